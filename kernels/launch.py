"""Launch configuration shared by the kernel launchers: block sizes, interpreter switches, occupancy, device."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language.standard


class TileConfig(NamedTuple):
    """Block sizes and launch meta-parameters of one kernel launch."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int = 8
    num_stages: int = 3
    group_n: int = 8  # backward only: token blocks that share a weight tile in L2


# Hopper/Ampere choices, keyed by (backward, fp32 inputs). 128x128 logit tiles with BLOCK_H=32 keep
# wgmma busy and fit in registers. Registers per thread at 8 warps, as launched (contiguous inputs, sizes
# divisible by 16; `python -m rpo_fast.aot`, Triton 3.7.1), 0 spills everywhere:
#   sm_90: fwd 169-170 (bf16/fp16), 110 (fp32); bwd 138 (bf16/fp16), 204 (bf16 + bias), 241 (fp16 + bias),
#          240 (bf16, dhidden only: a frozen head), 130 (bf16 + bias without dbias), 124 (fp32)
#   sm_80: fwd 223, 128 (fp32); bwd 214 (bf16/fp16), 255 (bf16/fp16 + bias, with or without dbias: at the
#          limit), 204 (dhidden only), 128 (fp32)
# Broader tiles or BLOCK_H=64 spilled when these were chosen. tests/test_aot_compile.py checks the SASS.
GPU_CONFIGS = {
    (False, False): TileConfig(block_n=128, block_v=128, block_h=32, num_warps=8, num_stages=3),
    (True, False): TileConfig(block_n=128, block_v=128, block_h=32, num_warps=8, num_stages=3),
    # fp32 inputs run 3xTF32 products, which hold three operand splits in registers: smaller tiles.
    (False, True): TileConfig(block_n=64, block_v=64, block_h=16, num_warps=8, num_stages=3),
    (True, True): TileConfig(block_n=32, block_v=64, block_h=16, num_warps=8, num_stages=3),
}
# The interpreter's cost grows with the number of tiles, not their size.
INTERPRETER = TileConfig(block_n=64, block_v=128, block_h=64, num_warps=1, num_stages=1)


class RowConfig(NamedTuple):
    """Launch meta-parameters of the row kernels (`logit_grad.py`): one program per row of the logits
    sweeps the vocabulary in BLOCK_V tiles."""

    block_v: int
    num_warps: int


# 4096 fp32 per tile at 8 warps: 16 per thread, four 16-byte loads in flight per thread.
GPU_ROW_CONFIG = RowConfig(block_v=4096, num_warps=8)
INTERPRETER_ROW_CONFIG = RowConfig(block_v=2048, num_warps=1)


def default_row_config(logits: torch.Tensor) -> RowConfig:
    """`INTERPRETER_ROW_CONFIG` for CPU tensors (the interpreter), else `GPU_ROW_CONFIG`."""
    return INTERPRETER_ROW_CONFIG if logits.device.type == "cpu" else GPU_ROW_CONFIG


def interpret_switch() -> bool:
    """TRITON_INTERPRET as Triton reads it: `triton.knobs.runtime.interpret` (Triton >= 3.4), or before `knobs`
    existed the variable equal to "1" (what Triton 3.2/3.3's `triton.jit` checks)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# `@triton.jit` builds each kernel once, when its module is imported, as an interpreted or a compiled function,
# from TRITON_INTERPRET as it is then; `rpo_fast.kernels` imports this module first, so this is the kernels'
# state. Setting the variable later cannot turn the interpreter on.
_BUILT_INTERPRETED = interpret_switch()


def library_interpreted() -> bool:
    """Whether Triton's own `@triton.jit` library (tl.max, tl.sum, ...) was built for the interpreter: at
    Triton's import, from TRITON_INTERPRET as it was then."""
    return type(triton.language.standard.max).__name__ == "InterpretedFunction"


if _BUILT_INTERPRETED and not library_interpreted():
    # Interpreted kernels calling compiled-mode library functions fail at their first launch with Triton's
    # "Cannot call @triton.jit'd outside of the scope of a kernel"; say why here instead.
    raise RuntimeError(
        "TRITON_INTERPRET=1 was set after triton was imported (triton builds its own library when imported, "
        "here without the interpreter; torch.compile, torch._dynamo and liger-kernel import it): set "
        "TRITON_INTERPRET=1 before Python imports triton, e.g. in the environment of the process")


def interpreting() -> bool:
    """True when the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 was set when triton and the
    kernels were first imported (see `_BUILT_INTERPRETED`; `import rpo_fast` imports neither, the first
    impl="triton" call does) and has not been unset since (tests unset it to stand for a CPU machine without
    the interpreter)."""
    return _BUILT_INTERPRETED and interpret_switch()


def on_device(tensor: torch.Tensor):
    """Context for a kernel launch on `tensor`'s device: Triton launches on the *current* CUDA device and its
    stream, so a head on cuda:1 while cuda:0 is current (device_map="auto") would read cuda:1 memory from a
    cuda:0 kernel. A no-op for CPU tensors (the interpreter) and meta tensors (`rpo_fast.aot`)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def kernel_flags(hidden: torch.Tensor) -> dict:
    """Constexpr flags that depend on the device and dtype rather than on the shapes.

    The interpreter mishandles bf16 products, so loaded tiles are upcast there (`UPCAST`); on a GPU the
    operands stay bf16/fp16 for tensor cores. fp32 inputs use IEEE products (as torch's matmul does by
    default) in the interpreter and 3xTF32 on a GPU (fp32-level accuracy on tensor cores).
    """
    upcast = hidden.device.type == "cpu"
    return {"UPCAST": upcast, "DOT_PRECISION": dot_precision(hidden.dtype, upcast)}


def dot_precision(dtype: torch.dtype, interpreted: bool) -> str:
    """`tl.dot`'s input_precision: "ieee" when interpreted; on a GPU "tf32x3" for fp32, else "tf32" (which
    bf16/fp16 operands ignore)."""
    if interpreted:
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"  # ignored for bf16/fp16 operands


def grad_filter_eps(dtype: torch.dtype) -> float | None:
    """The backward's gradient-filter threshold from `RPO_FAST_GRAD_FILTER`: unset/"0"/"off" = exact
    (default), "auto" = Cut Cross-Entropy's choice finfo(dtype).eps / 32 for bf16/fp16 (off for fp32),
    or a number."""
    value = os.environ.get("RPO_FAST_GRAD_FILTER", "").strip().lower()
    if value in ("", "0", "off", "none"):
        return None
    if value == "auto":
        return torch.finfo(dtype).eps / 32 if dtype in (torch.bfloat16, torch.float16) else None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"RPO_FAST_GRAD_FILTER: expected 'auto', 'off' or a number, got {value!r}") from None


def default_config(hidden: torch.Tensor, backward: bool) -> TileConfig:
    """`INTERPRETER` for CPU tensors; else `GPU_CONFIGS[backward, fp32 inputs]` (bf16/fp16 share a config)."""
    if hidden.device.type == "cpu":
        return INTERPRETER
    return GPU_CONFIGS[backward, hidden.dtype == torch.float32]


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_programs_wanted(device: torch.device) -> int:
    """Programs that fill the device about twice over (one on the interpreter: tiles run serially)."""
    if device.type != "cuda":
        return 1
    return 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def check_runnable(tensor: torch.Tensor, name: str = "hidden", choice: str = "impl='triton'") -> None:
    """Raises ValueError when Triton cannot run on `tensor`'s device: a CPU tensor without the interpreter.

    `choice` is the caller's option that launches the kernels (`impl='triton'`, `backward='atomic'`); the
    message names it and its CPU alternative.
    """
    if tensor.device.type == "cpu" and not interpreting():
        option = choice.split("=")[0]
        raise ValueError(
            f"{choice} needs CUDA tensors or the Triton interpreter: expected {name} on a CUDA device "
            f"or TRITON_INTERPRET=1 set before rpo_fast is imported (Triton builds the kernels at import), "
            f"got a tensor on {tensor.device} without the interpreter (use {option}='auto' on CPU)"
        )


_HEAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TARGET_DTYPES = (torch.int64, torch.int32)


def head_operands(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor):
    """The head kernels' operands, checked and made contiguous: hidden [N, H] float32/float16/bfloat16, weight
    [V >= 1, H] and bias [V] or None of hidden's dtype and device, targets [N] int32/int64 on that device.
    Mixed dtypes would compile to no GPU kernel (tl.dot of bf16 and fp16) or silently mix precisions in the
    interpreter.

    The targets' values are the caller's job (the public API checks them, `checks.check_op_targets`): an
    entry outside [0, V) that is not ignore_index reads nothing out of bounds (it matches no column) but
    gets a meaningless log-prob (-inf or -logsumexp) and gradient.

    Contiguous because the kernels keep in-tile offsets int32 (`tiles.py`): a strided view with
    stride(0) >= 2**31 / BLOCK_N would overflow them; and because the JIT turns a unit inner stride into
    `constexpr 1`, which is what lets the loads become 16-byte vectors. The copy of a strided view is an
    O(N*H) pass beside the kernels' O(N*V*H) work.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden and weight: expected [N, H] and [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight: expected a vocabulary of at least one row [V >= 1, H], got {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets: expected shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if hidden.dtype not in _HEAD_DTYPES:
        raise ValueError(f"hidden: expected dtype float32, float16 or bfloat16, got {hidden.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != hidden.dtype or t.device != hidden.device):
            raise ValueError(f"{name}: expected {hidden.dtype} on {hidden.device} (as hidden), got {t.dtype} "
                             f"on {t.device}")
    if targets.dtype not in _TARGET_DTYPES or targets.device != hidden.device:
        raise ValueError(f"targets: expected int64 or int32 on {hidden.device}, got {targets.dtype} on "
                         f"{targets.device}")
    return tuple(None if t is None else t.contiguous() for t in (hidden, weight, bias, targets))
