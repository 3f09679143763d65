"""Packed attention: one packed row of several sequences gives the same logits and gradients as running
each sequence alone with transformers' own sdpa attention (CPU, tiny random-init models)."""
import inspect

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
    # a shared-prompt row [prompt 0 1][chosen 2 3][rejected 2 3 4] read without its segments: refused, not one
    # sequence of 7 tokens
    with pytest.raises(ValueError, match="got 3 then 2 at 4: a shared-prompt row"):
        attention.cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 3, 2, 3, 4]]))


def test_sliding_window_in_an_unpacked_batch():
    """A batch of several unpadded rows (no packing) on the packed attention keeps the sliding window too."""
    model = tiny(MistralForCausalLM, MistralConfig, sliding_window=3)
    input_ids = torch.randint(0, 97, (2, 9))
    expected = model(input_ids=input_ids, use_cache=False).logits.detach()  # sdpa with transformers' window mask
    model.set_attn_implementation(attention.register())
    try:
        got = model(input_ids=input_ids, use_cache=False).logits.detach()
    finally:
        model.set_attn_implementation("sdpa")
    assert_close(got, expected, atol=1e-5, rtol=1e-5, name="logits")
    unwindowed = tiny(MistralForCausalLM, MistralConfig, sliding_window=None)(input_ids=input_ids, use_cache=False)
    assert (unwindowed.logits.detach() - expected).abs().max() > 1e-3  # the window matters at this length


def test_a_window_one_key_short_of_the_longest_segment():
    """sliding_window = the longest segment's length - 1: only that segment's last query loses a key (its first),
    and the window must still apply. Against softmax with the causal window mask written out, in float64."""
    torch.manual_seed(0)
    heads, dim, lengths, window = 2, 8, [5, 4], 4
    q, k, v = (torch.randn(1, heads, sum(lengths), dim, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    expected = torch.zeros_like(q)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        i, j = torch.arange(end - start)[:, None], torch.arange(end - start)[None, :]
        scores = q[0, :, start:end] @ k[0, :, start:end].transpose(-1, -2) / dim ** 0.5
        allowed = (j <= i) & (i - j < window)
        expected[0, :, start:end] = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[0, :, start:end]
    got = attention.varlen_attention_forward(torch.nn.Module().eval(), q, k, v, None, sliding_window=window,
                                             cu_seq_lens_q=cu, max_length_q=max(lengths))[0]
    assert_close(got, expected.transpose(1, 2), atol=1e-10, rtol=1e-10, name="attention")


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
    from rpo_fast.live_memory import LiveTensorTracker

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


# --- the CUDA branch of varlen_attention_forward, run on the CPU against the kernels' documented contracts ---


def documented_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window, causal):
    """What flash-attn's `flash_attn_varlen_func` (and the same FlashAttention-2 code behind torch's
    `varlen_attn`) documents, in fp32: q [Lq, H, D], k/v [Lk, Hkv, D] (H a multiple of Hkv, query head h
    reads key head h // (H // Hkv)); segment s's query i sits at key position i + n_k - n_q and sees the keys
    in [i' - window[0], i' + window[1]] (-1: unbounded; causal: window[1] = 0). Checks what the kernels check:
    one fp16/bf16 dtype, contiguous heads, int32 boundaries, max lengths that cover every segment."""
    assert q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype, (q.dtype, k.dtype, v.dtype)
    assert all(t.stride(-1) == 1 for t in (q, k, v)) and cu_q.dtype == cu_k.dtype == torch.int32
    assert isinstance(max_q, int) and isinstance(max_k, int)
    assert max_q >= int(cu_q.diff().max()) and max_k >= int(cu_k.diff().max())
    left, right = window
    right = 0 if causal else right
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32)
    for s in range(cu_q.numel() - 1):
        qs, ks, vs = q[cu_q[s]:cu_q[s + 1]].float(), k[cu_k[s]:cu_k[s + 1]].float(), v[cu_k[s]:cu_k[s + 1]].float()
        i = torch.arange(qs.shape[0])[:, None] + ks.shape[0] - qs.shape[0]
        j = torch.arange(ks.shape[0])[None, :]
        keep = (j <= i + right if right >= 0 else j >= 0) & (j >= i - left if left >= 0 else j >= 0)
        scores = torch.einsum("qhd,khd->hqk", qs, ks.repeat_interleave(group, 1)) * scale
        probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
        out[cu_q[s]:cu_q[s + 1]] = torch.einsum("hqk,khd->qhd", probs, vs.repeat_interleave(group, 1))
    return out.to(q.dtype)


def fake_flash_attn(calls):
    """A stand-in `flash_attn` module whose `flash_attn_varlen_func` has flash-attn 2.x's public signature
    (a wrong keyword is a TypeError, as on the GPU) and computes `documented_varlen`."""
    import types

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None and not return_attn_probs
        calls.append((q.dtype, k.dtype, v.dtype))
        return documented_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 scale=softmax_scale or q.shape[-1] ** -0.5, window=window_size, causal=causal)

    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def fake_torch_varlen(calls):
    """A stand-in for `torch.nn.attention.varlen.varlen_attn`: the arguments are bound to the real function's
    signature (whichever torch runs) and read as it reads them (causal exactly when window_size == (-1, 0);
    GQA only with enable_gqa, which torch 2.11/2.12 lack), then `documented_varlen` computes the
    FlashAttention-2 kernel's result."""
    from torch.nn.attention.varlen import varlen_attn

    signature = inspect.signature(varlen_attn)

    def fake(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        # torch 2.11/2.12 have no enable_gqa: there k and v must come with the query's heads
        assert a.get("enable_gqa") or a["query"].shape[1] == a["key"].shape[1], "varlen_attn: GQA needs enable_gqa"
        calls.append((a["query"].dtype, a["key"].dtype, a["value"].dtype))
        causal = a["window_size"] == (-1, 0)
        window = (-1, -1) if causal else tuple(a["window_size"])
        return documented_varlen(a["query"], a["key"], a["value"], a["cu_seq_q"], a["cu_seq_k"], a["max_q"],
                                 a["max_k"], scale=a["scale"] or a["query"].shape[-1] ** -0.5, window=window,
                                 causal=causal)

    fake.__signature__ = signature  # what the CUDA branch inspects
    return fake


def use_cuda_backend(monkeypatch, backend: str) -> list:
    """Routes varlen_attention_forward's CUDA branch to a CPU stand-in of `backend`; returns the dtypes of
    each kernel call."""
    import sys

    from torch.nn.attention import varlen

    calls = []
    monkeypatch.setattr(attention, "select_backend", lambda device: backend)
    if backend == "flash_attn":
        monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn(calls))
    else:
        monkeypatch.setattr(varlen, "varlen_attn", fake_torch_varlen(calls))
    return calls


def cuda_branch_inputs(share_prompt: bool):
    from rpo_fast.packing import pack_pairs
    from test_prompt_sharing import EDGE

    batch = pack_pairs(EDGE, share_prompt=share_prompt)
    L, H, Hkv, D = batch.num_tokens, 4, 2, 16
    q, k, v = torch.randn(1, H, L, D), torch.randn(1, Hkv, L, D), torch.randn(1, Hkv, L, D)
    return q, k, v, batch.attention_kwargs()


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("window", [None, 5])
def test_cuda_branch_matches_the_cpu_path(backend, share_prompt, window, monkeypatch):
    """The CUDA branch's layout ([L, H, D]), key gather, boundaries, scale, causal flag and window, given to
    each kernel as its documentation reads them, give the CPU path's attention (bf16 inputs, GQA)."""
    q, k, v, kwargs = cuda_branch_inputs(share_prompt)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    module = torch.nn.Module().eval()
    want = attention.varlen_attention_forward(module, *(t.float() for t in (q, k, v)), None, scaling=0.3,
                                              sliding_window=window, **kwargs)[0]
    calls = use_cuda_backend(monkeypatch, backend)
    got = attention.varlen_attention_forward(module, q, k, v, None, scaling=0.3, sliding_window=window, **kwargs)[0]
    assert calls == [(torch.bfloat16,) * 3]
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert_close(got, want, atol=2e-2, rtol=2e-2, name=f"{backend} window={window}")


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_cuda_branch_runs_the_kernels_in_half_precision(backend, monkeypatch):
    """The varlen kernels take fp16/bf16 only, q, k and v in one dtype. Under bf16 autocast with fp32
    weights q and k reach attention in fp32 and v in bf16 (rotary embeddings upcast): they are cast to bf16.
    fp32 outside autocast runs sdpa (the kernels would refuse it)."""
    q, k, v, kwargs = cuda_branch_inputs(share_prompt=True)
    module = torch.nn.Module().eval()
    want = attention.varlen_attention_forward(module, q, k, v, None, scaling=0.3, **kwargs)[0]
    calls = use_cuda_backend(monkeypatch, backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention.varlen_attention_forward(module, q, k, v.bfloat16(), None, scaling=0.3, **kwargs)[0]
    assert calls == [(torch.bfloat16,) * 3]
    assert_close(got, want, atol=3e-2, rtol=3e-2, name=f"{backend} under autocast")
    exact = attention.varlen_attention_forward(module, q, k, v, None, scaling=0.3, **kwargs)[0]
    assert len(calls) == 1 and exact.dtype == torch.float32
    assert_close(exact, want, atol=1e-6, rtol=1e-6, name="fp32 without autocast")


def old_torch_varlen(calls):
    """torch's first `varlen_attn` signature (no scale, no window, no GQA: causal or not, 1/sqrt(D)),
    computing what its kernel computes (`documented_varlen`)."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        assert query.shape[1] == key.shape[1] == value.shape[1], "no GQA in this signature"
        calls.append(is_causal)
        return documented_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=query.shape[-1] ** -0.5,
                                 window=(-1, -1), causal=is_causal)

    return varlen_attn


@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("window,kernel", [(None, True), (5, False), (10_000, True)])
def test_an_older_torch_varlen_kernel(share_prompt, window, kernel, monkeypatch):
    """torch's varlen_attn without scale, window or GQA: a custom scale goes in through q, grouped heads are
    repeated, a window that masks keys runs sdpa instead, and a window longer than every segment (which masks
    nothing) is dropped and keeps the kernel. Each equals the CPU path."""
    from torch.nn.attention import varlen

    q, k, v, kwargs = cuda_branch_inputs(share_prompt)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    module = torch.nn.Module().eval()
    want = attention.varlen_attention_forward(module, *(t.float() for t in (q, k, v)), None, scaling=0.3,
                                              sliding_window=window, **kwargs)[0]
    calls = []
    monkeypatch.setattr(attention, "select_backend", lambda device: "torch_varlen")
    monkeypatch.setattr(varlen, "varlen_attn", old_torch_varlen(calls))
    got = attention.varlen_attention_forward(module, q, k, v, None, scaling=0.3, sliding_window=window, **kwargs)[0]
    assert calls == ([True] if kernel else [])
    assert_close(got.float(), want, atol=2e-2, rtol=2e-2, name=f"window={window}")


def test_real_torch_varlen_op_accepts_the_cuda_branch_call():
    """torch's own `varlen_attn` (its Python checks, the custom op's schema and its fake kernels) takes the
    CUDA branch's call, forward and backward, on the meta device: shared prompt, GQA, sliding window."""
    from rpo_fast.packing import pack_pairs
    from test_prompt_sharing import EDGE

    batch = pack_pairs(EDGE, share_prompt=True).to("meta")
    L, module = batch.num_tokens, torch.nn.Module().eval()
    q = torch.empty(1, 4, L, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.empty(1, 2, L, 64, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    for window in (None, 7):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(attention, "select_backend", lambda device: "torch_varlen")
            out = attention.varlen_attention_forward(module, q, k, v, None, scaling=0.125, sliding_window=window,
                                                     **batch.attention_kwargs())[0]
        assert out.shape == (1, L, 4, 64) and out.dtype == torch.bfloat16
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_a_flash_attn_that_fails_to_load_is_not_used(tmp_path, monkeypatch):
    """A flash-attn wheel built for another torch is found but fails to import its CUDA extension: CUDA then
    takes torch's own varlen kernel instead of failing in the first forward."""
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text('raise ImportError("flash_attn_2_cuda: undefined symbol: _ZN3c10")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    attention.flash_attn_available.cache_clear()
    try:
        assert not attention.flash_attn_available()
        expected = "torch_varlen" if attention.torch_varlen_available() else "sdpa"
        assert attention.select_backend(torch.device("cuda")) == expected
    finally:
        attention.flash_attn_available.cache_clear()


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_mixed_precision_step_through_the_cuda_branch(backend, monkeypatch):
    """A tiny Mistral (GQA, sliding window, fp32 weights) under bf16 autocast, as mixed_precision="bf16" runs
    it, on a shared-prompt row: through transformers' own attention call, the CUDA branch (stand-in kernels)
    gives the CPU path's hidden states and parameter gradients under the same autocast."""
    from rpo_fast import modeling
    from rpo_fast.packing import pack_pairs
    from test_prompt_sharing import EDGE, _tiny

    model, batch = _tiny("mistral").train(), pack_pairs(EDGE, share_prompt=True)

    def step():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = modeling.response_hidden(model, batch)
        hidden.float().pow(2).mean().backward()
        return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want, want_grads = step()
    calls = use_cuda_backend(monkeypatch, backend)
    got, got_grads = step()
    assert calls == [(torch.bfloat16,) * 3] * model.config.num_hidden_layers
    assert_close(got, want, atol=3e-2, rtol=3e-2, name="hidden states")
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        err = float((got_grads[name] - grad).norm() / grad.norm().clamp_min(1e-12))
        assert err < 3e-2, f"grad {name}: relative error {err:.3g}"
