"""The kernel launchers' own contract (rpo_fast.kernels, called directly): every launch goes through
`launch.on_device` with its inputs' device, and malformed inputs are a ValueError naming the argument before
any kernel runs. The numbers are tested in test_linear_logprobs.py and test_logit_grad_kernel.py."""
import contextlib
import importlib
import os
import subprocess
import sys
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


def head_calls(hidden, weight, bias, targets):
    lse, g = torch.zeros(N), torch.ones(N)
    return [lambda: FWD.linear_logprobs_fwd(hidden, weight, bias, targets),
            lambda: BWD.linear_logprobs_bwd(hidden, weight, bias, targets, lse, g)]


BAD_HEAD_INPUTS = {
    # name: (hidden, weight, bias, targets) -> the bad ones, and the message (after "^")
    "fp64_hidden": (lambda h, w, b, t: (h.double(), w.double(), b.double(), t),
                    r"hidden: expected dtype float32, float16 or bfloat16, got torch\.float64"),
    "bf16_hidden_fp16_weight": (lambda h, w, b, t: (h.bfloat16(), w.half(), None, t),
                                r"weight: expected torch\.bfloat16 on cpu \(as hidden\), got torch\.float16 on cpu"),
    "weight_on_meta": (lambda h, w, b, t: (h, w.to("meta"), None, t),
                       r"weight: expected torch\.float32 on cpu \(as hidden\), got torch\.float32 on meta"),
    "fp16_bias_fp32_hidden": (lambda h, w, b, t: (h, w, b.half(), t),
                              r"bias: expected torch\.float32 on cpu \(as hidden\), got torch\.float16 on cpu"),
    "bias_on_meta": (lambda h, w, b, t: (h, w, b.to("meta"), t),
                     r"bias: expected torch\.float32 on cpu \(as hidden\), got torch\.float32 on meta"),
    "float_targets": (lambda h, w, b, t: (h, w, b, t.float()),
                      r"targets: expected int64 or int32 on cpu, got torch\.float32 on cpu"),
    "uint8_targets": (lambda h, w, b, t: (h, w, b, t.to(torch.uint8)),
                      r"targets: expected int64 or int32 on cpu, got torch\.uint8 on cpu"),
    "targets_on_meta": (lambda h, w, b, t: (h, w, b, t.to("meta")),
                        r"targets: expected int64 or int32 on cpu, got torch\.int64 on meta"),
}


@pytest.mark.parametrize("case", list(BAD_HEAD_INPUTS))
def test_head_launchers_refuse_mixed_dtypes_devices_and_non_integer_targets(case, monkeypatch):
    """A dtype or device that differs from hidden's, or targets that are not int32/int64, is a ValueError
    naming the argument, what was expected and what came, from both head launchers, before any launch (a bf16
    hidden with an fp16 weight ran in the interpreter and is a compile error on sm_90; float targets gave
    wrong log-probs silently)."""
    make_bad, message = BAD_HEAD_INPUTS[case]
    for kernel in (FWD._linear_logprobs_fwd_kernel, BWD._linear_logprobs_bwd_kernel):
        monkeypatch.setattr(kernel, "run", lambda *a, **k: pytest.fail("launched on bad inputs"))
    for call in head_calls(*make_bad(*head_inputs())):
        with pytest.raises(ValueError, match="^" + message):
            call()


def test_head_launchers_accept_int32_targets_and_every_float_dtype():
    """What the checks let through runs: int32 targets as the public API allows, fp32/fp16/bf16 operands."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        hidden, weight, bias, targets = head_inputs(dtype)
        lp64, _ = FWD.linear_logprobs_fwd(hidden, weight, bias, targets)
        lp32, _ = FWD.linear_logprobs_fwd(hidden, weight, bias, targets.int())
        assert torch.equal(lp64, lp32)


def test_head_backward_refuses_lse_or_grad_lp_elsewhere():
    hidden, weight, bias, targets = head_inputs()
    lse, g = torch.zeros(N), torch.ones(N)
    with pytest.raises(ValueError, match=r"^lse: expected a floating-point tensor on cpu \(as hidden\), got "
                                         r"torch\.float32 on meta"):
        BWD.linear_logprobs_bwd(hidden, weight, bias, targets, lse.to("meta"), g)
    with pytest.raises(ValueError, match=r"^grad_lp: expected a floating-point tensor on cpu \(as hidden\), got "
                                         r"torch\.int64 on cpu"):
        BWD.linear_logprobs_bwd(hidden, weight, bias, targets, lse, g.long())


def test_row_launchers_refuse_operands_on_another_device():
    logits, targets, lse, g = torch.randn(N, V), torch.randint(0, V, (N,)), torch.zeros(N), torch.ones(N)
    with pytest.raises(ValueError, match=rf"^targets: expected a \[{N}\] int64 tensor on cpu, got \({N},\) "
                                         r"torch\.int64 on meta"):
        ROWS.row_logprobs(logits, targets.to("meta"))
    for name, bad in (("lse", (lse.to("meta"), g)), ("g", (lse, g.to("meta")))):
        with pytest.raises(ValueError, match=rf"^{name}: expected a \[{N}\] floating-point tensor on cpu, got "
                                             rf"\({N},\) torch\.float32 on meta"):
            ROWS.logit_grad_(logits, targets, *bad)


LATE_INTERPRETER = """
import os, torch, rpo_fast
h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
for attempt in range(2):  # the first call imports the kernels, built for a GPU
    try:
        rpo_fast.linear_logprobs(h, w, t, impl="triton")
    except ValueError as e:
        print("ValueError:", e)
    os.environ["TRITON_INTERPRET"] = "1"  # following the advice, in the same process
"""


def test_interpreter_switched_on_after_import_is_refused_with_advice():
    """TRITON_INTERPRET=1 set after `import rpo_fast` (a notebook following the CPU error's advice) cannot
    take effect: @triton.jit built compiled kernels at import, which failed with "0 active drivers". The
    launcher keeps refusing, and says the variable must be set before rpo_fast is imported."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", LATE_INTERPRETER], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    for line in lines:
        assert line.startswith("ValueError: impl='triton' needs CUDA tensors or the Triton interpreter"), line
        assert "TRITON_INTERPRET=1 set before rpo_fast is imported" in line, line


def test_interpreter_state_is_the_kernels_not_the_environment(monkeypatch):
    """In this session the kernels are interpreted; a CPU launch is refused when they were built compiled
    whatever the environment says now, and when the variable is unset afterwards (as tests do)."""
    hidden, weight, bias, targets = head_inputs()
    assert launch.interpreting()
    FWD.linear_logprobs_fwd(hidden, weight, bias, targets)
    monkeypatch.setattr(launch, "_BUILT_INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1 set before rpo_fast is imported"):
        FWD.linear_logprobs_fwd(hidden, weight, bias, targets)
    monkeypatch.setattr(launch, "_BUILT_INTERPRETED", True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"use impl='auto' on CPU"):
        FWD.linear_logprobs_fwd(hidden, weight, bias, targets)


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), (None, False)])
def test_interpreter_switch_without_triton_knobs(monkeypatch, value, expected):
    """Triton before 3.4 has no `triton.knobs` (torch 2.7 pins Triton 3.3): the switch is then read from the
    variable as those versions' `triton.jit` reads it, instead of failing with an AttributeError at the first
    kernel launch."""
    import triton

    monkeypatch.delattr(triton, "knobs", raising=False)
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert launch.interpret_switch() is expected


WITHOUT_TRITON = """
import sys
import importlib.abc

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is not installed (blocked by the test)")

sys.meta_path.insert(0, NoTriton())
import torch
import rpo_fast

torch.manual_seed(0)
hidden = torch.randn(10, 8, requires_grad=True)
weight = torch.randn(30, 8, requires_grad=True)
targets = torch.randint(0, 30, (10,))
cu_seqlens = torch.tensor([0, 3, 5, 8, 10], dtype=torch.int32)
out = rpo_fast.fused_linear_rpo_loss(hidden, weight, targets, cu_seqlens)
out.loss.backward()
rpo_fast.linear_logprobs(hidden, weight, targets).sum().backward()
assert torch.isfinite(hidden.grad).all() and "triton" not in sys.modules
print("ok")
"""


def test_the_cpu_path_runs_without_triton():
    """setup.py installs Triton on Linux only (it has no macOS or Windows wheels): importing rpo_fast and the
    CPU loss and op, forward and backward, must not need it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_interpreter_set_after_triton_was_imported_is_refused_at_kernel_import():
    """TRITON_INTERPRET=1 set after triton's import: triton's own library (tl.max, ...) is compiled-mode, and the
    interpreted kernels failed at their first launch with Triton's "Cannot call @triton.jit'd outside of the
    scope of a kernel". Importing the kernels now says what happened. And `import rpo_fast` itself leaves triton
    and torch._dynamo unimported (it imported both through torch.compiler.disable for a while: ~1.4 s more per
    start, and a bench that set the variable after importing rpo_fast broke)."""
    code = ("import os, sys\n"
            "import rpo_fast\n"
            "print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))\n"
            "import triton\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "try:\n"
            "    import rpo_fast.kernels\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported, message = proc.stdout.splitlines()[:2]
    assert imported == "[]"
    assert message.startswith("TRITON_INTERPRET=1 was set after triton was imported"), proc.stdout
