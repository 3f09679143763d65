"""The "triton" and "torch" paths, with each backward, never allocate an [N, V]-sized tensor, forward or
backward; the dense path (the control that proves the recorder works) does."""
import pytest
import torch

import rpo_fast
from rpo_fast import chunked, fwdgrad
from conftest import LargestTensorRecorder


N, H, V, B = 600, 16, 500, 3


FWDGRAD_ROWS = 250  # one pair of 2 x 100 rows per chunk


def largest_allocation(impl, monkeypatch, backward="auto"):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 64 * V)  # 64-row chunks, so chunking is visible at this N
    monkeypatch.setattr(fwdgrad, "CHUNK_ELEMENTS", FWDGRAD_ROWS * V)
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    bias = torch.randn(V, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    cu = torch.arange(0, N + 1, N // (2 * B), dtype=torch.int32)
    ref_hidden, ref_weight = torch.randn(N, H), torch.randn(V, H)
    with LargestTensorRecorder() as rec:
        out = rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu, bias=bias, ref_hidden=ref_hidden,
                                             ref_weight=ref_weight, impl=impl, backward=backward)
        out.loss.backward()
    assert hidden.grad is not None and weight.grad is not None and bias.grad is not None
    return rec.largest[0]


@pytest.mark.parametrize("impl,backward", [("triton", "atomic"), ("torch", "recompute"), ("torch", "fwdgrad")])
def test_fused_paths_never_allocate_n_by_v(impl, backward, monkeypatch):
    largest = largest_allocation(impl, monkeypatch, backward)
    assert largest < N * V, f"impl={impl} allocated a tensor of {largest} elements (N*V = {N * V})"
    if impl == "torch":  # the interpreter also makes byte-level host copies of its buffers; torch does not
        chunk = FWDGRAD_ROWS if backward == "fwdgrad" else 64
        assert largest <= max(V * H, chunk * V, N * H), largest  # weight-sized, one chunk, or hidden-sized


def test_recorder_sees_dense_logits(monkeypatch):
    assert largest_allocation("dense", monkeypatch) >= N * V


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_recorders_see_inside_the_custom_op(impl, monkeypatch):
    """The fused head is a custom op, which a TorchDispatchMode sees as one call: the recorders run its Python
    implementation under the mode, so the temporaries inside (a logits chunk, the fp32 accumulators) count.
    Without that, every no-[N, V] check here would pass whatever the op allocated."""
    from rpo_fast.memory_plan import LiveTensorTracker

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
