"""Correctness of the fast paths at real sizes, judged relative to the same-dtype dense error:
`err(path) <= 2 * err(dense, same dtype) + TOL[dtype]`, with `err(x) = ||x - ref|| / ||ref||` and `ref` the
dense op on the same (upcast) inputs in a higher precision than the one under test (float64 for fp32 inputs,
fp32 for bf16/fp16), TF32 off.

Checked per shape (5% of the targets ignored):
- `linear_logprobs` (the generic op, impl under test): the per-token log-probs, dL/dhidden and dL/dweight
  for a random upstream gradient;
- `fused_linear_rpo_loss` with a reference head, once per head backward ("fwdgrad", the default where a
  gradient is needed; "recompute"; "atomic" with the Triton kernels): the loss, dL/dhidden and dL/dweight.
On a GPU the impl under test is "triton"; `python -m bench.run --suite tiny` checks impl="torch" on CPU the
same way (the tests run the Triton interpreter elsewhere).
"""
from __future__ import annotations

import contextlib
import gc
import json
from typing import Callable

import torch

from rpo_fast import dense_linear_logprobs, fused_linear_rpo_loss, linear_logprobs, rpo_loss

from .shapes import PRESETS, Shape

TOL = {torch.bfloat16: 5e-3, torch.float16: 1e-3, torch.float32: 1e-5}
LOSS_OPTIONS = dict(beta=0.1, alpha=1.0, sft_norm="token_mean")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


@contextlib.contextmanager
def _tf32_off():
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _grads(fn: Callable, hidden: torch.Tensor, weight: torch.Tensor, upstream: torch.Tensor, dtype: torch.dtype):
    """(value, dL/dhidden, dL/dweight) of `L = sum(fn(h, w) * upstream)` on leaves in `dtype` (the reference's
    gradients are not rounded to the inputs' dtype)."""
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    lp = fn(h, w)
    (lp.to(upstream.dtype) * upstream).sum().backward()
    return lp.detach(), h.grad, w.grad


def check_shape(label: str, shape: Shape, dtype: torch.dtype, device: torch.device, impl: str, *,
                bias: bool = False, seed: int = 0) -> list[dict]:
    """Rows of `_judged` for `linear_logprobs` (provider `ours_<impl>`) and for the loss through each head
    backward (provider `ours_<backward>`)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n, h, v, pairs = shape
    randn = lambda *size: torch.randn(*size, generator=gen, device=device)  # noqa: E731
    hidden = randn(n, h).to(dtype)
    weight = (randn(v, h) * h ** -0.5).to(dtype)
    b = (randn(v) * 0.1).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    targets[torch.rand(n, generator=gen, device=device) < 0.05] = -100
    upstream = randn(n)

    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32

    def op(kind):
        def fn(hh, ww):
            if kind == "ref":
                return dense_linear_logprobs(hh, ww, targets, None if b is None else b.to(ref_dtype))
            if kind == "dense":
                return dense_linear_logprobs(hh, ww, targets, b)
            return linear_logprobs(hh, ww, targets, b, impl=impl)
        return fn

    with _tf32_off():
        ref = _grads(op("ref"), hidden, weight, upstream.to(ref_dtype), ref_dtype)
        gc.collect()
        dense = _grads(op("dense"), hidden, weight, upstream, dtype)
        gc.collect()
        ours = _grads(op("ours"), hidden, weight, upstream, dtype)
    config = dict(N=n, H=h, V=v, dtype=str(dtype).replace("torch.", ""), ref_dtype=str(ref_dtype)[6:], bias=bias,
                  label=label, impl=impl, tol=TOL[dtype])
    rows = _judged(f"ours_{impl}", ("logprobs", "dhidden", "dweight"), ours, dense, ref, dtype, label, config)
    del ref, dense, ours
    gc.collect()

    # The whole loss with a reference head, through each head backward: value and gradients.
    lengths = torch.full((2 * pairs,), n // (2 * pairs))
    lengths[-1] += n - int(lengths.sum())
    cu = torch.zeros(2 * pairs + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    cu = cu.to(device)
    ref_hidden = hidden.roll(1, 0)

    def loss(compute_dtype, **options):
        """fn(h, w) -> the loss: fused_linear_rpo_loss with `options`, or without any the reference."""
        cast = lambda t: None if t is None else t.to(compute_dtype)  # noqa: E731
        ref_head = dict(bias=cast(b), ref_hidden=cast(ref_hidden), ref_weight=cast(weight), ref_bias=cast(b))
        if not options:
            return lambda hh, ww: reference_loss(hh, ww, targets, cu, **ref_head)
        return lambda hh, ww: fused_linear_rpo_loss(hh, ww, targets, cu, **ref_head, **LOSS_OPTIONS, **options).loss

    one = torch.ones((), device=device)
    with _tf32_off():
        ref = _grads(loss(ref_dtype), hidden, weight, one.to(ref_dtype), ref_dtype)
        gc.collect()
        dense = _grads(loss(dtype, impl="dense"), hidden, weight, one, dtype)
        gc.collect()
        for backward in loss_backwards(impl):
            ours = _grads(loss(dtype, impl=impl, backward=backward), hidden, weight, one, dtype)
            rows += _judged(f"ours_{backward}", ("loss", "loss_dhidden", "loss_dweight"), ours, dense, ref, dtype,
                            label, dict(config, backward=backward))
            del ours
            gc.collect()
    return rows


def reference_loss(hidden, weight, targets, cu_seqlens, *, bias, ref_hidden, ref_weight, ref_bias) -> torch.Tensor:
    """The RPO loss (`LOSS_OPTIONS`) through the dense head, in the inputs' dtype (float64 too): per-token
    log-probs, per-sequence sums, then `rpo_loss`'s formulas."""
    seq = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=targets.device),
                                  cu_seqlens.diff().long())

    def sums(x):
        return torch.zeros(cu_seqlens.numel() - 1, dtype=x.dtype, device=x.device).index_add(0, seq, x)

    policy = sums(dense_linear_logprobs(hidden, weight, targets, bias))
    with torch.no_grad():
        reference = sums(dense_linear_logprobs(ref_hidden, ref_weight, targets, ref_bias))
    return rpo_loss(policy, reference, sums((targets != -100).to(hidden.dtype)), **LOSS_OPTIONS).loss


def loss_backwards(impl: str) -> tuple[str, ...]:
    """The head backwards checked through the loss: the atomic kernel only where the Triton kernels run."""
    return ("fwdgrad", "recompute", "atomic") if impl == "triton" else ("fwdgrad", "recompute")


def _judged(provider, quantities, ours, dense, ref, dtype, label, config) -> list[dict]:
    """Rows: rel_err of `provider` and of same-dtype dense per quantity, and pass (1/0) per quantity."""
    rows = []
    errors = {q: (rel_err(x, r), rel_err(d, r)) for q, x, d, r in zip(quantities, ours, dense, ref)}
    judge_against_baseline("correctness", provider, "dense", label, errors, config, rows.append, TOL[dtype])
    return rows


def judge_against_baseline(op: str, provider: str, baseline: str, label: str, errors: dict, config: dict,
                           emit: Callable[[dict], None], tol: float) -> bool:
    """For a check judged against a same-dtype baseline path: `errors` {quantity: (provider's error, baseline's
    error)}, both against a higher-precision judge. Emits each error and a pass row per quantity (provider's
    error <= 2 x baseline's + tol); True when every quantity passes."""
    ok = True
    for quantity, (err, base_err) in errors.items():
        passed = err <= 2 * base_err + tol
        ok &= passed
        for who, metric, value in ((provider, f"rel_err_{quantity}", err), (baseline, f"rel_err_{quantity}", base_err),
                                   (provider, f"pass_{quantity}", float(passed))):
            emit(row(who, metric, value, label, config, op))
    return ok


def run_judged(op: str, provider: str, baseline: str, tag: str, label: str, config: dict,
               compute: Callable[[], dict | None], emit: Callable[[dict], None], log: Callable[[str], None],
               tol: float) -> bool | None:
    """Runs one check judged against a same-dtype baseline: `compute()` gives its errors ({quantity: (provider's,
    baseline's)}, see `judge_against_baseline`) or None where it does not apply. Emits the rows and logs one line
    (`tag` names the baseline there). True: passed; False: failed, or raised (a pass_run row of 0); None: skipped."""
    try:
        errors = compute()
    except Exception as exc:
        log(f"  FAIL {label}: failed to run ({type(exc).__name__}: {str(exc)[:200]})")
        emit(row(provider, "pass_run", 0.0, label, dict(config, error=str(exc)[:200]), op))
        return False
    if errors is None:
        return None
    ok = judge_against_baseline(op, provider, baseline, label, errors, config, emit, tol)
    log(f"  {'PASS' if ok else 'FAIL'} {label}: " + "  ".join(
        f"{q} {e:.1e} ({tag} {b:.1e})" for q, (e, b) in errors.items()))
    return ok


def row(provider, metric, value, label, config, op: str = "correctness") -> dict:
    """One long-format result row of a correctness check (`bench.report` tables them by `op`)."""
    return dict(op=op, provider=provider, mode="full", metric=metric, unit="1", x_name="shape",
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
            emit(row(f"ours_{impl}", "pass_run", 0.0, label, dict(N=shape.n, H=shape.h, V=shape.v,
                                                                   error=str(exc)[:200])))
            all_ok = False
            continue
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for r in rows:
            emit(r)
        dense = {r["metric"][8:]: r["p50"] for r in rows if r["provider"] == "dense"}
        ok = all(r["p50"] == 1.0 for r in rows if r["metric"].startswith("pass"))
        all_ok &= ok
        log(f"  {'PASS' if ok else 'FAIL'} {label} N={shape.n} H={shape.h} V={shape.v}:")
        for provider in dict.fromkeys(r["provider"] for r in rows if r["provider"] != "dense"):
            errs = {r["metric"][8:]: r["p50"] for r in rows if r["provider"] == provider and r["metric"].startswith("rel_err")}
            log(f"    {provider}: " + "  ".join(f"{k} {e:.1e} (dense {dense[k]:.1e})" for k, e in errs.items()))
    return all_ok
