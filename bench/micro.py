"""Two micro-checks of numbers the head's GPU design rests on, measured rather than guessed:

atomics   fp32 `tl.atomic_add` throughput with the default `sem="acq_rel"` (a GPU-wide fence per vector
          atomic) against `sem="relaxed"` (no fence), and a plain load-add-store as the ceiling. The kernel
          adds vectors into a buffer larger than L2 at distinct addresses, as the Triton backward scatters
          into its fp32 dW/dh accumulators. Metric: added elements per second; the buffer's sum checks that
          every add landed.
addmm     `torch.addmm(acc32, a_bf16, b_bf16, out_dtype=torch.float32, out=acc32)`, the fp32-accumulating
          tensor-core product the head's weight gradient uses (`rpo_fast.gemm.addmm_f32_`), at a head-like
          shape: its error after several accumulations against float64, and its time against the fallback
          (fp32 upcast of the operands, then fp32 addmm_) and against a plain bf16 mm (the floor).

Rows go to the run's CSV with op="micro"; `report.micro_table` prints them. On CPU (the gpu-dryrun suite)
the atomics kernel runs in the Triton interpreter at toy sizes and `out_dtype` is reported unsupported.
"""
from __future__ import annotations

import json
import math
import time
from typing import Callable

import torch

from .timing import Candidate, time_once

SEMANTICS = ("acq_rel", "relaxed", "plain")


def _median_s(fn: Callable[[], object], device: torch.device, reps: int, budget_s: float = 0.5, *,
              setup: Callable[[], object] = lambda: None, min_sample_s: float = 1e-3) -> tuple[float, int]:
    """(median seconds per `fn` call, calls made), timed as the loss benchmarks are (`timing.time_once`: CUDA
    events on a GPU, so launch and synchronize latency stay out). One warm-up call (compilation), one call
    that sizes the samples, then `reps` samples, or more (up to 50) when they fit in `budget_s`, fewer
    (at least 2) when one is longer than the budget. A sample is as many back-to-back calls as make
    `min_sample_s` of work (at most 1000), so that the latency before the first launch is a small part of it;
    `setup()` runs untimed before each sample."""
    calls = 0

    def sample(count: int) -> Candidate:
        def run(_state):
            nonlocal calls
            for _ in range(count):
                fn()
                calls += 1

        return Candidate("micro", setup, run)

    time_once(sample(1), device, wall_clock=True)
    once = time_once(sample(1), device)
    per_sample = min(1000, max(1, math.ceil(min_sample_s / max(once, 1e-9))))
    sample_s = once * per_sample
    reps = max(2, min(50, max(reps, int(budget_s / max(sample_s, 1e-9))))) if sample_s < budget_s else 2
    times = sorted(time_once(sample(per_sample), device) / per_sample for _ in range(reps))
    return times[len(times) // 2], calls


def _atomic_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def add_kernel(out_ptr, n_out, base, ITERS: tl.constexpr, BLOCK: tl.constexpr, SEM: tl.constexpr):
        # Program p adds 1.0 to BLOCK consecutive elements, ITERS times, striding over the buffer so that
        # programs never collide within a step (as the backward's tiles write disjoint accumulator blocks);
        # `base` is where the previous launch stopped, so that back-to-back launches keep moving on.
        offs = base + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ones = tl.full([BLOCK], 1.0, tl.float32)
        for i in range(ITERS):
            idx = (offs + i * BLOCK * tl.num_programs(0)) % n_out
            if SEM == "plain":
                tl.store(out_ptr + idx, tl.load(out_ptr + idx) + ones)
            else:
                tl.atomic_add(out_ptr + idx, ones, sem=SEM)

    return add_kernel


def atomic_rows(device: torch.device) -> list[dict]:
    """Elements/s of fp32 atomic adds per semantics, and whether the buffer's sum is exact."""
    kernel = _atomic_kernel()
    if device.type == "cuda":
        # 1 GiB of fp32 (well beyond L2, like a head's dW), 4 programs per SM, ~69 M adds per launch: ~50 us
        # at the fastest rate the roofline guessed for relaxed atomics (a timed sample then holds several
        # launches, see _median_s), ~2 ms at 1/40 of it for fenced ones
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        n_out, programs, block, iters, reps = 2**28, 4 * sms, 1024, 128, 5
    else:  # the interpreter: toy sizes, a rehearsal only
        n_out, programs, block, iters, reps = 2**12, 4, 64, 2, 1
    out = torch.zeros(n_out, dtype=torch.float32, device=device)
    adds = programs * block * iters
    rows = []
    for sem in SEMANTICS:
        out.zero_()
        launches = 0

        def launch():
            nonlocal launches
            kernel[(programs,)](out, n_out, launches * adds % n_out, ITERS=iters, BLOCK=block, SEM=sem,
                                num_warps=8)
            launches += 1

        seconds, runs = _median_s(launch, device, reps)
        total = float(out.double().sum())
        exact = total == adds * runs  # every launch (warm-up included) adds `adds` ones
        config = dict(n_out=n_out, programs=programs, block=block, iters=iters, adds=adds, exact=exact)
        rows.append(dict(op="micro", provider=f"atomic_add sem={sem}" if sem != "plain" else "load+add+store",
                         mode="-", metric="elements_per_s", unit="1/s", x_name="check", x_value="atomics",
                         p50=adds / seconds, p20=math.nan, p80=math.nan, config=json.dumps(config)))
    return rows


def addmm_rows(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Error vs float64 and time of out_dtype=float32 accumulation, the upcast fallback and a bf16 mm."""
    if device.type == "cuda":
        m, k, n, steps, reps = 8192, 4096, 4096, 4, 5  # a vocab slice of dW: [Vs, H] += dlogits^T [Vs, C] @ h [C, H]
    else:
        m, k, n, steps, reps = 64, 48, 32, 3, 1
    gen = torch.Generator(device=device).manual_seed(0)
    a = [torch.randn(m, k, generator=gen, device=device).to(dtype) for _ in range(steps)]
    b = [torch.randn(k, n, generator=gen, device=device).to(dtype) for _ in range(steps)]
    exact = sum(x.double() @ y.double() for x, y in zip(a, b))
    scale = float(exact.norm())
    flop = 2.0 * m * k * n * steps

    def out_dtype_acc(acc):
        for x, y in zip(a, b):
            torch.addmm(acc, x, y, out_dtype=torch.float32, out=acc)

    def upcast_acc(acc):
        for x, y in zip(a, b):
            acc.addmm_(x.float(), y.float())

    def plain(_acc):
        for x, y in zip(a, b):
            torch.mm(x, y)

    from rpo_fast.gemm import accumulates_in_place, fp32_out_on_tensor_cores

    # Which path rpo_fast's head products take here: out_dtype products at all, and accumulation in place
    # (else a tensor-core product into a temporary, added slice by slice).
    probe_config = json.dumps(dict(device=str(device), dtype=str(dtype).replace("torch.", "")))
    rows = [dict(op="micro", provider="rpo_fast.gemm probe", mode="-", metric=metric, unit="", x_name="check",
                 x_value="addmm", p50=float(value), p20=math.nan, p80=math.nan, config=probe_config)
            for metric, value in (("uses_out_dtype", fp32_out_on_tensor_cores(a[0])),
                                  ("accumulates_in_place", accumulates_in_place(a[0])))]
    for name, fn in (("addmm out_dtype=fp32", out_dtype_acc), ("fp32 upcast + addmm_", upcast_acc),
                     ("bf16 mm (no accumulation)", plain)):
        config = dict(m=m, k=k, n=n, steps=steps, dtype=str(dtype).replace("torch.", ""))
        acc = torch.zeros(m, n, dtype=torch.float32, device=device)
        try:
            fn(acc)
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            config["unsupported"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            rows.append(dict(op="micro", provider=name, mode="-", metric="unsupported", unit="", x_name="check",
                             x_value="addmm", p50=math.nan, p20=math.nan, p80=math.nan, config=json.dumps(config)))
            continue
        err = float((acc.double() - exact).norm()) / scale if name != "bf16 mm (no accumulation)" else math.nan
        # Timed into the same accumulator, zeroed untimed before each sample (its calls accumulate).
        seconds, _ = _median_s(lambda: fn(acc), device, reps, setup=acc.zero_)
        measured = [("rel_err_vs_fp64", "1", err)] if not math.isnan(err) else []
        measured += [("time", "s", seconds), ("tflops", "TFLOP/s", flop / seconds / 1e12)]
        for metric, unit, value in measured:
            rows.append(dict(op="micro", provider=name, mode="-", metric=metric, unit=unit, x_name="check",
                             x_value="addmm", p50=value, p20=math.nan, p80=math.nan, config=json.dumps(config)))
    return rows


def run(device: torch.device, emit: Callable[[dict], None], log: Callable[[str], None]) -> None:
    """Both checks; a failure of one is logged and leaves the other."""
    for name, check in (("atomics", atomic_rows), ("addmm", addmm_rows)):
        start = time.monotonic()
        try:
            rows = check(device)
        except Exception as exc:  # a micro-check must never stop the suite
            log(f"  micro-check {name} failed: {type(exc).__name__}: {str(exc)[:300]}")
            emit(dict(op="micro", provider=name, mode="-", metric="failed", unit="", x_name="check", x_value=name,
                      p50=math.nan, p20=math.nan, p80=math.nan,
                      config=json.dumps(dict(reason=f"{type(exc).__name__}: {str(exc)[:200]}"))))
            continue
        for row in rows:
            emit(row)
            log(f"  {name}: {row['provider']} {row['metric']} = {row['p50']:.4g} {row['unit']}")
        log(f"  micro-check {name}: {time.monotonic() - start:.1f} s")
