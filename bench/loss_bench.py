"""The loss microbenchmark loop: for every point, provider, mode and reference setting, time, memory,
TFLOP/s and the ratios, as long-format rows.

Metrics (one row each; `p50/p20/p80` hold the value, equal when there is a single measurement):
    time            s      fn only (setup such as the forward before a timed backward is excluded)
    first_call      s      the first forward+backward: compilation, autotuning, allocator warm-up
    tflops          TFLOP/s useful head FLOPs (`providers.flops`) over time; p20/p80 from the p80/p20 times
    x_gemm          x      time over the bare-GEMM floor's time (same mode, reference setting and point)
    frac_mm_peak    1      tflops over the matmul rate measured in the same run (left out if that failed)
    peak_mem        bytes  peak allocation above the inputs during the call (gradients included)
    peak_workspace  bytes  peak_mem minus the gradients every provider must return (dh, dW)
    mem_vs_dense    1      peak_mem over the dense provider's peak_mem
    loss_rel_diff   1      |loss - loss_dense| / |loss_dense| at the first call on the same inputs (all compute one
                           loss); config["tol"]: what rounding explains in this dtype (TOLERANCE)
    dh_rel_diff     1      ||dh - dh_dense|| / ||dh_dense|| (2-norms), likewise
    dw_rel_diff     1      ||dW - dW_dense|| / ||dW_dense||, likewise
    same_result     1      1 when the loss and both gradients are finite and within tolerance of dense's, else 0
                           and config["why"] says what (a NaN, a gradient off by more than the tolerance...)
    failed          -      NaN; config["reason"] says why the provider failed (at its first call, or while timed
                           in `mode`, after which it is dropped from the point); the others go on
"""
from __future__ import annotations

import gc
import json
import math
import time
import traceback
from typing import Callable

import torch

from . import providers as P
from .memory import measure_memory
from .shapes import Point, Suite
from .timing import Candidate, Quantiles, failure_reason, is_oom, time_interleaved

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Measured matmul TFLOP/s of a size^3 product (random data, after warm-up)."""
    gen = torch.Generator(device=device).manual_seed(2)
    a = torch.randn(size, size, generator=gen, device=device).to(dtype)
    b = torch.randn(size, size, generator=gen, device=device).to(dtype)
    res, _ = time_interleaved([Candidate("mm", lambda: None, lambda _: a @ b)], device, warmup=2,
                              min_reps=5, max_reps=20, budget_s=1.0)
    return 2.0 * size ** 3 / res["mm"].p50 / 1e12


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# Relative differences from dense that rounding alone explains, (loss, gradients) per dtype: measured between
# providers ~1e-7 in fp32 and ~5e-5 (loss) / ~3e-3 (gradients) in bf16; a real bug is off by O(1).
TOLERANCE = {"float32": (1e-4, 1e-3), "bfloat16": (1e-2, 5e-2), "float16": (1e-2, 5e-2)}


def rel_diff(value: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    """||value - ref|| / ||ref|| (2-norm, accumulated in fp32); NaN when either is missing or not finite."""
    if value is None or ref is None:
        return float("nan")
    diff = torch.linalg.vector_norm(value - ref, dtype=torch.float32)
    return float(diff / torch.linalg.vector_norm(ref, dtype=torch.float32).clamp_min(1e-30))


def _tag(point: Point, with_ref: bool) -> str:
    """'llama-3-8b', 'N=8192 +ref': a point and reference setting as the log and the skipped list name it."""
    return f"{point.label or point.x_name + '=' + str(point.x_value)}{' +ref' if with_ref else ''}"


def unfinished_points(suite: Suite, why: str, done=(), current: str | None = None) -> dict[str, str]:
    """{'point <tag>': why + ': stopped during it' / ': not reached'} for the suite's points not in `done`."""
    tags = [_tag(point, with_ref) for point in suite.points for with_ref in point.with_ref]
    return {f"point {tag}": f"{why}: {'stopped during it (partly measured)' if tag == current else 'not reached'}"
            for tag in tags if tag not in done}


def candidate(name: str, run: P.Run, inp: P.Inputs, mode: str) -> Candidate:
    def clear():
        inp.clear_grads()

    if mode == "forward":
        return Candidate(name, clear, lambda _: run.forward())
    if mode == "backward":
        return Candidate(name, lambda: (clear(), run.forward())[1], run.backward)
    return Candidate(name, clear, lambda _: run.backward(run.forward()))


class LossBench:
    """Runs a `Suite`'s points and collects rows through `emit(row_dict)`."""

    def __init__(self, suite: Suite, device: torch.device, emit: Callable[[dict], None], *,
                 providers: tuple[str, ...] | None = None, deadline: float | None = None,
                 log: Callable[[str], None] = print, check_stop: Callable[[], None] = lambda: None):
        self.suite, self.device, self.emit, self.log = suite, device, emit, log
        self.check_stop = check_stop  # called between points, providers and modes: raises to stop the run
        self.dtype = DTYPES[suite.dtype]
        self.only = providers
        self.deadline = deadline
        self.skipped: dict[str, str] = {}  # provider -> why it never ran
        self.failed: dict[str, str] = {}  # "provider at point" -> why it failed there (it has a `failed` row)
        self.done: list[str] = []  # tags of the points run to their end, failed or skipped for the budget
        self.current: str | None = None  # the point in flight
        self.mm_tflops = self._matmul_rate()

    def _matmul_rate(self) -> float:
        """The measured matmul TFLOP/s (a row and a log line), or NaN after logging and recording why it failed:
        the loss points do not need it, only their frac_mm_peak rows, which are then left out."""
        suite, config = self.suite, {"dtype": self.suite.dtype}
        row = dict(op="matmul", provider="torch.mm", mode="forward", x_name="size", x_value=suite.matmul_size)
        try:
            rate = matmul_rate(self.device, self.dtype, suite.matmul_size)
        except Exception as exc:
            reason = failure_reason(exc)
        else:
            self.emit(dict(row, metric="tflops", unit="TFLOP/s", p50=rate, p20=rate, p80=rate,
                           config=json.dumps(config)))
            self.log(f"matmul rate ({suite.dtype}): {rate:.2f} TFLOP/s")
            return rate
        _free(self.device)  # outside the except block, whose traceback pins the failed call's tensors
        self.log(f"matmul rate ({suite.dtype}) failed: {reason}")
        self.failed["matmul rate"] = f"failed: {reason}"
        self.emit(dict(row, metric="failed", unit="", p50=math.nan, p20=math.nan, p80=math.nan,
                       config=json.dumps(dict(config, reason=reason))))
        return math.nan

    def _providers(self, point: Point) -> list[str]:
        names = [n for n in P.ORDER if (point.providers is None or n in point.providers)
                 and (self.only is None or n in self.only)]
        out = []
        for name in names:
            reason = P.unavailable(name, self.device)
            if reason:
                if name not in self.skipped:
                    self.skipped[name] = reason
                    self.log(f"  skip {name}: {reason}")
                continue
            out.append(name)
        return out

    def run(self) -> None:
        for point in self.suite.points:
            for with_ref in point.with_ref:
                self.check_stop()
                tag = _tag(point, with_ref)
                if self.deadline is not None and time.monotonic() > self.deadline:
                    self.log(f"  time budget spent: skipping {tag}")
                    self.skipped[f"point {tag}"] = "time budget"
                    self.done.append(tag)
                    continue
                self.current = tag
                try:
                    self._run_point(point, with_ref)
                except Exception as exc:  # a broken point must not sink the whole run
                    if not is_oom(exc):
                        traceback.print_exc()
                    self.log(f"  point {tag} failed: {exc!r}"[:300])
                _free(self.device)
                self.done.append(tag)
                self.current = None

    def unfinished(self, why: str) -> dict[str, str]:
        """For a run stopped part-way (`why`: what stopped it): {'point <tag>': ...} for the point in flight
        and every point never started, in the suite's order."""
        return unfinished_points(self.suite, why, self.done, self.current)

    def _row(self, point, with_ref, provider, mode, metric, unit, q: Quantiles | float, extra=None) -> None:
        if isinstance(q, Quantiles):
            p50, p20, p80 = q.p50, q.p20, q.p80
        else:
            p50 = p20 = p80 = q
        n, h, v, pairs = point.shape
        config = dict(N=n, H=h, V=v, pairs=pairs, dtype=self.suite.dtype, ref=with_ref, label=point.label)
        config.update(extra or {})
        self.emit(dict(op="rpo_head", provider=provider, mode=mode, metric=metric, unit=unit, x_name=point.x_name,
                       x_value=point.x_value, p50=p50, p20=p20, p80=p80, config=json.dumps(config)))

    def _compare(self, point: Point, with_ref: bool, name: str, result, reference) -> None:
        """Rows `loss_rel_diff`, `dh_rel_diff`, `dw_rel_diff` (against dense, when dense ran) and `same_result`:
        1, or 0 with config["why"] when a value is missing or not finite or differs from dense's by more than
        the dtype's rounding allows (TOLERANCE). Logged loudly when 0."""
        loss_tol, grad_tol = TOLERANCE[self.suite.dtype]
        tolerances = {"loss": loss_tol, "dh": grad_tol, "dW": grad_tol}
        problems = []
        for what, value in zip(tolerances, result):
            if value is None:
                problems.append(f"no {what}")
            elif not bool(torch.isfinite(value).all()):
                problems.append(f"{what} not finite")
        for what, value, ref in zip(tolerances, result, reference or ()):
            diff, tol = rel_diff(value, ref), tolerances[what]
            self._row(point, with_ref, name, "full", f"{what.lower()}_rel_diff", "1", diff, {"tol": tol})
            if not diff <= tol:  # NaN included
                problems.append(f"{what} rel diff {diff:.1e} vs dense (tol {tol:g})")
        why = "; ".join(problems)
        self._row(point, with_ref, name, "full", "same_result", "1", float(not problems), {"why": why})
        if problems:
            self.log(f"  {name}: RESULT DIFFERS from dense or is not finite: {why}")

    def _fail(self, point: Point, with_ref: bool, provider: str, mode: str, reason: str) -> None:
        """Logs and records a provider's failure at a point: a `failed` row and an entry of `self.failed`."""
        self.log(f"  {provider}: failed ({reason}); dropped from this point")
        self._row(point, with_ref, provider, mode, "failed", "", float("nan"), {"reason": reason})
        self.failed[f"{provider} at {_tag(point, with_ref)}"] = f"failed: {reason}"

    def _attempt(self, what: str, inp: P.Inputs, measure: Callable[[], object]):
        """measure(), or None after logging why it failed and freeing what it left: outside the except block,
        whose traceback pins the failed call's tensors."""
        try:
            return measure()
        except Exception as exc:
            self.log(f"  {what} failed: {exc!r}"[:300])
        inp.clear_grads()
        _free(self.device)
        return None

    def _run_point(self, point: Point, with_ref: bool) -> None:
        shape = point.shape
        self.log(f"[{_tag(point, with_ref)}] N={shape.n} H={shape.h} V={shape.v} {self.suite.dtype}")
        inp = P.make_inputs(shape, self.dtype, self.device, with_ref)
        runs: dict[str, P.Run] = {}
        reference = None  # dense's (loss, dh, dW): what every other provider must reproduce
        for name in self._providers(point):
            self.check_stop()
            try:
                run = P.build(name, inp)
                inp.clear_grads()
                start = time.perf_counter()
                out = run.forward()
                run.backward(out)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                first = time.perf_counter() - start
                if name != "gemm":  # the floor computes no loss
                    result = (out.detach().float(), inp.hidden.grad, inp.weight.grad)
                    reference = result if name == "dense" else reference
                    self._compare(point, with_ref, name, result, reference)
                    del result
                del out
                inp.clear_grads()
                runs[name] = run
                if "full" in point.modes:
                    self._row(point, with_ref, name, "full", "first_call", "s", first)
            except Exception as exc:
                reason = failure_reason(exc)
                self._fail(point, with_ref, name, "full", f"first call: {reason}")
                run = None
            if name not in runs:  # after the except block, whose traceback pins the failed call's tensors
                inp.clear_grads()
                _free(self.device)
        del reference

        for mode in point.modes:
            self.check_stop()
            cands = [candidate(name, run, inp, mode) for name, run in runs.items()]
            if not cands:
                continue
            failures: dict[str, str] = {}  # a provider failing while timed is dropped; the others are timed
            times = self._attempt(f"timing {mode}", inp, lambda: time_interleaved(
                cands, self.device, warmup=1, min_reps=self.suite.min_reps, max_reps=self.suite.max_reps,
                budget_s=self.suite.budget_s, failures=failures)[0]) or {}
            for name, reason in failures.items():
                self._fail(point, with_ref, name, mode, f"timing {mode}: {reason}")
                del runs[name]
            inp.clear_grads()
            flop = P.flops(shape, mode, with_ref)
            floor = times.get("gemm")
            for name, q in times.items():
                self._row(point, with_ref, name, mode, "time", "s", q)
                tfl = Quantiles(flop / q.p50 / 1e12, flop / q.p80 / 1e12, flop / q.p20 / 1e12, q.n)
                self._row(point, with_ref, name, mode, "tflops", "TFLOP/s", tfl)
                if not math.isnan(self.mm_tflops):
                    self._row(point, with_ref, name, mode, "frac_mm_peak", "1", tfl.p50 / self.mm_tflops)
                if floor is not None:
                    self._row(point, with_ref, name, mode, "x_gemm", "x", q.p50 / floor.p50)
            summary = "  ".join(f"{n}={q.p50 * 1e3:.1f}ms" for n, q in times.items())
            self.log(f"  {mode:8s} {summary or 'no timings'}")

            if mode == "backward":
                continue  # memory is reported for the forward and for forward+backward
            peaks = {}
            for name, run in runs.items():
                if name == "gemm":
                    continue  # a time floor only: it materializes the logits
                inp.clear_grads()
                call = run.forward if mode == "forward" else (lambda r=run: r.backward(r.forward()))
                use = self._attempt(f"memory {name} {mode}", inp, lambda c=call: measure_memory(c, self.device))
                if use is None:
                    continue
                grads = inp.grad_bytes() if mode == "full" else 0
                inp.clear_grads()
                peaks[name] = use.peak
                self._row(point, with_ref, name, mode, "peak_mem", "bytes", float(use.peak))
                self._row(point, with_ref, name, mode, "peak_workspace", "bytes", float(max(use.peak - grads, 0)))
            if "dense" in peaks:
                for name, peak in peaks.items():
                    self._row(point, with_ref, name, mode, "mem_vs_dense", "1", peak / max(peaks["dense"], 1))
            self.log("  " + " " * 9 + "  ".join(f"{n}={p / 2**20:.1f}MiB" for n, p in peaks.items()))
        del runs, inp
