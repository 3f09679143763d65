"""How blind are the half-precision bounds? For the weight gradient of the head and loss correctness tests, the
largest fraction of its entries that can be set to zero while the test's bound still passes.

    .venv/bin/python tools/zeroed_fraction.py        # ~1 minute on one core (TRITON_INTERPRET=1 is set here)

For each bf16/fp16 case of tests/test_linear_logprobs.py::test_forward_and_grads_match_float64 and
tests/test_rpo_loss.py::test_dtypes_bias_and_average_log_prob it takes the library's dW, zeroes its entries
smallest first ("smallest": the hardest 10% to notice; if that fails, every 10% fails) or in a random order
("random": the median over 21 orders), and finds the largest fraction of the nonzero entries that still passes
`max|dW - dW64| <= bound`. It prints the worst case per test and dtype, for the bound the tests use now
(row by row, `row_bounds` in tests/rpo_reference_math.py) and for the earlier one (`2 * err(impl="dense") +
TOL * max(1, |dW64|)`, TOL bf16 1.5e-2 / 2e-2, fp16 2e-3), which judged by a path of the library itself.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import torch  # noqa: E402

import rpo_fast  # noqa: E402
import test_linear_logprobs as head_tests  # noqa: E402
import test_rpo_loss as loss_tests  # noqa: E402
from rpo_reference_math import max_abs_err, naive_logprobs, row_bounds  # noqa: E402

EARLIER_TOL = {"head": {torch.bfloat16: 1.5e-2, torch.float16: 2e-3},
               "loss": {torch.bfloat16: 2e-2, torch.float16: 2e-3}}
EARLIER_MIN_SCALE = {"head": 1.0, "loss": 1e-3}


def largest_passing_fraction(got: torch.Tensor, ref: torch.Tensor, limit: torch.Tensor, order: torch.Tensor) -> float:
    """Zeroing got's nonzero-reference entries in `order` (indices into them), with `limit` the bound of each entry:
    the largest fraction of them that can be zeroed while every entry stays within its bound."""
    got, ref, limit = got.double().flatten(), ref.double().flatten(), limit.double().flatten()
    idx = (ref != 0).nonzero()[:, 0][order]
    kept_ok = (got - ref).abs() <= limit
    others_ok = bool(kept_ok.all()) if idx.numel() == ref.numel() else bool(kept_ok[ref == 0].all())
    zeroed_ok = (ref[idx].abs() <= limit[idx]).long().cummin(0).values.bool()  # the first k+1 zeroed are fine
    rest_ok = torch.cat([kept_ok[idx].long().flip(0).cummin(0).values.flip(0).bool()[1:], torch.ones(1).bool()])
    passing = (zeroed_ok & rest_ok).nonzero()
    if not others_ok or passing.numel() == 0:
        return 0.0
    return (int(passing.max()) + 1) / idx.numel()


def entry_limits(got, ref, naive, dense, dtype, test):
    """Per-entry bounds: the tests' row-wise bound now, and the earlier whole-tensor bound."""
    now = row_bounds(ref, naive, dtype)
    earlier = (2 * max_abs_err(dense, ref)
               + EARLIER_TOL[test][dtype] * max(EARLIER_MIN_SCALE[test], ref.abs().max().item()))
    return {"now": now[:, None].expand_as(ref), "earlier": torch.full(ref.shape, earlier, dtype=torch.float64)}


def fractions(got, ref, limit, gen):
    """(largest passing fraction zeroing the smallest entries first, median over 21 random orders)."""
    nonzero = ref.flatten() != 0
    smallest = got.double().flatten()[nonzero].abs().argsort()
    randoms = [largest_passing_fraction(got, ref, limit, torch.randperm(int(nonzero.sum()), generator=gen))
               for _ in range(21)]
    return largest_passing_fraction(got, ref, limit, smallest), sorted(randoms)[10]


def head_cases(dtype):
    for shape in head_tests.SHAPES:
        for bias in (False, True):
            for impl in ("torch", "triton"):
                torch.manual_seed(0)
                hidden, weight, b, targets = head_tests.make_inputs(*shape, dtype, bias)
                g = torch.randn(shape[0], dtype=torch.float64)
                got, ref, naive = head_tests.against_float64(
                    hidden, weight, b, targets, g, lambda h, w, bb, t: rpo_fast.linear_logprobs(h, w, t, bb, impl=impl))
                _, dense = head_tests.grads_of(lambda h, w, bb, t: rpo_fast.linear_logprobs(h, w, t, bb, impl="dense"),
                                               hidden, weight, b, targets, g)
                yield f"{'x'.join(map(str, shape))} bias={bias} {impl}", got[1][1], ref[1][1], naive[1][1], dense[1]


def loss_cases(dtype):
    for bias in (False, True):
        for average_log_prob in (False, True):
            for impl in ("torch", "triton"):
                torch.manual_seed(0)
                case = loss_tests.make_case(B=2, max_len=40, H=75, V=301, dtype=dtype, bias=bias, ref_mode="head")
                opts = dict(beta=0.1, alpha=1.0, sft_norm="token_mean", loss_type="sigmoid", label_smoothing=0.0,
                            average_log_prob=average_log_prob)
                _, ref = loss_tests.reference64(*case, opts)
                _, naive = loss_tests.reference64(*case, opts, logprobs=naive_logprobs)
                _, got = loss_tests.actual(*case, opts, impl)
                _, dense = loss_tests.actual(*case, opts, "dense")
                yield f"bias={bias} avg={average_log_prob} {impl}", got[1], ref[1], naive[1], dense[1]


def main():
    gen = torch.Generator().manual_seed(0)
    print(f"{'test':<6} {'dtype':<9} {'bound':<8} {'smallest first (worst case)':>28} {'random (worst case)':>20}")
    for test, cases in (("head", head_cases), ("loss", loss_cases)):
        for dtype in (torch.bfloat16, torch.float16):
            worst = {"now": [0.0, 0.0, ""], "earlier": [0.0, 0.0, ""]}
            for name, got, ref, naive, dense in cases(dtype):
                if not ref.any():
                    continue
                limits = entry_limits(got, ref, naive, dense, dtype, test)
                for which, limit in limits.items():
                    smallest, random = fractions(got, ref, limit, gen)
                    w = worst[which]
                    if smallest > w[0]:
                        w[0], w[2] = smallest, name
                    w[1] = max(w[1], random)
            for which, (smallest, random, name) in worst.items():
                print(f"{test:<6} {str(dtype).split('.')[1]:<9} {which:<8} {smallest:>12.1%} ({name:<22}) "
                      f"{random:>8.1%}")


if __name__ == "__main__":
    main()
