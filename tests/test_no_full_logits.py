"""The "triton" and "torch" paths, with each backward, never allocate an [N, V]-sized tensor, forward or
backward; the dense path (the control that proves the recorder works) does."""
import pytest
import torch

import rpo_fast
from rpo_fast import chunked, fwdgrad
from conftest import LargestTensorRecorder


N, H, V, B = 600, 16, 500, 3


FWDGRAD_ROWS = 250  # one pair of 2 x 100 rows per chunk
CHUNK_ROWS = {"fwdgrad": FWDGRAD_ROWS, "recompute": 64, "atomic": 0}  # atomic: Triton kernels, no logits chunk


class KernelTensorRecorder(LargestTensorRecorder):
    """LargestTensorRecorder without the Triton interpreter's host copies of kernel arguments: it copies each
    buffer's storage as a flat uint8 tensor of its bytes (4 * N * H for the fp32 dhidden accumulator), which would
    set the largest size for the triton paths. Nothing in the head is uint8, so every other tensor still counts,
    an [N, V/2] one included (`dim_size=V` would also drop the copies, but not see a tensor of V/2 columns)."""

    def record(self, func, out) -> None:
        outs = out if isinstance(out, (tuple, list)) else (out,)
        super().record(func, [t for t in outs if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8)])


def largest_allocation(impl, monkeypatch, backward="auto"):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 64 * V)  # 64-row chunks, so chunking is visible at this N
    monkeypatch.setattr(fwdgrad, "FWDGRAD_CHUNK_ELEMENTS", FWDGRAD_ROWS * V)
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    bias = torch.randn(V, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    cu = torch.arange(0, N + 1, N // (2 * B), dtype=torch.int32)
    ref_hidden, ref_weight = torch.randn(N, H), torch.randn(V, H)
    with KernelTensorRecorder() as rec:
        out = rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, bias=bias, ref_hidden=ref_hidden,
                                             ref_weight=ref_weight, impl=impl, backward=backward)
        out.loss.backward()
    assert hidden.grad is not None and weight.grad is not None and bias.grad is not None
    return rec.largest[0]


@pytest.mark.parametrize("impl,backward", [("triton", "atomic"), ("torch", "recompute"), ("torch", "fwdgrad")])
def test_fused_paths_never_allocate_n_by_v(impl, backward, monkeypatch):
    """No tensor outgrows the weight, the hidden states or one logits chunk, forward or backward, on any fused path."""
    largest = largest_allocation(impl, monkeypatch, backward)
    assert largest < N * V, f"impl={impl} allocated a tensor of {largest} elements (N*V = {N * V})"
    # weight-sized, one chunk of logits, or hidden-sized
    assert largest <= max(V * H, CHUNK_ROWS[backward] * V, N * H), largest


def test_recorder_sees_dense_logits(monkeypatch):
    assert largest_allocation("dense", monkeypatch) >= N * V


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_recorders_see_inside_the_custom_op(impl, monkeypatch):
    """The fused head is a custom op, which a TorchDispatchMode sees as one call: the recorders run its Python
    implementation under the mode, so the temporaries inside (a logits chunk, the fp32 accumulators) count.
    Without that, every no-[N, V] check here would pass whatever the op allocated."""
    from rpo_fast.live_memory import LiveTensorTracker

    N, H, V, rows = 40, 16, 97, 8
    monkeypatch.setattr(rpo_fast.chunked, "CHUNK_ELEMENTS", rows * V)
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    with LargestTensorRecorder(dim_size=V) as recorder:
        rpo_fast.linear_logprobs(hidden, weight, targets, impl=impl).sum().backward()
    assert recorder.largest[0] >= V * H, recorder.largest  # the fp32 weight-gradient accumulator, inside the op
    hidden, weight = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight))
    tracker = LiveTensorTracker().track(hidden, weight)
    inputs = tracker.live
    with tracker:
        rpo_fast.linear_logprobs(hidden, weight, targets, impl=impl).sum().backward()
    # bf16 weights: inside the backward op the fp32 accumulator and the bf16 gradient cast from it coexist
    assert tracker.peak - inputs >= (4 + 2) * V * H
