"""The forward-time-gradient head's memory/time trade-off: `fused_linear_rpo_loss(backward="fwdgrad",
chunk_tokens=c)` over a range of chunk sizes, against the dense op and the bare head GEMMs.

    python -m bench.chunk_sweep [--n 1024 --h 256 --v 32000 --pairs 4] [--chunks auto,192,128,112,96,64]
                                [--dtype float32] [--reps 7] [--threads 1] [--out DIR]

A chunk holds whole pairs; a pair longer than `chunk_tokens` keeps its last `chunk_tokens` rows' logits from
the first pass and computes the others again (rpo_fast.fwdgrad). So a smaller chunk lowers the peak memory
(one chunk of fp32 logits alive) and adds head GEMM work: the `gemm work` column is that work over the three
GEMMs per token, from the chunk plan alone; `x GEMMs` is the time measured against the bare GEMMs
(`bench.providers`' floor), `peak / dense` the peak extra memory against the dense op's (gradients included,
as in `bench.run`). Timings are interleaved (every candidate once per round); peak memory is measured apart.

Writes DIR/results.json, DIR/summary.md and DIR/frontier.png (time against memory, one point per chunk size);
DIR defaults to bench/results/chunk-sweep-N<n>-<device>-<date>-<commit>.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from bench import env
from bench import providers as P
from bench.loss_bench import candidate
from bench.memory import measure_memory
from bench.shapes import Shape
from bench.timing import time_interleaved
from rpo_fast import fused_linear_rpo_loss
from rpo_fast.fwdgrad import default_chunk_tokens, plan_chunks, row_pieces


def gemm_work(bounds: list[int], chunk_tokens: int) -> float:
    """Head GEMM products of the fwdgrad plan over the three per token: (3 N + recomputed rows) / 3 N."""
    recomputed = 0
    for chunk in plan_chunks(bounds, chunk_tokens):
        kept = row_pieces(chunk.rows, chunk_tokens)[-1]
        recomputed += chunk.rows - (kept.stop - kept.start)
    return (3 * bounds[-1] + recomputed) / (3 * bounds[-1])


def parse_chunks(text: str) -> list[int | None]:
    """'auto,128,64' -> [None, 128, 64] (None: the op's default for the device)."""
    chunks = []
    for item in text.split(","):
        if item.strip() == "auto":
            chunks.append(None)
        elif item.strip().isdigit() and int(item) > 0:
            chunks.append(int(item))
        else:
            raise ValueError(f"--chunks: expected 'auto' or positive integers separated by commas, got {item!r}")
    return chunks


def sweep(shape: Shape, dtype: torch.dtype, device: torch.device, chunks: list[int | None], reps: int,
          log=print) -> list[dict]:
    """One row per candidate: name, chunk_tokens, gemm_work, time quantiles (s), x_gemm, x_dense, peak bytes."""
    inp = P.make_inputs(shape, dtype, device, with_ref=False)
    opts = dict(beta=P.BETA, alpha=P.ALPHA, sft_norm=P.SFT_NORM, loss_type=P.LOSS_TYPE)
    bounds = inp.cu_seqlens.tolist()
    auto = default_chunk_tokens(shape.v, device)

    def ours(chunk):
        return lambda: fused_linear_rpo_loss(inp.hidden, inp.weight, inp.targets, inp.cu_seqlens, **opts,
                                             backward="fwdgrad", chunk_tokens=chunk).loss

    runs = {"gemm": P.build("gemm", inp), "dense": P.build("dense", inp)}
    runs.update({f"fwdgrad chunk={chunk or f'auto ({auto})'}": P.LossRun(ours(chunk)) for chunk in chunks})
    chunk_of = {"gemm": None, "dense": None, **{f"fwdgrad chunk={c or f'auto ({auto})'}": c or auto for c in chunks}}
    cands = [candidate(name, run, inp, "full") for name, run in runs.items()]
    log(f"N={shape.n} H={shape.h} V={shape.v} pairs={shape.pairs} {dtype} on {env.device_name(device)}: "
        f"timing {len(cands)} candidates x {reps} rounds")
    times, _ = time_interleaved(cands, device, min_reps=reps, max_reps=reps, budget_s=0.0)
    rows = []
    for name, run in runs.items():
        peak = None
        if name != "gemm":  # the floor is a time only: it materializes the logits
            inp.clear_grads()
            peak = measure_memory(lambda r=run: r.backward(r.forward()), device).peak
        chunk = chunk_of[name]
        rows.append(dict(name=name, chunk_tokens=chunk, gemm_work=None if chunk is None else gemm_work(bounds, chunk),
                         p50=times[name].p50, p20=times[name].p20, p80=times[name].p80, peak=peak))
    inp.clear_grads()
    by = {r["name"]: r for r in rows}
    for r in rows:
        r["x_gemm"] = r["p50"] / by["gemm"]["p50"]
        r["x_dense"] = r["p50"] / by["dense"]["p50"]
        r["peak_over_dense"] = None if r["peak"] is None else r["peak"] / by["dense"]["peak"]
        log(f"  {r['name']:28s} {r['p50'] * 1e3:9.1f} ms  x GEMMs {r['x_gemm']:.3f}  x dense {r['x_dense']:.3f}"
            + ("" if r["peak"] is None else f"  peak {r['peak'] / 2**20:8.1f} MiB ({r['peak_over_dense']:.3f} of dense)"))
    return rows


def summary_markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# fwdgrad chunk sweep: {meta['device']}", "",
             f"- date: {meta['date']}; commit: {meta['commit']}; command: `{meta['command']}`",
             f"- shape: N={meta['n']} H={meta['h']} V={meta['v']}, {meta['pairs']} pairs, {meta['dtype']}, "
             f"forward+backward, {meta['reps']} interleaved rounds (p50 [p20, p80])", "",
             "| candidate | chunk rows | gemm work | time ms | x GEMMs | x dense | peak MiB | peak / dense |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {r['name']} | {fmt(r['chunk_tokens'], 'd')} | {fmt(r['gemm_work'], '.3f')} | "
                     f"{r['p50'] * 1e3:.1f} [{r['p20'] * 1e3:.1f}, {r['p80'] * 1e3:.1f}] | {r['x_gemm']:.3f} | "
                     f"{r['x_dense']:.3f} | {fmt(None if r['peak'] is None else r['peak'] / 2**20, '.1f')} | "
                     f"{fmt(r['peak_over_dense'], '.3f')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [r for r in rows if r["chunk_tokens"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["peak_over_dense"] for r in ours], [r["x_gemm"] for r in ours], "o-", label="fwdgrad")
    for r in ours:
        ax.annotate(str(r["chunk_tokens"]), (r["peak_over_dense"], r["x_gemm"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    dense = next(r for r in rows if r["name"] == "dense")
    ax.plot([dense["peak_over_dense"]], [dense["x_gemm"]], "s", color="gray", label="dense")
    ax.axhline(1.0, color="black", lw=0.8, ls=":", label="bare GEMMs")
    ax.set_xscale("log")
    ax.set_xlabel("peak extra memory / dense")
    ax.set_ylabel("time / bare head GEMMs")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1024, help="response tokens (rows of the head)")
    parser.add_argument("--h", type=int, default=256)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--pairs", type=int, default=4, help="pairs (sequences of N / 2B tokens each)")
    parser.add_argument("--chunks", default="auto,192,128,112,96,64", help="chunk_tokens values; auto = the default")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--reps", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is steadier on a busy machine)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="output folder")
    args = parser.parse_args(argv)
    chunks = parse_chunks(args.chunks)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    shape = Shape(args.n, args.h, args.v, pairs=args.pairs)
    start = time.perf_counter()
    rows = sweep(shape, getattr(torch, args.dtype), device, chunks, args.reps)
    default = env.default_out_dir(device)  # bench/results/<device>-<date>-<commit>
    out = args.out or os.path.join(os.path.dirname(default), f"chunk-sweep-N{args.n}-{os.path.basename(default)}")
    os.makedirs(out, exist_ok=True)
    meta = dict(device=env.device_name(device), date=env.timestamp(), commit=env.git_sha(), versions=env.versions(),
                command="python -m bench.chunk_sweep " + " ".join(argv if argv is not None else sys.argv[1:]),
                n=args.n, h=args.h, v=args.v, pairs=args.pairs, dtype=args.dtype, reps=args.reps,
                wall_s=round(time.perf_counter() - start, 1))
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(summary_markdown(rows, meta))
    plot(rows, os.path.join(out, "frontier.png"),
         f"fwdgrad chunk_tokens, N={args.n} H={args.h} V={args.v} {args.dtype}\n{meta['device']} @ {meta['commit']}")
    print(f"wrote {out}/summary.md, results.json, frontier.png ({meta['wall_s']} s)")
    return rows


if __name__ == "__main__":
    main()
