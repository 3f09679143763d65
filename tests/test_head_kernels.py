"""The head kernels' launchers and the backward's tile skip, in the Triton interpreter against float64:
tiles whose rows all have a zero gradient are skipped exactly; strided operands are made contiguous
(the kernels keep in-tile offsets int32) and malformed ones refused with a ValueError."""
import pytest
import torch

from rpo_fast.aot import recorded_launches
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
