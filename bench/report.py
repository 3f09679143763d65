"""Output of a run: the long-format CSV, the printed/markdown tables, the targets, the plots.

    python -m bench.report RUN_DIR [--suite NAME]

writes RUN_DIR's summary.md and plots again from its results.csv (which a run writes row by row): for a run
stopped before it wrote them, e.g. killed at the GPU suite's hard limit.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections import defaultdict
from typing import Callable

from .providers import LABELS, ORDER, OURS
from .shapes import GPU_SUITES, PUBLISHED_CE, PUBLISHED_CE_LABEL, PUBLISHED_CE_MS

COLUMNS = ("op", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80", "config",
           "device", "git_sha", "versions", "timestamp")
MiB = 2 ** 20


class Results:
    """Collects rows (stamped with the run's metadata) and writes them as they come."""

    def __init__(self, csv_path: str, meta: dict):
        self.meta = meta
        self.rows: list[dict] = []
        self._file = open(csv_path, "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
        self._writer.writeheader()

    def emit(self, row: dict) -> None:
        row = {**row, **{k: self.meta[k] for k in ("device", "git_sha", "versions", "timestamp")}}
        row["config"] = row.get("config") or "{}"
        self.rows.append(row)
        self._writer.writerow({k: _fmt(row.get(k)) for k in COLUMNS})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _fmt(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return v


def read_csv(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("p50", "p20", "p80"):
            r[k] = float(r[k]) if r[k] not in ("", None) else math.nan
    return rows


def _cfg(row) -> dict:
    return json.loads(row["config"]) if isinstance(row["config"], str) else row["config"]


def point_of(row) -> tuple:
    """The benchmark point a loss row belongs to: (label, x_name, x_value, N, H, V). Two points may share a
    shape (a preset and a sweep step, say); their rows come from different timing runs and never mix."""
    c = _cfg(row)
    return c.get("label") or "", row["x_name"], str(row["x_value"]), c["N"], c["H"], c["V"]


def _index(rows):
    """(point, ref, mode, provider, metric) -> row, for the loss rows."""
    idx = {}
    for r in rows:
        if r["op"] != "rpo_head":
            continue
        idx[(point_of(r), _cfg(r)["ref"], r["mode"], r["provider"], r["metric"])] = r
    return idx


def _shape_key(point):
    return point[3:6]


def _failure(idx, point, ref, provider) -> str | None:
    """Why `provider` failed at this point and reference setting (its `failed` row's reason), or None."""
    for mode in ("full", "forward", "backward"):
        r = idx.get((point, ref, mode, provider, "failed"))
        if r is not None:  # one line, no table separators
            return " ".join((_cfg(r).get("reason") or "no reason recorded").split()).replace("|", "/")
    return None


# ---------------------------------------------------------------------------------------------- tables

def headline_tables(rows) -> list[str]:
    """One markdown table per labelled point, reference setting and mode."""
    idx = _index(rows)
    seen, out = [], []
    for r in rows:
        if r["op"] != "rpo_head" or r["metric"] not in ("time", "failed"):
            continue
        point = point_of(r)
        key = (point, _cfg(r)["ref"], r["mode"])
        if point[0] and key not in seen:
            seen.append(key)
    for point, ref, mode in seen:
        n, h, v = _shape_key(point)
        out.append(f"**{point[0]}** — N={n} H={h} V={v}, {_cfg(next(r for r in rows if r['op'] == 'rpo_head'))['dtype']}, "
                   f"{'with' if ref else 'no'} reference head, mode `{mode}`\n")
        out.append("| provider | time ms p50 [p20, p80] | TFLOP/s | x GEMM floor | peak extra MiB | workspace MiB "
                   "| mem / dense | rel diff vs dense: loss / dh / dW |")
        out.append("|---|---|---|---|---|---|---|---|")
        for p in ORDER:
            get = lambda m, md=mode: idx.get((point, ref, md, p, m))  # noqa: E731
            t = get("time")
            if t is None:
                failed = _failure(idx, point, ref, p)
                if failed:
                    out.append(f"| {LABELS[p]} (`{p}`) | **failed**: {failed} |" + " |" * 6)
                continue
            cells = [f"{LABELS[p]} (`{p}`)", f"{t['p50'] * 1e3:.2f} [{t['p20'] * 1e3:.2f}, {t['p80'] * 1e3:.2f}]",
                     _num(get("tflops"), "{:.2f}"), _num(get("x_gemm"), "{:.2f}"),
                     _num(get("peak_mem"), "{:.1f}", MiB), _num(get("peak_workspace"), "{:.1f}", MiB),
                     _num(get("mem_vs_dense"), "{:.3f}"), _same_result_cell(idx, point, ref, p) if mode == "full" else ""]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return out


def _num(row, fmt, scale=1.0):
    """'—' when not measured; 'NaN' when measured and NaN (a broken result, never to be read as missing)."""
    if row is None:
        return "—"
    if math.isnan(row["p50"]):
        return "NaN"
    return fmt.format(row["p50"] / scale)


def _same_result_cell(idx, point, ref, provider) -> str:
    """'2.0e-08 / 6.2e-07 / 6.0e-07' (loss / dh / dW against dense), in bold with what is wrong when the
    provider's result is not finite or differs from dense's by more than rounding explains."""
    get = lambda m: idx.get((point, ref, "full", provider, m))  # noqa: E731
    cell = " / ".join(_num(get(m), "{:.1e}") for m in ("loss_rel_diff", "dh_rel_diff", "dw_rel_diff"))
    same = get("same_result")
    if same is not None and same["p50"] != 1:
        return f"**{cell}: DIFFERS ({_cfg(same).get('why', '')})**"
    return cell


def result_notes(rows) -> list[str]:
    """One bold line per provider and point whose first-call result is not finite or differs from dense's."""
    out = []
    for r in rows:
        if r["op"] == "rpo_head" and r["metric"] == "same_result" and r["p50"] != 1:
            label, x_name, x_value = point_of(r)[:3]
            where = (label or f"{x_name}={x_value}") + (" +ref" if _cfg(r)["ref"] else "")
            out.append(f"**`{r['provider']}` at {where}: the result differs from dense's or is not finite "
                       f"({_cfg(r).get('why', '')}): its times measure a wrong computation.**")
    return out


def sweep_tables(rows) -> list[str]:
    """Time and peak memory (mode full, no reference) along V and along N."""
    out = []
    for axis in ("V", "N"):
        series = sweep_series(rows, axis)
        if not series:
            continue
        (fixed_name, fixed), data = series
        xs = sorted({x for d in data.values() for x in d})
        out.append(f"**Sweep over {axis}** ({fixed_name}, mode `full`, no reference): time ms p50 / peak extra MiB\n")
        out.append("| provider | " + " | ".join(f"{axis}={x}" for x in xs) + " |")
        out.append("|---|" + "---|" * len(xs))
        for p in ORDER:
            if p not in data:
                continue
            cells = []
            for x in xs:
                t, m = data[p].get(x, (None, None))
                if t is None or t["metric"] == "failed":
                    cells.append("—" if t is None else "failed")
                    continue
                cells.append(f"{t['p50'] * 1e3:.1f} / " + ("—" if m is None else f"{m['p50'] / MiB:.0f}"))
            out.append(f"| `{p}` | " + " | ".join(cells) + " |")
        out.append("")
    return out


def sweep_series(rows, axis: str):
    """{provider: {x: (time row, peak_mem row or None)}} along `axis` through the headline-like shape: for V
    the points sharing the most common (N, H); for N those sharing the most common (H, V). Where two points
    sit at one x (a preset and a sweep step of the same shape), the first measured stands for x, for every
    provider: time and memory always come from one point. A provider that failed there has (its `failed`
    row, None) instead."""
    cand = [r for r in rows if r["op"] == "rpo_head" and r["mode"] == "full" and r["metric"] == "time"
            and not _cfg(r)["ref"]]
    cand += [r for r in rows if r["op"] == "rpo_head" and r["metric"] == "failed" and not _cfg(r)["ref"]]
    if not cand:
        return None

    def fixed_of(c):
        return (c["N"], c["H"]) if axis == "V" else (c["H"], c["V"])

    groups = defaultdict(set)
    for r in cand:
        c = _cfg(r)
        groups[fixed_of(c)].add(c[axis])
    fixed, xs = max(groups.items(), key=lambda kv: (len(kv[1]), kv[0]))
    if len(xs) < 2:
        return None
    idx = _index(rows)
    point_at = {}  # x -> the point that stands for it
    data = defaultdict(dict)
    for r in cand:
        c = _cfg(r)
        if fixed_of(c) != fixed or point_at.setdefault(c[axis], point_of(r)) != point_of(r):
            continue
        if r["metric"] == "failed":
            data[r["provider"]].setdefault(c[axis], (r, None))
        else:
            data[r["provider"]][c[axis]] = (r, idx.get((point_of(r), False, "full", r["provider"], "peak_mem")))
    name = f"N={fixed[0]}, H={fixed[1]}" if axis == "V" else f"H={fixed[0]}, V={fixed[1]}"
    return (name, fixed), data


def train_table(rows) -> list[str]:
    tr = [r for r in rows if r["op"] == "train_step"]
    if not tr:
        return []
    out = ["**Training step** (random-init model, packed RPO batch, AdamW; reference log-probs cached)\n",
           "| model | provider | tokens/step | ms/step p50 | tokens/s p50 [p20, p80] | peak step extra MiB | peak GiB |",
           "|---|---|---|---|---|---|---|"]
    by = defaultdict(dict)
    for r in tr:
        by[(r["x_value"], r["provider"])][r["metric"]] = r
    for (model, provider), m in by.items():
        if "failed" in m:
            out.append(f"| {model} | {provider} | | failed: {_cfg(m['failed']).get('reason', '')} | | | |")
            continue
        c = _cfg(m["step_time"])
        tok = m["tokens_per_s"]
        peak = "—" if "peak_mem" not in m else f"{m['peak_mem']['p50'] / 2**30:.1f}"
        out.append(f"| {model} | {provider} | {c['tokens']} | {m['step_time']['p50'] * 1e3:.1f} | "
                   f"{tok['p50']:.0f} [{tok['p20']:.0f}, {tok['p80']:.0f}] | "
                   f"{m['peak_step_extra']['p50'] / MiB:.1f} | {peak} |")
    out.append("")
    return out


def _by_label(rows, op: str) -> dict[str, dict[tuple[str, str], float]]:
    """{x_value: {(provider, metric): p50}} of the rows of one correctness `op`."""
    by = defaultdict(dict)
    for r in rows:
        if r["op"] == op:
            by[r["x_value"]][(r["provider"], r["metric"])] = r["p50"]
    return by


def _judged_cells(m: dict, provider: str, baseline: str, quantities, tag: str) -> tuple[list[str], str]:
    """Table cells 'err (tag baseline-err)' per quantity, and 'yes' when every pass_* row of `provider` is 1."""
    cells = []
    for q in quantities:
        e, b = m.get((provider, f"rel_err_{q}")), m.get((baseline, f"rel_err_{q}"))
        cells.append("—" if e is None else f"{e:.1e} ({tag} {b:.1e})")
    passes = [v for (p, k), v in m.items() if p == provider and k.startswith("pass")]
    return cells, "yes" if passes and all(v == 1 for v in passes) else "NO"


def correctness_table(rows) -> list[str]:
    by = _by_label(rows, "correctness")
    if not by:
        return []
    out = ["**Correctness** (rel. error vs the dense op in a higher precision: float64 for fp32 inputs, fp32 for "
           "bf16; pass: err <= 2 x same-dtype dense err + tol)\n",
           "| shape | path | value | dhidden | dweight | pass |", "|---|---|---|---|---|---|"]
    for label, m in by.items():
        for provider in dict.fromkeys(p for p, _ in m if p != "dense"):
            loss = any(k.startswith("rel_err_loss") for p, k in m if p == provider)
            path = f"loss backward={provider[5:]}" if loss else f"linear_logprobs impl={provider[5:]}"
            quantities = ("loss", "loss_dhidden", "loss_dweight") if loss else ("logprobs", "dhidden", "dweight")
            cells, ok = _judged_cells(m, provider, "dense", quantities, "dense")
            out.append(f"| {label} | {path} | " + " | ".join(cells) + f" | {ok} |")
    out.append("")
    return out


def _against_baseline_table(rows, op: str, heading: str, first: str, quantities, baseline: str, tag: str,
                            label_of: Callable[[str, str], str]) -> list[str]:
    """A correctness table of `op` rows: one line per (label, provider other than `baseline`)."""
    by = _by_label(rows, op)
    if not by:
        return []
    out = [heading + "\n", f"| {first} | path | " + " | ".join(quantities) + " | pass |",
           "|---|---|" + "---|" * len(quantities) + "---|"]
    for label, m in by.items():
        for provider in dict.fromkeys(p for p, _ in m if p != baseline):
            cells, ok = _judged_cells(m, provider, baseline, quantities, tag)
            out.append(f"| {label_of(label, provider)} | {provider} | " + " | ".join(cells) + f" | {ok} |")
    out.append("")
    return out


def attention_correctness_table(rows) -> list[str]:
    """The packed attention's kernels against the CPU sdpa path in float64 (`bench.attention_correctness`)."""
    return _against_baseline_table(
        rows, "attention_correctness", "**Attention correctness** (packed rows of random pairs, bf16, 8 query / 2 "
        "key-value heads; rel. error vs the CPU sdpa path in float64; pass: err <= 2 x that path's own bf16 err + "
        "0.01)", "layout", ("out", "dq", "dk", "dv"), "cpu sdpa bf16", "cpu",
        lambda label, backend: label.replace(f"attention {backend} ", ""))


def backbone_correctness_table(rows) -> list[str]:
    """Liger's backbone kernels against the model without them in fp32 (`bench.backbone_correctness`)."""
    return _against_baseline_table(
        rows, "backbone_correctness", "**Backbone kernels** (2-layer random-init models, bf16; rel. error vs the "
        "model without the kernels in fp32; pass: err <= 2 x the bf16 model's own err without them + 0.01)",
        "model", ("loss", "grads"), "bf16 without", "without", lambda label, provider: label)


# --------------------------------------------------------------------------------------------- targets

FUSED = "ours_fwdgrad"  # the fused RPO loss as users get it (backward="auto" where gradients are needed)


def targets(rows, suite: str, skipped: dict[str, str] | None = None) -> list[dict]:
    """The issue-12 targets with measured ratios, judged on the fused RPO loss (`FUSED`), and the same ratios
    for every other backward choice as information. Each: name, target, measured, met (True/False/None).
    A ratio without a value says why: the provider failed (its reason), was skipped (`skipped`, the run's
    list), or was not measured at that point."""
    idx = _index(rows)
    skipped = skipped or {}

    def val(point, ref, mode, provider, metric):
        r = idx.get((point, ref, mode, provider, metric))
        return None if r is None or math.isnan(r["p50"]) else r["p50"]

    def missing(point, *providers):
        why = []
        for p in providers:
            if val(point, False, "full", p, "time") is not None:
                continue
            failed = _failure(idx, point, False, p) if point else None
            why.append(f"`{p}` failed ({failed})" if failed else f"`{p}` skipped ({skipped[p]})" if p in skipped
                       else f"`{p}` not measured")
        return "; ".join(why) or None

    def judged(provider, name, goal, value, test, note=None, extra=None):
        if provider == FUSED:
            return _target(name, goal, value, test, note, extra)
        return _target(name, "(info)", value, None, note, extra)

    out = []
    gpu = suite in GPU_SUITES
    note = {"gpu": None, "gpu-dryrun": "dry run on CPU at toy sizes: not a measurement"}.get(
        suite, "not measured: no GPU in this run")
    # GPU: judged at the point labelled llama-3-8b (N=16384, H=4096, V=128256 in the gpu suite).
    llama = _labelled(rows, "llama-3-8b")
    t_gemm, t_liger = (val(llama, False, "full", p, "time") for p in ("gemm", "liger"))
    w_dense = val(llama, False, "full", "dense", "peak_workspace")
    for p in OURS:
        t = val(llama, False, "full", p, "time")
        work = _ratio(val(llama, False, "full", p, "peak_workspace"), w_dense)
        out.append(judged(p, f"GPU llama-3-8b full: `{p}` time / bare GEMMs", "<= 1.2", _ratio(t, t_gemm),
                          lambda x: x <= 1.2, note or missing(llama, p, "gemm"), f"workspace / dense {_fmt_ratio(work)}"))
    out.append(_target(f"GPU llama-3-8b full: Liger time / `{FUSED}` time", ">= 1.5",
                       _ratio(t_liger, val(llama, False, "full", FUSED, "time")), lambda x: x >= 1.5,
                       note or missing(llama, "liger", FUSED)))
    ce_point = _labelled(rows, PUBLISHED_CE_LABEL)
    ce = _shape_key(ce_point) if ce_point else tuple(PUBLISHED_CE[:3])
    quack = PUBLISHED_CE_MS["QuACK 0.6.1 chunked_linear_cross_entropy"] / 1e3
    t_ce = val(ce_point, False, "full", FUSED, "time")
    out.append(_target(f"GPU {PUBLISHED_CE_LABEL} (M={ce[0]} H={ce[1]} V={ce[2]}) full: `{FUSED}` time / QuACK's "
                       f"published {quack * 1e3:.2f} ms (H200)", "<= 1.15", _ratio(t_ce, quack), lambda x: x <= 1.15,
                       note or missing(ce_point, FUSED) or "comparable on an H200 only"))
    # CPU: at V=32000, at every N measured there (fp32).
    cpu_points = sorted({point_of(r) for r in rows if r["op"] == "rpo_head" and _cfg(r)["V"] == 32000
                         and _cfg(r)["dtype"] == "float32"}, key=lambda pt: (_shape_key(pt), pt))
    if gpu or not cpu_points:
        why = "not measured in this run" if gpu else "no CPU point at V=32000 in this run"
        for name, goal in (("peak / dense peak", "<= 0.125"), ("time / dense time", "<= 1.0"),
                           ("time / bare GEMMs", "<= 1.15")):
            out.append(_target(f"CPU V=32000 full: `{FUSED}` {name}", goal, None, None, why))
        return out
    for point in cpu_points:
        tag = f"N={point[3]} H={point[4]}"
        get = lambda p, m: val(point, False, "full", p, m)  # noqa: E731
        for p in OURS:
            if get(p, "time") is None and p != FUSED and not _failure(idx, point, False, p):
                continue
            work = _ratio(get(p, "peak_workspace"), get("dense", "peak_workspace"))
            out.append(judged(p, f"CPU V=32000 {tag} full: `{p}` peak / dense peak", "<= 0.125",
                              _ratio(get(p, "peak_mem"), get("dense", "peak_mem")), lambda x: x <= 0.125,
                              missing(point, p, "dense"), f"workspace ratio {_fmt_ratio(work)}"))
            out.append(judged(p, f"CPU V=32000 {tag} full: `{p}` time / dense time", "<= 1.0",
                              _ratio(get(p, "time"), get("dense", "time")), lambda x: x <= 1.0,
                              missing(point, p, "dense")))
            out.append(judged(p, f"CPU V=32000 {tag} full: `{p}` time / bare GEMMs", "<= 1.15",
                              _ratio(get(p, "time"), get("gemm", "time")), lambda x: x <= 1.15,
                              missing(point, p, "gemm")))
    return out


def _labelled(rows, label):
    """The (first) point with this label, or None."""
    return next((point_of(r) for r in rows if r["op"] == "rpo_head" and _cfg(r).get("label") == label), None)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _fmt_ratio(x):
    return "—" if x is None else f"{x:.3f}"


def _target(name, goal, value, test, note=None, extra=None):
    met = None if value is None or test is None else bool(test(value))
    return dict(name=name, target=goal, measured=value, met=met, note=note or "", extra=extra or "")


def targets_table(ts) -> list[str]:
    out = ["| target | goal | measured | met | note |", "|---|---|---|---|---|"]
    for t in ts:
        met = {True: "met", False: "**not met**", None: "—"}[t["met"]]
        note = "; ".join(x for x in (t["note"], t["extra"]) if x)
        out.append(f"| {t['name']} | {t['target']} | {_fmt_ratio(t['measured'])} | {met} | {note} |")
    out.append("")
    return out


# ----------------------------------------------------------------------------------------------- plots

def plot(rows, path_prefix: str) -> list[str]:
    """vs_V.png and vs_N.png: time (p50 with p20-p80 bars) and peak extra memory per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for axis in ("V", "N"):
        series = sweep_series(rows, axis)
        if not series:
            continue
        (fixed_name, fixed), data = series
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
        markers = dict(zip(ORDER, "osD^vPX*hx"))  # distinct shapes: providers often overlap
        for p in ORDER:
            if p not in data:
                continue
            xs = sorted(x for x, (r, _) in data[p].items() if r["metric"] == "time")
            if not xs:
                continue
            t50, lo, hi, mx, my = [], [], [], [], []
            for x in xs:
                r, mem = data[p][x]
                t50.append(r["p50"] * 1e3)
                lo.append((r["p50"] - r["p20"]) * 1e3)
                hi.append((r["p80"] - r["p50"]) * 1e3)
                if mem is not None:
                    mx.append(x)
                    my.append(mem["p50"] / MiB)
            style = dict(marker=markers[p], markerfacecolor="none", markersize=8, alpha=0.85, label=LABELS[p])
            ax_t.errorbar(xs, t50, yerr=[lo, hi], capsize=3, **style)
            if my:
                ax_m.plot(mx, my, **style)
        dtype = _cfg(next(r for r in rows if r["op"] == "rpo_head"))["dtype"]
        for ax, ylabel in ((ax_t, "time fwd+bwd (ms, p50, p20-p80)"), (ax_m, "peak extra memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=7)
        fig.suptitle(f"RPO loss through the LM head, {fixed_name}, {dtype}, no reference head — "
                     f"{rows[0]['device']} @ {rows[0]['git_sha']}", fontsize=9)
        fig.tight_layout()
        path = f"{path_prefix}vs_{axis}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def summary_markdown(rows, meta: dict, skipped: dict[str, str], extra_notes: list[str]) -> str:
    ts = targets(rows, meta["suite"], skipped)
    lines = [f"# rpo-fast benchmark run: {meta['device']}", "",
             f"- date: {meta['timestamp']}", f"- commit: {meta['git_sha']}", f"- versions: {meta['versions']}",
             f"- suite: {meta['suite']}; command: `{meta['command']}`",
             "- wall time: " + (f"{meta['wall_s']:.0f} s" if "wall_s" in meta else "unknown"),
             ""]
    notes = extra_notes + result_notes(rows)
    lines += notes + [""] if notes else []
    if skipped:
        lines += ["Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items()), ""]
    lines += ["## Targets", ""] + targets_table(ts) + [
        f"Targets are judged on the fused RPO loss as users get it (`{FUSED}`); the other backward choices show "
        "the same ratios as information ((info)). Peak extra memory is the highest allocation above the inputs "
        "during the call, gradients included; *workspace* subtracts the gradients dh and dW that every provider "
        "must return.", ""]
    lines += ["Reading the providers: Liger computes its gradients inside the forward (one chunk of pairs at a "
              "time), so its `forward` carries nearly the whole cost and its `backward` only hands back stored "
              "gradients: compare `full`. On CPU `cce` is Cut Cross-Entropy's `impl=\"torch_compile\"` (dense "
              "logits under torch.compile; its Triton kernel needs a GPU). `gemm` is a time floor, not a loss.", ""]
    lines += filter_caveat(rows, meta)
    lines += providers_section(meta)
    lines += ["## Loss through the LM head", ""] + headline_tables(rows) + sweep_tables(rows)
    lines += published_ce_table(rows) + micro_table(rows)
    lines += (train_table(rows) + correctness_table(rows) + attention_correctness_table(rows)
              + backbone_correctness_table(rows))
    return "\n".join(lines) + "\n"


def filter_caveat(rows, meta: dict) -> list[str]:
    """What the gradient-filtering providers' times mean here, when the run has any: on a GPU `cce` (Cut
    Cross-Entropy's default) and `ours_atomic_filter` skip gradient tiles whose every entry is below a bf16-scale
    threshold, and how many they skip depends on the logits, which here are random."""
    on_gpu = (meta["device_type"] == "cuda" if "device_type" in meta  # a rebuild without meta.json: the rows' device
              else not str(meta.get("device", "")).startswith("CPU "))
    filtered = sorted({r["provider"] for r in rows if r["op"] == "rpo_head" and r["metric"] == "time"
                       and (r["provider"] == "ours_atomic_filter" or (r["provider"] == "cce" and on_gpu))})
    if not filtered:
        return []
    return [f"Gradient filters: {' and '.join(f'`{p}`' for p in filtered)} skip the backward's tiles in which "
            "every entry of the softmax gradient is below a bf16-scale threshold (Cut Cross-Entropy's default on a "
            "GPU; `RPO_FAST_GRAD_FILTER=auto` for ours): not exact, since the skipped entries can add up where the "
            "softmax is flat. The inputs here are random with unit-scale logits, so the softmax is nearly flat and few "
            "tiles fall below that threshold (at the Llama-3-8B head, about 20-46% of the tiles depending on the "
            "tile shape, measured on these inputs); a trained model's peaked distributions leave far more of them "
            "below it. Their times here therefore understate what the filter saves in training; the exact "
            "providers do not depend on the logits' distribution.", ""]


def providers_section(meta: dict) -> list[str]:
    """How each provider of the run was configured (meta["providers"], written by bench.run)."""
    config = meta.get("providers")
    if not config:
        return []
    return (["## How each provider ran", ""] + [f"- `{name}`: {how}" for name, how in config.items()] + [""])


def published_ce_table(rows) -> list[str]:
    """Our providers at the published cross-entropy heads' shape, beside the published times (H200)."""
    point = _labelled(rows, PUBLISHED_CE_LABEL)
    if point is None:
        return []
    shape = _shape_key(point)
    idx = _index(rows)
    out = [f"**Beside the published fused cross-entropy heads** (H200, bf16, M={shape[0]} H={shape[1]} V={shape[2]}, "
           "forward+backward; published figures from liger-kernel 0.8.5's CuTe-DSL SM90 kernel docstring, not "
           "measured here; ours is the RPO loss, which adds per-sequence reductions to cross-entropy)\n",
           "| head | ms | source |", "|---|---|---|"]
    out += [f"| {name} | {ms:.2f} | published |" for name, ms in PUBLISHED_CE_MS.items()]
    for p in ORDER:
        t = idx.get((point, False, "full", p, "time"))
        if t is not None and not math.isnan(t["p50"]):
            out.append(f"| {LABELS[p]} (`{p}`) | {t['p50'] * 1e3:.2f} | this run: {t['device']} |")
    out.append("")
    return out


def micro_table(rows) -> list[str]:
    """The micro-checks (bench/micro.py): fp32 atomics and addmm into an fp32 accumulator."""
    mr = [r for r in rows if r["op"] == "micro"]
    if not mr:
        return []
    out = ["**Micro-checks** (bench/micro.py)\n", "| check | variant | metric | value | note |", "|---|---|---|---|---|"]
    for r in mr:
        c = _cfg(r)
        value = "—" if math.isnan(r["p50"]) else f"{r['p50']:.4g} {r['unit']}".strip()
        note = c.get("unsupported") or c.get("reason") or ("sum exact" if c.get("exact") else
                                                            "**sum NOT exact**" if "exact" in c else "")
        out.append(f"| {r['x_value']} | {r['provider']} | {r['metric']} | {value} | {note} |")
    out.append("")
    return out


# ----------------------------------------------------------------------------------------------- rebuild

SEVEN_B_HEADING = "\n## 7B memory modes\n"


def rebuild(run_dir: str, suite: str | None = None, plots: bool = True) -> str:
    """Writes `run_dir`/summary.md (and the plots) from its results.csv; returns the summary's path.

    The run's meta.json gives the suite, command and skipped providers when it was written; otherwise they
    come from the rows (device, commit, versions, date), `suite` (default: "gpu" unless the rows' device is
    a CPU) and a note that says so. A "## 7B memory modes" section already in summary.md (bench/gpu_7b.py
    appends it) is kept at the end. Numbers come from the CSV, rounded there to 6 significant digits.
    """
    csv_path = os.path.join(run_dir, "results.csv")
    if not os.path.isfile(csv_path):
        raise ValueError(f"run_dir: expected a folder holding results.csv, got {run_dir!r}")
    rows = read_csv(csv_path)
    if not rows:
        raise ValueError(f"run_dir: expected measured rows in {csv_path}, got none")
    meta_path = os.path.join(run_dir, "meta.json")
    notes = ["**Summary rebuilt from results.csv by `python -m bench.report`** (the run stopped before writing "
             "it); the numbers are the CSV's, rounded to 6 significant digits."]
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        skipped = meta.pop("skipped", {})
        notes += meta.pop("notes", [])
    else:
        first = rows[0]
        meta = {key: first[key] for key in ("device", "git_sha", "versions", "timestamp")}
        meta["command"] = "unknown (no meta.json)"
        skipped = {}
        notes[0] += " No meta.json: the command, wall time and skipped providers of this run are not known."
    if suite is not None or "suite" not in meta:
        meta["suite"] = suite or ("cpu" if rows[0]["device"].startswith("CPU ") else "gpu")
    summary_path = os.path.join(run_dir, "summary.md")
    seven_b = ""
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            old = f.read()
        if SEVEN_B_HEADING in old:
            seven_b = old[old.index(SEVEN_B_HEADING):]
    with open(summary_path, "w", encoding="utf-8") as f:
        f.write(summary_markdown(rows, meta, skipped, notes) + seven_b)
    if plots:
        plot(rows, os.path.join(run_dir, ""))
    return summary_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[2])
    parser.add_argument("run_dir", help="a benchmark run's folder (holding results.csv)")
    parser.add_argument("--suite", default=None, help="the run's suite (gpu, gpu-dryrun, cpu, ...); default: "
                        "meta.json's, else gpu unless the rows' device is a CPU")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    try:
        print(rebuild(args.run_dir, args.suite, plots=not args.no_plots))
    except ValueError as e:
        parser.exit(2, f"python -m bench.report: error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
