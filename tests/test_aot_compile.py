"""Every Triton kernel, compiled as its launcher really launches it (the JIT's own specialization for
contiguous inputs with sizes divisible by 16, see rpo_fast.aot) for sm_90 and sm_80 on this CPU-only
machine, is checked on its SASS: no spills; the head GEMMs on tensor cores (wgmma on sm_90); 16-byte
loads and no element-by-element ones; unfenced atomics (no `MEMBAR.*.GPU`, no L1 invalidate), which the
acq_rel default of `tl.atomic_add` would put around every atomic of the backward.

Compilation runs in a subprocess without TRITON_INTERPRET: the interpreter replaces @triton.jit
functions at import time."""
import json
import os
import subprocess
import sys

import pytest
from triton.runtime.jit import JITFunction

from rpo_fast.aot import BACKWARDS, HEAD_VARIANTS, ROW_VARIANTS, head_launch, resource_usage

if not hasattr(JITFunction, "_pack_args"):  # CI pins Triton 3.7.1; rpo_fast.aot mirrors 3.6+'s internals
    pytest.skip("rpo_fast.aot needs Triton >= 3.6", allow_module_level=True)

ARCHS = (90, 80)


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "rpo_fast.aot", *map(str, ARCHS)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def name(r):
    return f"{r['kernel']} {r['dtype']}{' bias' if r['bias'] else ''} sm_{r['arch']}"


# Launches that training makes and that lower differently from their neighbours: the frozen-head backward
# (LoRA: dhidden only, 240 registers on sm_90 against 138 with dweight), a bias without dbias, fp16 without
# bias, and logit_grad_ into fp16 for the fp16 gradient GEMMs.
MUST_COMPILE = {("bwd_dh", "bf16", False), ("bwd_dh_dw", "bf16", True), ("fwd", "fp16", False),
                ("bwd", "fp16", False), ("logit_grad", "fp16", False)}


def test_every_kernel_variant_was_compiled(reports):
    expected = {(k, d, b, a) for a in ARCHS for k, d, b in HEAD_VARIANTS}
    expected |= {(k, d, False, a) for a in ARCHS for k, d in ROW_VARIANTS}
    compiled = {(r["kernel"], r["dtype"], r["bias"], r["arch"]) for r in reports}
    assert compiled == expected
    assert {(k, d, b, a) for a in ARCHS for k, d, b in MUST_COMPILE} <= compiled


@pytest.mark.parametrize("kernel", list(BACKWARDS))
def test_backward_variants_launch_the_gradients_they_name(kernel):
    """Each backward variant is the launch the real launcher makes for its gradient subset (recorded on meta
    tensors, nothing compiled): COMPUTE_DH/DW/DB as its `BACKWARDS` entry asks (DB only with a bias)."""
    (dh, dw, db), filter_eps = BACKWARDS[kernel]
    for bias in (False, True):
        kwargs = head_launch(kernel, "bf16", bias).kwargs
        assert (kwargs["COMPUTE_DH"], kwargs["COMPUTE_DW"], kwargs["COMPUTE_DB"]) == (dh, dw, db and bias)
        assert kwargs["FILTER_GRAD"] == (filter_eps > 0) and kwargs["HAS_BIAS"] == bias


def test_no_spills(reports):
    for r in reports:
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0 and r["spill_instructions"] == 0, \
            f"{name(r)} spills: {r}"
        assert 0 < r["registers"] <= 255, name(r)


# `cuobjdump -res-usage` of the bf16 forward with H = 2056 (not a multiple of BLOCK_H) for sm_80, which spills:
# the spill is in STACK, LOCAL stays 0 (Triton 3.7.1).
SPILLING_USAGE = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function _linear_logprobs_fwd_kernel:
  REG:255 STACK:24 SHARED:0 LOCAL:0 CONSTANT[0]:432 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_resource_usage_reads_spills_from_the_stack():
    assert resource_usage(SPILLING_USAGE) == {"registers": 255, "stack_bytes": 24, "local_bytes": 0}


def test_head_gemms_run_on_tensor_cores(reports):
    for r in reports:
        if r["kernel"] in ("row_logprobs", "logit_grad"):
            assert r["tensor_core_ops"] == 0, name(r)
            continue
        assert r["tensor_core_ops"] > 0, f"{name(r)} does not use tensor cores"
        if r["arch"] == 90:
            assert r["has_wgmma"], f"{name(r)}: no HGMMA (wgmma) in the sm_90 SASS"


def test_loads_are_vectorized(reports):
    for r in reports:
        assert r["wide_loads"] > 0, f"{name(r)}: no 16-byte load (cp.async or LDG.E.128): {r}"
        assert r["scalar_cp_async"] == 0, f"{name(r)}: cp.async of one element at a time: {r}"
        assert r["subword_loads"] == 0, f"{name(r)}: 1- or 2-byte global loads (unvectorized operands): {r}"
        if r["kernel"] == "logit_grad":
            assert r["wide_stores"] > 0, f"{name(r)}: no 16-byte stores: {r}"


def test_atomics_are_unfenced_reductions(reports):
    for r in reports:
        assert r["gpu_fences"] == 0, f"{name(r)}: {r['gpu_fences']} MEMBAR.*.GPU fences (acq_rel atomics?): {r}"
        assert r["l1_invalidates"] == 0, f"{name(r)}: {r['l1_invalidates']} CCTL.IVALL: {r}"
        if r["kernel"].startswith("bwd"):
            # RED/REDG: reductions that return nothing (ATOM/ATOMG would wait for the old value).
            assert r["atomics"] and all(op.startswith(("RED.", "REDG.")) for op in r["atomics"]), \
                f"{name(r)}: expected only fire-and-forget RED/REDG reductions, got {r['atomics']}"
        else:
            assert not r["atomics"], f"{name(r)}: unexpected atomics {r['atomics']}"


def test_an_older_triton_is_named_not_a_missing_attribute():
    """rpo_fast.aot mirrors JITFunction internals of Triton >= 3.6 (`_pack_args`); on an older Triton it says so
    instead of failing with an AttributeError deep inside."""
    from rpo_fast.aot import Launch, compile_launch

    with pytest.raises(RuntimeError, match=r"needs Triton >= 3.6 .* the kernels themselves run on Triton >= 3.2"):
        compile_launch(Launch(kernel=object(), args=(), kwargs={}), 90)
