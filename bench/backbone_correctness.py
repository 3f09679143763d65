"""Correctness of Liger's backbone kernels (RMSNorm, RoPE, SwiGLU) as the trainer applies them on CUDA
(`rpo_fast.modeling.enable_liger_kernels`, the default `liger_kernels: true`).

A small random-init model of each family is run forward and backward on random tokens in bf16, with and
without the kernels, and both are judged against the model without them in fp32: the loss and every parameter
gradient (relative error, Frobenius, over all gradients at once) of the patched model within twice the unpatched
bf16 model's own error plus 1e-2. Skipped (nothing to judge) where the kernels do not apply: the CPU, or
liger-kernel not installed.
"""
from __future__ import annotations

import contextlib
import copy
import sys
from typing import Callable

import torch

from rpo_fast import modeling

from .correctness import rel_err, run_judged

OP = "backbone_correctness"
CONFIG = dict(dtype="bfloat16", judge="fp32 without the kernels")
FAMILIES = ("llama", "mistral", "qwen2")
TOL = 1e-2


def tiny_model(family: str):
    """A 2-layer model of `family` (grouped-query heads, untied head), fp32, random init from seed 0."""
    import transformers

    common = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False)
    config = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
              "qwen2": transformers.Qwen2Config}[family](**common)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()


def _loss_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    return loss.detach().double(), grads


@contextlib.contextmanager
def module_names_restored(model):
    """Restores, on exit, the names in `model`'s transformers module (e.g. `modeling_llama`).

    Liger's instance patch also rebinds names there: `apply_rotary_pos_emb`, which attention looks up at every
    forward, and the RMSNorm/MLP classes that later models are built from. Inside, the patch takes effect;
    after, models run or built in this process (the unpatched references, the training-step benchmark's
    models) are stock again.
    """
    module = sys.modules[type(modeling.base_model(model)).__module__]
    saved = dict(vars(module))
    try:
        yield
    finally:
        for name in set(vars(module)) - set(saved):
            delattr(module, name)
        for name, value in saved.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)


def check_family(family: str, device: torch.device, patch: Callable = modeling.enable_liger_kernels) -> dict | None:
    """{"loss": (patched err, unpatched bf16 err), "grads": (...)} against fp32 without the kernels; None when
    `patch` does not apply to this model on this device.

    The unpatched models run before the patch and the patch's module-level names are undone after it
    (`module_names_restored`): Liger rebinds the family's RoPE function for every model of the process, which
    would otherwise leave RoPE unjudged (in the reference too) and patch every model built afterwards.
    """
    exact = tiny_model(family).to(device)
    plain = copy.deepcopy(exact).to(torch.bfloat16)
    patched = copy.deepcopy(plain)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, exact.config.vocab_size, (2, 160), generator=gen).to(device)
    loss32, grads32 = _loss_and_grads(exact, ids)
    unpatched = _loss_and_grads(plain, ids)
    with module_names_restored(patched):
        if not patch(patched):
            return None
        results = [_loss_and_grads(patched, ids), unpatched]
    return {"loss": tuple(rel_err(r[0], loss32) for r in results),
            "grads": tuple(rel_err(r[1], grads32) for r in results)}


def run(device: torch.device, emit: Callable[[dict], None], log: Callable[[str], None] = print,
        patch: Callable = modeling.enable_liger_kernels) -> bool:
    """Every family; emits rows; True when all that ran passed (a family the kernels skip is logged)."""
    all_ok = True
    for family in FAMILIES:
        label = f"liger backbone {family}"
        ok = run_judged(OP, "liger", "bf16 without", "bf16 without", label, CONFIG,
                        lambda: check_family(family, device, patch), emit, log, TOL)
        if ok is None:
            log(f"  skipped {label}: the kernels do not apply here (CPU, or liger-kernel not installed)")
        else:
            all_ok &= ok
    return all_ok
