"""Peak extra memory of a call: bytes allocated beyond what was live when the call started.

GPU: `torch.cuda.max_memory_allocated` minus the allocation at entry (the caching allocator's reserved
pool does not count). CPU: torch's CPU allocations are invisible to `tracemalloc`, and a
`TorchDispatchMode` misses the temporaries that kernels allocate inside one op (`logsumexp` allocates a
full-size buffer, for one). So on CPU the call runs under `torch.profiler` with `profile_memory=True`,
which records every allocation and free of the c10 CPU allocator; the peak of their running sum in time
order is the peak extra memory. The profiler slows the call down, so never time under it.
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys
from typing import Callable, NamedTuple

import torch


class MemoryUse(NamedTuple):
    peak: int  # bytes: highest live allocation above the entry level during the call
    end: int  # bytes still live above the entry level when the call returned (outputs, grads, saved tensors)


@contextlib.contextmanager
def quiet_stderr():
    """Kineto prints start/stop lines on the C-level stderr (fd 2, even while Python's sys.stderr is
    redirected); keep them out of the benchmark's log."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_allocation_trace(fn: Callable[[], object]) -> tuple[list[tuple[int, int]], object]:
    """Runs `fn()` under the profiler; returns ([(time_ns, +bytes allocated / -bytes freed)], fn's result)."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda ev: ev[0])
    return events, result


def peak_of(events: list[tuple[int, int]]) -> MemoryUse:
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return MemoryUse(peak, live)


def measure_memory(fn: Callable[[], object], device: torch.device) -> MemoryUse:
    """Peak and end-of-call extra memory of `fn()` on `device`. fn's return value is dropped before `end`
    is read, so return nothing you want counted as freed (or return it: then it counts in `end`)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        use = MemoryUse(torch.cuda.max_memory_allocated(device) - base, torch.cuda.memory_allocated(device) - base)
        del result
        return use
    events, result = cpu_allocation_trace(fn)
    del result
    return peak_of(events)
