"""Memory planner: the peak memory of an RPO training step, by component, from a model config alone.

`plan_memory(config, max_length=1024, micro_batch_pairs=2, ...)` predicts what
`torch.cuda.max_memory_allocated` reports at steady state (optimizer state already allocated) for
one packed micro-batch of `2 * micro_batch_pairs` sequences, and `MemoryPlan.fits(gpu_bytes)` says
whether it fits. Parameter counts come from instantiating the model on the `meta` device.
`rpo_fast.live_memory.LiveTensorTracker` measures the same quantity on CPU (live tensor-storage bytes);
the tests hold the planner to it.

Activation formula (bytes per token per decoder layer; Llama/Mistral/Gemma blocks, H hidden, Q = heads
x head_dim, K = kv_heads x head_dim, I intermediate, a heads, b = bytes of the dtype, T the packed
tokens). Full fine-tuning, every weight trainable, what autograd saves:

    RMSNorm x2      2 x (4H + 4 + bH)     fp32 copy of x (x itself in fp32) and rsqrt, normed input of
                                          the weight multiply; Gemma keeps the fp32 normed (4H) instead
    norm outputs    2 x bH                inputs of q/k/v and gate/up projections
    attention       bQ + 2bK + bQ + 4a    q, k, v after RoPE, output (= o_proj input), fp32 logsumexp
                                          (flash / varlen; "sdpa" with a packed mask repeats k, v to Q and
                                          adds the converted mask, T x b per token; "eager" adds the fp32
                                          and b-byte probabilities, a T (4 + b), and an o_proj input copy)
    MLP             4bI                   gate, act(gate), up, act*up
    llama bf16:     16H + 4Q + 4K + 8I + 4a + 8  ~ 196 KiB for Mistral-7B (flash), 6.1 MiB/token for 32 layers

Frozen weights (LoRA) save less: a frozen linear keeps no input, a frozen norm no normed copy; each
LoRA branch keeps its input cast to the adapter dtype (when it differs), its dropout mask/output when
dropout > 0, and the rank-r activation. With gradient checkpointing (per layer, non-reentrant) a layer
keeps only its input, bH per token, and one layer's saved set is recomputed during its backward.

Peak = max over the step's phases (loss forward, loss backward, backward through the last and the
first layer, end of backward, optimizer step) of weights + optimizer state + reference + the
activations, gradients and workspaces alive then. Constants that are not in the formula above
(backward temporaries, CUDA kernel workspace) are set from CPU measurements with `LiveTensorTracker`
and kept small; see docs/memory.md for the validation table.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from . import checks, chunked, fwdgrad, optim
from .config import check_chunk_tokens_used, is_module_regex
from .loss import resolve_head_backward

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("full_ft", "lora")
REFERENCES = ("precomputed", "model", "lora_disabled", "none")
LOSS_IMPLS = ("fused", "triton", "torch", "dense")
ATTENTIONS = ("flash", "sdpa", "eager")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COMPONENTS = ("weights", "gradients", "optimizer_state", "activations", "loss_workspace", "reference", "workspace")
CONFIG_DIR = Path(__file__).parent / "model_configs"
GiB = 2**30

# Constants measured with LiveTensorTracker on CPU (tests/test_memory_plan.py) or known of CUDA.
CUDA_KERNEL_WORKSPACE = 256 * 2**20  # cuBLAS workspaces, attention scratch: inside max_memory_allocated
CUDA_CONTEXT = 600 * 2**20  # CUDA context + handles: outside the allocator, counted by `fits`


# ---------------------------------------------------------------------------------------------------
# Model configs and their shapes


def shipped_configs() -> list[str]:
    """Names accepted by `load_model_config` besides paths: the JSON files in rpo_fast/model_configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


@functools.lru_cache(maxsize=1)
def shipped_hub_ids() -> dict[str, str]:
    """{hub id: shipped name}, e.g. {"mistralai/Mistral-7B-v0.1": "mistral-7b"} (from each file's _comment)."""
    ids = {}
    for path in CONFIG_DIR.glob("*.json"):
        comment = json.loads(path.read_text()).get("_comment", "")
        if comment:
            ids[comment.split()[0]] = path.stem
    return ids


def load_model_config(model):
    """A `transformers.PretrainedConfig` from a config, a dict, a shipped name or the hub id of one, a JSON
    file or a directory.

    Raises:
        ValueError: for a name that is neither shipped nor an existing path, or a dict without model_type.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        name = shipped_hub_ids().get(str(model), str(model))
        if not path.exists() and (CONFIG_DIR / f"{name}.json").exists():
            path = CONFIG_DIR / f"{name}.json"
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"model: expected a shipped config name {shipped_configs()} (or its hub id), a "
                             f"config.json path or a directory with one, got {str(model)!r}")
        try:
            model = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"model: {path} is not valid JSON ({err})") from None
    if not isinstance(model, dict) or "model_type" not in model:
        raise ValueError(f"model: expected a config dict with 'model_type', got {type(model).__name__}")
    kwargs = {k: v for k, v in model.items() if k not in ("model_type", "architectures") and not k.startswith("_")}
    return AutoConfig.for_model(model["model_type"], **kwargs)


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs from a decoder-only model: sizes and parameter counts (no weights)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    gemma_norm: bool  # the norm keeps its fp32 normed input (Gemma) rather than a b-byte copy (Llama)
    n_params: int  # unique parameters
    layer_params: int  # one decoder layer
    embedding_params: int
    head_params: int  # 0 when tied to the embedding
    linears: tuple[tuple[str, int, int], ...]  # (name, in_features, out_features) in one layer
    layer_param_numels: tuple[int, ...]  # every parameter tensor of one layer

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear(self, name: str) -> tuple[int, int]:
        for n, fan_in, fan_out in self.linears:
            if n == name:
                return fan_in, fan_out
        raise KeyError(name)


def model_shape(config) -> ModelShape:
    """Sizes and parameter counts of the model `config` describes, instantiated on the meta device."""
    config = load_model_config(config)
    return _model_shape(config.to_json_string(use_diff=False))


@functools.lru_cache(maxsize=32)
def _model_shape(config_json: str) -> ModelShape:
    from transformers import AutoConfig, AutoModelForCausalLM

    data = json.loads(config_json)
    config = AutoConfig.for_model(data.pop("model_type"), **{k: v for k, v in data.items()
                                                              if k not in ("architectures", "_name_or_path")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(backbone, "layers", None)
    if not layers:
        raise ValueError(f"model: the planner models Llama/Mistral/Gemma-style decoders (a `layers` list of "
                         f"blocks with {list(LINEARS)}); {type(model).__name__} has none")
    layer = layers[0]
    linears = {}
    for name, module in layer.named_modules():
        short = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and short in LINEARS:
            linears[short] = (module.in_features, module.out_features)
    missing = [n for n in LINEARS if n not in linears]
    if missing:
        raise ValueError(f"model: the planner models Llama/Mistral/Gemma-style blocks with {list(LINEARS)}; "
                         f"{type(model).__name__} lacks {missing}")
    unique = {id(p): p for p in model.parameters()}
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head is embedding
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    return ModelShape(
        name=type(model).__name__,
        vocab_size=embedding.shape[0],
        hidden_size=embedding.shape[1],
        intermediate_size=linears["gate_proj"][1],
        num_layers=len(layers),
        num_heads=num_heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        tied_embeddings=tied,
        gemma_norm="Gemma" in type(layer).__name__,
        n_params=sum(p.numel() for p in unique.values()),
        layer_params=sum(p.numel() for p in layer.parameters()),
        embedding_params=embedding.numel(),
        head_params=0 if tied else head.numel(),
        linears=tuple((n, *linears[n]) for n in LINEARS),
        layer_param_numels=tuple(p.numel() for p in layer.parameters()),
    )


# ---------------------------------------------------------------------------------------------------
# The plan


@dataclass
class MemoryPlan:
    """Predicted peak memory of one training step, by component (bytes), at its peak phase.

    `components` sum to `peak_bytes`, the prediction for `torch.cuda.max_memory_allocated` (on CPU: peak
    live tensor bytes). `phases` holds the total at every modeled phase of the step.
    """

    components: dict[str, int]
    peak_phase: str
    phases: dict[str, int]
    options: dict
    tokens: int
    response_tokens: int
    n_params: int
    n_trainable: int
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return sum(self.components.values())

    def required_bytes(self, headroom: float = 0.05) -> int:
        """GPU memory needed: the peak plus the CUDA context (on CUDA), over (1 - headroom) for allocator
        fragmentation (reserved beyond allocated)."""
        context = CUDA_CONTEXT if self.options["device"] == "cuda" else 0
        return math.ceil((self.peak_bytes + context) / (1 - headroom))

    def fits(self, gpu_bytes: int, headroom: float = 0.05) -> bool:
        """True when `required_bytes(headroom)` is at most `gpu_bytes` (e.g. 80 * 2**30; an "80 GB"
        H100 reports 79.1 GiB as total_memory, the `--gpu-gb` default)."""
        return self.required_bytes(headroom) <= gpu_bytes

    def table(self, gpu_bytes: int | None = None) -> str:
        width = max(len(c) for c in COMPONENTS) + 2
        opts = self.options
        lines = [
            f"model {opts['model']}: {self.n_params / 1e9:.2f}B params, {self.n_trainable / 1e6:.1f}M trainable",
            f"mode {opts['mode']}, {opts['dtype']}, optimizer {opts['optimizer']}, reference {opts['reference']}, "
            f"loss {opts['loss_impl']} ({opts['head_backward']} backward), attention {opts['attention']}, checkpointing "
            f"{'on' if opts['gradient_checkpointing'] else 'off'}",
            f"micro-batch: {self.tokens} tokens ({self.response_tokens} scored)"
            + (f", per process of FSDP x {opts['fsdp_processes']}" if opts.get("fsdp_processes", 1) > 1 else "")
            + (f", per process of DDP x {opts['ddp_processes']}" if opts.get("ddp_processes", 1) > 1 else ""),
            "",
            f"{'component':<{width}}{'GiB':>9}",
        ]
        for name in COMPONENTS:
            lines.append(f"{name:<{width}}{self.components[name] / GiB:>9.2f}")
        lines.append(f"{'peak':<{width}}{self.peak_bytes / GiB:>9.2f}   (at {self.peak_phase})")
        if gpu_bytes is not None:
            need = self.required_bytes()
            verdict = "fits" if self.fits(gpu_bytes) else "does NOT fit"
            lines.append(f"{'needed':<{width}}{need / GiB:>9.2f}   {verdict} in {gpu_bytes / GiB:.1f} GiB "
                         f"(+CUDA context, 5% fragmentation headroom)")
        lines.append("phases: " + ", ".join(f"{k} {v / GiB:.1f}" for k, v in self.phases.items()))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def plan_memory(
    model_config,
    *,
    max_length: int = 1024,
    micro_batch_pairs: int | None = 2,
    tokens_per_micro_batch: int | None = None,
    prompt_tokens: int = 0,
    share_prompt: bool = False,
    mode: str = "full_ft",
    lora_rank: int = 16,
    lora_targets: tuple[str, ...] = LINEARS,
    lora_dtype: str = "fp32",
    lora_dropout: float = 0.0,
    dtype: str = "bf16",
    gradient_checkpointing: bool = True,
    optimizer: str = "adamw",
    reference: str = "precomputed",
    loss_impl: str = "fused",
    head_backward: str = "auto",
    head_chunk_tokens: int | None = None,
    attention: str = "flash",
    device: str = "cuda",
    fsdp_processes: int = 1,
    ddp_processes: int = 1,
) -> MemoryPlan:
    """Predicts the peak memory of one RPO training step.

    Args:
        model_config: a transformers config, a config dict, a shipped name (`shipped_configs()`), a
            config.json path or a directory holding one.
        max_length: tokens per sequence (prompt + response); a micro-batch packs 2 * micro_batch_pairs
            sequences into one row of T = 2 * micro_batch_pairs * max_length tokens (worst case).
        tokens_per_micro_batch: the packer's token budget T instead of micro_batch_pairs.
        prompt_tokens: prompt tokens per sequence, not scored by the head (0: worst case, N = T).
        share_prompt: pack each pair as [prompt][chosen][rejected] (`rpo_fast.packing`): the row is one
            prompt per pair shorter, and each layer's attention keeps its keys/values gathered per segment,
            one prompt per pair more than the unshared row. Needs attention="flash" (the packed attention).
        mode: "full_ft" or "lora" (frozen base, adapters of `lora_rank` on `lora_targets`, stored in
            `lora_dtype`, peft's default fp32; dropout > 0 keeps a mask and a copy per target).
        dtype: parameter and activation dtype, "bf16" | "fp16" | "fp32".
        optimizer: one of `rpo_fast.optim.OPTIMIZER_MODES` (see that module).
        reference: "precomputed" (cached reference log-probs), "model" (a second frozen copy),
            "lora_disabled" (the base model with adapters off), "none" (reference-free).
        loss_impl: "fused" (= "triton" on CUDA, "torch" on CPU), "triton", "torch" (chunked) or
            "dense" (full [N, V] logits, the naive baseline).
        head_backward: the fused head's backward (`fused_linear_rpo_loss(backward=)`): "auto" (= "fwdgrad", a
            training step needs the gradient; "recompute" for dtype="fp16"), "fwdgrad" (gradients formed in forward, one chunk of logits at
            a time), "recompute" (chunked logits recomputed in backward) or "atomic" (the Triton kernel's fp32
            accumulators). Not used with loss_impl="dense".
        head_chunk_tokens: fwdgrad's `chunk_tokens` (logit rows alive at a time; None: the device's default
            budget, `rpo_fast.fwdgrad.default_chunk_tokens`).
        attention: "flash" (FlashAttention varlen / torch varlen_attn: no mask, no kv repeat), "sdpa"
            (transformers' sdpa with packed position_ids: block mask, kv repeated) or "eager".
        device: "cuda" (adds kernel workspace; `fits` adds the context) or "cpu" (the measurement).
        fsdp_processes: FSDP world size (full sharding, one unit per decoder layer, as accelerate wraps it):
            the plan is one process's. Weights, gradients and optimizer state are divided by it; on top
            come the whole weights of two decoder layers (the one running and the prefetched next) and of
            the embedding, head and final norm (gathered through forward and backward), and the whole
            gradients of the head and of the layer last reduce-scattered. A frozen reference model is not
            sharded (the trainer keeps a whole copy per process).
        ddp_processes: DDP world size: the plan is one process's, with the whole model. The gradients live in
            DDP's communication buckets (the trainer asks for `gradient_as_bucket_view`, so they are the
            buckets, not a copy), allocated when the model is wrapped: they are resident in every phase.

    Returns:
        MemoryPlan.

    Raises:
        ValueError: naming the argument, for unknown options or non-positive sizes.
    """
    checks.check_choice("mode", mode, MODES)
    checks.check_choice("dtype", dtype, DTYPE_BYTES)
    checks.check_choice("lora_dtype", lora_dtype, DTYPE_BYTES)
    checks.check_choice("reference", reference, REFERENCES)
    checks.check_choice("loss_impl", loss_impl, LOSS_IMPLS)
    checks.check_choice("head_backward", head_backward, checks.HEAD_BACKWARDS)
    checks.check_choice("attention", attention, ATTENTIONS)
    checks.check_choice("device", device, ("cuda", "cpu"))
    _, in_backward = optim.parse_mode(optimizer)
    for name, value in (("fsdp_processes", fsdp_processes), ("ddp_processes", ddp_processes),
                        ("max_length", max_length), ("lora_rank", lora_rank)):
        if not checks.is_int(value) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    for name, value in (("micro_batch_pairs", micro_batch_pairs), ("tokens_per_micro_batch", tokens_per_micro_batch)):
        if value is not None and not checks.is_int(value):
            raise ValueError(f"{name}: expected an integer (or None), got {value!r}")
    if not checks.is_int(prompt_tokens):
        raise ValueError(f"prompt_tokens: expected an integer, got {prompt_tokens!r}")
    if not (isinstance(lora_dropout, (int, float)) and 0 <= lora_dropout < 1):
        raise ValueError(f"lora_dropout: expected a number in [0, 1), got {lora_dropout!r}")
    if isinstance(lora_targets, str):
        raise ValueError(f"lora_targets: expected a tuple of projection names, got the string {lora_targets!r}")
    checks.check_chunk_tokens(head_chunk_tokens, "head_chunk_tokens")
    check_chunk_tokens_used(head_chunk_tokens, head_backward, loss_impl, "loss_impl")
    if fsdp_processes > 1 and ddp_processes > 1:
        raise ValueError(f"ddp_processes: expected 1 with fsdp_processes={fsdp_processes} (a run is DDP or FSDP), "
                         f"got {ddp_processes}")
    if refusing := _processes_refusing(optimizer, fsdp_processes, ddp_processes):
        raise ValueError(f"optimizer: {optimizer!r} steps during backward, before the gradients are reduced "
                         f"across processes: expected a mode without _in_backward with {refusing}")
    if reference == "lora_disabled" and mode != "lora":
        raise ValueError("reference: 'lora_disabled' needs mode='lora', got mode='full_ft'")
    bad_targets = [t for t in lora_targets if t not in LINEARS]
    if mode == "lora" and (bad_targets or not lora_targets or lora_rank < 1):
        raise ValueError(f"lora_targets: expected a non-empty subset of {list(LINEARS)} and lora_rank >= 1, "
                         f"got {list(lora_targets)} and {lora_rank}")
    tokens, response, kv_tokens = _micro_batch_tokens(max_length, micro_batch_pairs, tokens_per_micro_batch,
                                                      prompt_tokens, share_prompt, attention)
    if loss_impl == "fused":
        loss_impl_resolved = "triton" if device == "cuda" else "torch"
    else:
        loss_impl_resolved = loss_impl

    shape = model_shape(model_config)
    b = DTYPE_BYTES[dtype]
    lora = mode == "lora"
    ctx = _Context(shape=shape, T=tokens, N=response, b=b, lora=lora, rank=lora_rank, targets=set(lora_targets),
                   lb=DTYPE_BYTES[lora_dtype], dropout=lora_dropout, attention=attention, device=device,
                   kv_tokens=kv_tokens)

    # Static: weights, optimizer state, reference weights.
    H, V, L = shape.hidden_size, shape.vocab_size, shape.num_layers
    if lora:
        lora_numels = [lora_rank * fan for name, fan_in, fan_out in shape.linears if name in lora_targets
                       for fan in (fan_in, fan_out)]  # lora_A [r, in], lora_B [out, r]
        lora_layer = sum(lora_numels)
        n_trainable = L * lora_layer
        weights = shape.n_params * b + n_trainable * ctx.lb
        trainable_numels = lora_numels * L
        grad_bytes = ctx.lb
    else:
        n_trainable = shape.n_params
        weights = shape.n_params * b
        trainable_numels = list(shape.layer_param_numels) * L + [shape.embedding_params, shape.head_params, H]
        trainable_numels = [n for n in trainable_numels if n]
        grad_bytes = b
    W = fsdp_processes
    shard = lambda n: math.ceil(n / W)  # noqa: E731 - one process's share of a sharded quantity
    state = sum(optim.state_bytes(optimizer, shard(n), grad_bytes) for n in trainable_numels)
    step_ws = optim.step_workspace_bytes(optimizer, shard(max(trainable_numels)))
    ref_weights = shape.n_params * b if reference == "model" else 0
    ref_hidden = response * H * b if reference in ("model", "lora_disabled") else 0

    # Gradients of each region (bytes), and the largest tensor of a layer (in-backward steps it alone).
    if lora:
        g_layer, g_head, g_embed = lora_layer * grad_bytes, 0, 0
        layer_largest = max(lora_numels)
    else:
        g_layer = shape.layer_params * b
        g_head = (shape.head_params or shape.embedding_params) * b + H * b  # head (or tied) + final norm
        g_embed = 0 if shape.tied_embeddings else shape.embedding_params * b
        layer_largest = max(shape.layer_param_numels)
    g_all = L * g_layer + g_head + g_embed
    # FSDP: the whole weights gathered while forward and backward run (two layers: the running one and the
    # prefetched next; the embedding, head and final norm, which accelerate keeps gathered), and the whole
    # gradient of the layer last reduced (the head's stays whole until the end of backward).
    lora_weights = lora_layer * ctx.lb if lora else 0
    gathered = (2 * (shape.layer_params * b + lora_weights)
                + (shape.embedding_params + shape.head_params + H) * b) if W > 1 else 0
    g_reducing = g_layer if W > 1 else 0
    # A tied embedding's head gradient waits in autograd's buffer until the embedding's arrives at the
    # end of backward; the two are then summed out of place (three [V, H] gradients at once).
    g_tied = shape.embedding_params * b if (shape.tied_embeddings and not lora) else 0

    # Activations.
    a_layer = ctx.layer_saved()
    a_shared = ctx.shared_saved()
    a_ckpt = tokens * H * b  # a checkpointed layer keeps its input
    held = tokens * H * b  # the last hidden state, referenced by the training step until it ends
    a_final = ctx.final_norm_saved() + held + response * H * b  # + the head's input rows
    a_layers = L * (a_ckpt if gradient_checkpointing else a_layer)
    transient = ctx.backward_transient()
    backward_resolved = "dense" if loss_impl_resolved == "dense" else resolve_head_backward(
        head_backward, loss_impl_resolved, TORCH_DTYPES[dtype], needs_grad=True)
    loss = _loss_memory(backward_resolved, response, V, H, b, not lora, device, head_chunk_tokens,
                        pair_rows=2 * (max_length - prompt_tokens))

    phases: dict[str, dict[str, int]] = {}
    static = dict(weights=shard(weights), optimizer_state=state, reference=ref_weights)

    def phase(name, **parts):
        comp = dict.fromkeys(COMPONENTS, 0)
        comp.update(static)
        for k, v in parts.items():
            comp[k] += v
        if ddp_processes > 1:  # the buckets hold every gradient from the wrap on; a phase's own count lies inside
            comp["gradients"] = max(comp["gradients"], g_all)
        comp["workspace"] += CUDA_KERNEL_WORKSPACE if device == "cuda" else 0
        phases[name] = comp

    def in_backward_step(numel: int) -> int:
        return optim.step_workspace_bytes(optimizer, numel) if in_backward else 0

    if reference in ("model", "lora_disabled"):
        phase("reference forward", reference=ctx.no_grad_forward_peak() + ref_hidden, weights=gathered)
    fwd_act = a_layers + a_shared + a_final
    phase("loss forward", activations=fwd_act, loss_workspace=loss.forward + loss.saved, reference=ref_hidden,
          weights=gathered)
    phase("loss backward", activations=fwd_act, loss_workspace=loss.backward + loss.saved, reference=ref_hidden,
          weights=gathered)
    phase("loss backward end", activations=fwd_act, loss_workspace=loss.end + loss.saved, reference=ref_hidden,
          weights=gathered)
    if in_backward and not lora and not g_tied:  # the head's gradient is stepped as soon as it is returned
        phase("head step", activations=fwd_act, loss_workspace=loss.returned + loss.saved, reference=ref_hidden,
              workspace=in_backward_step(shape.head_params))
    recompute = a_layer if gradient_checkpointing else 0
    per_layer_kept = a_ckpt if gradient_checkpointing else a_layer
    for which, done_layers in (("last", 0), ("first", L - 1)):
        kept = (L - done_layers) * per_layer_kept
        if in_backward:  # one layer tensor's gradient at a time (+ the waiting tied head gradient)
            g_now = g_tied + layer_largest * grad_bytes
        else:
            g_now = g_head + shard(done_layers * g_layer) + (g_reducing if done_layers else 0)
        # An in-backward step runs in a gradient hook between the layer's backward ops, so its temporaries and
        # the ops' are not alive together: the phase holds the larger of the two.
        step_now = in_backward_step(layer_largest)
        phase(f"backward, {which} layer", activations=kept + recompute + a_shared + transient + held,
              gradients=g_now, workspace=step_now - min(step_now, transient), weights=gathered)
    if not in_backward:
        phase("backward end", gradients=g_head + shard(g_all - g_head) + 2 * g_tied, activations=held,
              weights=gathered)
        phase("optimizer step", gradients=shard(g_all), workspace=step_ws)
    elif g_tied:  # the out-of-place sum of the two tied gradients, then its step
        phase("backward end", gradients=3 * g_tied, activations=held)
    elif g_embed:
        phase("backward end", gradients=g_embed, activations=held,
              workspace=in_backward_step(shape.embedding_params))

    peak_phase = max(phases, key=lambda k: sum(phases[k].values()))
    options = dict(model=getattr(model_config, "name_or_path", None) or
                   (str(model_config) if isinstance(model_config, (str, os.PathLike)) else shape.name),
                   max_length=max_length, micro_batch_pairs=micro_batch_pairs,
                   tokens_per_micro_batch=tokens_per_micro_batch, prompt_tokens=prompt_tokens,
                   share_prompt=share_prompt, mode=mode, lora_rank=lora_rank, lora_targets=tuple(lora_targets),
                   lora_dtype=lora_dtype, lora_dropout=lora_dropout, dtype=dtype,
                   gradient_checkpointing=gradient_checkpointing, optimizer=optimizer, reference=reference,
                   loss_impl=loss_impl_resolved, head_backward=backward_resolved, head_chunk_tokens=head_chunk_tokens,
                   attention=attention, device=device,
                   fsdp_processes=W, ddp_processes=ddp_processes)
    return MemoryPlan(components=phases[peak_phase], peak_phase=peak_phase,
                      phases={k: sum(v.values()) for k, v in phases.items()}, options=options, tokens=tokens,
                      response_tokens=response, n_params=shape.n_params, n_trainable=n_trainable,
                      notes=_notes(options, shape))


def _micro_batch_tokens(max_length: int, micro_batch_pairs: int | None, tokens_per_micro_batch: int | None,
                        prompt_tokens: int, share_prompt: bool, attention: str) -> tuple[int, int, int]:
    """The micro-batch `plan_memory`'s sizing options describe: its packed tokens T, its scored (response) tokens
    N, and the key/value rows attention keeps (T, or more with a shared prompt).

    Raises:
        ValueError: naming the option, for sizes that make no micro-batch.
    """
    if tokens_per_micro_batch is None:
        if not micro_batch_pairs or micro_batch_pairs < 1:
            raise ValueError(f"micro_batch_pairs: expected an integer >= 1 (or tokens_per_micro_batch), "
                             f"got {micro_batch_pairs}")
        tokens = 2 * micro_batch_pairs * max_length
        n_seq = 2 * micro_batch_pairs
    else:
        if tokens_per_micro_batch < 2:
            raise ValueError(f"tokens_per_micro_batch: expected >= 2, got {tokens_per_micro_batch}")
        tokens = tokens_per_micro_batch
        n_seq = max(2, 2 * math.ceil(tokens / (2 * max_length)))
    if not 0 <= prompt_tokens < max_length:
        raise ValueError(f"prompt_tokens: expected 0 <= prompt_tokens < max_length={max_length}, got {prompt_tokens}")
    response = max(1, tokens - n_seq * prompt_tokens)
    kv_tokens = tokens
    if share_prompt:
        if attention != "flash":
            raise ValueError(f"share_prompt: needs attention='flash' (the packed attention), "
                             f"got attention={attention!r}")
        prompts = (n_seq // 2) * prompt_tokens  # one prompt copy per pair leaves the row, one joins the key rows
        tokens, kv_tokens = tokens - prompts, tokens + prompts
    return tokens, response, kv_tokens


def _notes(options: dict, shape: ModelShape) -> list[str]:
    """What a plan's options (`MemoryPlan.options`) imply beyond its numbers."""
    opt_base, in_backward = optim.parse_mode(options["optimizer"])
    dtype, lora, reference = options["dtype"], options["mode"] == "lora", options["reference"]
    fsdp_processes, ddp_processes = options["fsdp_processes"], options["ddp_processes"]
    notes = []
    if in_backward:
        notes.append("optimizer steps in backward: gradient accumulation 1, no global-norm clipping")
    if opt_base == "adamw" and dtype != "fp32" and not lora:
        notes.append(f"torch AdamW on {dtype} weights keeps {dtype} states and loses updates below half an ulp; "
                     "adamw_bf16 (Kahan) or adamw_bf16_sr preserve them")
    if shape.tied_embeddings and not lora:
        notes.append("tied embeddings: the head's gradient waits for the embedding's until the end of backward")
    if fsdp_processes > 1:
        notes.append(f"FSDP over {fsdp_processes} processes: one process's memory; weights, gradients and optimizer "
                     f"state sharded {fsdp_processes} ways, two layers and the embedding/head gathered whole"
                     + ("; the reference model is a whole copy per process" if reference == "model" else ""))
    if ddp_processes > 1:
        notes.append(f"DDP over {ddp_processes} processes: one process's memory, the whole model; the gradients are "
                     "DDP's buckets, resident from the wrap on")
    return notes


def _processes_refusing(optimizer: str, fsdp_processes: int, ddp_processes: int) -> str | None:
    """"fsdp_processes=N" or "ddp_processes=N" when `optimizer` steps in backward and the run has several processes,
    which it cannot: DDP and FSDP reduce the gradients after the hooks that would step them. None otherwise."""
    if optim.parse_mode(optimizer)[1]:
        for name, processes in (("fsdp_processes", fsdp_processes), ("ddp_processes", ddp_processes)):
            if processes > 1:
                return f"{name}={processes}"
    return None


@dataclass
class _Context:
    """Per-token activation accounting for one decoder layer (see the module docstring)."""

    shape: ModelShape
    T: int  # packed tokens
    N: int  # scored (response) tokens
    b: int  # activation bytes
    lora: bool
    rank: int
    targets: set
    lb: int  # LoRA adapter bytes
    dropout: float
    attention: str
    device: str
    kv_tokens: int  # keys/values attention keeps (T, or more for shared-prompt key rows)

    def _lora_branch(self, name: str) -> int:
        """Per-token bytes a LoRA branch on `name` saves: cast input, dropout, rank-r activation."""
        if not self.lora or name not in self.targets:
            return 0
        fan_in, _ = self.shape.linear(name)
        kept = self.lb * self.rank
        if self.dropout > 0:  # mask (bool from CUDA's fused kernel, a float tensor on CPU) + dropped input
            kept += (1 if self.device == "cuda" else self.lb) * fan_in + self.lb * fan_in
        elif self.lb != self.b:
            kept += self.lb * fan_in  # the input cast to the adapter dtype
        return kept

    def _input_kept(self, names) -> bool:
        """Does some consumer keep this b-byte input itself? (trainable weight, or a same-dtype adapter)"""
        if not self.lora:
            return True
        return self.dropout == 0 and self.lb == self.b and any(n in self.targets for n in names)

    def _norm(self) -> int:
        H, trainable = self.shape.hidden_size, not self.lora
        if self.shape.gemma_norm:
            return 4 * H + 4 + (4 * H if trainable else 0)
        return 4 * H + 4 + (self.b * H if trainable else 0)

    def layer_saved(self) -> int:
        """Bytes one decoder layer saves for backward (all T tokens)."""
        s, b = self.shape, self.b
        H, Q, K, I, a = s.hidden_size, s.q_width, s.kv_width, s.intermediate_size, s.num_heads
        per_token = 2 * self._norm()
        per_token += b * H * self._input_kept(("q_proj", "k_proj", "v_proj"))
        per_token += b * H * self._input_kept(("gate_proj", "up_proj"))
        repeat = self.attention != "flash" and K != Q
        kv = 2 * b * (Q if repeat else K)
        if self.attention == "eager":
            probs = 4 * a * self.T + (b * a * self.T if b != 4 else 0)  # fp32 softmax, its b-byte copy
            per_token += b * Q + probs + b * Q * self._input_kept(("o_proj",))
        else:
            per_token += b * Q + b * Q + 4 * a  # q, output (o_proj's input), logsumexp; k, v below
            if self.attention == "sdpa":
                per_token += b * self.T  # the block mask converted to an additive b-byte bias, per call
        per_token += 3 * b * I + b * I * self._input_kept(("down_proj",))
        per_token += sum(self._lora_branch(n) for n in LINEARS)
        return self.T * per_token + self.kv_tokens * kv

    def shared_saved(self) -> int:
        """Saved once per forward: RoPE cos/sin, ids, positions, the packed boolean mask."""
        extra = self.T * self.T if self.attention in ("sdpa", "eager") else 0
        return 2 * self.T * self.shape.head_dim * self.b + 16 * self.T + extra

    def final_norm_saved(self) -> int:
        return self.T * self._norm()

    def backward_transient(self) -> int:
        """Temporaries of one layer's backward on top of its saved tensors: the output gradient, the
        MLP's intermediate gradients and the norms' fp32 gradients (calibrated on CPU)."""
        s = self.shape
        return self.T * (2 * self.b * s.intermediate_size + 3 * 4 * s.hidden_size)

    def no_grad_forward_peak(self) -> int:
        """Peak of a forward without autograd: one MLP's intermediates, the stream and its norm."""
        s = self.shape
        return self.T * (3 * self.b * s.intermediate_size + 3 * self.b * s.hidden_size + 8 * s.hidden_size)


class LossMemory(NamedTuple):
    """Bytes of the linear -> log-prob op beyond its inputs, at its moments."""

    forward: int  # forward peak
    backward: int  # backward peak inside its loop
    end: int  # backward end: the fp32 accumulators being cast to the gradients
    returned: int  # after it returns: the hidden-state gradient and the head's gradient
    saved: int  # kept from forward to backward


def _loss_memory(backward: str, N: int, V: int, H: int, b: int, trainable_head: bool, device: str,
                 chunk_tokens: int | None, pair_rows: int) -> LossMemory:
    """The head's workspace by how its gradient is made: "dense", "fwdgrad", "recompute" or "atomic".

    `chunk_tokens`: fwdgrad's logit rows per chunk (None: the device's default). `pair_rows`: the longest pair's
    response rows (chosen + rejected), which fwdgrad copies whole when they exceed its chunk. The head's gradient (b x V x H) is part of `end` and `returned` (of `saved` for fwdgrad);
    `plan_memory` does not count it again among the gradients."""
    head_grad = b * V * H if trainable_head else 0
    returned = N * H * b + head_grad
    if backward == "dense":  # full logits: b-byte matmul output, fp32 log-softmax saved, fp32 grads
        fwd = (b * N * V if b != 4 else 0) + 4 * N * V
        bwd = 4 * N * V + 4 * N * V + (b * N * V if b != 4 else 0) + N * H * b
        return LossMemory(fwd, bwd, returned, returned, 4 * N * V)
    if backward == "fwdgrad":
        # The gradients are made in forward and held until backward hands them back as they are: `saved`, with
        # nothing more `returned`. Forward, per chunk: its fp32 logits (+ the b-byte dlogits on CUDA), its hidden
        # rows and dhidden rows in the GEMM operand dtype (b on CUDA, fp32 on CPU), beside the fp32 dweight
        # accumulator (in fp32 it is the gradient; else it is cast at the end, both alive) and, on CPU, the
        # weight's fp32 copy for the products. Logits: a chunk of whole pairs or a piece of a longer pair, at
        # most chunk_tokens rows. Hidden and dhidden rows: the chunk's, or a longer pair's whole.
        rows = min(N, chunk_tokens or fwdgrad.default_chunk_tokens(V, torch.device(device)))
        chunk = rows * V
        copied_rows = max(rows, min(N, pair_rows))
        operand = b if device == "cuda" else 4
        extra_acc = (4 - b) * V * H if trainable_head else 0
        weight_copy = 4 * V * H if device == "cpu" and b != 4 else 0
        loop = (4 * chunk + (b * chunk if device == "cuda" and b != 4 else 0) + 2 * operand * copied_rows * H
                + weight_copy + 8 * N)
        fwd = max(loop + extra_acc, (4 * V * H if trainable_head and b != 4 else 0))
        return LossMemory(fwd, 0, 0, 0, returned)
    if backward == "atomic":  # per-split partial lse / target logits; fp32 dhidden and dweight accumulators
        splits = 8
        fwd = 2 * 4 * splits * N + 8 * N
        bwd = 4 * N * H + b * N * H + (4 * V * H if trainable_head else 0)
        return LossMemory(fwd, bwd, bwd + head_grad, returned, 4 * N)
    # recompute: fp32 logits chunks, from half-precision operands on CUDA (fp32 GEMM output); elsewhere a b-byte
    # product, then fp32. On CUDA logsumexp's own two fp32 temporaries.
    rows = min(N, chunked.chunk_rows(V, device=torch.device(device)))
    chunk = rows * V
    half_ops = device == "cuda" and b != 4
    upcast = b * chunk if b != 4 and not half_ops else 0
    fwd = 4 * chunk + upcast + (8 * chunk if device == "cuda" else 0) + 8 * N
    # Backward peak: the chunk's fp32 softmax, its b-byte dlogits copy (the GEMM operand on CUDA, the dhidden
    # operand elsewhere) and the rows for the gradient GEMMs (fp32 hidden rows off CUDA, the b-byte dhidden
    # chunk on CUDA); at the end the fp32 accumulator is cast to the gradient (in fp32 it is the gradient).
    grad_hidden = N * H * b + 8 * N
    acc = 4 * V * H if trainable_head else 0
    bwd = grad_hidden + acc + 4 * chunk + (b * chunk if b != 4 else 0) + (b if half_ops else 4) * rows * H
    end = grad_hidden + head_grad + (acc if b != 4 else 0)
    return LossMemory(fwd, bwd, end, returned, 4 * N)


# ---------------------------------------------------------------------------------------------------
# The plan of a training config


@dataclass(frozen=True)
class World:
    """A training run's processes: how many, and whether FSDP shards the model over them (else DDP, when > 1)."""

    processes: int = 1
    fsdp: bool = False


TRAINER_REFERENCES = {"cache": "precomputed", "model": "model", "adapter": "lora_disabled", "none": "none"}
TRAINER_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def plan_for_train_config(config, model=None, device: str = "cuda", world: World = World()) -> MemoryPlan:
    """The planner's prediction for a `rpo_fast.config.TrainConfig` on `device`, at its worst micro-batch.

    The packer fills micro-batches up to `token_budget` tokens and `max_pairs_per_micro_batch` pairs, and
    gives a pair longer than the budget a micro-batch of its own, so the worst case is
    max(2 max_length, min(token_budget, 2 max_length x max_pairs)) tokens, all of them scored (no prompt
    tokens: response tokens cost the loss more; so shared-prompt packing, which only drops prompt copies, is
    planned but saves nothing in this worst case). Attention is varlen ("flash"), as the trainer runs it
    on CUDA. `mixed_precision: bf16` over fp32 weights is planned as fp32 throughout (an overestimate
    of the autocast activations).

    Args:
        config: the training config.
        model: the model config to plan for (anything `load_model_config` takes) instead of `config.model`.
        world: the run's processes; with more than one, one process's memory under DDP, or FSDP when
            `world.fsdp` (the launcher decides which, not the config).

    Raises:
        ValueError: when the model's config cannot be found (pass `model`), or for options the planner
            does not model (LoRA targets outside its projections).
    """
    return plan_memory(model if model is not None else config.model,
                       **train_config_plan_options(config, device, world))


def train_config_plan_options(config, device: str = "cuda", world: World = World()) -> dict:
    """`plan_memory` keyword arguments (all but the model) for a training config; see `plan_for_train_config`."""
    pair_tokens = 2 * config.max_length
    tokens = config.token_budget
    if config.max_pairs_per_micro_batch is not None:
        tokens = min(tokens, pair_tokens * config.max_pairs_per_micro_batch)
    targets = config.lora_target_modules
    if targets == "all-linear" or is_module_regex(targets):  # a regex: planned as every projection (an upper bound)
        targets = LINEARS
    elif isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    lora = config.finetune == "lora"
    impl = config.impl
    return dict(head_backward=config.head_backward, head_chunk_tokens=config.head_chunk_tokens,
        max_length=config.max_length, micro_batch_pairs=None, tokens_per_micro_batch=max(tokens, pair_tokens),
        prompt_tokens=0, share_prompt=config.share_prompt, mode="lora" if lora else "full_ft", lora_rank=config.lora_r,
        lora_targets=tuple(targets) if lora else LINEARS, lora_dropout=config.lora_dropout if lora else 0.0,
        dtype=TRAINER_DTYPES[config.dtype], gradient_checkpointing=config.gradient_checkpointing,
        optimizer=config.optimizer, reference=TRAINER_REFERENCES[config.reference],
        loss_impl="fused" if impl == "auto" else impl, attention="flash", device=device,
        fsdp_processes=world.processes if world.fsdp else 1, ddp_processes=1 if world.fsdp else world.processes)


def train_config_keys(change: dict) -> dict:
    """The training-config keys (`rpo_fast.config.TrainConfig`) that make a change of `single_changes` other than
    the micro-batch's in a run: the inverse of `train_config_plan_options`, with what the config requires along
    with it (no mixed precision over 16-bit weights; no clipping or accumulation for an optimizer that steps in
    backward)."""
    keys = {}
    for name, value in change.items():
        if name == "gradient_checkpointing":
            keys[name] = value
        elif name == "reference":
            keys[name] = next(key for key, planned in TRAINER_REFERENCES.items() if planned == value)
        elif name == "dtype":
            keys[name] = next(key for key, planned in TRAINER_DTYPES.items() if planned == value)
            if value != "fp32":
                keys["mixed_precision"] = "no"
        elif name == "optimizer":
            keys[name] = value
            if optim.parse_mode(value)[1]:
                keys.update(max_grad_norm=0, gradient_accumulation_steps=1)
        elif name == "mode":
            keys["finetune"] = "lora" if value == "lora" else "full"
        elif name == "lora_rank":
            keys["lora_r"] = value
        else:
            raise ValueError(f"{name}: no training-config key sets it alone")
    return keys


class Alternative(NamedTuple):
    """One change to a run's options (`alternatives`) and its plan."""

    text: str  # the change in words
    change: dict  # the plan_memory options it sets
    plan: MemoryPlan


def single_changes(options: dict) -> list[tuple[str, dict]]:
    """The single changes `alternatives` plans for `options` (plan_memory's keyword arguments), each
    (the change in words, the options it sets); they need no model."""
    full = options.get("mode", "full_ft") == "full_ft"
    changes = []
    if not options.get("gradient_checkpointing", True):
        changes.append(("gradient checkpointing on", dict(gradient_checkpointing=True)))
    if options.get("reference") == "model":
        changes.append(("reference log-probs precomputed (reference: cache)", dict(reference="precomputed")))
    if options.get("dtype") == "fp32":
        changes.append(("bf16 weights (dtype: bfloat16, mixed_precision: no)", dict(dtype="bf16")))
    if full:
        for opt in ("adamw_bf16_sr", "adamw8bit", "adamw_bf16_in_backward", "adamw_bf16_sr_in_backward"):
            if opt != options.get("optimizer") and not _processes_refusing(
                    opt, options.get("fsdp_processes", 1), options.get("ddp_processes", 1)):
                note = " (max_grad_norm 0, no accumulation)" if opt.endswith("_in_backward") else ""
                changes.append((f"optimizer {opt}{note}", dict(optimizer=opt)))
        changes.append(("LoRA r16 with the disabled adapter as reference",
                        dict(mode="lora", reference="lora_disabled", optimizer="adamw", lora_rank=16)))
    tokens, pairs = options.get("tokens_per_micro_batch"), options.get("micro_batch_pairs")
    if tokens and tokens >= 4 * options.get("max_length", 1024):
        changes.append((f"half the micro-batch ({tokens // 2} tokens)", dict(tokens_per_micro_batch=tokens // 2)))
    elif not tokens and pairs and pairs > 1:
        changes.append((f"half the micro-batch ({pairs // 2} pair{'s' if pairs // 2 > 1 else ''})",
                        dict(micro_batch_pairs=pairs // 2)))
    return changes


def alternatives(model_config, gpu_bytes: int, **options) -> list[Alternative]:
    """What one change to `options` (plan_memory's keyword arguments; `single_changes`) does to the plan, for a
    run that does not fit. Those that fit on `gpu_bytes` come first, the one needing the most memory (the
    smallest departure from the run asked for) first; then those that do not."""
    listed = [Alternative(text, change, plan_memory(model_config, **{**options, **change}))
              for text, change in single_changes(options)]
    return sorted(listed, key=lambda alt: (not alt.plan.fits(gpu_bytes), -alt.plan.required_bytes()))


def alternatives_text(model_config, gpu_bytes: int, **options) -> str:
    """Lines for a plan that does not fit: each single change and the memory it would need."""
    lines = ["one change at a time:"]
    for alt in alternatives(model_config, gpu_bytes, **options):
        verdict = "fits" if alt.plan.fits(gpu_bytes) else "does not fit"
        lines.append(f"  {alt.text}: needs {alt.plan.required_bytes() / GiB:.1f} GiB ({verdict})")
    return "\n".join(lines)


def forecast(config, model_config, gpu_bytes: int, world: World = World()) -> str:
    """One log line for the start of training: the predicted peak of `config`'s worst micro-batch on a GPU of
    `gpu_bytes` (one process's of `world`), and whether it fits (with what
    to do when it does not)."""
    try:
        options = train_config_plan_options(config, "cuda", world)
        plan = plan_memory(model_config, **options)
    except Exception as err:  # noqa: BLE001 - an architecture the planner does not model: training goes on
        return f"memory plan: not available ({type(err).__name__}: {err})"
    line = (f"memory plan: predicted peak {plan.peak_bytes / GiB:.1f} GiB at {plan.peak_phase}, needs "
            f"{plan.required_bytes() / GiB:.1f} of {gpu_bytes / GiB:.1f} GiB")
    if plan.fits(gpu_bytes):
        return line + ": fits"
    fitting = [alt.text for alt in alternatives(model_config, gpu_bytes, **options) if alt.plan.fits(gpu_bytes)]
    return (line + ": does NOT fit, expect an out-of-memory error"
            + (f"; it would fit with {fitting[0]}" if fitting else "")
            + "; `rpo-fast plan-memory --config CONFIG` lists the options")


# ---------------------------------------------------------------------------------------------------
# CLI: rpo-fast plan-memory


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="rpo-fast plan-memory",
        description="Predict the peak GPU memory of RPO training from a model config (no weights).")
    parser.add_argument("--config", default=None,
                        help="a training config (YAML, as `rpo-fast train --config`): plan exactly that run; the "
                             "sizing and mode options below then come from it")
    parser.add_argument("--model", default=None,
                        help=f"shipped config {shipped_configs()} or its hub id, a config.json, or a directory "
                             "holding one (required without --config; with it, overrides the config's model)")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per sequence (prompt + response)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--micro-batch", type=int, default=None, help="preference pairs per micro-batch (default 2)")
    size.add_argument("--tokens", type=int, default=None, help="token budget per packed micro-batch instead")
    parser.add_argument("--prompt-tokens", type=int, default=0, help="unscored prompt tokens per sequence")
    parser.add_argument("--share-prompt", action="store_true",
                        help="shared-prompt packing: each pair's prompt in the row once (the trainer's default)")
    parser.add_argument("--mode", choices=MODES, default="full_ft")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-targets", default=",".join(LINEARS), help="comma-separated projection names")
    parser.add_argument("--lora-dtype", choices=list(DTYPE_BYTES), default="fp32")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bf16")
    parser.add_argument("--no-checkpointing", action="store_true", help="disable gradient checkpointing")
    parser.add_argument("--optimizer", choices=list(optim.OPTIMIZER_MODES) + list(optim.ALIASES), default="adamw")
    parser.add_argument("--reference", choices=REFERENCES, default=None,
                        help="default: precomputed (full_ft), lora_disabled (lora)")
    parser.add_argument("--loss-impl", choices=LOSS_IMPLS, default="fused")
    parser.add_argument("--head-backward", choices=checks.HEAD_BACKWARDS, default="auto")
    parser.add_argument("--head-chunk-tokens", type=int, default=None,
                        help="logit rows per fwdgrad chunk (the trainer's head_chunk_tokens; default: what fits the "
                             "device's logits budget)")
    parser.add_argument("--attention", choices=ATTENTIONS, default="flash")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    world = parser.add_mutually_exclusive_group()
    world.add_argument("--fsdp", type=int, default=1, metavar="PROCESSES",
                       help="FSDP world size: plan one process's memory with weights, gradients and optimizer "
                            "state sharded this many ways (default 1: no FSDP)")
    world.add_argument("--ddp", type=int, default=1, metavar="PROCESSES",
                       help="DDP world size: plan one process's memory, the whole model with its gradients in "
                            "DDP's buckets from the start (default 1: one process)")
    parser.add_argument("--gpu-gb", type=float, default=79.1,
                        help="GPU memory in GiB for the fits verdict (an '80 GB' H100 has 79.1 GiB)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    return parser


def options_from_args(args: argparse.Namespace) -> dict:
    """`plan_memory` keyword arguments (all but the model) from the command line's options."""
    reference = args.reference or ("lora_disabled" if args.mode == "lora" else "precomputed")
    pairs = None if args.tokens else (2 if args.micro_batch is None else args.micro_batch)
    return dict(
        max_length=args.max_length, micro_batch_pairs=pairs, tokens_per_micro_batch=args.tokens,
        prompt_tokens=args.prompt_tokens, share_prompt=args.share_prompt, mode=args.mode, lora_rank=args.lora_rank,
        lora_targets=tuple(t for t in args.lora_targets.split(",") if t), lora_dtype=args.lora_dtype,
        lora_dropout=args.lora_dropout, dtype=args.dtype, gradient_checkpointing=not args.no_checkpointing,
        optimizer=args.optimizer, reference=reference, loss_impl=args.loss_impl, head_backward=args.head_backward,
        head_chunk_tokens=args.head_chunk_tokens,
        attention=args.attention, device=args.device, fsdp_processes=args.fsdp, ddp_processes=args.ddp)


# Options that --config decides (the rest: --model, --device, --fsdp, --ddp, --gpu-gb, --json, still apply).
CONFIG_DECIDES = ("--max-length", "--micro-batch", "--tokens", "--prompt-tokens", "--share-prompt", "--mode",
                  "--lora-rank", "--lora-targets", "--lora-dtype", "--lora-dropout", "--dtype", "--no-checkpointing",
                  "--optimizer", "--reference", "--loss-impl", "--head-backward", "--head-chunk-tokens",
                  "--attention")


def _train_key(arg: str) -> str | None:
    """The TrainConfig key of `--key[=value]` (dashes read as underscores), or None."""
    from .config import TrainConfig

    name = arg[2:].partition("=")[0].replace("-", "_") if arg.startswith("--") else ""
    return name if name in TrainConfig.__dataclass_fields__ else None


def main(argv: list[str] | None = None) -> int:
    """`rpo-fast plan-memory ...`: prints the plan; exit status 0 when it fits, 1 when it does not, 2 for bad
    arguments (one line naming the option).

    With `--config` or train-style `--key=value` overrides, it plans that training config (the train
    command's defaults < the file < the overrides); the options in CONFIG_DECIDES then come from it.
    """
    from .config import TrainConfig, load_config, parse_overrides

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    parser.epilog = ("exit status: 0 the plan fits in --gpu-gb, 1 it does not fit, 2 bad arguments. With --config "
                     "or train-style --key=value overrides (e.g. --token_budget=2048; rpo-fast train --help lists "
                     "the keys) it plans that training config.")
    # Config mode: --config, or a train-style --key=value (the planner's own options are spelled with dashes).
    # There, `--key=value` and a bare boolean `--flag` of a config key are train overrides (--model stays the
    # planner's); the planner's sizing options (`--max-length 512`, `--reference cache`) are refused below.
    config_mode = any(a == "--config" or a.startswith("--config=") or ("_" in a.partition("=")[0] and _train_key(a))
                      for a in argv)

    def is_override(arg: str) -> bool:
        key, name = _train_key(arg), arg.partition("=")[0]
        if key in (None, "model") or ("-" in name[2:] and name in CONFIG_DECIDES):
            return False
        return "=" in arg or TrainConfig.__dataclass_fields__[key].type in (bool, "bool")

    overrides = [a for a in argv if config_mode and is_override(a)]
    args, unknown = parser.parse_known_args([a for a in argv if a not in overrides])

    def fail(message: str):
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    if unknown:
        fail(f"unrecognized arguments: {' '.join(unknown)}")
    if not (math.isfinite(args.gpu_gb) and args.gpu_gb > 0):
        fail(f"--gpu-gb: expected a finite number of GiB > 0, got {args.gpu_gb}")
    try:
        if config_mode:
            given = [a.split("=")[0] for a in argv if a.split("=")[0] in CONFIG_DECIDES and a not in overrides]
            if given:
                raise ValueError(f"--config: the training config decides {given}; set them in the config file or "
                                 "as train-style overrides (--max_length=1024, --optimizer=adamw_bf16, ...)")
            train_config = load_config(args.config, parse_overrides(overrides))
            model = args.model if args.model is not None else train_config.model
            options = {**train_config_plan_options(train_config, args.device), "fsdp_processes": args.fsdp,
                       "ddp_processes": args.ddp}
        elif args.model is None:
            raise ValueError("--model: expected a model config (or --config TRAIN_CONFIG), got none")
        else:
            model, options = args.model, options_from_args(args)
        plan = plan_memory(model, **options)
    except (ValueError, OSError) as err:
        fail(str(err))
    gpu_bytes = int(args.gpu_gb * GiB)
    if args.json:
        print(json.dumps({**dataclasses.asdict(plan), "peak_bytes": plan.peak_bytes,
                          "required_bytes": plan.required_bytes(), "fits": plan.fits(gpu_bytes)}, indent=2))
    else:
        print(plan.table(gpu_bytes))
        if not plan.fits(gpu_bytes):
            print(alternatives_text(model, gpu_bytes, **options))
    return 0 if plan.fits(gpu_bytes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
