"""Packed attention: one packed row of several sequences gives the same logits and gradients as running
each sequence alone with transformers' own sdpa attention (CPU, tiny random-init models)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from conftest import assert_close
from rpo_fast import attention

LENGTHS = [7, 13, 1, 10]  # irregular, including a one-token sequence


def tiny(model_cls=LlamaForCausalLM, config_cls=LlamaConfig, **extra):
    config = config_cls(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    model = model_cls(config).float()
    model.config._attn_implementation = "sdpa"
    return model


def packed_inputs(lengths, vocab=97):
    ids = [torch.randint(0, vocab, (n,)) for n in lengths]
    input_ids = torch.cat(ids)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, input_ids, position_ids, cu_seqlens


def unpacked_logits_and_grads(model, ids):
    model.zero_grad()
    logits = [model(input_ids=x[None], use_cache=False).logits[0] for x in ids]
    torch.cat(logits).pow(2).mean().backward()
    return torch.cat(logits).detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def packed_logits_and_grads(model, input_ids, position_ids, **kwargs):
    model.zero_grad()
    model.set_attn_implementation(attention.register())
    try:
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs).logits[0]
        logits.pow(2).mean().backward()
    finally:
        model.set_attn_implementation("sdpa")
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("boundaries", ["cu_seqlens", "position_ids"])
def test_packed_equals_unpacked_logits_and_grads(boundaries):
    model = tiny()
    ids, input_ids, position_ids, cu_seqlens = packed_inputs(LENGTHS)
    expected, expected_grads = unpacked_logits_and_grads(model, ids)
    kwargs = {"cu_seq_lens_q": cu_seqlens, "max_length_q": max(LENGTHS)} if boundaries == "cu_seqlens" else {}
    got, got_grads = packed_logits_and_grads(model, input_ids, position_ids, **kwargs)
    assert_close(got, expected, atol=1e-5, rtol=1e-5, name="logits")
    for name, grad in expected_grads.items():
        assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-4, name=f"grad {name}")


def test_packing_matters():
    """Guards the test above: the same packed row without restarting positions/boundaries differs."""
    model = tiny()
    ids, input_ids, _, _ = packed_inputs(LENGTHS)
    expected, _ = unpacked_logits_and_grads(model, ids)
    got = model(input_ids=input_ids, use_cache=False).logits[0].detach()
    assert (got - expected).abs().max() > 1e-3


def test_sliding_window_packed_equals_unpacked():
    model = tiny(MistralForCausalLM, MistralConfig, sliding_window=4)
    ids, input_ids, position_ids, cu_seqlens = packed_inputs(LENGTHS)
    expected, _ = unpacked_logits_and_grads(model, ids)
    got, _ = packed_logits_and_grads(model, input_ids, position_ids, cu_seq_lens_q=cu_seqlens)
    assert_close(got, expected, atol=1e-5, rtol=1e-5, name="logits")


def test_cu_seqlens_from_position_ids():
    got = attention.cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 0, 1]]))
    assert got.tolist() == [0, 3, 4, 6] and got.dtype == torch.int32
    with pytest.raises(ValueError, match="position_ids"):
        attention.cu_seqlens_from_position_ids(torch.tensor([[3, 4, 0, 1]]))


def test_refuses_padding_mask_and_kv_cache():
    module = torch.nn.Module()
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="attention_mask"):
        attention.varlen_attention_forward(module, q, q, q, torch.ones(1, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key"):
        attention.varlen_attention_forward(module, q[:, :, :1], q, q, None)


def test_backend_on_cpu_is_sdpa():
    assert attention.select_backend(torch.device("cpu")) == "sdpa"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_uses_the_fused_kernel_not_the_math_one(dtype):
    """Per-sequence sdpa on CPU keeps only q, k, v, the output and logsumexp for backward (the flash kernel);
    the math fallback (3-D inputs) would keep each sequence's [H, L, L] probabilities, in fp32 for bf16."""
    from rpo_fast.memory_plan import LiveTensorTracker

    heads, kv_heads, dim, lengths = 4, 2, 16, [200, 56]
    total = sum(lengths)
    module = torch.nn.Module().train()
    q = torch.randn(1, heads, total, dim, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, total, dim, dtype=dtype, requires_grad=True) for _ in range(2))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    tracker = LiveTensorTracker().track(q, k, v)
    before = tracker.live
    with tracker:
        out, _ = attention.varlen_attention_forward(module, q, k, v, None, position_ids=position_ids, scaling=0.25)
    kept = tracker.live - before  # what autograd holds for backward, plus the output
    attention_matrices = heads * sum(n * n for n in lengths) * 4
    assert kept < attention_matrices / 4, f"{kept} bytes kept; the [H, L, L] probabilities are {attention_matrices}"
    assert out.shape == (1, total, heads, dim)
