"""The logged per-pair metrics: sums over a micro-batch, and pair-weighted means over micro-batches."""
import math
import os

import pytest
import torch

from rpo_fast.loss import RPOOutput
from rpo_fast.metrics import PAIR_METRICS, metrics_from_sums, pair_metric_sums


def _output(chosen_rewards, rejected_rewards, pref_loss, nll, alpha):
    c, r = torch.tensor(chosen_rewards), torch.tensor(rejected_rewards)
    n = c.numel()
    zeros = torch.zeros(n)
    return RPOOutput(loss=torch.tensor(pref_loss + alpha * nll), pref_loss=torch.tensor(pref_loss),
                     nll=torch.tensor(nll), chosen_logps=c * 10, rejected_logps=r * 10, ref_chosen_logps=zeros,
                     ref_rejected_logps=zeros, chosen_rewards=c, rejected_rewards=r,
                     chosen_token_counts=zeros + 1, rejected_token_counts=zeros + 1)


def test_one_micro_batch():
    """Each metric's sum over 4 pairs, by hand. Chosen and rejected differ in every sum (rewards, log-probs, ranked
    right or wrong), so a metric read from the other half shows. A tie (equal rewards, as every pair has before
    training) is not ranked right: accuracy counts c > r."""
    out = _output([0.5, -0.25, 0.0, 1.0], [0.125, 0.5, 0.0, -1.0], pref_loss=0.7, nll=2.0, alpha=0.5)
    out = out._replace(chosen_logps=torch.tensor([-3.0, -5.5, -7.0, -2.0]),
                       rejected_logps=torch.tensor([-4.0, -9.0, -6.5, -11.0]))
    got = dict(zip(PAIR_METRICS, pair_metric_sums(out, 4, alpha=0.5).tolist()))
    expected = {"loss": 4 * (0.7 + 0.5 * 2.0), "pref_loss": 4 * 0.7, "nll": 4 * 2.0, "rewards/chosen": 1.25,
                "rewards/rejected": -0.375, "rewards/margins": 0.375 - 0.75 + 0.0 + 2.0,
                "rewards/accuracies": 2.0, "logps/chosen": -17.5, "logps/rejected": -30.5}
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_micro_batches_average_by_pair_and_nll_by_its_share():
    """Two micro-batches (3 pairs, then 1): every metric is a pair-weighted mean; with `nll_pairs` (token_mean,
    the micro-batch's share of the step's chosen tokens, in pairs) the NLL and its share of the loss are
    weighted by it instead."""
    a = _output([1.0, 0.0, 0.0], [0.0, 0.5, 0.0], pref_loss=0.6, nll=1.0, alpha=2.0)
    b = _output([2.0], [1.0], pref_loss=0.2, nll=3.0, alpha=2.0)
    means = metrics_from_sums(pair_metric_sums(a, 3, alpha=2.0) + pair_metric_sums(b, 1, alpha=2.0), 4)
    assert means["pref_loss"] == pytest.approx((3 * 0.6 + 0.2) / 4)
    assert means["nll"] == pytest.approx((3 * 1.0 + 3.0) / 4)
    assert means["rewards/accuracies"] == pytest.approx(2 / 4)
    assert means["rewards/margins"] == pytest.approx((1.0 - 0.5 + 0.0 + 1.0) / 4)
    # token_mean: a has 1 chosen token in all, b has 3, so their NLL shares are 1 and 3 of 4 pairs.
    weighted = metrics_from_sums(pair_metric_sums(a, 3, nll_pairs=1.0, alpha=2.0)
                                 + pair_metric_sums(b, 1, nll_pairs=3.0, alpha=2.0), 4)
    assert weighted["nll"] == pytest.approx((1 * 1.0 + 3 * 3.0) / 4)
    assert weighted["loss"] == pytest.approx(weighted["pref_loss"] + 2.0 * weighted["nll"])
    assert weighted["pref_loss"] == means["pref_loss"]


def test_loss_without_sft_term_ignores_an_infinite_nll():
    """alpha=0 (plain DPO): the NLL is only a metric, and the loss is the preference loss, even where the NLL is
    infinite (a chosen token of probability 0): 0 * inf would log a NaN loss, which the trainer skips the step
    for. The loss is formed from pref_loss and alpha * nll, not read from out.loss (the trainer's is weighted)."""
    out = _output([0.5, -0.25], [0.125, 0.5], pref_loss=0.7, nll=math.inf, alpha=0.0)
    got = metrics_from_sums(pair_metric_sums(out._replace(loss=torch.tensor(123.0)), 2, alpha=0.0), 2)
    assert got["loss"] == pytest.approx(0.7) and got["pref_loss"] == pytest.approx(0.7) and got["nll"] == math.inf
    weighted = pair_metric_sums(_output([1.0], [0.0], pref_loss=0.6, nll=1.5, alpha=2.0)._replace(
        loss=torch.tensor(-1.0)), 1, nll_pairs=3.0, alpha=2.0)
    assert weighted[0].item() == pytest.approx(0.6 + 2.0 * 1.5 * 3.0)


def test_final_table_names_the_steps_each_column_averages():
    """With log_every=3 the first logged step is 3: the column says so (it said 'train first 1')."""
    from rpo_fast.metrics import final_table

    records = [{"step": s, "loss": float(s), "tokens/s": 1.0, "peak_mem_mb": 1.0} for s in range(3, 31, 3)]
    header, loss_row = final_table(records, None, None).splitlines()[:2]
    assert header.split()[1:] == ["step", "3", "step", "30", "eval", "before", "eval", "after"]
    assert loss_row.split()[1:3] == ["3", "30"]
    header = final_table([dict(r, step=r["step"] + 9990) for r in records] * 2, None, None).splitlines()[0]
    assert "steps 9993-9996  " in header  # wide labels keep a gap between columns


def test_final_table_leaves_out_skipped_steps():
    """A skipped (non-finite) step's record has a NaN loss: the columns average the logged steps that trained.
    Steps 1, 2, [3 skipped], 4 with window 2: first = steps 1-2, last = steps 2 and 4."""
    from rpo_fast.metrics import final_table

    records = [{"step": s, "loss": float(s), "tokens/s": 1.0, "peak_mem_mb": 1.0, "skipped": False} for s in (1, 2, 4)]
    records.insert(2, {"step": 3, "loss": float("nan"), "tokens/s": 1.0, "peak_mem_mb": 1.0, "skipped": True})
    header, loss_row = final_table(records, None, None, window=2).splitlines()[:2]
    assert header.split()[1:5] == ["steps", "1-2", "steps", "2-4"]
    assert loss_row.split()[1:3] == ["1.5", "3"]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from Linux's /proc")
def test_cpu_peak_memory_is_the_peak_resident_set_in_mib():
    """On the CPU, peak_mem_mb is this process's peak resident set in MiB: Linux's VmHWM (kB = KiB) / 1024."""
    from rpo_fast.metrics import peak_memory_mb

    hold = torch.ones(64 * 2**20 // 4)  # 64 MiB touched: the peak is at least that much above nothing
    got = peak_memory_mb(torch.device("cpu"))
    with open("/proc/self/status") as f:
        hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    assert got == pytest.approx(hwm_kib / 1024, rel=0.05)
    assert got > 64 and hold.sum() > 0


def test_tensorboard_drops_its_events_past_the_checkpoint_on_resume(tmp_path, monkeypatch):
    """metrics.jsonl forgets the steps a crash lost after the last checkpoint; TensorBoard must too (purge_step),
    or a resumed run shows those steps twice. The tensorboard package is not in the pinned set: a stand-in."""
    import importlib.util
    import sys
    import types

    from rpo_fast.metrics import MetricsLogger

    made = []

    class SummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            made.append(purge_step)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "tensorboard" else real_find_spec(name, *a))
    MetricsLogger(tmp_path, tensorboard=True)
    MetricsLogger(tmp_path, tensorboard=True, resume_step=4)
    assert made == [None, 5]


def test_read_records_drops_a_torn_last_line_and_names_a_bad_line_elsewhere(tmp_path, capsys):
    """A run killed while appending to metrics.jsonl leaves a partial last line: --resume crashed on it with a
    JSONDecodeError that named no file. It is dropped now, with a notice; a bad line before the last is a
    ValueError naming the file and the line."""
    from rpo_fast.metrics import MetricsLogger, read_records

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_records(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert f"notice: {path}: dropped its last line 4, cut short" in capsys.readouterr().out
    MetricsLogger(tmp_path, tensorboard=False, resume_step=2)  # what --resume does: the torn line goes
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'

    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=rf"{path}: line 2 is not a JSON record"):
        read_records(path)
