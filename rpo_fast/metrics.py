"""Training metrics: the per-step JSONL log, the progress bar, TensorBoard, the final table and the plot.

Every record is a flat dict with "step" plus metric names as in TRL's DPO trainer: loss, pref_loss,
nll, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen,
logps/rejected, and tokens/s, peak_mem_mb, lr, grad_norm. Eval records carry the same names under
"eval/" (and "eval/gold_accuracy" for the generation check).
"""
from __future__ import annotations

import importlib.util
import json
import math
import resource
from pathlib import Path

import torch

# Per-pair metrics, in the order of the table and the reductions.
PAIR_METRICS = ("loss", "pref_loss", "nll", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected")


def pair_metric_sums(out, n_pairs: int, nll_pairs: float | None = None, *, alpha: float) -> torch.Tensor:
    """Sums over the pairs of one micro-batch, in PAIR_METRICS order: [len(PAIR_METRICS)] float64, on the
    device of `out` (the trainer adds them up there and reads them back once per step: a read per micro-batch
    would wait for the GPU).

    Scalars (loss, pref_loss, nll) are per-pair means, so they are weighted by `n_pairs`; dividing the
    sum over micro-batches (and processes) by the total pair count gives pair-weighted means. The NLL
    (and its share of the loss) is weighted by `nll_pairs` instead when given: for sft_norm="token_mean"
    the trainer passes the micro-batch's share of the step's chosen tokens, in pairs, so the result is
    the step's token mean.

    The loss is formed here as the loss functions form it, `pref_loss + alpha * nll`, or `pref_loss` alone
    when `alpha` is 0 (the NLL is then a metric, and may be infinite); `out.loss` is not read (the trainer's
    carries its micro-batch weights).
    """
    nll_pairs = n_pairs if nll_pairs is None else nll_pairs
    c, r = out.chosen_rewards.double(), out.rejected_rewards.double()
    pref, nll = out.pref_loss.detach().double(), out.nll.detach().double()
    sft = alpha * nll * nll_pairs if alpha else 0.0
    values = [pref * n_pairs + sft, pref * n_pairs,
              nll * nll_pairs, c.sum(), r.sum(), (c - r).sum(), (c > r).double().sum(),
              out.chosen_logps.detach().double().sum(), out.rejected_logps.detach().double().sum()]
    return torch.stack([v.reshape(()) for v in values])


def metrics_from_sums(sums: torch.Tensor, n_pairs: int, prefix: str = "") -> dict[str, float]:
    return {prefix + name: float(v) / max(n_pairs, 1) for name, v in zip(PAIR_METRICS, sums.tolist())}


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on `device` since the last `reset_peak_memory` (the trainer resets it at the
    start of each step: the step's peak), or on the CPU this process's peak resident set size so far (MB;
    it cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new peak for `peak_memory_mb` on a CUDA device (nothing to do on the CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class MetricsLogger:
    """Appends records to `<output_dir>/metrics.jsonl` and TensorBoard (when installed and enabled).

    On resume from `resume_step`, records of later steps (logged before a crash, then lost with the
    un-checkpointed work) are dropped first, so the log reads like one uninterrupted run.
    """

    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, resume_step: int | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        elif self.path.exists():
            kept = [r for r in read_records(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self.writer = None
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            # on resume, TensorBoard drops its events past the checkpoint too (purge_step), as the jsonl does
            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"),
                                        purge_step=None if resume_step is None else resume_step + 1)

    def log(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def flush(self) -> None:
        """Writes TensorBoard's buffered events to disk (metrics.jsonl is written record by record); the trainer
        calls it with each checkpoint, so a crash loses no event the checkpoint covers."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_records(path: str | Path, log=print) -> list[dict]:
    """The records of a metrics.jsonl file. An unparsable last line (the torn tail of a record being appended
    when the process was killed) is dropped, with a notice through `log`.

    Raises:
        ValueError: naming the file and line, for an unparsable line before the last.
    """
    lines = [(k, line) for k, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1)
             if line.strip()]
    records = []
    for position, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if position < len(lines) - 1:
                raise ValueError(f"{path}: line {number} is not a JSON record ({e}); expected one record per "
                                 "line, as the trainer writes them") from None
            log(f"notice: {path}: dropped its last line {number}, cut short ({len(line)} characters, not a "
                "JSON record): the tail of a record being written when the run stopped")
    return records


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "rpo", unit: str = "step",
                 leave: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit=unit, leave=leave,
                dynamic_ncols=True)


def progress_postfix(record: dict) -> dict[str, str]:
    return {"loss": f"{record['loss']:.4f}", "acc": f"{record['rewards/accuracies']:.2f}",
            "margin": f"{record['rewards/margins']:.3f}", "logp_c": f"{record['logps/chosen']:.1f}",
            "tok/s": f"{record['tokens/s']:.0f}"}


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def final_table(train_records: list[dict], eval_before: dict | None, eval_after: dict | None,
                window: int | None = None) -> str:
    """A plain-text table: each metric averaged over the first and the last `window` logged training steps
    (default: a tenth of them, at least 1; the column names their steps), and on the eval set before and after
    training."""
    rows = [r for r in train_records if "loss" in r and not r.get("skipped")]
    window = window or max(1, len(rows) // 10)
    first, last = rows[:window], rows[-window:]

    def mean(records, key):
        vals = [r[key] for r in records if key in r]
        return sum(vals) / len(vals) if vals else None

    def steps(records):  # the logged steps a column averages (every log_every-th step with log_every > 1)
        if not records:
            return "steps"
        a, b = records[0]["step"], records[-1]["step"]
        return f"step {a}" if a == b else f"steps {a}-{b}"

    columns = [steps(first), steps(last), "eval before", "eval after"]
    names = list(PAIR_METRICS) + ["gold_accuracy"]
    width = max(len(n) for n in names) + 2
    cell = max(16, *(len(c) + 2 for c in columns))
    lines = ["metric".ljust(width) + "".join(c.rjust(cell) for c in columns)]
    for name in names:
        cells = [mean(first, name), mean(last, name), (eval_before or {}).get(f"eval/{name}"),
                 (eval_after or {}).get(f"eval/{name}")]
        if all(c is None for c in cells):
            continue
        lines.append(name.ljust(width) + "".join(_fmt(c).rjust(cell) for c in cells))
    if rows:
        lines.append(f"steps {rows[-1]['step']}, tokens/s (mean) {mean(rows, 'tokens/s'):.0f}, "
                     f"peak memory {max(r['peak_mem_mb'] for r in rows):.0f} MB")
    return "\n".join(lines)


def plot_metrics(records: list[dict], path: str | Path, title: str = "RPO training") -> Path:
    """PNG of chosen/rejected log-probs and rewards (plus margins and accuracy) over steps; eval points as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r and not r.get("skipped")]
    evals = [r for r in records if "eval/loss" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("log-probs (summed over response)", ["logps/chosen", "logps/rejected"]),
              ("implicit rewards  beta * log(pi / pi_ref)", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
              ("loss and preference accuracy", ["loss", "rewards/accuracies"])]
    for ax, (label, keys) in zip(axes, panels):
        for key in keys:
            line, = ax.plot([r["step"] for r in train], [r[key] for r in train], label=key, linewidth=1.2)
            points = [(r["step"], r[f"eval/{key}"]) for r in evals if f"eval/{key}" in r]
            if points:
                ax.plot(*zip(*points), "o--", color=line.get_color(), label=f"eval/{key}", markersize=5)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
