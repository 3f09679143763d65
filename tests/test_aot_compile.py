"""Every Triton kernel compiles for sm_90 and sm_80 on this CPU-only machine, stays on tensor cores
(wgmma on sm_90 for bf16/fp16/fp32 via 3xTF32; mma on sm_80) and does not spill registers (ptxas -v).

Compilation runs in a subprocess without TRITON_INTERPRET: the interpreter replaces @triton.jit
functions at import time."""
import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module", params=[90, 80], ids=["sm90", "sm80"])
def reports(request):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "rpo_fast.aot", str(request.param)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return request.param, [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_all_kernels_compile_without_spills_on_tensor_cores(reports):
    arch, rows = reports
    kernels = ("fwd", "bwd", "bwd_filtered")
    assert {(r["kernel"], r["dtype"]) for r in rows} == {(k, d) for k in kernels for d in ("bf16", "fp16", "fp32")}
    for r in rows:
        what = f"{r['kernel']} {r['dtype']} sm_{arch}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{what} spills: {r}"
        assert r["has_mma"], f"{what} does not use tensor cores"
        if arch == 90:
            assert r["has_wgmma"], f"{what}: no wgmma.mma_async in the sm_90 PTX"
        assert 0 < r["registers"] <= 255
