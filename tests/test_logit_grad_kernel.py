"""The row kernels of the forward-time-gradient path (`row_logprobs`, `logit_grad_`) in the Triton
interpreter against float64 torch, on irregular shapes (V not a multiple of the vocab tile, several
tiles per row), ignored targets, g == 0 rows, logits of +-1e4 and -inf logits (a masked vocabulary); fp32
(in place) and bf16/fp16 output."""
import pytest
import torch

from rpo_fast import row_passes
from rpo_fast.kernels import RowConfig, logit_grad_, row_logprobs
from conftest import max_abs_err

IGNORE = -100
# (C, V, block_v): several tiles with a ragged last one, one partial tile, a single row / column.
CASES = [(37, 1000, 256), (37, 1000, None), (5, 4099, 1024), (1, 1, 16)]


def make_rows(C, V, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(C, V, generator=gen) * scale
    targets = torch.randint(0, V, (C,), generator=gen)
    targets[::4] = IGNORE
    g = torch.randn(C, generator=gen)
    g[1::5] = 0.0
    return logits, targets, g


def reference(logits, targets, g):
    """float64 lp, lse and dlogits = g * (onehot - softmax), zero rows at ignored targets."""
    x = logits.double()
    lse = torch.logsumexp(x, dim=1)
    keep = targets != IGNORE
    safe = torch.where(keep, targets, 0)
    lp = torch.where(keep, x.gather(1, safe[:, None])[:, 0] - lse, 0.0)
    onehot = torch.nn.functional.one_hot(safe, x.shape[1]).double()
    dlogits = torch.where(keep[:, None], g.double()[:, None] * (onehot - torch.softmax(x, dim=1)), 0.0)
    return lp, lse, dlogits


def config(block_v):
    return None if block_v is None else RowConfig(block_v=block_v, num_warps=1)


@pytest.mark.parametrize("C,V,block_v", CASES, ids=lambda x: str(x))
def test_row_logprobs_match_float64(C, V, block_v):
    logits, targets, g = make_rows(C, V)
    lp, lse = row_logprobs(logits, targets, IGNORE, config=config(block_v))
    ref_lp, ref_lse, _ = reference(logits, targets, g)
    assert lp.dtype == lse.dtype == torch.float32 and lp.shape == lse.shape == (C,)
    assert torch.all(lp[targets == IGNORE] == 0)
    assert max_abs_err(lse, ref_lse) < 1e-5 * max(1.0, ref_lse.abs().max().item())
    assert max_abs_err(lp, ref_lp) < 1e-5 * max(1.0, ref_lp.abs().max().item())


def test_row_logprobs_with_large_logits():
    """+-1e4 logits: exp overflows unless the running max is subtracted; most rows are one-hot softmaxes."""
    logits, targets, g = make_rows(37, 1000, scale=1e4)
    logits[3, 17] = 1e4 + 1.0
    lp, lse = row_logprobs(logits, targets, IGNORE, config=RowConfig(block_v=256, num_warps=1))
    ref_lp, ref_lse, _ = reference(logits, targets, g)
    assert torch.isfinite(lp).all() and torch.isfinite(lse).all()
    # fp32 resolution at 1e4 is ~1e-3: the logits themselves carry that error.
    assert max_abs_err(lse, ref_lse) < 4e-3 and max_abs_err(lp, ref_lp) < 4e-3


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("C,V,block_v", CASES, ids=lambda x: str(x))
def test_logit_grad_matches_float64(C, V, block_v, out_dtype):
    logits, targets, g = make_rows(C, V)
    _, ref_lse, ref = reference(logits, targets, g)
    lse = ref_lse.float()
    work = logits.clone()
    dlogits = logit_grad_(work, targets, lse, g, out_dtype, IGNORE, config=config(block_v))

    assert dlogits.dtype == out_dtype and dlogits.shape == (C, V)
    assert (dlogits.data_ptr() == work.data_ptr()) == (out_dtype == torch.float32)  # in place only for fp32
    if out_dtype != torch.float32:
        assert torch.equal(work, logits)  # the logits are left alone
    zero_rows = (targets == IGNORE) | (g == 0)
    assert torch.all(dlogits[zero_rows] == 0)
    # Elementwise: the fp32 result (a few ulps of |g|: onehot - p cancels) rounded once to out_dtype. One
    # ulp, not half: the interpreter truncates fp32 -> bf16 where a GPU rounds to nearest.
    rel = {torch.float32: 0.0, torch.bfloat16: 2**-7, torch.float16: 2**-10}[out_dtype]
    bound = rel * ref.abs() + 1e-6 * g.abs().max().item()
    err = (dlogits.double() - ref).abs()
    assert torch.all(err <= bound), f"max error {err.max().item():.3g}, worst excess {(err - bound).max().item():.3g}"


def test_logit_grad_with_large_logits_and_lse_from_row_logprobs():
    """The two kernels chained, as the forward-time-gradient path runs them, at +-1e4 logits: the gradient
    is finite and sums to ~0 per row (softmax sums to 1, the one-hot to 1)."""
    logits, targets, g = make_rows(37, 1000, scale=1e4)
    cfg = RowConfig(block_v=256, num_warps=1)
    _, lse = row_logprobs(logits, targets, IGNORE, config=cfg)
    _, _, ref = reference(logits, targets, g)
    dlogits = logit_grad_(logits.clone(), targets, lse, g, torch.float32, IGNORE, config=cfg)
    assert torch.isfinite(dlogits).all()
    # exp(x - lse) with x, lse ~1e4 in fp32: an absolute error of ~1e-3 in the exponent, relative in the result.
    assert max_abs_err(dlogits, ref) < 4e-3 * g.abs().max().item()
    assert dlogits.double().sum(1).abs().max().item() < 1e-2


def masked_rows(V, block_v):
    """Rows of logits with -inf entries, as a -inf bias masking vocabulary entries gives, and what each row's
    logsumexp must be: 0-3 finite (their first tile, first two tiles, all but the ragged last tile, all but one
    entry are -inf; row 1 also has -inf entries scattered after its first finite tile and its target on one),
    4 all -inf, 5 one +inf logit, 6 one NaN logit: undefined (NaN, as the torch path gives), 7 no -inf."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(8, V, generator=gen) * 3.0
    last_tile = (V - 1) // block_v * block_v
    logits[0, :block_v] = float("-inf")
    logits[1, :2 * block_v] = float("-inf")
    logits[1, 2 * block_v + 3::7] = float("-inf")
    logits[2, :last_tile] = float("-inf")
    logits[3, :V - 1] = float("-inf")
    logits[4] = float("-inf")
    logits[5, V // 2] = float("inf")
    logits[6, V // 3] = float("nan")
    targets = torch.tensor([V - 1, 2 * block_v + 3, last_tile + 1, V - 1, 5, V // 2, 0, IGNORE])
    return logits, targets


@pytest.mark.parametrize("V,block_v", [(1000, 256), (4099, 1024)], ids=lambda x: str(x))
def test_row_kernels_with_minus_inf_logits(V, block_v):
    """A row whose first vocab tile is all -inf starts the online softmax at max -inf: exp(-inf - -inf) must
    not turn its logsumexp into NaN. Finite rows match float64 log_softmax (a target at a -inf logit has
    log-prob -inf); rows whose log-softmax is undefined (all -inf, a +inf or a NaN logit) get NaN where the
    torch path (`row_passes.row_logprobs_to_probs_`) does. The gradient kernel, fed that lse, is 0 at the -inf logits."""
    logits, targets = masked_rows(V, block_v)
    cfg = RowConfig(block_v=block_v, num_warps=1)
    lp, lse = row_logprobs(logits, targets, IGNORE, config=cfg)

    x = logits.double()
    ref_lse = torch.logsumexp(x, dim=1)
    keep = targets != IGNORE
    ref_lp = torch.where(keep, torch.log_softmax(x, dim=1).gather(1, torch.where(keep, targets, 0)[:, None])[:, 0], 0.0)
    ok = torch.tensor([True] * 4 + [False] * 3 + [True])
    assert torch.isfinite(ref_lse[ok]).all()
    assert max_abs_err(lse[ok], ref_lse[ok]) < 1e-5 * ref_lse[ok].abs().max().item(), (lse, ref_lse)
    assert lp[1].item() == float("-inf") and ref_lp[1].item() == float("-inf")  # its target logit is -inf
    finite_lp = ok.clone()
    finite_lp[1] = False
    assert max_abs_err(lp[finite_lp], ref_lp[finite_lp]) < 1e-5 * max(1.0, ref_lp[finite_lp].abs().max().item())
    assert torch.isnan(lse[~ok]).all() and torch.isnan(lp[~ok]).all()

    torch_lp, torch_lse = row_passes.row_logprobs_to_probs_(logits.clone(), targets, IGNORE)
    assert torch.equal(torch_lse.isnan(), lse.isnan()) and torch.equal(torch_lp.isnan(), lp.isnan())
    assert torch.equal(torch_lp.isinf(), lp.isinf())

    g = torch.linspace(0.5, 1.5, 8)
    g[4] = 0.0  # an undefined row with a zero gradient weight: all zero, not NaN
    dlogits = logit_grad_(logits.clone(), targets, lse, g, torch.float32, IGNORE, config=cfg)
    onehot = torch.nn.functional.one_hot(torch.where(keep, targets, 0), V).double()
    ref = torch.where(keep[:, None], g.double()[:, None] * (onehot - torch.softmax(x, dim=1)), 0.0)
    rows = ok & keep
    masked = torch.isinf(logits[rows])  # exp(-inf - lse) = 0: exactly g * onehot there (row 1's target is one)
    assert torch.isfinite(dlogits[rows]).all() and torch.equal(dlogits[rows][masked].double(), ref[rows][masked])
    assert max_abs_err(dlogits[rows], ref[rows]) < 1e-6
    assert torch.all(dlogits[4] == 0) and torch.all(dlogits[7] == 0)  # g == 0 / ignored target


def test_row_kernels_refuse_bad_inputs():
    """Each malformed argument raises ValueError whose message starts with that argument's name (a bare "g" would
    match "got" in any message)."""
    logits, targets, g = make_rows(4, 10)
    lse = torch.zeros(4)
    with pytest.raises(ValueError, match=r"^logits: expected a contiguous \[C, V\] float32 tensor"):
        row_logprobs(logits.double(), targets)
    with pytest.raises(ValueError, match=r"^logits: expected .*\(not contiguous\)"):
        row_logprobs(logits.T.contiguous().T, targets)
    with pytest.raises(ValueError, match=r"^targets: expected a \[4\] int64 tensor"):
        row_logprobs(logits, targets.int())
    with pytest.raises(ValueError, match=r"^g: expected a \[4\] floating-point tensor on cpu, got \(3,\)"):
        logit_grad_(logits, targets, lse, g[:3])
    with pytest.raises(ValueError,
                       match=r"^lse: expected a \[4\] floating-point tensor on cpu, got \(4,\) torch\.int64"):
        logit_grad_(logits, targets, lse.long(), g)
    with pytest.raises(ValueError, match=r"^out_dtype: expected one of"):
        logit_grad_(logits, targets, lse, g, torch.float64)


def test_row_kernels_refuse_an_empty_vocabulary():
    """[C, 0] logits have no log-softmax: row_logprobs returned its uninitialized lp/lse buffers (the launch
    was skipped); both row kernels now refuse them, as the head kernels refuse a weight of no rows."""
    logits, targets = torch.empty(3, 0), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"^logits: expected a vocabulary of at least one column \[C, V >= 1\], "
                                         r"got \(3, 0\)"):
        row_logprobs(logits, targets)
    with pytest.raises(ValueError, match=r"^logits: expected a vocabulary of at least one column"):
        logit_grad_(logits, targets, torch.zeros(3), torch.ones(3))
