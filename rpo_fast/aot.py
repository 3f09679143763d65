"""Compile the Triton kernels as they launch, for a GPU target on a machine without a GPU, and read the SASS.

CPU-only CI proves the GPU path builds and what it builds to. Each kernel is compiled with the exact
specialization the JIT would use at launch: the real launcher runs on `meta` tensors of sizes divisible
by 16 (no data, no device) and its kernel call is recorded instead of launched; the JIT's own binder
then turns the recorded arguments into the signature, constexprs and attributes (`tt.divisibility=16`
on aligned pointers and sizes, unit strides as `constexpr 1`) for the target, so this cannot drift from
the launchers. `triton.compile` returns the cubin; Triton's bundled `cuobjdump` gives the registers,
the stack and local memory (spills go to the stack) and the SASS, in which we count what matters on a GPU:

- tensor-core instructions (HGMMA = wgmma on sm_90, HMMA = mma.sync on sm_80);
- 16-byte loads (LDGSTS.128 = cp.async, LDG.E.128), narrower cp.async and sub-word loads;
- global atomics/reductions, and `MEMBAR.*.GPU` fences (an acq_rel atomic is fenced GPU-wide).

Run as `python -m rpo_fast.aot [90 80]` (it must run without `TRITON_INTERPRET`, which replaces
`@triton.jit` functions by interpreted ones at import time). Prints one JSON report per kernel variant.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Launch sizes: multiples of 16, which the JIT marks divisible by 16 (tt.divisibility); Mistral-like H and V.
N, H, V = 1024, 4096, 32000
# (name, dtype, bias) of the head kernels, per arch. fp16 lowers like bf16 but not to the same registers.
HEAD_VARIANTS = [
    ("fwd", "bf16", False), ("fwd", "bf16", True), ("fwd", "fp16", False), ("fwd", "fp16", True), ("fwd", "fp32", True),
    ("bwd", "bf16", False), ("bwd", "bf16", True), ("bwd", "fp16", False), ("bwd", "fp16", True), ("bwd", "fp32", True),
    ("bwd_filtered", "bf16", True), ("bwd_filtered", "fp32", True),
    ("bwd_dh", "bf16", False), ("bwd_dh_dw", "bf16", True),
]
# The backward variants: which of (dhidden, dweight, dbias) the launch asks for (COMPUTE_DH/DW/DB) and its
# gradient-filter threshold (FILTER_GRAD when > 0).
BACKWARDS = {
    "bwd": ((True, True, True), 0.0),
    "bwd_filtered": ((True, True, True), 1e-3),
    "bwd_dh": ((True, False, False), 0.0),  # a frozen head (LoRA, or a tied embedding left out): dhidden only
    "bwd_dh_dw": ((True, True, False), 0.0),  # a frozen bias
}
# (name, output dtype) of the row kernels over a chunk's fp32 logits.
ROW_VARIANTS = [("row_logprobs", "fp32"), ("logit_grad", "fp32"), ("logit_grad", "bf16"), ("logit_grad", "fp16")]


@dataclasses.dataclass
class CompileReport:
    """What the cubin of one kernel variant compiled for sm_`arch` holds: registers, local memory and SASS
    instruction counts. `dtype` is the inputs' dtype (head kernels) or the output's (row kernels)."""

    kernel: str
    dtype: str
    bias: bool
    arch: int
    registers: int
    stack_bytes: int  # per-thread stack frame (cuobjdump's STACK): where ptxas puts register spills
    local_bytes: int  # other per-thread local memory (LOCAL: local arrays, which these kernels have none of)
    spill_instructions: int  # STL/LDL in the SASS
    tensor_core_ops: int  # HGMMA (sm_90 wgmma) or HMMA (mma.sync)
    has_wgmma: bool
    wide_loads: int  # LDGSTS.*.128 (cp.async 16 B) + LDG.E.128
    cp_async_8b: int  # LDGSTS.*.64: 8-byte cp.async (fp32 tiles too small to give each thread 16 B)
    scalar_cp_async: int  # LDGSTS of 4 bytes or less: one element per copy
    subword_loads: int  # LDG of 1 or 2 bytes (an unvectorized bf16/fp16 operand)
    wide_stores: int  # STG.E.128
    atomics: dict  # opcode (with modifiers) -> count in the SASS
    gpu_fences: int  # MEMBAR.*.GPU
    l1_invalidates: int  # CCTL.IVALL


@dataclasses.dataclass
class Launch:
    """One recorded kernel call: the JITFunction, its positional and keyword arguments."""

    kernel: object
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recorded_launches(*kernels):
    """Within the block, `kernel[grid](...)` records a `Launch` instead of running (it needs no device)."""
    launches: list[Launch] = []
    for kernel in kernels:
        kernel.run = lambda *args, grid, warmup, _k=kernel, **kwargs: launches.append(Launch(_k, args, kwargs))
    try:
        yield launches
    finally:
        for kernel in kernels:
            del kernel.run


def _record(launcher: Callable[[], object], *kernels) -> Launch:
    with recorded_launches(*kernels) as launches:
        launcher()
    assert len(launches) == 1, f"expected one launch, got {len(launches)}"
    return launches[0]


def head_launch(kernel: str, dtype: str, bias: bool) -> Launch:
    """The launch of the forward (`fwd`) or a `BACKWARDS` head kernel that the real launcher makes for
    contiguous CUDA-like inputs (meta tensors: aligned, not CPU, so no interpreter flags)."""
    from rpo_fast.kernels import linear_logprobs_bwd, linear_logprobs_fwd
    from rpo_fast.kernels.linear_logprobs_bwd import _linear_logprobs_bwd_kernel
    from rpo_fast.kernels.linear_logprobs_fwd import _linear_logprobs_fwd_kernel

    meta = dict(device="meta")
    dt = _DTYPES[dtype]
    hidden, weight = torch.empty(N, H, dtype=dt, **meta), torch.empty(V, H, dtype=dt, **meta)
    b = torch.empty(V, dtype=dt, **meta) if bias else None
    targets = torch.empty(N, dtype=torch.int64, **meta)
    if kernel == "fwd":
        return _record(lambda: linear_logprobs_fwd(hidden, weight, b, targets), _linear_logprobs_fwd_kernel)
    lse, g = torch.empty(N, **meta), torch.empty(N, **meta)
    needs_grad, filter_eps = BACKWARDS[kernel]
    return _record(lambda: linear_logprobs_bwd(hidden, weight, b, targets, lse, g, needs_grad=needs_grad,
                                               filter_eps=filter_eps), _linear_logprobs_bwd_kernel)


def row_launch(kernel: str, out_dtype: str) -> Launch:
    """The launch of `row_logprobs` or `logit_grad_` over [N, V] fp32 logits."""
    from rpo_fast.kernels import logit_grad_, row_logprobs
    from rpo_fast.kernels.logit_grad import _logit_grad_kernel, _row_logprobs_kernel

    logits = torch.empty(N, V, device="meta")
    targets = torch.empty(N, dtype=torch.int64, device="meta")
    if kernel == "row_logprobs":
        return _record(lambda: row_logprobs(logits, targets), _row_logprobs_kernel)
    lse, g = torch.empty(N, device="meta"), torch.empty(N, device="meta")
    return _record(lambda: logit_grad_(logits, targets, lse, g, _DTYPES[out_dtype]), _logit_grad_kernel)


def compile_launch(launch: Launch, arch: int):
    """`triton.compile` of a recorded launch for sm_`arch`, specialized as `JITFunction.run` would."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, kwargs = launch.kernel, dict(launch.kwargs)
    if not hasattr(fn, "_pack_args"):  # JITFunction's internals, which this mirrors, as of Triton 3.6
        raise RuntimeError(f"rpo_fast.aot needs Triton >= 3.6 (it specializes as JITFunction.run does), got "
                           f"Triton {triton.__version__}; the kernels themselves run on Triton >= 3.2")
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, flag, path], capture_output=True, text=True, check=True).stdout


def sass_opcodes(sass: str) -> list[str]:
    """The opcode with its modifiers of every SASS instruction (predicates dropped), in order."""
    ops = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Za-z0-9_.]*)", sass, re.M)
    return ops


def resource_usage(usage: str) -> dict:
    """registers, stack_bytes and local_bytes from `cuobjdump -res-usage` of a one-kernel cubin, e.g.
    `REG:255 STACK:24 SHARED:0 LOCAL:0 ...`: a spill shows in STACK, not LOCAL."""
    found = {key: re.search(rf"\b{field}:(\d+)", usage)
             for key, field in (("registers", "REG"), ("stack_bytes", "STACK"), ("local_bytes", "LOCAL"))}
    if None in found.values():
        raise RuntimeError(f"could not parse cuobjdump -res-usage output:\n{usage}")
    return {key: int(m.group(1)) for key, m in found.items()}


def report(kernel: str, dtype: str, bias: bool, arch: int, cubin: bytes) -> CompileReport:
    usage = resource_usage(_cuobjdump(cubin, "-res-usage"))
    ops = sass_opcodes(_cuobjdump(cubin, "-sass"))
    if not ops:
        raise RuntimeError("no SASS instructions found in the cuobjdump output")
    count = lambda pattern: sum(1 for op in ops if re.fullmatch(pattern, op))  # noqa: E731
    return CompileReport(
        kernel=kernel, dtype=dtype, bias=bias, arch=arch, **usage, spill_instructions=count(r"(STL|LDL)(\..*)?"),
        tensor_core_ops=count(r"(HGMMA|HMMA)\..*"), has_wgmma=count(r"HGMMA\..*") > 0,
        wide_loads=count(r"LDGSTS\..*\.128(\..*)?|LDG\..*\.128(\..*)?"),
        cp_async_8b=count(r"LDGSTS\..*\.64(\..*)?"), scalar_cp_async=count(r"LDGSTS(?!.*\.(128|64)).*"),
        subword_loads=count(r"LDG\..*\.(U8|S8|U16|S16)(\..*)?"),
        wide_stores=count(r"STG\..*\.128(\..*)?"),
        atomics=dict(collections.Counter(op for op in ops if re.match(r"(ATOMG|ATOM|RED|REDG)\.", op))),
        gpu_fences=count(r"MEMBAR\..*GPU.*"), l1_invalidates=count(r"CCTL\.IVALL.*"),
    )


def compile_all(archs: list[int]) -> list[CompileReport]:
    """The reports of every `HEAD_VARIANTS` and `ROW_VARIANTS` launch compiled for each sm_`arch` in `archs`."""
    reports = []
    for arch in archs:
        for kernel, dtype, bias in HEAD_VARIANTS:
            compiled = compile_launch(head_launch(kernel, dtype, bias), arch)
            reports.append(report(kernel, dtype, bias, arch, compiled.asm["cubin"]))
        for kernel, out_dtype in ROW_VARIANTS:
            compiled = compile_launch(row_launch(kernel, out_dtype), arch)
            reports.append(report(kernel, out_dtype, False, arch, compiled.asm["cubin"]))
    return reports


def main(argv: list[str]) -> int:
    """Command line: compiles for the archs in `argv` (default 90 80) and prints one JSON `CompileReport` per
    variant; returns 0. Raises RuntimeError under `TRITON_INTERPRET`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rpo_fast.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("archs", nargs="*", type=int, default=[90, 80], metavar="ARCH",
                        help="compute capabilities to compile for, e.g. 90 (Hopper) 80 (Ampere); default: 90 80")
    archs = parser.parse_args(argv).archs
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("rpo_fast.aot must run without TRITON_INTERPRET (see module docstring)")
    for r in compile_all(archs):
        print(json.dumps(dataclasses.asdict(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
