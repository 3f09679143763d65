"""Optimizer memory modes for full fine-tuning a 7B model on one GPU.

A bf16 7B model holds 2 bytes/param of weights; plain AdamW adds 2 bytes/param of gradients and two
moment states. These modes trade where those bytes go (docs/memory.md has the numbers for 7B models):

    mode                    states/param     full grads   step transients         notes
    adamw                   2 x param dtype  yes          none (fused kernel)     bf16 params: bf16 states and
                                                                                  round-to-nearest updates, which
                                                                                  lose updates below half an ulp
    adamw_bf16              4 B + 2 B comp   yes          20 B x a 4M chunk       bf16 m, v (stochastic rounding)
                                                                                  + Kahan-compensated weights
    adamw_bf16_sr           4 B              yes          20 B x a 4M chunk       weights stochastically rounded
    adamw8bit               ~2.03 B          yes          none                    bitsandbytes, CUDA only
    <any>_in_backward       as above         no           as above                step per parameter from its
                                                                                  post-accumulate-grad hook

`_in_backward` modes (`adamw_in_backward`, alias `adamw_fused_in_backward`) step each parameter as
soon as its gradient is accumulated and free that gradient, so at most one parameter's gradient
exists at a time (torch tutorial "How to save memory by fusing the optimizer step into the backward
pass"). Constraints, enforced by `build_optimizer`:

- gradient accumulation must be 1: the step happens inside every backward;
- clipping by the global gradient norm is impossible (the norm is known only after the last
  gradient, when all but one parameter are already updated): `max_grad_norm` is refused. The
  optimizer still reports the pre-step global norm of the last backward (`last_grad_norm`) for logs;
- `optimizer.step()` updates nothing (it publishes the last backward's norm and counts) and `zero_grad()`
  has nothing to free, so an ordinary training loop and LR schedulers work unchanged (the schedulers
  see every per-parameter group through `param_groups`);
- one process: DDP and FSDP reduce gradients after the hook has already stepped the local ones (the
  trainer refuses more);
- no fp16 GradScaler (bf16 needs none): unscaling and inf checks would need all gradients;
- a non-finite gradient cannot be skipped as a whole step: parameters whose gradients arrived earlier
  (those nearer the output) are already updated. With `skip_nonfinite` (the default) the first
  non-finite gradient halts the step: it and every later gradient of that backward are dropped, and
  `step()` reports how many parameters were updated (`last_params_updated`), so a caller can skip
  the loss before backward (a non-finite loss updates nothing) and count the rest.

`LowPrecisionAdamW` keeps both moments in bf16 written with stochastic rounding (an EMA with
beta2 = 0.999 changes v by 0.1% per step, less than bf16's 0.4% half-ulp, so round-to-nearest would
freeze v) and either a bf16 Kahan compensation buffer (weight = p + comp, about 16 mantissa bits)
or stochastic rounding of the weights (unbiased, no extra buffer). Its math is torch's AdamW in fp32,
chunk by chunk, so the fp32 temporaries stay bounded.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Iterable

import torch

BASE_MODES = ("adamw", "adamw_bf16", "adamw_bf16_sr", "adamw8bit")
IN_BACKWARD_SUFFIX = "_in_backward"
OPTIMIZER_MODES = BASE_MODES + tuple(m + IN_BACKWARD_SUFFIX for m in BASE_MODES)
ALIASES = {"adamw_fused_in_backward": "adamw_in_backward"}

# Elements per chunk of LowPrecisionAdamW's fp32 math, and its transient bytes per element at the worst
# moment (fp32 m, v, w and step, + the int32 noise and bf16 result of a stochastic rounding; 21.8 measured,
# on CPU, for bf16 and fp32 gradients).
LOW_PRECISION_CHUNK = 2**22
LOW_PRECISION_TEMPS_PER_ELEMENT = 22
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps fp32 states for smaller tensors
BNB_BLOCK = 256  # blockwise quantization: one fp32 absmax per 256 values per state


def parse_mode(mode: str) -> tuple[str, bool]:
    """`"adamw_bf16_in_backward"` -> `("adamw_bf16", True)`.

    Raises:
        ValueError: for an unknown mode, naming the known ones.
    """
    mode = ALIASES.get(mode, mode)
    if mode not in OPTIMIZER_MODES:
        raise ValueError(f"optimizer: expected one of {list(OPTIMIZER_MODES) + list(ALIASES)}, got {mode!r}")
    if mode.endswith(IN_BACKWARD_SUFFIX):
        return mode[: -len(IN_BACKWARD_SUFFIX)], True
    return mode, False


def state_bytes(mode: str, numel: int, param_bytes: int) -> int:
    """Optimizer-state bytes for one parameter tensor of `numel` elements stored in `param_bytes`-byte
    elements (what `build_optimizer(mode)` allocates; the per-tensor `step` counters are ignored)."""
    base, _ = parse_mode(mode)
    if base == "adamw":  # torch AdamW: exp_avg and exp_avg_sq in the parameter's dtype
        return 2 * param_bytes * numel
    if base == "adamw_bf16":  # bf16 m, v + bf16 compensation for 16-bit weights only
        return (4 + (2 if param_bytes == 2 else 0)) * numel
    if base == "adamw_bf16_sr":
        return 4 * numel
    if numel < BNB_MIN_8BIT_SIZE:  # adamw8bit
        return 8 * numel
    return 2 * numel + 2 * 4 * math.ceil(numel / BNB_BLOCK)


def step_workspace_bytes(mode: str, largest_numel: int) -> int:
    """Transient bytes of one optimizer step beyond states, gradients and weights."""
    base, _ = parse_mode(mode)
    if base in ("adamw_bf16", "adamw_bf16_sr"):
        return LOW_PRECISION_TEMPS_PER_ELEMENT * min(largest_numel, LOW_PRECISION_CHUNK)
    return 0  # fused torch AdamW and bitsandbytes update in place


# ---------------------------------------------------------------------------------------------------
# Stochastic rounding and the low-precision AdamW


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16 rounding up or down with probability proportional to proximity (unbiased).

    Adds uniform noise to the 16 mantissa bits bf16 drops, then truncates them: works for both signs
    (the bit pattern holds the magnitude) and keeps inf; finite values beyond bf16's largest may
    round to inf, and a NaN whose payload lies only in the dropped bits becomes inf.
    """
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic_round_to_bf16: expected a float32 tensor, got {x.dtype}")
    if generator is None:  # also the form torch.compile traces
        bits = torch.randint_like(x, 0, 1 << 16, dtype=torch.int32)
    else:
        bits = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits.add_(x.contiguous().view(torch.int32)).bitwise_and_(-65536)
    return bits.view(torch.float32).to(torch.bfloat16)


def nearest_bf16_as_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest bf16 value (ties to even), still in fp32: exact, through integer ops."""
    bits = x.contiguous().view(torch.int32)
    lsb = bits.bitwise_right_shift(16).bitwise_and_(1)
    return bits.add(lsb).add_(0x7FFF).bitwise_and_(-65536).view(torch.float32)


def _round_bf16(x32: torch.Tensor, stochastic: bool, generator: torch.Generator | None) -> torch.Tensor:
    return stochastic_round_to_bf16(x32, generator) if stochastic else x32.to(torch.bfloat16)


def adamw_low_precision_update(w, comp, g, m, v, *, lr: float, weight_decay: float, beta1: float, beta2: float,
                               eps: float, step_size: float, bias_correction2_sqrt: float, weight_update: str,
                               stochastic_states: bool, generator: torch.Generator | None = None):
    """One AdamW update of a flat chunk in fp32 (torch's formula), returned in storage precision.

    Args:
        w: [n] weights (bf16/fp16/fp32); comp: [n] bf16 Kahan compensation or None; g: [n] gradient;
            m, v: [n] bf16 moments. Inputs are not modified.

    Returns:
        (w_new in w's dtype, comp_new bf16 or None, m_new bf16, v_new bf16).
    """
    # Python floats only in mul/add/div (not lerp weights or alpha=/value=), so torch.compile keeps
    # them symbolic instead of recompiling for every step's bias correction.
    g32 = g.to(torch.float32, copy=True)  # squared in place below: never the caller's gradient itself
    m32 = m.float().mul_(beta1).add_(g32 * (1 - beta1))
    v32 = v.float().mul_(beta2).add_(g32.square_().mul_(1 - beta2))
    del g32
    w32 = w.float()
    if comp is not None:
        w32.add_(comp.float())
    if weight_decay:
        w32.mul_(1 - lr * weight_decay)
    step = v32.sqrt().div_(bias_correction2_sqrt).add_(eps).reciprocal_().mul_(m32).mul_(step_size)
    w32.sub_(step)
    del step
    m_new = _round_bf16(m32, stochastic_states, generator)
    del m32
    v_new = _round_bf16(v32, stochastic_states, generator)
    del v32
    if w.dtype == torch.float32:
        return w32, None, m_new, v_new
    if comp is not None:  # the weight is w + comp: keep the rounding residual
        # Round with integer ops: inductor elides a float round trip x.to(bf16).float() (it keeps fp32).
        rounded = nearest_bf16_as_fp32(w32) if w.dtype == torch.bfloat16 else w32.to(w.dtype).float()
        return rounded.to(w.dtype), w32.sub_(rounded).to(torch.bfloat16), m_new, v_new
    if weight_update == "stochastic" and w.dtype == torch.bfloat16:
        return _round_bf16(w32, True, generator), None, m_new, v_new
    return w32.to(w.dtype), None, m_new, v_new


# The per-parameter states LowPrecisionAdamW keeps in bf16 whatever the parameter's dtype.
BF16_STATES = ("exp_avg", "exp_avg_sq", "compensation")


class LowPrecisionAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, torch's formula) with bf16 states and precision-preserving updates.

    Per step, chunk by chunk in fp32: `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g^2`,
    `w = w (1 - lr wd) - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)` with `bc = 1 - beta^t`.

    Args:
        params: parameters or groups; bf16/fp16/fp32 parameters.
        state_rounding: "stochastic" (default) or "nearest" for writing m and v to bf16.
        weight_update: how a 16-bit weight absorbs the fp32 update: "kahan" (a bf16 compensation
            buffer carries the rounding residual: the weight is p + comp), "stochastic" (unbiased
            rounding, no buffer) or "nearest" (plain bf16 AdamW, for comparison). fp32 weights are
            updated exactly whatever this says.
        seed: seeds the stochastic-rounding generator (one per device) of the eager path.
        compile: run each chunk's update as one `torch.compile`d kernel (about 20 bytes of memory
            traffic per element instead of about 200 over ~30 eager kernels; the first step compiles;
            stochastic rounding then draws from torch's global RNG).

    Memory: 4 bytes/param of states, + 2 for "kahan" with 16-bit weights; transients of at most
    `LOW_PRECISION_CHUNK` elements x `LOW_PRECISION_TEMPS_PER_ELEMENT` bytes.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, state_rounding: str = "stochastic", weight_update: str = "kahan",
                 seed: int = 0, chunk_elements: int = LOW_PRECISION_CHUNK, compile: bool = False):
        if state_rounding not in ("stochastic", "nearest"):
            raise ValueError(f"state_rounding: expected 'stochastic' or 'nearest', got {state_rounding!r}")
        if weight_update not in ("kahan", "stochastic", "nearest"):
            raise ValueError(f"weight_update: expected 'kahan', 'stochastic' or 'nearest', got {weight_update!r}")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"expected lr, eps, weight_decay >= 0 and betas in [0, 1), got lr={lr}, eps={eps}, "
                             f"weight_decay={weight_decay}, betas={betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_rounding, self.weight_update = state_rounding, weight_update
        self.seed, self.chunk_elements = seed, chunk_elements
        self._generators: dict[torch.device, torch.Generator] = {}
        self._update = _compiled_update() if compile else adamw_low_precision_update
        self.compiled = compile

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.compiled:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[device]

    def state_dict(self) -> dict:
        """torch's optimizer state plus the stochastic-rounding generators' states (a resumed run draws the
        same rounding noise as an uninterrupted one)."""
        state = super().state_dict()
        state["rounding_generators"] = {str(device): gen.get_state() for device, gen in self._generators.items()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, then the bf16 states put back as saved: torch casts every floating-point state to its
        parameter's dtype, which for fp16 weights flushes small second moments to 0 (the updates then blow up)
        and for fp32 weights doubles the states' memory."""
        state_dict = dict(state_dict)
        generators = state_dict.pop("rounding_generators", {})
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(saved_ids, params):
            for name, value in state_dict["state"].get(i, {}).items():
                if name in BF16_STATES:
                    self.state[p][name] = value.to(device=p.device, dtype=torch.bfloat16, copy=True)
        for device, generator_state in generators.items():
            if (gen := self._generator(torch.device(device))) is not None:
                gen.set_state(generator_state)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, group)
        return loss

    def _step_param(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise ValueError("LowPrecisionAdamW: sparse gradients are not supported")
        state = self.state[p]
        compensated = self.weight_update == "kahan" and p.dtype != torch.float32
        if not state:
            state["step"] = 0
            for name in (n for n in BF16_STATES if compensated or n != "compensation"):
                state[name] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        options = dict(lr=group["lr"], weight_decay=group["weight_decay"], beta1=beta1, beta2=beta2,
                       eps=group["eps"], step_size=group["lr"] / (1 - beta1 ** state["step"]),
                       bias_correction2_sqrt=math.sqrt(1 - beta2 ** state["step"]),
                       weight_update=self.weight_update, stochastic_states=self.state_rounding == "stochastic",
                       generator=self._generator(p.device))
        # FSDP2 parameters, their gradients and the states made like them are DTensors: the update is
        # elementwise, so each rank updates its own shard (torch ops would refuse DTensors mixed with the
        # rounding noise, a plain tensor).
        p, grad = _local_shard(p), _local_shard(p.grad).reshape(-1)
        work = p.view(-1) if p.is_contiguous() else p.detach().clone(memory_format=torch.contiguous_format).view(-1)
        m, v = _local_shard(state["exp_avg"]).view(-1), _local_shard(state["exp_avg_sq"]).view(-1)
        comp = _local_shard(state["compensation"]).view(-1) if compensated else None
        for start in range(0, work.numel(), self.chunk_elements):
            rows = slice(start, start + self.chunk_elements)
            w_new, comp_new, m_new, v_new = self._update(
                work[rows], None if comp is None else comp[rows], grad[rows], m[rows], v[rows], **options)
            m[rows], v[rows], work[rows] = m_new, v_new, w_new
            if comp is not None:
                comp[rows] = comp_new
            del w_new, comp_new, m_new, v_new
        if not p.is_contiguous():
            p.copy_(work.view_as(p))


def _local_shard(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (shares its storage); any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


@functools.lru_cache(maxsize=1)
def _compiled_update():
    return torch.compile(adamw_low_precision_update, dynamic=True)


# ---------------------------------------------------------------------------------------------------
# Optimizer step fused into backward


class InBackwardOptimizer(torch.optim.Optimizer):
    """Steps each parameter from its post-accumulate-grad hook, then frees its gradient.

    One inner optimizer per parameter (built by `make_optimizer([group])`), so full gradients never
    coexist: peak gradient memory is one parameter's. `param_groups` are the inner optimizers' groups
    (the same dicts), so LR schedulers reach every parameter. `zero_grad()` has nothing left to do;
    `step()` publishes what the backward passes since the previous call did:

        last_grad_norm        global L2 norm of their gradients (pre-step; NaN/inf if one was not finite,
                              None if no gradient arrived)
        last_params_updated   parameters stepped
        last_step_complete    True when no gradient was non-finite (always True without skip_nonfinite)

    With `skip_nonfinite`, each gradient's norm is checked on the host before its step (one device sync
    per parameter: on a GPU the backward's kernel launches wait for it, an estimated 1-2% of a 7B step,
    unmeasured): from the first non-finite gradient on, gradients are dropped unstepped until `step()`.
    Parameters stepped before it keep their update.
    """

    steps_in_backward = True

    def __init__(self, params, make_optimizer: Callable[[list[dict]], torch.optim.Optimizer],
                 track_grad_norm: bool = True, skip_nonfinite: bool = True):
        super().__init__(params, {})
        self._inner: dict[torch.Tensor, torch.optim.Optimizer] = {}
        self._handles = []
        self.track_grad_norm = track_grad_norm or skip_nonfinite
        self.skip_nonfinite = skip_nonfinite
        self._grad_sq: torch.Tensor | None = None
        self._updated = 0
        self._halted = False
        self.last_grad_norm: float | None = None
        self.last_params_updated = 0
        self.last_step_complete = True
        inner_groups = []
        for group in self.param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                if p in self._inner:
                    continue
                inner = make_optimizer([{**options, "params": [p]}])
                self._inner[p] = inner
                inner_groups.extend(inner.param_groups)
                self._handles.append(p.register_post_accumulate_grad_hook(self._step_param))
        self.param_groups = inner_groups

    @torch.no_grad()
    def _step_param(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if self.track_grad_norm:
            # bf16 norm (fp32 accumulation inside), no fp32 copy of the gradient
            sq = torch.linalg.vector_norm(p.grad).float().square()
            self._grad_sq = sq if self._grad_sq is None else self._grad_sq + sq.to(self._grad_sq.device)
            if self.skip_nonfinite and not self._halted and not bool(torch.isfinite(sq)):
                self._halted = True
        if not self._halted:
            self._inner[p].step()
            self._updated += 1
        p.grad = None

    def step(self, closure: Callable | None = None):
        """Nothing to update (done in backward); publishes `last_grad_norm`, `last_params_updated` and
        `last_step_complete`, and re-arms the non-finite guard."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_grad_norm = None if self._grad_sq is None else float(self._grad_sq.sqrt())
        self.last_params_updated, self.last_step_complete = self._updated, not self._halted
        self._grad_sq, self._updated, self._halted = None, 0, False
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._inner:
            p.grad = None

    def remove_hooks(self) -> None:
        """Detaches the hooks: after this, backward leaves gradients and nothing steps."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def state_dict(self) -> dict:
        return {"inner": [inner.state_dict() for inner in self._inner.values()]}

    def load_state_dict(self, state_dict: dict) -> None:
        inners = list(self._inner.values())
        if len(state_dict.get("inner", ())) != len(inners):
            raise ValueError(f"state_dict: expected {len(inners)} per-parameter optimizer states, "
                             f"got {len(state_dict.get('inner', ()))}")
        for inner, sd in zip(inners, state_dict["inner"]):
            inner.load_state_dict(sd)
        # Loading replaces each inner optimizer's group dicts: share the new ones again.
        self.param_groups = [group for inner in inners for group in inner.param_groups]


# ---------------------------------------------------------------------------------------------------
# Factory


def _param_groups(model_or_params, weight_decay: float, decay_1d: bool) -> list[dict]:
    if isinstance(model_or_params, torch.nn.Module):
        params = [p for p in model_or_params.parameters() if p.requires_grad]
    else:
        params = [p for p in model_or_params if p.requires_grad]
    unique = list({id(p): p for p in params}.values())  # tied weights once
    if not unique:
        raise ValueError("build_optimizer: expected at least one parameter with requires_grad=True, got none")
    if not weight_decay or decay_1d:
        return [{"params": unique, "weight_decay": weight_decay}]
    # No decay on norms and biases (1-D), as HF Trainer and TRL do.
    decay = [p for p in unique if p.ndim >= 2]
    no_decay = [p for p in unique if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def _bitsandbytes_adamw8bit():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError("optimizer 'adamw8bit' needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU; "
                          "'adamw_bf16' needs nothing beyond torch") from err
    return bitsandbytes.optim.AdamW8bit


def build_optimizer(
    model_or_params: torch.nn.Module | Iterable[torch.Tensor],
    mode: str = "adamw",
    lr: float = 5e-7,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    *,
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
    decay_1d: bool = False,
    seed: int = 0,
    compile: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer for one of `OPTIMIZER_MODES` over the trainable parameters.

    Args:
        model_or_params: a module (its parameters with requires_grad) or an iterable of parameters.
        mode: "adamw" (torch fused AdamW, states in the parameter dtype), "adamw_bf16" (bf16 states,
            Kahan-compensated weights), "adamw_bf16_sr" (bf16 states, stochastically rounded
            weights), "adamw8bit" (bitsandbytes, CUDA), each optionally with "_in_backward";
            "adamw_fused_in_backward" is an alias of "adamw_in_backward".
        weight_decay: decoupled; not applied to 1-D parameters (norms, biases) unless `decay_1d`.
        gradient_accumulation_steps, max_grad_norm: the training loop's settings, checked against
            the mode (in-backward modes allow neither accumulation nor global-norm clipping).
        seed: adamw_bf16* only: seeds the stochastic rounding (in-backward modes: seed + k for the k-th
            parameter's optimizer, so that no two parameters draw the same noise).
        compile: adamw_bf16* only: `torch.compile` each chunk's update (see `LowPrecisionAdamW`).

    Returns:
        A `torch.optim.Optimizer`. In-backward modes return an `InBackwardOptimizer`
        (`steps_in_backward = True`): call `backward()` and the parameters are updated; `step()`
        and `zero_grad()` stay harmless, and gradients are None after backward.

    Raises:
        ValueError: unknown mode; in-backward with gradient_accumulation_steps > 1 or
            max_grad_norm; adamw8bit with parameters off CUDA; compile outside adamw_bf16*; no
            trainable parameters.
        ImportError: adamw8bit without bitsandbytes.
    """
    base, in_backward = parse_mode(mode)
    if in_backward and gradient_accumulation_steps != 1:
        raise ValueError(f"optimizer {mode!r} steps inside every backward: expected gradient_accumulation_steps=1, "
                         f"got {gradient_accumulation_steps} (use {base!r} to accumulate)")
    if in_backward and max_grad_norm is not None:
        raise ValueError(f"optimizer {mode!r} cannot clip by the global gradient norm (parameters are updated "
                         f"before the last gradient exists): expected max_grad_norm=None, got {max_grad_norm}")
    if compile and base not in ("adamw_bf16", "adamw_bf16_sr"):
        raise ValueError(f"compile=True applies to the adamw_bf16 modes, got optimizer {mode!r}")
    groups = _param_groups(model_or_params, weight_decay, decay_1d)
    if base == "adamw":
        make = lambda g: torch.optim.AdamW(g, lr=lr, betas=betas, eps=eps, fused=True)  # noqa: E731
    elif base in ("adamw_bf16", "adamw_bf16_sr"):
        update = "kahan" if base == "adamw_bf16" else "stochastic"
        # In-backward modes make one optimizer per parameter: each gets its own seed, so that parameters of one
        # shape (every layer's q_proj) do not draw the same rounding noise.
        seeds = itertools.count(seed)
        make = lambda g: LowPrecisionAdamW(g, lr=lr, betas=betas, eps=eps, weight_update=update,  # noqa: E731
                                           seed=next(seeds), compile=compile)
    else:
        off_cuda = [tuple(p.shape) for g in groups for p in g["params"] if p.device.type != "cuda"]
        if off_cuda:
            raise ValueError(f"optimizer 'adamw8bit' needs CUDA parameters, got {len(off_cuda)} off CUDA "
                             f"(first of shape {off_cuda[0]})")
        adamw8bit = _bitsandbytes_adamw8bit()
        make = lambda g: adamw8bit(g, lr=lr, betas=betas, eps=eps)  # noqa: E731
    if in_backward:
        return InBackwardOptimizer(groups, make)
    return make(groups)
