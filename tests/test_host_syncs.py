"""Host-device synchronizations of the fused loss and the training step, counted on the CPU.

On CUDA a host read of a device tensor (`.item()`, `.tolist()`, `bool()`, `.nonzero()`, a boolean-mask index,
`repeat_interleave` without `output_size`, ...) waits until the GPU has run everything queued before it, and
so does a copy from pageable host memory to the GPU (`.to(device)` without `non_blocking`). `count_host_syncs`
patches those torch.Tensor methods and torch functions and counts the calls made from rpo_fast's own code
(rpo_fast/ and kernels/): on the CPU each one stands for a synchronization the call would make on a GPU.
`cuda_branches` takes the branches the code takes on CUDA to avoid them (`rpo_fast.host_sync`) on the CPU.

The budgets are what the code makes now: a new read per chunk or per micro-batch breaks them.
"""
from __future__ import annotations

import collections
import contextlib
from collections import defaultdict
from types import SimpleNamespace
import functools
import os
import sys

import pytest
import torch

import rpo_fast
from rpo_fast import host_sync, trainer
from rpo_fast.config import load_config
from rpo_fast.liger_compat import RPOLoss
from rpo_fast.loss import fused_linear_rpo_loss, rpo_loss
from tiny_lm import build_tiny_model_dir, tiny_overrides

OURS = tuple(os.path.realpath(os.path.join(os.path.dirname(rpo_fast.__file__), d)) + os.sep
             for d in (".", "kernels", os.path.join("..", "kernels")))
# Functions that build or read a batch on the host, before it goes to the device: their reads wait for nothing.
# (By co_name, which Python 3.10 has too: packing.py's only `to` is PackedBatch.to.)
HOST_SIDE = {("packing.py", "pack_pairs"), ("packing.py", "_pack_shared_prompt"), ("packing.py", "to")}
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero", "unique",
         "unique_consecutive", "masked_select")


@functools.lru_cache(maxsize=None)
def _is_ours(filename: str) -> bool:
    return os.path.realpath(filename).startswith(OURS)


def _host_side(frame) -> bool:
    while frame is not None:
        if (os.path.basename(frame.f_code.co_filename), frame.f_code.co_name) in HOST_SIDE:
            return True
        frame = frame.f_back
    return False


def _bool_index(index) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
               for i in (index if isinstance(index, tuple) else (index,)))


def _unsized_repeats(repeats=None, *args, output_size=None, **kwargs) -> bool:
    return isinstance(repeats, torch.Tensor) and output_size is None and not args


def _blocking_copy(tensor, *args, non_blocking=False, **kwargs) -> bool:
    """`.to(device)` of a host tensor without non_blocking (on CUDA: a copy from pageable memory that waits)."""
    device = kwargs.get("device", next((a for a in args if isinstance(a, (torch.device, str))), None))
    return device is not None and tensor.device.type == "cpu" and not non_blocking


class HostSyncs(collections.Counter):
    """(kind, "file:line (function)") -> calls; `reads` and `copies` are the totals of each kind. On the CPU a
    `.to(device)` of a tensor already on the device (a no-op on a GPU too) looks like a host-to-device copy, so
    the tests count copies where the tensors come from the host (`where`)."""

    def total(self, kind: str | None = None, where: str = "") -> int:
        return sum(n for (k, site), n in self.items() if (kind is None or k == kind) and where in site)

    @property
    def reads(self) -> int:
        return self.total("read")

    @property
    def copies(self) -> int:
        return self.total("copy")

    def __str__(self) -> str:
        return ", ".join(f"{n} {kind} at {site}" for (kind, site), n in sorted(self.items()))


@contextlib.contextmanager
def count_host_syncs():
    """Counts, while active, the host reads and blocking host-to-device copies called from rpo_fast's code (not
    the reads of the host-side functions `HOST_SIDE`)."""
    counter, busy = HostSyncs(), [False]
    patches = []

    def wrap(owner, name, kind, condition=None):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if not busy[0]:
                busy[0] = True
                try:
                    caller = sys._getframe(1)
                    if (_is_ours(caller.f_code.co_filename) and (condition is None or condition(*args, **kwargs))
                            and (kind == "copy" or not _host_side(caller))):
                        code = caller.f_code
                        site = f"{os.path.basename(code.co_filename)}:{caller.f_lineno} ({code.co_name})"
                        counter[kind, site] += 1
                finally:
                    busy[0] = False
            return original(*args, **kwargs)

        patches.append((owner, name, original))
        setattr(owner, name, wrapper)

    for name in READS:
        wrap(torch.Tensor, name, "read")
    wrap(torch.Tensor, "__getitem__", "read", lambda self, index: _bool_index(index))
    wrap(torch.Tensor, "__setitem__", "read", lambda self, index, value: _bool_index(index))
    wrap(torch.Tensor, "repeat_interleave", "read", lambda self, *a, **k: _unsized_repeats(*a, **k))
    for name in ("nonzero", "argwhere", "unique", "masked_select"):
        wrap(torch, name, "read")
    wrap(torch, "repeat_interleave", "read", lambda x, *a, **k: _unsized_repeats(*a, **k))
    wrap(torch.Tensor, "to", "copy", _blocking_copy)
    try:
        yield counter
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


@pytest.fixture
def cuda_branches(monkeypatch):
    """The branches rpo_fast takes on CUDA to avoid synchronizations, taken on the CPU: `host_sync` answers as
    for a CUDA device, and pinning (CUDA-only) leaves the tensor as it is. Returns the pinned tensors' count."""
    pinned = []

    def pin_memory(self, *args, **kwargs):
        pinned.append(self.shape)
        return self

    monkeypatch.setattr(host_sync, "waits_for_host_reads", lambda device: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    return pinned


# --- the fused loss -------------------------------------------------------------------------------------------

V, H = 50, 8
LENGTHS = [5, 7, 4, 6, 3, 8]  # 3 pairs: with chunk_tokens=12, three chunks, and pieces for the longer pairs


def _loss_inputs(reference: bool):
    torch.manual_seed(0)
    n = sum(LENGTHS)
    hidden = torch.randn(n, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    targets = torch.randint(0, V, (n,))
    targets[2] = -100
    cu_seqlens = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32)
    ref = dict(ref_hidden=torch.randn(n, H), ref_weight=torch.randn(V, H)) if reference else {}
    return hidden, weight, targets, cu_seqlens, ref


@pytest.mark.parametrize("reference", [False, True])
def test_fused_loss_fwdgrad_reads_the_host_three_times(cuda_branches, reference):
    """Forward and backward of the default (fwdgrad) head: one read of cu_seqlens (the checks and the chunk
    plan), one of the targets' and token counts' checks together, and grad_output in backward; none per chunk
    or piece, and no blocking copy."""
    hidden, weight, targets, cu_seqlens, ref = _loss_inputs(reference)
    with count_host_syncs() as syncs:
        out = fused_linear_rpo_loss(hidden, weight, targets, cu_seqlens, impl="torch", backward="fwdgrad",
                                    chunk_tokens=4, **ref)
        out.loss.backward()
    assert syncs.reads <= 3, str(syncs)
    fwdgrad_copies = syncs.total("copy", "fwdgrad.py") + syncs.total("copy", "row_passes.py")
    assert fwdgrad_copies == 0 and cuda_branches, str(syncs)  # the chunks' index


@pytest.mark.parametrize("reference", [False, True])
def test_fused_loss_recompute_checks_targets_once(reference):
    """The recompute backward (linear_logprobs' op): the targets checked once, not again by each head."""
    hidden, weight, targets, cu_seqlens, ref = _loss_inputs(reference)
    with count_host_syncs() as syncs:
        fused_linear_rpo_loss(hidden, weight, targets, cu_seqlens, impl="torch", backward="recompute",
                              **ref).loss.backward()
    assert syncs.total(where="checks.py") <= 3, str(syncs)
    assert syncs.reads <= 5, str(syncs)


@pytest.mark.parametrize("use_ref", [False, True])
def test_rpo_loss_module_reads(cuda_branches, use_ref):
    """RPOLoss (Liger's interface): one index of the scored positions for every packed input, and the fused
    loss's three, whose check of the packed targets' values is the only one (RPOLoss used to check `target`
    itself first, a fourth read)."""
    torch.manual_seed(0)
    inputs = torch.randn(4, 9, H, requires_grad=True)
    target = torch.randint(0, V, (4, 9))
    target[:, :3] = -100
    weight = torch.randn(V, H, requires_grad=True)
    ref = (torch.randn(4, 9, H), torch.randn(V, H)) if use_ref else (None, None)
    with count_host_syncs() as syncs:
        loss, _ = RPOLoss(use_ref_model=use_ref, compute_nll_loss=True)(weight, inputs, target, None, *ref)
        loss.backward()
    assert syncs.reads <= 4, str(syncs)
    assert syncs.total(where="check_target_values") == 0, str(syncs)


# --- the trainer ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("share_prompt", [False, True])
def test_trainer_micro_batch_reads(tiny_model_dir, tmp_path, monkeypatch, cuda_branches, share_prompt):
    """One step of two micro-batches (policy and reference model forwards, the fused loss, backward, the
    metrics): the fused loss's reads, no metric read back per micro-batch, no attention read per layer, and
    the batches copied to the device without blocking."""
    counted = []
    run_step = trainer.run_step

    def counted_run_step(*args, **kwargs):
        with count_host_syncs() as syncs:
            result = run_step(*args, **kwargs)
        counted.append(syncs)
        return result

    monkeypatch.setattr(trainer, "run_step", counted_run_step)
    overrides = tiny_overrides(tiny_model_dir, tmp_path, max_steps=1, eval_file="none", share_prompt=share_prompt,
                               gradient_accumulation_steps=2)
    trainer.train(load_config(None, overrides))
    (syncs,) = counted
    micro_batches = 2
    assert syncs.reads <= 3 * micro_batches, str(syncs)
    assert syncs.total("copy", "packing.py") == 0 and cuda_branches, str(syncs)


@pytest.mark.parametrize("training", [True, False])
def test_hf_trainer_metrics_read_once(training):
    """RPOTrainerMixin's metrics of one batch: the 8 means (training) or sums and pair counts (evaluation) read
    back together, once."""
    from rpo_fast.integrations.hf_trainer import RPOTrainerMixin

    out = rpo_loss(torch.randn(6), torch.randn(6), torch.tensor([3.0, 4, 5, 6, 7, 8]))
    gather = lambda t: t  # noqa: E731 - one process
    trainer_state = SimpleNamespace(model=SimpleNamespace(training=training),
                                    _rpo_metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                                    accelerator=SimpleNamespace(gather_for_metrics=gather, gather=gather))
    with count_host_syncs() as syncs:
        RPOTrainerMixin._record_metrics(trainer_state, out, 1.0)
    assert syncs.reads == 1, str(syncs)
    recorded = trainer_state._rpo_metrics["train" if training else "eval"]
    expected = out.chosen_rewards.mean() if training else out.chosen_rewards.sum()
    assert recorded["rewards/chosen"] == [(expected.item(), 1 if training else 3)]
