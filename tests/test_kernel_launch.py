"""The kernel launchers' own contract (rpo_fast.kernels, called directly): every launch goes through
`launch.on_device` with its inputs' device, and malformed inputs are a ValueError naming the argument before
any kernel runs. The numbers are tested in test_linear_logprobs.py and test_logit_grad_kernel.py."""
import contextlib
import importlib
import types

import pytest
import torch

from rpo_fast.kernels import launch

FWD = importlib.import_module("rpo_fast.kernels.linear_logprobs_fwd")  # the package re-exports the function names
BWD = importlib.import_module("rpo_fast.kernels.linear_logprobs_bwd")
ROWS = importlib.import_module("rpo_fast.kernels.logit_grad")
N, H, V = 5, 8, 11


def head_inputs(dtype=torch.float32):
    hidden, weight = torch.randn(N, H).to(dtype), torch.randn(V, H).to(dtype)
    return hidden, weight, torch.randn(V).to(dtype), torch.randint(0, V, (N,))


def launches():
    """(module, kernel, call) for every launcher, on CPU inputs."""
    hidden, weight, bias, targets = head_inputs()
    lse, g = torch.zeros(N), torch.ones(N)
    logits = torch.randn(N, V)
    return [
        (FWD, FWD._linear_logprobs_fwd_kernel, lambda: FWD.linear_logprobs_fwd(hidden, weight, bias, targets)),
        (BWD, BWD._linear_logprobs_bwd_kernel, lambda: BWD.linear_logprobs_bwd(hidden, weight, bias, targets, lse, g)),
        (ROWS, ROWS._row_logprobs_kernel, lambda: ROWS.row_logprobs(logits, targets)),
        (ROWS, ROWS._logit_grad_kernel, lambda: ROWS.logit_grad_(logits, targets, lse, g, torch.bfloat16)),
    ]


@pytest.mark.parametrize("index", range(4), ids=["fwd", "bwd", "row_logprobs", "logit_grad_"])
def test_every_launch_runs_on_the_inputs_device(index, monkeypatch):
    """Triton launches on the current CUDA device, so each launcher must enter `on_device(input)` around its
    kernel call. Checked by recording: the device `on_device` was given, and that the kernel call came inside
    it (the multi-GPU case itself needs two GPUs)."""
    module, kernel, call = launches()[index]
    entered, inside = [], []

    @contextlib.contextmanager
    def recorder(tensor):
        entered.append(tensor.device)
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    monkeypatch.setattr(module, "on_device", recorder)
    ran = []
    monkeypatch.setattr(kernel, "run", lambda *args, grid, warmup, **kwargs: ran.append(bool(inside)))
    call()
    assert entered == [torch.device("cpu")] and ran == [True]


def test_on_device_selects_the_tensors_cuda_device():
    """`on_device` is torch.cuda.device(index) for a CUDA tensor (built, not entered: no GPU here) and does
    nothing for CPU and meta tensors."""
    ctx = launch.on_device(types.SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    for device in ("cpu", "meta"):
        assert isinstance(launch.on_device(torch.empty(0, device=device)), contextlib.nullcontext)
