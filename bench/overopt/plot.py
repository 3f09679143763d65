"""The figure: held-out log-prob of the preferred responses vs step (the paper's Figure 1, right panel),
beside the reward margin and the gold accuracy. Lines are the mean over seeds; the band spans the seeds."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

COLORS = {"dpo": "#d62728", "rpo_sum": "#1f77b4", "rpo_seq_mean": "#2ca02c", "rpo_sum_paper_eta": "#9467bd"}
STYLES = {"dpo": "-", "rpo_sum": "--", "rpo_seq_mean": "-.", "rpo_sum_paper_eta": ":"}  # overlaps stay visible
PANELS = (("eval/logp_chosen", "log-prob of preferred responses (nats)\n(held-out, summed over response tokens)"),
          ("eval/margin", "reward margin  β·Δ log-ratio (nats)\n(held-out)"),
          ("eval/gold_acc", "gold accuracy: greedy answers\ncorrect (held-out prompts)"))


def series(rows: list[dict], variant: str, metric: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) over seeds of one variant's metric; steps every seed has."""
    by_step = defaultdict(list)
    for r in rows:
        if r["variant"] == variant and r["metric"] == metric:
            by_step[int(r["step"])].append(float(r["value"]))
    n_seeds = max((len(v) for v in by_step.values()), default=0)
    steps = sorted(s for s, v in by_step.items() if len(v) == n_seeds)
    return (steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], [min(by_step[s]) for s in steps],
            [max(by_step[s]) for s in steps])


def plot(rows: list[dict], labels: dict[str, str], path: str | Path, title: str, epoch_steps: int = 0) -> Path:
    """One panel per PANELS metric; dotted verticals at epoch boundaries when `epoch_steps` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(15, 4.6))
    for ax, (metric, ylabel) in zip(axes, PANELS):
        for variant, label in labels.items():
            steps, mean, lo, hi = series(rows, variant, metric)
            if not steps:
                continue
            color = COLORS.get(variant)
            ax.plot(steps, mean, STYLES.get(variant, "-"), marker="o", ms=3.5, lw=1.8, color=color, label=label)
            if lo != hi:
                ax.fill_between(steps, lo, hi, color=color, alpha=0.15, lw=0)
        if metric == "eval/gold_acc":
            top = max((v for r in rows if r["metric"] == metric for v in [float(r["value"])]), default=0.0)
            ax.set_ylim(-0.02, max(0.1, min(1.0, top * 1.15 + 0.02)))
        last = max((int(r["step"]) for r in rows), default=0)
        for boundary in range(epoch_steps, last, epoch_steps) if epoch_steps else ():
            ax.axvline(boundary, color="0.6", ls=":", lw=1)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
