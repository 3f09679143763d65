"""Compile the Triton kernels for a GPU target on a machine without a GPU, and report on the result.

This is how CPU-only CI proves the GPU path builds: `triton.compile` with a `GPUTarget` returns PTX and
cubin, and Triton's bundled `ptxas -v` reports registers and spill bytes. A bf16 `tl.dot` on sm_90 must
lower to `wgmma.mma_async` (Hopper tensor cores).

Run as `python -m rpo_fast.aot` (it must run without `TRITON_INTERPRET`, which replaces `@triton.jit`
functions by interpreted ones at import time).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

_DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


@dataclasses.dataclass
class CompileReport:
    kernel: str
    dtype: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    has_wgmma: bool
    has_mma: bool  # any tensor-core instruction: wgmma (sm_90) or mma.sync (sm_80)


def _signature(kernel: str, dtype: str, bias: bool, grad_filter: bool, cfg=None) -> tuple[dict, dict, object]:
    """Argument types and constexprs for one kernel; mirrors the launchers in `rpo_fast.kernels`."""
    import torch

    from rpo_fast.kernels.launch import GPU_CONFIGS, dot_precision

    ptr = f"*{_DTYPES[dtype]}"
    bias_t = ptr if bias else "constexpr"
    cfg = cfg or GPU_CONFIGS[kernel == "bwd", dtype == "fp32"]
    flags = {
        "HAS_BIAS": bias, "EVEN_H": True, "UPCAST": False,
        "DOT_PRECISION": dot_precision(torch.float32 if dtype == "fp32" else torch.bfloat16, False),
        "BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_H": cfg.block_h,
    }
    strides = {"stride_hn": "i64", "stride_hh": "i64", "stride_wv": "i64", "stride_wh": "i64"}
    if kernel == "fwd":
        sig = {"hidden_ptr": ptr, "weight_ptr": ptr, "bias_ptr": bias_t, "targets_ptr": "*i64",
               "lse_part_ptr": "*fp32", "tgt_part_ptr": "*fp32",
               "N": "i32", "V": "i32", "H": "i32", "tiles_per_split": "i32", **strides}
    else:
        sig = {"hidden_ptr": ptr, "weight_ptr": ptr, "bias_ptr": bias_t, "targets_ptr": "*i64",
               "lse_ptr": "*fp32", "grad_lp_ptr": "*fp32", "grad_hidden_ptr": "*fp32",
               "grad_weight_ptr": "*fp32", "grad_bias_ptr": "*fp32" if bias else "constexpr",
               "N": "i32", "V": "i32", "H": "i32", "ignore_index": "i32", "filter_eps": "fp32", **strides}
        flags.update(COMPUTE_DH=True, COMPUTE_DW=True, COMPUTE_DB=bias, FILTER_GRAD=grad_filter, GROUP_N=cfg.group_n)
    constexprs = dict(flags)
    if not bias:
        constexprs["bias_ptr"] = None
        if kernel == "bwd":
            constexprs["grad_bias_ptr"] = None
    sig.update({k: "constexpr" for k in constexprs})
    return sig, constexprs, cfg


def compile_kernel(kernel: str, dtype: str, arch: int, bias: bool = True, grad_filter: bool = False,
                   config=None) -> CompileReport:
    """Compile `kernel` ("fwd" or "bwd") for `dtype` and sm_`arch`; parse `ptxas -v` for spills.
    `grad_filter` compiles the backward's gradient-filtering variant."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_kernel must run without TRITON_INTERPRET (see module docstring)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rpo_fast.kernels.linear_logprobs_bwd import _linear_logprobs_bwd_kernel
    from rpo_fast.kernels.linear_logprobs_fwd import _linear_logprobs_fwd_kernel

    fn = _linear_logprobs_fwd_kernel if kernel == "fwd" else _linear_logprobs_bwd_kernel
    sig, constexprs, cfg = _signature(kernel, dtype, bias, grad_filter, config)
    compiled = triton.compile(
        ASTSource(fn, sig, constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )
    ptx = compiled.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    arch_name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name={arch_name}", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"could not parse ptxas output:\n{log}")
    return CompileReport(
        kernel=kernel + ("_filtered" if grad_filter else ""), dtype=dtype, arch=arch, registers=int(regs.group(1)),
        spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
        has_wgmma="wgmma.mma_async" in ptx, has_mma="wgmma.mma_async" in ptx or "mma.sync" in ptx,
    )


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rpo_fast.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("archs", nargs="*", type=int, default=[90, 80], metavar="ARCH",
                        help="compute capabilities to compile for, e.g. 90 (Hopper) 80 (Ampere); default: 90 80")
    archs = parser.parse_args(argv).archs
    variants = [("fwd", False, False), ("fwd", True, False), ("bwd", False, False), ("bwd", True, False),
                ("bwd", True, True)]  # (kernel, bias, grad_filter)
    reports = [
        dataclasses.asdict(compile_kernel(k, d, a, bias, grad_filter))
        for a in archs for k, bias, grad_filter in variants for d in ("bf16", "fp16", "fp32")
    ]
    for r in reports:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
