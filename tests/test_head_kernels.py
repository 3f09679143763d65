"""The head kernels' launchers and the backward's tile skip, in the Triton interpreter against float64:
tiles whose rows all have a zero gradient are skipped exactly; strided operands are made contiguous
(the kernels keep in-tile offsets int32) and malformed ones refused with a ValueError; a -inf bias that
masks whole vocab tiles or splits leaves the log-probs finite."""
import importlib

import pytest
import torch

from rpo_fast.aot import recorded_launches
from rpo_fast.chunked import chunked_linear_logprobs_fwd
from rpo_fast.kernels import TileConfig, linear_logprobs_bwd, linear_logprobs_fwd
from rpo_fast.kernels.linear_logprobs_bwd import _linear_logprobs_bwd_kernel
from rpo_fast.kernels.linear_logprobs_fwd import _linear_logprobs_fwd_kernel
from conftest import max_abs_err
from rpo_reference_math import logprobs64

IGNORE = -100


def test_backward_skips_only_tiles_whose_rows_all_have_zero_gradient():
    """Token blocks of 16: block 0 has g == 0 everywhere, block 1 one nonzero row, block 2 only ignored
    targets, block 3 ragged and dense. Skipped blocks must add nothing and the mixed one everything."""
    torch.manual_seed(0)
    N, H, V = 60, 24, 70
    hidden, weight, bias = torch.randn(N, H), torch.randn(V, H) / H**0.5, torch.randn(V)
    targets = torch.randint(0, V, (N,))
    targets[32:48] = IGNORE
    g = torch.randn(N)
    g[0:16] = 0.0
    g[16:32] = 0.0
    g[21] = 1.5
    cfg = TileConfig(block_n=16, block_v=32, block_h=16)
    _, lse = linear_logprobs_fwd(hidden, weight, bias, targets, IGNORE, config=cfg)
    grads = linear_logprobs_bwd(hidden, weight, bias, targets, lse, g, IGNORE, config=cfg)

    leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    (logprobs64(*leaves, targets) * g.double()).sum().backward()
    for name, got, leaf in zip(("d_hidden", "d_weight", "d_bias"), grads, leaves):
        assert max_abs_err(got, leaf.grad) < 1e-5 * max(1.0, leaf.grad.abs().max().item()), name
    assert torch.all(grads[0][:16] == 0) and torch.all(grads[0][32:48] == 0)
    assert grads[0][21].abs().max() > 0


def test_launchers_copy_strided_operands_and_refuse_malformed_ones():
    torch.manual_seed(1)
    N, H, V = 20, 16, 50
    hidden = torch.randn(H, N).T  # column-major views: no unit inner stride
    weight = (torch.randn(H, V) / H**0.5).T
    targets = torch.randint(0, V, (2 * N,))[::2]
    cfg = TileConfig(block_n=16, block_v=32, block_h=16)
    for kernel, launcher in ((_linear_logprobs_fwd_kernel, lambda: linear_logprobs_fwd(hidden, weight, None, targets)),
                             (_linear_logprobs_bwd_kernel, lambda: linear_logprobs_bwd(
                                 hidden, weight, None, targets, torch.zeros(N), torch.ones(N)))):
        with recorded_launches(kernel) as launches:
            launcher()
        args = launches[0].args
        assert args[0].is_contiguous() and args[1].is_contiguous() and args[3].is_contiguous()
        assert (args[-4], args[-3], args[-2], args[-1]) == (H, 1, H, 1)  # the strides the kernel sees

    lp, lse = linear_logprobs_fwd(hidden, weight, None, targets, IGNORE, config=cfg)
    assert max_abs_err(lp, logprobs64(hidden, weight, None, targets)) < 1e-5
    g = torch.randn(N)
    dh, dw, _ = linear_logprobs_bwd(hidden, weight, None, targets, lse, g, IGNORE, config=cfg)
    leaves = [t.double().requires_grad_() for t in (hidden, weight)]
    (logprobs64(*leaves, None, targets) * g.double()).sum().backward()
    assert max_abs_err(dh, leaves[0].grad) < 1e-5 and max_abs_err(dw, leaves[1].grad) < 1e-5

    with pytest.raises(ValueError, match="hidden and weight"):
        linear_logprobs_fwd(hidden, weight[:, :8], None, targets)
    with pytest.raises(ValueError, match="targets"):
        linear_logprobs_fwd(hidden, weight, None, targets[:5])
    with pytest.raises(ValueError, match="bias"):
        linear_logprobs_fwd(hidden, weight, torch.zeros(V + 1), targets)
    with pytest.raises(ValueError, match="lse and grad_lp"):
        linear_logprobs_bwd(hidden, weight, None, targets, lse[:3], g)
    for launcher in (lambda: linear_logprobs_fwd(hidden, weight[:0], None, targets),  # was a ZeroDivisionError
                     lambda: linear_logprobs_bwd(hidden, weight[:0], None, targets, lse, g)):
        with pytest.raises(ValueError, match=r"weight: expected a vocabulary of at least one row"):
            launcher()


@pytest.mark.parametrize("programs", [1, 16], ids=["one_split", "vocab_splits"])
@pytest.mark.parametrize("masked", ["head", "all_but_ragged_tail"])
def test_forward_with_minus_inf_bias(masked, programs, monkeypatch):
    """A -inf bias masking the start of the vocabulary makes a row's first vocab tiles (with 16 programs
    wanted: 4 splits of 2 tiles, the first whole split) all -inf, where the online softmax's running max is
    still -inf: exp(-inf - -inf) must not make the logsumexp NaN. Log-probs and lse match float64 log_softmax
    (a target at a masked entry: -inf), the backward fed that lse matches float64 autograd; a row with a +inf
    logit, and every row under an all -inf bias, has an undefined log-softmax: NaN, as in the torch path."""
    fwd_module = importlib.import_module("rpo_fast.kernels.linear_logprobs_fwd")
    monkeypatch.setattr(fwd_module, "num_programs_wanted", lambda device: programs)
    torch.manual_seed(4)
    N, H, V = 37, 24, 203  # block_v 32: 7 vocab tiles, the last one ragged (11 columns)
    cfg = TileConfig(block_n=16, block_v=32, block_h=16)
    hidden, weight = torch.randn(N, H), torch.randn(V, H) / H**0.5
    bias = torch.randn(V)
    if masked == "head":
        bias[:64] = float("-inf")
        bias[100:190:9] = float("-inf")  # scattered, below the targets
    else:
        bias[:192] = float("-inf")
    targets = torch.randint(192, V, (N,))
    targets[::5] = IGNORE
    targets[3] = 10  # a masked entry
    hidden[7, 0] = float("inf")  # +-inf logits in row 7 only (its block's other rows stay finite)

    with recorded_launches(_linear_logprobs_fwd_kernel) as launches:
        linear_logprobs_fwd(hidden, weight, bias, targets, IGNORE, config=cfg)
    assert launches[0].args[4].shape == ((4 if programs > 1 else 1), N)  # lse_part: one row per vocab split
    lp, lse = linear_logprobs_fwd(hidden, weight, bias, targets, IGNORE, config=cfg)
    logits64 = hidden.double() @ weight.double().T + bias.double()
    ref_lse = torch.logsumexp(logits64, -1)
    ref_lp = logprobs64(hidden, weight, bias, targets, IGNORE)
    ok = torch.ones(N, dtype=torch.bool)
    ok[7] = False
    assert torch.isfinite(ref_lse[ok]).all()
    assert max_abs_err(lse[ok], ref_lse[ok]) < 1e-5 * ref_lse[ok].abs().max().item(), (lse, ref_lse)
    assert lp[3].item() == float("-inf") and ref_lp[3].item() == float("-inf")
    finite = ok.clone()
    finite[3] = False
    assert max_abs_err(lp[finite], ref_lp[finite]) < 1e-5 * max(1.0, ref_lp[finite].abs().max().item())
    assert torch.isnan(lse[7]) and torch.isnan(lp[7])
    torch_lp, torch_lse = chunked_linear_logprobs_fwd(hidden, weight, bias, targets, IGNORE)
    assert torch.equal(torch_lse.isnan(), lse.isnan()) and torch.equal(torch_lp.isnan(), lp.isnan())

    # The backward recomputes exp(logit - lse): 0 at the -inf logits, so the masked entries get no gradient.
    rows = torch.arange(N) != 7
    h, t = hidden[rows], targets[rows]
    g = torch.randn(N - 1)
    grads = linear_logprobs_bwd(h, weight, bias, t, lse[rows], g, IGNORE, config=cfg)
    leaves = [x.double().requires_grad_() for x in (h, weight, bias)]
    (logprobs64(*leaves, t, IGNORE) * g.double()).sum().backward()
    for name, got, leaf in zip(("d_hidden", "d_weight", "d_bias"), grads, leaves):
        assert torch.isfinite(got).all(), name
        assert max_abs_err(got, leaf.grad) < 1e-5 * max(1.0, leaf.grad.abs().max().item()), name

    bias.fill_(float("-inf"))  # every logit -inf: undefined everywhere, NaN; ignored targets still 0
    lp, lse = linear_logprobs_fwd(hidden, weight, bias, targets, IGNORE, config=cfg)
    torch_lp, torch_lse = chunked_linear_logprobs_fwd(hidden, weight, bias, targets, IGNORE)
    assert torch.isnan(lse).all() and torch.isnan(torch_lse).all()
    assert torch.equal(lp.isnan(), targets != IGNORE) and torch.equal(torch_lp.isnan(), targets != IGNORE)
    assert torch.all(lp[targets == IGNORE] == 0)
