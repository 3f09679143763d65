"""Correctness of the fast paths at real sizes against the dense reference, judged relative to the
same-dtype dense error: `err(impl) <= 2 * err(dense, same dtype) + TOL[dtype]`, with
`err(x) = ||x - ref|| / ||ref||` and `ref` the dense op in fp32 on the same (upcast) inputs, TF32 off.

Checked per shape: the per-token log-probs, dL/dhidden and dL/dweight for a random upstream gradient
(5% of the targets ignored), and the RPO loss through `fused_linear_rpo_loss` with a reference head.
On a GPU the path under test is impl="triton"; `python -m bench.run --suite tiny` checks impl="torch" on
CPU the same way (the tests run the Triton interpreter elsewhere).
"""
from __future__ import annotations

import gc
import json
from typing import Callable

import torch

from rpo_fast import dense_linear_logprobs, fused_linear_rpo_loss, linear_logprobs

from .shapes import PRESETS, Shape

TOL = {torch.bfloat16: 5e-3, torch.float16: 1e-3, torch.float32: 1e-5}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def _grads(fn: Callable, hidden: torch.Tensor, weight: torch.Tensor, upstream: torch.Tensor):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    lp = fn(h, w)
    (lp.float() * upstream).sum().backward()
    return lp.detach().float(), h.grad.float(), w.grad.float()


def check_shape(label: str, shape: Shape, dtype: torch.dtype, device: torch.device, impl: str, *,
                bias: bool = False, seed: int = 0) -> list[dict]:
    """Returns rows: rel_err of impl and of same-dtype dense per quantity, and pass (1/0) per quantity."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n, h, v, pairs = shape
    randn = lambda *size: torch.randn(*size, generator=gen, device=device)  # noqa: E731
    hidden = randn(n, h).to(dtype)
    weight = (randn(v, h) * h ** -0.5).to(dtype)
    b = (randn(v) * 0.1).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    targets[torch.rand(n, generator=gen, device=device) < 0.05] = -100
    upstream = randn(n)

    def op(kind):
        def fn(hh, ww):
            if kind == "ref":
                return dense_linear_logprobs(hh.float(), ww.float(), targets, None if b is None else b.float())
            if kind == "dense":
                return dense_linear_logprobs(hh, ww, targets, b)
            return linear_logprobs(hh, ww, targets, b, impl=impl)
        return fn

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = _grads(op("ref"), hidden, weight, upstream)
        gc.collect()
        dense = _grads(op("dense"), hidden, weight, upstream)
        gc.collect()
        ours = _grads(op("ours"), hidden, weight, upstream)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    rows = []
    config = dict(N=n, H=h, V=v, dtype=str(dtype).replace("torch.", ""), bias=bias, label=label, impl=impl,
                  tol=TOL[dtype])
    for i, qty in enumerate(("logprobs", "dhidden", "dweight")):
        e_ours, e_dense = rel_err(ours[i], ref[i]), rel_err(dense[i], ref[i])
        ok = e_ours <= 2 * e_dense + TOL[dtype]
        rows += [_row(f"ours_{impl}", f"rel_err_{qty}", e_ours, label, config),
                 _row("dense", f"rel_err_{qty}", e_dense, label, config),
                 _row(f"ours_{impl}", f"pass_{qty}", float(ok), label, config)]
    del ref, dense, ours
    gc.collect()

    # The whole loss with a reference head: ours vs dense fp32 on the same inputs.
    lengths = torch.full((2 * pairs,), n // (2 * pairs))
    lengths[-1] += n - int(lengths.sum())
    cu = torch.zeros(2 * pairs + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    cu = cu.to(device)
    ref_hidden = hidden.roll(1, 0)
    kw = dict(beta=0.1, alpha=1.0, sft_norm="token_mean")
    with torch.no_grad():
        loss_ref = fused_linear_rpo_loss(hidden.float(), weight.float(), targets, cu, bias=None if b is None else b.float(),
                                         ref_hidden=ref_hidden.float(), ref_weight=weight.float(),
                                         ref_bias=None if b is None else b.float(), impl="dense", **kw).loss
        loss_ours = fused_linear_rpo_loss(hidden, weight, targets, cu, bias=b, ref_hidden=ref_hidden, ref_weight=weight,
                                          ref_bias=b, impl=impl, **kw).loss
        loss_dense = fused_linear_rpo_loss(hidden, weight, targets, cu, bias=b, ref_hidden=ref_hidden,
                                           ref_weight=weight, ref_bias=b, impl="dense", **kw).loss
    e_ours, e_dense = rel_err(loss_ours, loss_ref), rel_err(loss_dense, loss_ref)
    rows += [_row(f"ours_{impl}", "rel_err_loss", e_ours, label, config),
             _row("dense", "rel_err_loss", e_dense, label, config),
             _row(f"ours_{impl}", "pass_loss", float(e_ours <= 2 * e_dense + TOL[dtype]), label, config)]
    return rows


def _row(provider, metric, value, label, config) -> dict:
    return dict(op="correctness", provider=provider, mode="full", metric=metric, unit="1", x_name="shape",
                x_value=label, p50=value, p20=value, p80=value, config=json.dumps(config))


def gpu_checks() -> list[tuple[str, Shape, bool]]:
    """Real H and V: Llama-3-8B at its full N, the others at N=4096, plus an irregular N with a bias."""
    checks = [("llama-3-8b", PRESETS["llama-3-8b"], False)]
    checks += [(name, shape._replace(n=4096), False) for name, shape in PRESETS.items() if name != "llama-3-8b"]
    checks.append(("llama-3-8b-irregular+bias", Shape(3001, 4096, 128256), True))
    return checks


def cpu_checks() -> list[tuple[str, Shape, bool]]:
    return [("cpu-small", Shape(512, 256, 32000), False), ("cpu-irregular+bias", Shape(301, 96, 5003), True)]


def run_checks(device: torch.device, dtype: torch.dtype, impl: str, checks, emit: Callable[[dict], None],
               log: Callable[[str], None] = print, deadline: float | None = None) -> bool:
    """Runs every check, emits rows, logs one line per shape; True when all passed."""
    import time

    all_ok = True
    for label, shape, bias in checks:
        if deadline is not None and time.monotonic() > deadline:
            log(f"  time budget spent: skipping correctness {label}")
            continue
        try:
            rows = check_shape(label, shape, dtype, device, impl, bias=bias)
        except Exception as exc:
            log(f"  correctness {label}: failed to run ({type(exc).__name__}: {str(exc)[:200]})")
            emit(_row(f"ours_{impl}", "pass_run", 0.0, label, dict(N=shape.n, H=shape.h, V=shape.v,
                                                                   error=str(exc)[:200])))
            all_ok = False
            continue
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for r in rows:
            emit(r)
        errs = {r["metric"][8:]: r["p50"] for r in rows if r["provider"] != "dense" and r["metric"].startswith("rel_err")}
        dense = {r["metric"][8:]: r["p50"] for r in rows if r["provider"] == "dense"}
        ok = all(r["p50"] == 1.0 for r in rows if r["metric"].startswith("pass"))
        all_ok &= ok
        log(f"  {'PASS' if ok else 'FAIL'} {label} N={shape.n} H={shape.h} V={shape.v}: " + "  ".join(
            f"{k} {errs[k]:.1e} (dense {dense[k]:.1e})" for k in errs))
    return all_ok
