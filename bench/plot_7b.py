"""Plot of the 7B memory modes: measured peak vs the planner's prediction per mode, with the card's limits.

    python -m bench.plot_7b RUN_DIR/gpu_7b.csv RUN_DIR/gpu_7b.png

Reads the CSV `bench/gpu_7b.py` writes (also inside `bash bench/gpu_suite.sh`); run it here after fetching a
GPU run (a lent machine returns at most 8 files, and the suite already writes 8). Bars are
`torch.cuda.max_memory_allocated` (GiB), diamonds the prediction, labels tokens/s; modes that did not run
are listed with their status under the axis.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

GPU_LIMITS_GIB = {"80 GB card (79.1 GiB)": 79.1, "24 GiB cap (LoRA)": 24.0}


def read_modes(path: Path) -> list[dict]:
    """One entry per (mode, path) in CSV order: name, peak, predicted (GiB), tokens_per_s, status."""
    entries: dict[tuple[str, str], dict] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            settings = json.loads(row["config"])
            key = (row["mode"], settings.get("path", "packed"))
            entry = entries.setdefault(key, {"name": f"{key[0]} ({key[1]})", "status": "ok",
                                             "device": row["gpu_name"], "version": row["version"]})
            if row["metric"] in ("skipped", "oom", "error"):
                entry["status"] = row["metric"]
            else:
                entry[row["metric"]] = float(row["p50"])
    return list(entries.values())


def plot(entries: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [e for e in entries if "peak_memory" in e]
    other = [f"{e['name']}: {e['status']}" for e in entries if "peak_memory" not in e]
    if not ran:
        raise ValueError(f"{out}: no mode in the CSV has a measured peak (statuses: {other})")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(ran) + 2), 5))
    xs = range(len(ran))
    ax.bar(xs, [e["peak_memory"] for e in ran], color="#4c72b0", label="measured peak")
    ax.scatter(xs, [e.get("predicted_peak", float("nan")) for e in ran], marker="D", color="#dd8452", zorder=3,
               label="planner's prediction")
    for x, e in zip(xs, ran):
        if "tokens_per_s" in e:
            ax.annotate(f"{e['tokens_per_s']:.0f} tok/s", (x, e["peak_memory"]), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 3), textcoords="offset points")
    top = max(max(e["peak_memory"], e.get("predicted_peak", 0)) for e in ran)
    for label, gib in GPU_LIMITS_GIB.items():
        if gib <= 1.3 * top:
            ax.axhline(gib, linestyle="--", linewidth=1, color="grey")
            ax.annotate(label, (len(ran) - 0.5, gib), ha="right", va="bottom", fontsize=7, color="grey")
    shown = [gib for gib in GPU_LIMITS_GIB.values() if gib <= 1.3 * top]
    ax.set_ylim(0, 1.25 * max([top, *shown]))  # room for the legend above the bars
    ax.set_xticks(list(xs), [e["name"] for e in ran], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("GiB")
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    ax.set_title(f"7B RPO memory modes — {ran[0]['device']} — {ran[0]['version'].split(';')[0]}", fontsize=9)
    if other:
        fig.text(0.01, 0.01, "not run: " + "; ".join(other), fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.05 if other else 0, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, help="gpu_7b.csv")
    parser.add_argument("out", type=Path, help="the PNG to write")
    args = parser.parse_args(argv)
    if not args.csv.is_file():
        parser.error(f"csv: expected an existing gpu_7b.csv, got {str(args.csv)!r}")
    try:
        print(plot(read_modes(args.csv), args.out))
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
