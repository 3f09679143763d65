"""Shared fixtures: a seeded RNG for every test and a verbose closeness check."""
import copy
import os
import random

import numpy as np
import pytest
import torch

from rpo_fast.live_memory import OutputRecorder

# Interpreter tests are ~10x faster single-threaded; the Makefile sets these too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0


def assert_close(actual, expected, *, atol, rtol=0.0, name="value"):
    """allclose that reports the worst mismatches instead of a bare False."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rows = "\n".join(f"  at {tuple(i)}: got {actual[tuple(i)].item():.6g}, expected {expected[tuple(i)].item():.6g}"
                         for i in idx)
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} mismatches (atol={atol}, rtol={rtol}), "
                             f"max abs err {max_abs_err(actual, expected):.3g}; first:\n{rows}")


class LargestTensorRecorder(OutputRecorder):
    """Records the largest tensor any op creates while active: `largest = (numel, shape, op)`.
    With `dim_size`, only tensors having a dimension of that size count (e.g. vocab-sized ones)."""

    def __init__(self, dim_size: int | None = None):
        super().__init__()
        self.dim_size = dim_size
        self.largest = (0, None, None)

    def record(self, func, out) -> None:
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and (self.dim_size is None or self.dim_size in t.shape)
                    and t.numel() > self.largest[0]):
                self.largest = (t.numel(), tuple(t.shape), str(func))


class HeadMatmulCounter(LargestTensorRecorder):
    """Records every matrix product one of whose operands has a dimension of size `vocab` (the LM head's
    products), by output shape, plus the largest tensor created."""

    PRODUCTS = {"aten.mm.default", "aten.addmm.default", "aten.addmm_.default", "aten.bmm.default",
                "aten.matmul.default", "aten.mm.dtype", "aten.addmm.dtype", "aten.mm.out", "aten.addmm.out"}

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.products = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if str(func) in self.PRODUCTS and any(isinstance(a, torch.Tensor) and self.vocab in a.shape for a in args):
            self.products.append(tuple(out.shape))
        return out


def perturbed_deepcopy(model: torch.nn.Module, build_plain) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(copy.deepcopy(model) with every weight moved by 0.1 N(0, 1), build_plain() holding the copy's weights):
    the second, built fresh, is what the copy must compute."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for p in copied.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    plain = build_plain()
    plain.load_state_dict(copied.state_dict())
    return copied, plain
