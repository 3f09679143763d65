"""Correctness of the packed attention's kernels (`rpo_fast.attention`) on the device they run on.

The trainer's packed rows go through `varlen_attention_forward`: on CUDA flash-attn's varlen kernel when it
loads, else PyTorch's own varlen kernel, both in bf16; on the CPU sdpa per block. Each backend the device has
is run forward and backward on packed rows of random preference pairs, plain (two full sequences per pair)
and shared-prompt (each pair's prompt once, both responses attending to it), with and without a sliding
window, grouped-query heads, and judged against the CPU sdpa path in float64: output and q/k/v gradients,
relative error (Frobenius) within twice the CPU sdpa path's own bf16 error plus 1e-2.

The GPU suite runs this beside the head's correctness (`bench.run`), since the unit tests that exercise the
real CUDA kernels are skipped on CPU-only machines.
"""
from __future__ import annotations

import random
from typing import Callable

import torch

from rpo_fast import attention
from rpo_fast.data import PreferenceExample
from rpo_fast.packing import pack_pairs

from .correctness import rel_err, run_judged

OP = "attention_correctness"
HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64
WINDOWS = (None, 24)
TOL = 1e-2


def random_pairs(n: int, seed: int = 0) -> list[PreferenceExample]:
    rng = random.Random(seed)

    def ids(low, high):
        return [rng.randrange(10, 1000) for _ in range(rng.randint(low, high))]

    return [PreferenceExample(ids(5, 60), ids(3, 50), ids(3, 50), k) for k in range(n)]


def backends(device: torch.device) -> list[str]:
    """The attention backends `device` runs: the CUDA kernels that load here, else sdpa."""
    if device.type != "cuda":
        return ["sdpa"]
    found = [name for name, available in (("flash_attn", attention.flash_attn_available()),
                                          ("torch_varlen", attention.torch_varlen_available())) if available]
    return found or ["sdpa"]


def _attend(q, k, v, upstream, kwargs, backend: str):
    """(output, dq, dk, dv) of varlen_attention_forward through `backend` on leaves q, k, v [1, heads, L, D]."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    module = torch.nn.Module().eval()
    saved = attention.select_backend
    attention.select_backend = lambda device: backend
    try:
        out = attention.varlen_attention_forward(module, q, k, v, None, **kwargs)[0]
    finally:
        attention.select_backend = saved
    out.backward(upstream.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def check_layout(device: torch.device, backend: str, shared: bool, window: int | None, seed: int = 0) -> dict:
    """Relative errors of one backend on one packed layout: {quantity: (backend's, cpu sdpa bf16's)}."""
    batch = pack_pairs(random_pairs(6, seed), share_prompt=shared)
    gen = torch.Generator().manual_seed(seed)
    length = batch.num_tokens
    q = torch.randn(1, HEADS, length, HEAD_DIM, generator=gen, dtype=torch.float64)
    k = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen, dtype=torch.float64)
    v = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen, dtype=torch.float64)
    upstream = torch.randn(1, length, HEADS, HEAD_DIM, generator=gen, dtype=torch.float64)
    kwargs = dict(scaling=HEAD_DIM ** -0.5, sliding_window=window, **batch.attention_kwargs())
    exact = _attend(q, k, v, upstream, kwargs, "sdpa")  # on the CPU, float64
    cpu_bf16 = _attend(*(t.bfloat16() for t in (q, k, v)), upstream, kwargs, "sdpa")
    on_device = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in kwargs.items()}
    got = _attend(*(t.to(device, torch.bfloat16) for t in (q, k, v)), upstream.to(device), on_device, backend)
    names = ("out", "dq", "dk", "dv")
    return {name: (rel_err(g.cpu(), e), rel_err(c, e)) for name, g, c, e in zip(names, got, cpu_bf16, exact)}


def run(device: torch.device, emit: Callable[[dict], None], log: Callable[[str], None] = print) -> bool:
    """Every backend of `device` x {plain, shared prompt} x windows; emits correctness rows; True when all pass."""
    found: list[str] = []
    # The probe imports flash-attn, whose broken install can raise anything: that fails this check, not the run.
    if run_judged(OP, "backend probe", "cpu sdpa bf16", "cpu bf16", "attention backend probe", dict(device=str(device)),
                  lambda: found.extend(backends(device)), emit, log, TOL) is False:
        return False
    all_ok = True
    for backend in found:
        for shared in (False, True):
            for window in WINDOWS:
                label = f"attention {backend} {'shared-prompt' if shared else 'plain'} window={window}"
                config = dict(backend=backend, shared_prompt=shared, window=window, heads=HEADS, kv_heads=KV_HEADS,
                              head_dim=HEAD_DIM, dtype="bfloat16", judge="cpu sdpa float64")
                all_ok &= run_judged(OP, backend, "cpu sdpa bf16", "cpu bf16", label, config,
                                     lambda: check_layout(device, backend, shared, window), emit, log, TOL)
    return all_ok
