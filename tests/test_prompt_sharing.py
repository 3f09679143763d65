"""Shared-prompt packing ([prompt][chosen][rejected] per pair): the layout, and that a step on it gives the
same per-token log-probs, loss and parameter gradients as the unshared layout, for the policy and the
reference (tiny random-init Llama and sliding-window Mistral/Qwen2, CPU, fp32)."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from conftest import assert_close
from rpo_fast import attention, modeling
from rpo_fast.data import PreferenceExample
from rpo_fast.logprobs import linear_logprobs
from rpo_fast.packing import pack_pairs
from rpo_fast.ref_cache import compute_reference_logps
from test_packing import HAND, random_examples

VOCAB = 97
# prompt longer than both responses; a 1-token chosen; a 1-token rejected; a 1-token prompt
EDGE = [PreferenceExample(list(range(3, 23)), [30, 31, 32], [40, 41], 0),
        PreferenceExample([5, 6, 7, 8], [50], [51, 52, 53, 54, 55, 56, 57], 1),
        PreferenceExample([9, 10, 11, 12, 13, 14], [60, 61, 62, 63, 64, 65], [70], 2),
        PreferenceExample([15], [16, 17], [18, 19, 20], 3)]


def test_hand_example():
    b = pack_pairs(HAND, share_prompt=True)
    assert b.input_ids.tolist() == [[11, 12, 13, 14, 15, 16, 21, 22, 23, 24, 25, 26]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 2, 3, 4]]
    assert b.cu_seqlens.tolist() == [0, 3, 5, 6, 8, 9, 12]
    assert b.key_index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 6, 7, 8, 6, 7, 9, 10, 11]
    assert b.cu_seqlens_k.tolist() == [0, 3, 8, 12, 14, 17, 22]
    assert b.response_index.tolist() == [2, 3, 7, 2, 7, 9, 10]
    assert b.targets.tolist() == [14, 15, 23, 16, 24, 25, 26]
    assert b.response_cu_seqlens.tolist() == [0, 2, 3, 4, 7]
    assert (b.max_seqlen, b.max_seqlen_k, b.num_tokens, b.sequence_tokens) == (3, 5, 12, 17)
    assert (b.cu_seqlens.dtype, b.cu_seqlens_k.dtype, b.key_index.dtype) == (torch.int32, torch.int32, torch.int64)
    moved = b.to("meta")
    assert moved.key_index.device.type == moved.cu_seqlens_k.device.type == "meta"
    assert pack_pairs(HAND).key_index is None and not pack_pairs(HAND).shares_prompt


@pytest.mark.parametrize("n_pairs,seed", [(1, 0), (5, 1), (12, 2)])
def test_layout_reconstructs_the_unshared_sequences(n_pairs, seed):
    """Every response token sees exactly its unshared sequence's tokens, at the same positions, and the head
    gets the same targets in the same order (chosen of all pairs, then rejected)."""
    examples = random_examples(n_pairs, seed)
    shared, plain = pack_pairs(examples, share_prompt=True), pack_pairs(examples)
    assert torch.equal(shared.targets, plain.targets)
    assert torch.equal(shared.response_cu_seqlens, plain.response_cu_seqlens)
    assert shared.sequence_tokens == plain.sequence_tokens == plain.num_tokens
    assert shared.num_tokens == sum(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    ids, pos = shared.input_ids[0], shared.position_ids[0]
    cq, ck = shared.cu_seqlens.tolist(), shared.cu_seqlens_k.tolist()
    assert len(cq) == len(ck) == 3 * n_pairs + 1 and cq[-1] == shared.num_tokens
    for i, ex in enumerate(examples):
        for part, response in ((1, ex.chosen_ids.tolist()), (2, ex.rejected_ids.tolist())):
            s = 3 * i + part
            keys = shared.key_index[ck[s]:ck[s + 1]]
            # the keys are the whole unshared sequence, each at its position: prompt then this response only
            assert ids[keys].tolist() == ex.prompt_ids.tolist() + response
            assert pos[keys].tolist() == list(range(len(ex.prompt_ids) + len(response)))
            assert ids[cq[s]:cq[s + 1]].tolist() == response  # the queries are the response
        prompt_keys = shared.key_index[ck[3 * i]:ck[3 * i + 1]]
        assert ids[prompt_keys].tolist() == ex.prompt_ids.tolist() == ids[cq[3 * i]:cq[3 * i + 1]].tolist()
    for j in range(2 * n_pairs):  # each head row predicts the next token of its own sequence
        rows = shared.response_index[shared.response_cu_seqlens[j]:shared.response_cu_seqlens[j + 1]]
        assert torch.equal(pos[rows] + 1, plain.position_ids[0, plain.response_index[
            plain.response_cu_seqlens[j]:plain.response_cu_seqlens[j + 1]]] + 1)


def _tiny(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "mistral":  # a window shorter than most prompts and sequences
        model = MistralForCausalLM(MistralConfig(sliding_window=5, **common))
    else:  # qwen2: one sliding layer, one full layer
        model = Qwen2ForCausalLM(Qwen2Config(sliding_window=4, use_sliding_window=True, max_window_layers=1,
                                             **common))
    model.set_attn_implementation(attention.register())
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.randn(VOCAB) * 0.5)  # exercises the head bias too
    return model.float()


def _step(model, reference, examples, share_prompt: bool):
    """(per-token policy log-probs, reference log-probs, RPOOutput, parameter gradients) of one training step."""
    batch = pack_pairs(examples, share_prompt=share_prompt)
    model.zero_grad()
    packed = modeling.PackedRPOModel(model, beta=0.7, alpha=0.3, sft_norm="token_mean", impl="torch")
    ref_hidden, ref_weight, ref_bias = modeling.reference_head_inputs(reference, batch, torch.float32)
    out = packed(batch, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
    out.loss.backward()
    with torch.no_grad():
        weight, bias = modeling.head(model)
        token_logps = linear_logprobs(modeling.response_hidden(model, batch), weight, batch.targets, bias)
        ref_token_logps = linear_logprobs(ref_hidden, ref_weight, batch.targets, ref_bias)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return token_logps, ref_token_logps, out, grads


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("data", ["edge", "random"])
def test_shared_step_equals_unshared(kind, data):
    """Per-token log-probs (policy and reference), the loss and every parameter gradient of one step: shared
    prompt == unshared layout, in fp32. Several pairs per row, prompts longer than both responses, 1-token
    responses and prompts, and (mistral, qwen2) sliding windows shorter than the sequences."""
    _assert_shared_step_equals_unshared(kind, data)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_shared_step_equals_unshared_one_call_per_response(kind, monkeypatch):
    """The same with each response in its own CPU attention call (long responses), not both in one."""
    monkeypatch.setattr(attention, "MAX_DROPPED_SCORES", -1)
    _assert_shared_step_equals_unshared(kind, "random")


def _assert_shared_step_equals_unshared(kind, data):
    examples = EDGE if data == "edge" else random_examples(6, seed=3, vocab=VOCAB, max_part=14)
    model = _tiny(kind)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():  # the reference differs from the policy, so the preference term is not trivial
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.train()
    got = _step(model, reference, examples, share_prompt=True)
    want = _step(model, reference, examples, share_prompt=False)
    assert_close(got[0], want[0], atol=2e-5, rtol=1e-5, name="policy token log-probs")
    assert_close(got[1], want[1], atol=2e-5, rtol=1e-5, name="reference token log-probs")
    for field in ("loss", "pref_loss", "nll", "chosen_logps", "rejected_logps"):
        assert_close(getattr(got[2], field), getattr(want[2], field), atol=2e-5, rtol=1e-5, name=field)
    assert set(got[3]) == set(want[3]) and len(want[3]) == len(list(model.parameters()))
    for name, grad in want[3].items():
        assert_close(got[3][name], grad, atol=1e-6, rtol=1e-4, name=f"grad {name}")
    assert want[3]["model.embed_tokens.weight"].abs().sum() > 0


def test_sharing_is_not_a_no_op():
    """The test above can fail: a rejected response that also saw the chosen one gives other log-probs."""
    model = _tiny("llama").eval()
    batch = pack_pairs(EDGE, share_prompt=True)
    weight, bias = modeling.head(model)
    with torch.no_grad():
        right = linear_logprobs(modeling.response_hidden(model, batch), weight, batch.targets, bias)
        # let every rejected segment see the chosen response too (its keys become prompt + chosen + rejected)
        keys, bounds = batch.key_index.tolist(), batch.cu_seqlens_k.tolist()
        leaky, leaky_bounds = [], [0]
        for s in range(len(bounds) - 1):
            seg = keys[bounds[s]:bounds[s + 1]]
            if s % 3 == 2:  # prompt + chosen's own keys + rejected's own keys
                prompt = keys[bounds[s - 2]:bounds[s - 1]]
                seg = prompt + keys[bounds[s - 1]:bounds[s]][len(prompt):] + seg[len(prompt):]
            leaky += seg
            leaky_bounds.append(len(leaky))
        batch.key_index = torch.tensor(leaky)
        batch.cu_seqlens_k = torch.tensor(leaky_bounds, dtype=torch.int32)
        batch.max_seqlen_k = max(b - a for a, b in zip(leaky_bounds, leaky_bounds[1:]))
        wrong = linear_logprobs(modeling.response_hidden(model, batch), weight, batch.targets, bias)
    n_chosen = sum(len(e.chosen_ids) for e in EDGE)
    assert torch.equal(right[:n_chosen], wrong[:n_chosen])
    assert (right[n_chosen:] - wrong[n_chosen:]).abs().max() > 1e-3


def _unshared_rows(batch) -> torch.Tensor:
    """Rows of a shared-prompt row that make up the unshared row (each response's keys: its full sequence)."""
    keys, bounds = batch.key_index, batch.cu_seqlens_k.tolist()
    sequences = [keys[bounds[3 * i + part]:bounds[3 * i + part + 1]] for part in (1, 2) for i in range(batch.n_pairs)]
    return torch.cat(sequences)


@pytest.mark.parametrize("data", ["edge", "random"])
@pytest.mark.parametrize("window", [None, 5, 2])
@pytest.mark.parametrize("responses", ["one call", "a call each"])
def test_cpu_attention_equals_unshared_in_float64(data, window, responses, monkeypatch):
    """The CPU attention on a shared-prompt row is the unshared layout's, to float64 rounding: every output
    and the gradient of every query, key and value (grouped-query heads, windows shorter than the prompts),
    with a pair's responses in one sdpa call or in one each. In float64 any key a query wrongly sees or
    misses shows as an error of ~1e-3, rounding as ~1e-15."""
    monkeypatch.setattr(attention, "MAX_DROPPED_SCORES", 10 ** 9 if responses == "one call" else -1)
    examples = EDGE if data == "edge" else random_examples(6, seed=3, vocab=VOCAB, max_part=14)
    shared, plain = pack_pairs(examples, share_prompt=True), pack_pairs(examples)
    rows = _unshared_rows(shared)
    torch.manual_seed(0)
    L, H, Hkv, D = shared.num_tokens, 4, 2, 16
    q, k, v = (torch.randn(1, heads, L, D, dtype=torch.float64, requires_grad=True) for heads in (H, Hkv, Hkv))
    grad_out = torch.randn(1, rows.numel(), H, D, dtype=torch.float64)
    module = torch.nn.Module().train()
    kwargs = dict(scaling=D ** -0.5, sliding_window=window)
    got = attention.varlen_attention_forward(module, q, k, v, None, **kwargs, **shared.attention_kwargs())[0][:, rows]
    got_grads = torch.autograd.grad((got * grad_out).sum(), (q, k, v))
    want = attention.varlen_attention_forward(module, *(t[:, :, rows] for t in (q, k, v)), None, **kwargs,
                                              **plain.attention_kwargs())[0]
    want_grads = torch.autograd.grad((want * grad_out).sum(), (q, k, v))
    assert_close(got, want, atol=1e-12, rtol=1e-12, name="attention output")
    for name, g, w in zip("qkv", got_grads, want_grads):
        assert_close(g, w, atol=1e-12, rtol=1e-12, name=f"grad {name}")


def test_cpu_attention_refuses_keys_outside_their_block():
    """A response whose keys reach into another pair's rows is refused (the CPU path computes each pair
    on its own rows), not silently mis-attended."""
    batch = pack_pairs(EDGE, share_prompt=True)
    batch.key_index = batch.key_index.clone()
    batch.key_index[batch.cu_seqlens_k[4]] = 0  # pair 1's chosen response: a key in pair 0's prompt
    q = torch.randn(1, 2, batch.num_tokens, 8)
    with pytest.raises(ValueError, match="rpo_key_index: segment 4 .* before the block it belongs to"):
        attention.varlen_attention_forward(torch.nn.Module(), q, q, q, None, **batch.attention_kwargs())


def test_reference_cache_values_do_not_depend_on_the_layout():
    model = _tiny("mistral").eval()
    examples = EDGE + random_examples(5, seed=4, vocab=VOCAB)
    shared = compute_reference_logps(model, examples, token_budget=60, impl="torch", share_prompt=True)
    plain = compute_reference_logps(model, examples, token_budget=60, impl="torch", share_prompt=False)
    assert_close(shared, plain, atol=2e-5, rtol=1e-5, name="cached reference log-probs")


@pytest.mark.parametrize("model_type, options, reason", [
    ("bloom", {}, "BloomForCausalLM runs its own attention"),
    ("falcon", {}, "FalconForCausalLM runs its own attention"),
    ("stablelm", {}, "StableLmForCausalLM runs its own attention"),
    ("lfm2", dict(layer_types=["conv", "full_attention"], num_hidden_layers=2), r"\['conv'\] layers"),
    ("minimax", dict(layer_types=["linear_attention", "full_attention"], num_hidden_layers=2), r"\['linear_attention'\] layers"),
])
def test_models_that_packing_would_get_wrong_are_refused_at_load(model_type, options, reason, tmp_path):
    """Before the model is built (Falcon's own attention lookup would fail with a KeyError on the packed
    attention's name): a ValueError naming the model and why a packed row would be read as one sequence."""
    from transformers import AutoConfig

    AutoConfig.for_model(model_type, **options).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"model: expected .*{model_type}.*{reason}"):
        modeling.load_causal_lm(str(tmp_path))
    for ok in ("llama", "qwen2", "gemma3_text"):
        modeling.check_packable(AutoConfig.for_model(ok))
    modeling.check_packable(AutoConfig.for_model("lfm2", layer_types=["full_attention"] * 2, num_hidden_layers=2))


def test_unsupported_models_are_named():
    model = _tiny("llama")
    assert modeling.shared_prompt_unsupported(model) is None
    model.set_attn_implementation("sdpa")  # would let the rejected response see the chosen one
    assert "'sdpa'" in modeling.shared_prompt_unsupported(model)
    with pytest.raises(ValueError, match="batch: a shared-prompt batch needs packed attention"):
        modeling.response_hidden(model, pack_pairs(HAND, share_prompt=True))
    model.set_attn_implementation(attention.register())
    model.config.layer_types = ["full_attention", "linear_attention"]
    assert "linear_attention" in modeling.shared_prompt_unsupported(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels: needs a GPU")
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_cuda_backends_align_causality_bottom_right(backend, monkeypatch):
    """On a GPU: each varlen kernel on a shared-prompt row (key segments longer than query segments, and a
    sliding window) equals the CPU sdpa path, whose bottom-right alignment the tests above check."""
    if backend == "flash_attn" and not attention.flash_attn_available():
        pytest.skip("flash-attn is not installed")
    if backend == "torch_varlen" and not attention.torch_varlen_available():
        pytest.skip("this torch has no torch.nn.attention.varlen")
    batch = pack_pairs(EDGE, share_prompt=True)
    torch.manual_seed(0)
    L, H, Hkv, D = batch.num_tokens, 4, 2, 64
    q, k, v = torch.randn(1, H, L, D), torch.randn(1, Hkv, L, D), torch.randn(1, Hkv, L, D)
    module = torch.nn.Module().eval()
    for window in (None, 5):
        kwargs = dict(scaling=D ** -0.5, sliding_window=window, **batch.attention_kwargs())
        want = attention.varlen_attention_forward(module, q, k, v, None, **kwargs)[0]
        monkeypatch.setattr(attention, "select_backend", lambda device: backend)
        cuda = {k_: (t.cuda() if isinstance(t, torch.Tensor) else t) for k_, t in kwargs.items()}
        got = attention.varlen_attention_forward(module, *(t.cuda().bfloat16() for t in (q, k, v)), None, **cuda)[0]
        monkeypatch.undo()
        assert_close(got.float().cpu(), want, atol=2e-2, rtol=2e-2, name=f"{backend} window={window}")
        assert not math.isnan(got.float().sum().item())


def test_trainer_falls_back_with_a_notice():
    from rpo_fast.config import TrainConfig
    from rpo_fast.trainer import resolve_share_prompt

    model, lines = _tiny("llama"), []
    config = TrainConfig()
    assert resolve_share_prompt(config, model, lines.append) is config and lines == []
    model.set_attn_implementation("sdpa")
    fallback = resolve_share_prompt(config, model, lines.append)
    assert fallback.share_prompt is False and config.share_prompt is True
    assert len(lines) == 1 and lines[0].startswith("notice: share_prompt is off: attention is 'sdpa'")


def test_memory_plan_knows_the_layout():
    """Shared prompts: the row (every per-token activation) loses one prompt per pair, the key/value rows
    attention keeps gain one, the head's rows stay; without prompt tokens nothing changes."""
    from rpo_fast.memory_plan import plan_memory

    options = dict(max_length=1024, micro_batch_pairs=4, prompt_tokens=512, mode="lora")
    plain, shared = (plan_memory("mistral-7b", share_prompt=s, **options) for s in (False, True))
    assert (plain.tokens, shared.tokens) == (8192, 8192 - 4 * 512)
    assert plain.response_tokens == shared.response_tokens == 8192 - 8 * 512
    assert shared.peak_bytes < plain.peak_bytes
    assert plan_memory("mistral-7b", share_prompt=True, **{**options, "prompt_tokens": 0}).peak_bytes == \
        plan_memory("mistral-7b", **{**options, "prompt_tokens": 0}).peak_bytes
    with pytest.raises(ValueError, match="share_prompt: needs attention='flash'"):
        plan_memory("mistral-7b", share_prompt=True, attention="sdpa", **options)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_mixin_packed_path_shares_the_prompt(kind):
    """rpo_fast.integrations.hf_trainer on a padded batch: shared-prompt packing gives the unshared packed
    path's log-probs and gradients; a model on another attention packs unshared, with a warning."""
    from rpo_fast.integrations.hf_trainer import sequence_logps
    from rpo_fast.integrations.padded import pairs_from_padded
    from rpo_fast.packing import pad_pairs

    model = _tiny(kind).train()
    inputs = pad_pairs(EDGE, pad_id=0)
    assert [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in pairs_from_padded(
        inputs["input_ids"], inputs["attention_mask"], inputs["labels"])] == \
        [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in EDGE]
    results = []
    for share in (True, False):
        model.zero_grad()
        logps, counts = sequence_logps(model, inputs, packed=True, share_prompt=share, impl="torch")
        (logps * torch.arange(1, 9)).sum().backward()
        results.append((logps.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert_close(results[0][0], results[1][0], atol=2e-5, rtol=1e-5, name="sequence log-probs")
    assert torch.equal(results[0][1], results[1][1])
    for name, grad in results[1][2].items():
        assert_close(results[0][2][name], grad, atol=1e-6, rtol=1e-4, name=f"grad {name}")

    other = dict(inputs, input_ids=inputs["input_ids"].clone())
    other["input_ids"][len(EDGE), 0] += 1  # pair 0's rejected row has another prompt: no shared layout
    assert pairs_from_padded(other["input_ids"], other["attention_mask"], other["labels"]) is None
    model.set_attn_implementation("sdpa")
    with pytest.warns(UserWarning, match="share_prompt: packing unshared: attention is 'sdpa'"):
        logps, _ = sequence_logps(model, inputs, packed=True, share_prompt=True, impl="torch")
    assert_close(logps.detach(), results[1][0], atol=2e-5, rtol=1e-5, name="sdpa fallback log-probs")
    with warnings.catch_warnings():  # the same model again (a PEFT reference, the next step): no repeat
        warnings.simplefilter("error")
        sequence_logps(model, inputs, packed=True, share_prompt=True, impl="torch")


@pytest.mark.parametrize("edit", ["hole", "other_label"])
def test_hf_mixin_labels_that_are_not_the_response_tokens_pack_unshared(edit):
    """A response label that is -100 (a hole) or differs from its token: pairs_from_padded finds no shared layout
    (the shared layout scores the tokens from the first label on), and the mixin's share_prompt log-probs are the
    labels' own: each row's plain forward (eager attention, float64 log-softmax) summed over its labels."""
    from rpo_fast.integrations.hf_trainer import sequence_logps
    from rpo_fast.integrations.padded import pairs_from_padded
    from rpo_fast.packing import pad_pairs

    model = _tiny("llama").eval()
    inputs = pad_pairs(EDGE, pad_id=0)
    labels = inputs["labels"].clone()
    if edit == "hole":
        labels[0, 21] = -100  # pair 0's chosen response is tokens 20..22: its middle token unlabelled
    else:
        labels[len(EDGE) + 1, 5] = (labels[len(EDGE) + 1, 5] + 1) % VOCAB  # pair 1's rejected: another label
    inputs = dict(inputs, labels=labels)
    assert pairs_from_padded(inputs["input_ids"], inputs["attention_mask"], labels) is None

    with torch.no_grad():
        logps, counts = sequence_logps(model, inputs, packed=True, share_prompt=True, impl="torch")
        eager = copy.deepcopy(model)
        eager.set_attn_implementation("eager")
        expected = []
        for j in range(2 * len(EDGE)):
            real = inputs["attention_mask"][j].bool()
            ids, lab = inputs["input_ids"][j][real], labels[j][real][1:]
            logits = eager(input_ids=ids[None]).logits[0, :-1].double()
            scored = lab != -100
            expected.append(logits.log_softmax(-1)[scored].gather(1, lab[scored, None]).sum())
    assert counts.tolist() == [float((labels[j] != -100).sum()) for j in range(2 * len(EDGE))]
    assert_close(logps, torch.stack(expected).float(), atol=2e-5, rtol=1e-5, name="sequence log-probs")
