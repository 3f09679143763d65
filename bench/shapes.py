"""Benchmark shapes: presets from real models, sweeps over V and N, and the CPU quick / tiny sets.

N counts response tokens (prompt positions never reach the head), packed as 2B sequences of equal length
so that Liger's padded [2B, T, H] layout holds exactly the same tokens as the packed [N, H] one.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

# Our providers (bench.providers), one per head backward choice.
OURS = ("ours_fwdgrad", "ours_recompute", "ours_atomic", "ours_atomic_filter")


class Shape(NamedTuple):
    n: int  # response tokens
    h: int  # hidden size
    v: int  # vocabulary size
    pairs: int = 4  # B preference pairs -> 2B sequences of n // (2B) tokens

    @property
    def seq_len(self) -> int:
        return self.n // (2 * self.pairs)


# H/V of the LM heads of real models; N = 16384 response tokens per micro-batch.
PRESETS = {
    "mistral-7b": Shape(16384, 4096, 32000),
    "llama-3-8b": Shape(16384, 4096, 128256),
    "gemma-7b": Shape(16384, 3072, 256000),
}
# The shape at which the fastest fused cross-entropy heads are published (H200, bf16, M=4096 tokens, H=4096,
# V=128256, forward+backward, CUDA-event medians, from liger-kernel 0.8.5's CuTe-DSL SM90 kernel docstring):
# a GPU run sets the RPO head beside these (the preference loss adds only per-sequence reductions).
PUBLISHED_CE = Shape(4096, 4096, 128256)
PUBLISHED_CE_LABEL = "published-ce"
PUBLISHED_CE_MS = {"QuACK 0.6.1 chunked_linear_cross_entropy": 17.33, "Liger 0.8.5 CuTe-DSL SM90 FLCE": 18.06,
                   "Liger 0.8.5 Triton FLCE": 141.0}


@dataclasses.dataclass
class Point:
    """One benchmark point: a shape, the axis it belongs to, and what to run there."""

    shape: Shape
    x_name: str  # "preset", "V" or "N"
    x_value: object  # preset name or the swept number
    modes: tuple[str, ...] = ("full",)
    with_ref: tuple[bool, ...] = (False,)
    providers: tuple[str, ...] | None = None  # None: every provider of the suite
    label: str = ""


@dataclasses.dataclass
class Suite:
    dtype: str
    points: list[Point]
    headline: str  # label of the point the targets are judged on
    min_reps: int = 3
    max_reps: int = 20
    budget_s: float = 5.0  # timing budget per point (all providers together)
    matmul_size: int = 2048  # square matmul that measures the device's rate (8192 on a GPU)
    threads: int | None = None  # torch CPU threads unless --threads says otherwise; None: torch's default


# `full` (forward+backward) first: the targets are judged on it, so a run stopped at its hard time limit loses
# the informational forward / backward rows rather than the target rows.
ALL_MODES = ("full", "forward", "backward")
GPU_SUITES = ("gpu", "gpu-dryrun")  # the GPU suite and its CPU dry run: micro-checks, kernel checks, GPU targets

def gpu_suite() -> Suite:
    """bf16 on one GPU, most important first (the run stops starting new points when its budget is spent):
    the Llama-3-8B preset in every mode with every provider (the targets are judged there), then the other two
    presets and the published cross-entropy heads' shape with every provider, then the presets with the
    reference head, then sweeps along V (N=16384, H=4096) and N (Llama-3-8B head; N=4096 and 16384 come from the
    published-ce and llama-3-8b points: no shape is measured twice). torch.compile of the dense loss only at the
    headline: each new shape costs a compilation."""
    every = ("dense", "liger", "cce", *OURS, "gemm")
    peers = ("dense", "liger", "cce", "ours_fwdgrad", "ours_recompute", "gemm")
    llama = PRESETS["llama-3-8b"]
    points = [Point(llama, "preset", "llama-3-8b", modes=ALL_MODES, with_ref=(False,), providers=None,
                    label="llama-3-8b")]
    for name in ("mistral-7b", "gemma-7b"):
        points.append(Point(PRESETS[name], "preset", name, providers=every, label=name))
    points.append(Point(PUBLISHED_CE, "preset", PUBLISHED_CE_LABEL, providers=every, label=PUBLISHED_CE_LABEL))
    for name in ("llama-3-8b", "mistral-7b", "gemma-7b"):
        points.append(Point(PRESETS[name], "preset", name, with_ref=(True,), providers=peers, label=name))
    sweep = ("dense", "liger", "cce", "ours_fwdgrad", "ours_recompute", "gemm")
    points += [Point(llama._replace(v=v), "V", v, providers=sweep) for v in (8192, 65536, 196608)]
    # N=4096 is the published-ce point (same shape, a superset of the providers) and N=16384 the llama-3-8b
    # preset: the N sweep reads them there rather than measuring either shape twice.
    points += [Point(llama._replace(n=n), "N", n, providers=sweep) for n in (8192, 32768)]
    return Suite("bfloat16", points, headline="llama-3-8b", min_reps=3, max_reps=10, budget_s=1.5, matmul_size=8192)


def gpu_dryrun_suite() -> Suite:
    """The GPU suite's structure at toy sizes on CPU, impl="triton" in the Triton interpreter: proves that the
    suite's code runs (labels, targets, tables) before a GPU session spends device time on it. Not a
    measurement."""
    suite = gpu_suite()
    for p in suite.points:  # small enough that the interpreted atomic backward takes seconds, not minutes
        n, h, v, pairs = p.shape
        p.shape = Shape(max(16, n // 256), max(32, h // 64), max(64, v // 512), pairs)
        if p.x_name in ("V", "N"):
            p.x_value = p.shape.v if p.x_name == "V" else p.shape.n
    suite.min_reps, suite.max_reps, suite.budget_s, suite.matmul_size = 2, 2, 0.05, 256
    return suite


def cpu_quick_suite() -> Suite:
    """fp32 on CPU, about 2-6 minutes on a 2-core machine. H=256 with N=1024 keeps the presets' N/H = 4; the
    N sweep reaches N=2048, where the fixed [V, H] gradient stops dominating the chunked path's memory."""
    head = Shape(1024, 256, 32000)
    ours = ("ours_fwdgrad", "ours_recompute")  # the atomic backward is GPU-only
    peers = ("dense", "dense_compile", "liger", "cce", *ours, "gemm")
    points = [
        Point(head, "V", 32000, modes=ALL_MODES, with_ref=(False,), providers=peers, label="cpu-head"),
        Point(head, "V", 32000, modes=("full",), with_ref=(True,), providers=("dense", "liger", *ours, "gemm"),
              label="cpu-head"),
    ]
    points += [Point(head._replace(v=v), "V", v, providers=("dense", *ours, "gemm")) for v in (4096, 12288)]
    points += [Point(head._replace(n=n), "N", n, providers=("dense", *ours, "gemm")) for n in (256, 2048)]
    # One thread: on this shared 2-core machine, 2-thread timings swung 2x with other processes' load (every
    # OpenMP region waits for a descheduled thread; the chunked path has ~8x more regions), while 1-thread
    # p20..p80 stay within a few percent. --threads 2 measures the other way.
    return Suite("float32", points, headline="cpu-head", min_reps=3, max_reps=7, budget_s=3.0, threads=1)


def cpu_full_suite() -> Suite:
    """The CPU suite without --quick: more points, every provider at every point, more repeats."""
    suite = cpu_quick_suite()
    every = ("dense", "liger", "cce", "ours_fwdgrad", "ours_recompute", "gemm")
    for p in suite.points:
        if p.x_name in ("N", "V") and not p.label:
            p.providers = every
    suite.points += [Point(Shape(n, 256, 32000), "N", n, providers=every) for n in (512, 4096)]
    suite.points += [Point(Shape(1024, 256, v), "V", v, providers=every) for v in (8192, 16384, 65536)]
    suite.min_reps, suite.max_reps, suite.budget_s, suite.threads = 5, 15, 8.0, None
    return suite


def tiny_suite() -> Suite:
    """For tests: tiny shapes, cheap providers only, seconds in all (Liger, compiled as it runs everywhere, at
    one point: each new shape costs it a torch.compile of several seconds on CPU)."""
    head = Shape(128, 32, 1024, pairs=2)
    cheap = ("dense", "ours_fwdgrad", "ours_recompute", "gemm")
    points = [Point(head, "V", 1024, modes=ALL_MODES, with_ref=(False,), providers=("liger", *cheap), label="tiny-head"),
              Point(head, "V", 1024, modes=ALL_MODES, with_ref=(True,), providers=cheap, label="tiny-head"),
              Point(head._replace(v=512), "V", 512, providers=cheap),
              Point(head._replace(n=256), "N", 256, providers=cheap)]
    return Suite("float32", points, headline="tiny-head", min_reps=2, max_reps=3, budget_s=0.05, matmul_size=256)
