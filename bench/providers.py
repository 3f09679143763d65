"""Benchmark providers: every way a user could compute the RPO loss through an LM head, plus the floor.

Each provider turns one set of inputs into a `Run` with `forward() -> loss` (autograd on) and
`backward(loss)`. All compute the same loss (sigmoid DPO, beta=0.1, plus alpha=1.0 times the token-mean
NLL on the chosen sequences: Liger's `compute_nll_loss` and TRL's "sft"); `loss_bench` checks the loss and both
gradients of each one's first call against dense's, within the dtype's rounding (`loss_bench.TOLERANCE`):

    dense          full logits in the input dtype, log_softmax in fp32 (rpo_fast impl="dense")
    dense_compile  the same function under torch.compile (static shapes)
    liger          liger_kernel LigerFusedLinearDPOLoss(compute_nll_loss=True), its default chunking
                   (one pair per chunk) and its default compiled=True (torch.compile of the per-chunk loss) on
                   every device, as users run it: on CPU too, where dense_compile and cce are compiled as well
    cce            Cut Cross-Entropy linear_cross_entropy(reduction="none") -> per-token log-probs, then
                   the RPO formula in torch; impl="cce" on GPU (default gradient filtering), on CPU
                   impl="torch_compile" (dense logits under torch.compile: the only CPU path it has)
  rpo_fast fused_linear_rpo_loss, one provider per backward choice (all exact but the filter):
    ours_fwdgrad   backward="fwdgrad" (the default where gradients are needed): chunks of whole pairs, each
                   chunk's gradient formed in the forward from its logits; the backward only scales it
    ours_recompute backward="recompute": the linear_logprobs op, whose chunked backward recomputes each
                   chunk's logits from the saved logsumexp (the generic op's default; TRL / HF Trainer)
    ours_atomic    impl="triton", backward="atomic": the Triton backward kernel scattering into fp32
                   accumulators with atomics (GPU only; the CPU interpreter is a correctness tool)
    ours_atomic_filter  the same with RPO_FAST_GRAD_FILTER=auto: the backward skips tiles in which every
                   |onehot - softmax| entry is below finfo(bf16).eps / 32, as Cut Cross-Entropy does by
                   default. Not exact, and not bounded by bf16 rounding: the skipped entries add up, and on
                   a flat softmax their sum is large (bf16, V = 50257: dhidden 27x the naive bf16 error)
                   Before the `backward=` keyword existed, ours_recompute was impl="torch" and ours_atomic
                   impl="triton" (the same code); on such a build ours_fwdgrad is skipped.
    gemm           the bare head GEMMs, no softmax: logits = h W^T forward, dh = G W and dW = G^T h
                   backward (plus h_ref W_ref^T with the reference head): the time floor
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from typing import Callable

import torch

from rpo_fast import fused_linear_rpo_loss
from rpo_fast.loss import preference_losses, sft_nll
from rpo_fast.reference import dense_linear_logprobs

from .shapes import OURS, Shape

BETA, ALPHA, LOSS_TYPE, SFT_NORM = 0.1, 1.0, "sigmoid", "token_mean"
ALLOW_INTERPRETER = "RPO_BENCH_INTERPRETER"  # set by the gpu-dryrun suite: run ours_atomic in the interpreter
ORDER = ("dense", "dense_compile", "liger", "cce", *OURS, "gemm")
LABELS = {
    "dense": "dense PyTorch (fp32 logits)",
    "dense_compile": "dense + torch.compile",
    "liger": "Liger FusedLinearDPO+NLL",
    "cce": "Cut Cross-Entropy + RPO",
    "ours_fwdgrad": "rpo_fast backward=fwdgrad",
    "ours_recompute": "rpo_fast backward=recompute",
    "ours_atomic": "rpo_fast backward=atomic (Triton)",
    "ours_atomic_filter": "rpo_fast backward=atomic, grad filter",
    "gemm": "bare head GEMMs (floor)",
}
# What each of our providers passes to fused_linear_rpo_loss, and the same without the `backward=` keyword.
OURS_KWARGS = {"ours_fwdgrad": dict(backward="fwdgrad"), "ours_recompute": dict(backward="recompute"),
               "ours_atomic": dict(impl="triton", backward="atomic"),
               "ours_atomic_filter": dict(impl="triton", backward="atomic")}
OURS_KWARGS_BEFORE_BACKWARD = {"ours_recompute": dict(impl="torch"), "ours_atomic": dict(impl="triton"),
                               "ours_atomic_filter": dict(impl="triton")}


@dataclasses.dataclass
class Inputs:
    """One benchmark point's tensors. hidden [N, H] and weight [V, H] require grad; the reference head
    (ref_hidden, ref_weight) does not. 2B sequences of equal length, chosen first."""

    shape: Shape
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor  # [N] int64
    cu_seqlens: torch.Tensor  # [2B+1] int32
    seg_ids: torch.Tensor  # [N] int64: sequence of each token
    counts: torch.Tensor  # [2B] float32 tokens per sequence
    ref_hidden: torch.Tensor | None = None
    ref_weight: torch.Tensor | None = None

    def clear_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None

    def grad_bytes(self) -> int:
        return sum(t.grad.numel() * t.grad.element_size() for t in (self.hidden, self.weight) if t.grad is not None)

    def input_bytes(self) -> int:
        ts = (self.hidden, self.weight, self.targets, self.ref_hidden, self.ref_weight)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, with_ref: bool, seed: int = 0) -> Inputs:
    """Random (never zero) inputs whose logits have unit scale, like a trained head's after its final norm."""
    gen = torch.Generator(device=device).manual_seed(seed)  # on the device: a CPU randn of a Gemma head takes s

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device=device) * scale).to(dtype)

    n, h, v, pairs = shape
    if n % (2 * pairs):
        raise ValueError(f"shape: expected N divisible by 2B={2 * pairs} (equal-length sequences), got N={n}")
    lengths = torch.full((2 * pairs,), n // (2 * pairs), dtype=torch.int64)
    cu = torch.zeros(2 * pairs + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    inputs = Inputs(
        shape=shape,
        hidden=randn(n, h).requires_grad_(),
        weight=randn(v, h, scale=h ** -0.5).requires_grad_(),
        targets=torch.randint(0, v, (n,), generator=gen, device=device),
        cu_seqlens=cu.to(device),
        seg_ids=torch.repeat_interleave(torch.arange(2 * pairs), lengths).to(device),
        counts=lengths.float().to(device),
    )
    if with_ref:
        inputs.ref_hidden = randn(n, h)
        inputs.ref_weight = randn(v, h, scale=h ** -0.5)
    return inputs


def rpo_from_token_logps(lp: torch.Tensor, ref_lp: torch.Tensor | None, inp: Inputs) -> torch.Tensor:
    """The RPO loss from per-token log-probs [N] (fp32): segment sums, then the formula (no checks, so it
    traces under torch.compile)."""
    n_seqs = inp.counts.numel()
    sums = torch.zeros(n_seqs, dtype=torch.float32, device=lp.device).index_add(0, inp.seg_ids, lp.float())
    ratios = sums
    if ref_lp is not None:
        ref = torch.zeros(n_seqs, dtype=torch.float32, device=lp.device).index_add(0, inp.seg_ids, ref_lp.float())
        ratios = sums - ref
    b = n_seqs // 2
    z = BETA * (ratios[:b] - ratios[b:])
    return preference_losses(z, BETA, LOSS_TYPE).mean() + ALPHA * sft_nll(sums[:b], inp.counts[:b], SFT_NORM)


class Run:
    """A provider bound to inputs."""

    def forward(self):  # -> loss (scalar, autograd graph attached) or the floor's forward products
        raise NotImplementedError

    def backward(self, out) -> None:
        out.backward()


class LossRun(Run):
    def __init__(self, loss_fn: Callable[[], torch.Tensor]):
        self.loss_fn = loss_fn

    def forward(self):
        return self.loss_fn()


class EnvRun(LossRun):
    """A LossRun with environment switches set around its forward and its backward."""

    def __init__(self, loss_fn: Callable[[], torch.Tensor], env: dict[str, str]):
        super().__init__(loss_fn)
        self.env = env

    @contextlib.contextmanager
    def _switches(self):
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def forward(self):
        with self._switches():
            return self.loss_fn()

    def backward(self, out) -> None:
        with self._switches():
            out.backward()


class GemmRun(Run):
    """The three GEMMs of a linear head (fp32 accumulation inside cuBLAS/MKL, outputs in the input dtype),
    plus the reference head's forward GEMM when there is one. The backward GEMMs take the forward's
    logits as the upstream gradient: same shape and dtype as a real dlogits, and no extra [N, V] buffer."""

    def __init__(self, inp: Inputs):
        self.inp = inp

    def forward(self):
        inp = self.inp
        with torch.no_grad():
            logits = inp.hidden @ inp.weight.T
            if inp.ref_hidden is not None:
                torch.mm(inp.ref_hidden, inp.ref_weight.T)  # the reference head's GEMM, result unused
        return logits

    def backward(self, out) -> None:
        inp = self.inp
        with torch.no_grad():
            inp.hidden.grad = out @ inp.weight
            inp.weight.grad = out.T @ inp.hidden


def _have(module: str) -> str | None:
    import importlib.util

    return None if importlib.util.find_spec(module) is not None else f"{module} not installed"


def _cpu_compiler() -> str | None:
    cxx = os.environ.get("CXX", "g++")
    return None if shutil.which(cxx) else f"no C++ compiler ({cxx}) for torch.compile on CPU"


def _configure_dynamo() -> None:
    import torch._dynamo

    # One compiled graph per shape (static shapes are the fastest); raise the recompile limit so that a
    # sweep never silently falls back to eager.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)


def has_backward_keyword() -> bool:
    """Whether this build's fused_linear_rpo_loss takes `backward=` (the choice of head backward)."""
    import inspect

    return "backward" in inspect.signature(fused_linear_rpo_loss).parameters


def ours_kwargs(name: str) -> dict | None:
    """fused_linear_rpo_loss keywords of one of our providers; None where this build lacks its backward."""
    return dict(OURS_KWARGS[name]) if has_backward_keyword() else OURS_KWARGS_BEFORE_BACKWARD.get(name)


def parse_names(text: str) -> tuple[str, ...]:
    """The providers named in a comma-separated list (`--providers`); ValueError on a name that is not one,
    so that a misspelled name fails the run instead of silently dropping that provider."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in ORDER]
    if unknown or not names:
        raise ValueError(f"--providers: expected comma-separated names from {','.join(ORDER)}, got "
                         f"{', '.join(map(repr, unknown)) if unknown else repr(text)}")
    return names


def unavailable(name: str, device: torch.device) -> str | None:
    """None when the provider can run on `device`; else why not."""
    if name in OURS and ours_kwargs(name) is None:
        return "fused_linear_rpo_loss has no backward= keyword in this build"
    if name in ("ours_atomic", "ours_atomic_filter"):
        if device.type != "cuda" and not (os.environ.get(ALLOW_INTERPRETER) == "1"
                                          and os.environ.get("TRITON_INTERPRET") == "1"):
            return "GPU only (the CPU interpreter is not a performance path)"
        return _have("triton")
    if name == "liger":  # compiled: torch.compile needs a C++ compiler on CPU
        return _have("liger_kernel") or (_cpu_compiler() if device.type == "cpu" else None)
    if name == "cce":
        return _have("cut_cross_entropy") or (_cpu_compiler() if device.type == "cpu" else None)
    if name == "dense_compile":
        return _cpu_compiler() if device.type == "cpu" else _have("triton")
    if name in ("dense", "ours_fwdgrad", "ours_recompute", "gemm"):
        return None
    raise ValueError(f"provider: expected one of {list(ORDER)}, got {name!r}")


def build(name: str, inp: Inputs) -> Run:
    """Binds provider `name` to `inp`. Heavy setup (compilation) happens on the first forward."""
    dev = inp.hidden.device
    ref = dict(ref_hidden=inp.ref_hidden, ref_weight=inp.ref_weight)
    opts = dict(beta=BETA, alpha=ALPHA, sft_norm=SFT_NORM, loss_type=LOSS_TYPE)
    if name == "dense" or name in OURS:
        kwargs = dict(impl="dense") if name == "dense" else ours_kwargs(name)

        def loss():
            return fused_linear_rpo_loss(inp.hidden, inp.weight, inp.targets, inp.cu_seqlens, **ref, **opts,
                                         **kwargs).loss

        return EnvRun(loss, {"RPO_FAST_GRAD_FILTER": "auto"}) if name == "ours_atomic_filter" else LossRun(loss)
    if name == "gemm":
        return GemmRun(inp)
    if name == "dense_compile":
        _configure_dynamo()

        def dense_rpo(hidden, weight, targets, ref_hidden, ref_weight):
            lp = dense_linear_logprobs(hidden, weight, targets)
            ref_lp = None
            if ref_hidden is not None:
                with torch.no_grad():
                    ref_lp = dense_linear_logprobs(ref_hidden, ref_weight, targets)
            return rpo_from_token_logps(lp, ref_lp, inp)

        compiled = torch.compile(dense_rpo, dynamic=False)
        return LossRun(lambda: compiled(inp.hidden, inp.weight, inp.targets, inp.ref_hidden, inp.ref_weight))
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if dev.type == "cuda" else "torch_compile"
        if impl == "torch_compile":
            _configure_dynamo()

        def cce_loss():
            lp = -linear_cross_entropy(inp.hidden, inp.weight, inp.targets, reduction="none", impl=impl)
            ref_lp = None
            if inp.ref_hidden is not None:
                with torch.no_grad():
                    ref_lp = -linear_cross_entropy(inp.ref_hidden, inp.ref_weight, inp.targets, reduction="none",
                                                   impl=impl)
            return rpo_from_token_logps(lp, ref_lp, inp)

        return LossRun(cce_loss)
    if name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        _configure_dynamo()  # one compiled graph per shape: a sweep must not fall back to eager
        with_ref = inp.ref_hidden is not None
        module = LigerFusedLinearDPOLoss(beta=BETA, alpha=ALPHA, compute_nll_loss=True, compiled=True,
                                         use_ref_model=with_ref, loss_type=LOSS_TYPE)
        n_seqs, seq_len, h = 2 * inp.shape.pairs, inp.shape.seq_len, inp.shape.h
        padded = lambda t: None if t is None else t.view(n_seqs, seq_len, h)  # noqa: E731

        def liger_loss():
            return module(inp.weight, padded(inp.hidden), inp.targets.view(n_seqs, seq_len),
                          ref_input=padded(inp.ref_hidden), ref_weight=inp.ref_weight)[0]

        return LossRun(liger_loss)
    raise ValueError(f"provider: expected one of {list(ORDER)}, got {name!r}")


def configuration(name: str, device: torch.device) -> str:
    """How provider `name` runs on `device`, in a line for the summary: peers are compared as configured here."""
    gpu = device.type == "cuda"
    if name in OURS:
        kwargs = ours_kwargs(name) or {}
        call = "fused_linear_rpo_loss(" + ", ".join(f'{k}="{v}"' for k, v in kwargs.items()) + ")"
        return call + (" with RPO_FAST_GRAD_FILTER=auto (skips gradient tiles whose every |onehot - p| < "
                       "finfo(bf16).eps / 32; not exact)"
                       if name == "ours_atomic_filter" else "") + ", eager"
    return {
        "dense": 'fused_linear_rpo_loss(impl="dense"): full logits in the input dtype, log_softmax in fp32, eager',
        "dense_compile": "the dense loss under torch.compile(dynamic=False), one graph per shape",
        "liger": "LigerFusedLinearDPOLoss(compute_nll_loss=True, chunk_size=1, compiled=True): its defaults, its "
                 "per-chunk loss under torch.compile",
        "cce": ('linear_cross_entropy(impl="cce", reduction="none"), with its default gradient filter (skips '
                'gradient tiles whose entries are all below finfo(bf16).eps / 32; not exact), then the RPO '
                'formula in torch' if gpu else
                'linear_cross_entropy(impl="torch_compile", reduction="none"): dense logits under torch.compile '
                "(CCE's only CPU path), then the RPO formula in torch"),
        "gemm": "the bare head GEMMs (h W^T; G W and G^T h), no softmax: a time floor, not a loss",
    }[name]


def flops(shape: Shape, mode: str, with_ref: bool) -> float:
    """Useful head FLOPs: 2NHV per GEMM; forward 1 GEMM (+1 reference), backward 2, full 3 (+1)."""
    n, h, v, _ = shape
    gemm = 2.0 * n * h * v
    ref = gemm if with_ref else 0.0
    return {"forward": gemm + ref, "backward": 2 * gemm, "full": 3 * gemm + ref}[mode]
