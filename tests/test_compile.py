"""The public ops inside a user's `torch.compile`d function (dynamo's tracing and guards, with the "eager" backend:
no inductor compile, so each test takes seconds).

fused_linear_rpo_loss and RPOLoss plan on the host (cu_seqlens read back, chunk plans, target checks): they are
opaque to dynamo, one graph break, so packed batches whose token and pair counts change every step do not
recompile them per shape (they did, until dynamo's recompile limit, then ran eagerly with a warning).
linear_logprobs compiles with fullgraph=True; a bad target still raises its ValueError.
"""
import random

import pytest
import torch

from rpo_fast import RPOLoss, fused_linear_rpo_loss, linear_logprobs

H, V = 8, 37
STEPS = 10


def counting_backend():
    """A dynamo backend that runs the captured graphs as they are and counts them (one per compile or recompile)."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    return graphs, backend


def packed_batches(seed=0):
    """STEPS packed batches (x [N, H], targets [N], cu_seqlens [2B+1]) whose N and pair count B change each step."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    for n_pairs in [1, 2, 3, 4, 5, 6, 7, 8, 3, 5][:STEPS]:
        lengths = [rng.randint(2, 9) for _ in range(2 * n_pairs)]
        n = sum(lengths)
        targets = torch.randint(0, V, (n,), generator=gen)
        targets[::5] = -100
        cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        yield torch.randn(n, H, generator=gen), targets, cu_seqlens


def padded_batches(seed=0):
    """STEPS Liger-style batches (x [2B, T, H], target [2B, T]) whose B and T change each step."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    for n_pairs in [1, 2, 3, 4, 5, 6, 7, 8, 3, 5][:STEPS]:
        length = rng.randint(5, 14)
        target = torch.randint(0, V, (2 * n_pairs, length), generator=gen)
        target[:, :2] = -100
        yield torch.randn(2 * n_pairs, length, H, generator=gen), target


def parameters(seed=0):
    gen = torch.Generator().manual_seed(seed)
    backbone = torch.nn.Linear(H, H)
    with torch.no_grad():
        backbone.weight.copy_(torch.randn(H, H, generator=gen) / H**0.5)
        backbone.bias.copy_(torch.randn(H, generator=gen))
    weight = (torch.randn(V, H, generator=gen) / H**0.5).requires_grad_()
    bias = torch.randn(V, generator=gen).requires_grad_()
    return backbone, weight, bias


def run_steps(step, batches, params):
    """(loss, gradients of params) per batch."""
    results = []
    for batch in batches:
        loss = step(*batch)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    return results


def assert_compiles_bounded(step, batches, params, max_graphs):
    """`step` compiled: at most `max_graphs` graphs over the STEPS shapes, and every loss and gradient as eager's."""
    torch._dynamo.reset()
    graphs, backend = counting_backend()
    compiled = run_steps(torch.compile(step, backend=backend), batches(), params)
    eager = run_steps(step, batches(), params)
    assert len(graphs) <= max_graphs, f"{len(graphs)} graphs compiled over {STEPS} shapes"
    for (loss, grads), (loss_e, grads_e) in zip(compiled, eager):
        torch.testing.assert_close(loss, loss_e, rtol=1e-6, atol=1e-7)
        for g, g_e in zip(grads, grads_e):
            torch.testing.assert_close(g, g_e, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backward,autocast", [("fwdgrad", False), ("recompute", False), ("fwdgrad", True)])
def test_fused_loss_compiles_once_for_varying_shapes(backward, autocast):
    """A compiled step around fused_linear_rpo_loss over packed batches of ten (N, B) shapes: one graph break at
    the loss, no recompiles per shape (before: dynamo traced into the loss, its guards on the row count and the
    pair count recompiled every step, and from the eighth on its rest ran eagerly). Under autocast too: the
    loss sees the autocast state of the compiled step around it and casts its inputs as in eager."""
    backbone, weight, bias = parameters()

    def step(x, targets, cu_seqlens):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = torch.tanh(backbone(x))
            out = fused_linear_rpo_loss(hidden, weight, targets, cu_seqlens, bias=bias, backward=backward,
                                        alpha=0.5)
            return out.loss + 0.01 * out.nll.detach()

    # The step's graph before the loss and its graph after it, each compiled static, then dynamic in N (and B).
    assert_compiles_bounded(step, packed_batches, (backbone.weight, backbone.bias, weight, bias), max_graphs=4)


def test_rpo_loss_module_compiles_once_for_varying_shapes():
    """The same for RPOLoss (Liger's interface) over padded batches of ten (B, T) shapes."""
    backbone, weight, bias = parameters()
    loss_fn = RPOLoss(beta=0.1, compute_nll_loss=True, alpha=0.5, use_ref_model=False)

    def step(x, target):
        loss, aux = loss_fn(weight, torch.tanh(backbone(x)), target, bias)
        return loss + 0.01 * aux[0].detach().mean()

    # As above; x [2B, T, H] becomes dynamic one dimension at a time (dynamo's automatic dynamic shapes).
    assert_compiles_bounded(step, padded_batches, (backbone.weight, backbone.bias, weight, bias), max_graphs=6)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_linear_logprobs_compiles_whole(backend):
    """torch.compile(fullgraph=True) over linear_logprobs: one graph (before: its target check read the targets
    back on the host, a graph break), values and gradients as eager's, and a bad target still raises the
    ValueError naming `targets` when the graph runs (the op checks them)."""
    gen = torch.Generator().manual_seed(0)
    hidden, weight, bias = torch.randn(23, H, generator=gen), torch.randn(V, H, generator=gen), torch.randn(V)
    targets = torch.randint(0, V, (23,), generator=gen)
    targets[::4] = -100
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]

    def f(h, w, b, t):
        return (linear_logprobs(h, w, t, b, impl="torch") * torch.linspace(0.5, 1.5, t.numel())).sum()

    eager = f(*leaves, targets)
    expected = torch.autograd.grad(eager, leaves)
    torch._dynamo.reset()
    compiled_f = torch.compile(f, fullgraph=True, backend=backend)
    got = compiled_f(*leaves, targets)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    for g, e in zip(torch.autograd.grad(got, leaves), expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
    for bad in (V, -1):
        targets[5] = bad
        with pytest.raises(ValueError, match=rf"targets: expected values in \[0, {V}\) .*got {bad} at position 5"):
            compiled_f(*leaves, targets)
