"""Timing: p20/p50/p80 over repeats, several candidates interleaved so that load drifts hit all alike.

A candidate is `(setup, fn)`: `setup()` runs untimed before every repeat and returns the state that
`fn(state)` consumes (for the backward mode, setup runs the forward and fn the backward). GPU: one pair of
CUDA events around each `fn` (every sample, the sizing round's included), read after a synchronize; CPU:
`time.perf_counter`. Repeats are round-robin over the candidates (A B C A B C ...), which on a shared CPU
spreads other processes' load over every candidate instead of penalizing whichever ran during a spike. A
candidate that fails (say, out of memory) can be dropped on its own while the others are timed to the end.
"""
from __future__ import annotations

import gc
import time
from typing import Callable, NamedTuple, Sequence

import torch


class Quantiles(NamedTuple):
    p50: float
    p20: float
    p80: float
    n: int


def quantiles(samples: Sequence[float]) -> Quantiles:
    t = torch.tensor(sorted(samples), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return Quantiles(q[0], q[1], q[2], len(samples))


class Candidate(NamedTuple):
    name: str
    setup: Callable[[], object]
    fn: Callable[[object], object]


def time_once(cand: Candidate, device: torch.device, wall_clock: bool = False) -> float:
    """Seconds of one `fn` call. GPU: CUDA events around it (launch and synchronize latency excluded), or with
    `wall_clock` perf_counter between two synchronizes (the first call: compilation is host time); CPU:
    perf_counter."""
    state = cand.setup()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if not wall_clock:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = cand.fn(state)
            end.record()
            torch.cuda.synchronize(device)
            del out, state
            return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    out = cand.fn(state)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start_s
    del out, state
    return elapsed


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error (torch's, or one whose message says so, as some kernels raise it)."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def failure_reason(exc: BaseException, limit: int = 200) -> str:
    """'out of memory', or 'Type: message' (at most `limit` characters)."""
    return "out of memory" if is_oom(exc) else f"{type(exc).__name__}: {exc}"[:limit]


def time_interleaved(candidates: Sequence[Candidate], device: torch.device, *, warmup: int = 1,
                     min_reps: int = 3, max_reps: int = 20, budget_s: float = 5.0,
                     failures: dict[str, str] | None = None,
                     ) -> tuple[dict[str, Quantiles], dict[str, float]]:
    """Times every candidate; returns ({name: Quantiles in seconds}, {name: seconds of the first call}).

    The first call of each candidate (compilation, autotuning, allocator warm-up) is reported apart, in
    wall-clock seconds, and never enters the quantiles; every sample in them is timed the same way (CUDA
    events on a GPU). Repeats are chosen so that all of them fit in about `budget_s`, within
    [min_reps, max_reps]. With a `failures` dict, a candidate that raises is dropped from then on (the others
    go on) and failures[name] says why; without one, exceptions propagate.
    """
    live = list(candidates)

    def attempt(cand: Candidate, call: Callable[[Candidate], object]):
        """call(cand), or None once cand raised and was dropped (after the except block, whose traceback
        pins the failed call's tensors, so that they can be freed)."""
        if failures is None:
            return call(cand)
        try:
            return call(cand)
        except Exception as exc:  # one provider's failure (an OOM, a compile error) must not sink the rest
            failures[cand.name] = failure_reason(exc)
        live.remove(cand)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None

    def each(call: Callable[[Candidate], object]) -> dict[str, object]:
        """{name: call(c)} over the live candidates, in order, dropping those that raise."""
        out = {}
        for c in list(live):
            value = attempt(c, call)
            if c in live:
                out[c.name] = value
        return out

    first_call = each(lambda c: time_once(c, device, wall_clock=True))
    for _ in range(max(0, warmup - 1)):
        each(lambda c: time_once(c, device))
    # One warm round sizes the repeats and is the first sample.
    first_round = each(lambda c: time_once(c, device))
    reps = int(min(max_reps, max(min_reps, budget_s // max(sum(first_round.values()), 1e-9)))) - 1
    samples: dict[str, list[float]] = {name: [t] for name, t in first_round.items()}
    for _ in range(reps):
        if device.type == "cuda":  # one synchronize per round: the candidates' events are read after it
            events = each(_record)
            torch.cuda.synchronize(device)
            for name, (start, end) in events.items():
                if name in samples:
                    samples[name].append(start.elapsed_time(end) / 1e3)
        else:
            for name, t in each(lambda c: time_once(c, device)).items():
                samples[name].append(t)
    names = {c.name for c in live}
    return ({name: quantiles(s) for name, s in samples.items() if name in names},
            {name: t for name, t in first_call.items() if name in names})


def _record(cand: Candidate):
    """(start, end) CUDA events around one `fn` call, not yet synchronized."""
    state = cand.setup()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    cand.fn(state)
    end.record()
    return start, end
