"""pack_padded_pairs: hand-checked packing, and the packed path gives the padded path's loss and gradients."""
import copy

import pytest
import torch

from rpo_fast import fused_linear_rpo_loss
from rpo_fast.integrations.padded import pack_padded_pairs

transformers = pytest.importorskip("transformers", reason="the model-level checks need transformers")



# B = 2 pairs: rows 0, 1 chosen, rows 2, 3 rejected; row 1 is left-padded, the others right-padded.
INPUT_IDS = torch.tensor([[5, 6, 7, 8, 0], [0, 0, 9, 10, 11], [5, 6, 12, 0, 0], [9, 13, 14, 15, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
LABELS = torch.tensor([[-100, -100, 7, 8, -100], [-100, -100, -100, 10, 11], [-100, -100, 12, -100, -100],
                       [-100, 13, 14, 15, -100]])


def test_pack_hand_example():
    p = pack_padded_pairs(INPUT_IDS, MASK, LABELS)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 5, 6, 12, 9, 13, 14, 15]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 0, 1, 2, 3]]
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_seqlens.tolist() == [0, 4, 7, 10, 14]
    assert p.max_seqlen == 4 and isinstance(p.max_seqlen, int)
    # label at packed index k is predicted from packed index k - 1
    assert p.response_index.tolist() == [1, 2, 4, 5, 8, 10, 11, 12]
    assert p.targets.tolist() == [7, 8, 10, 11, 12, 13, 14, 15]
    assert p.response_cu_seqlens.dtype == torch.int32 and p.response_cu_seqlens.tolist() == [0, 2, 4, 5, 8]
    # tuple order of the spec: (input_ids, position_ids, cu_seqlens, max_seqlen, response_index, targets, resp_cu)
    assert tuple(p)[4] is p.response_index and tuple(p)[6] is p.response_cu_seqlens


def test_loss_mask_equals_labels_and_first_token_is_never_scored():
    loss_mask = (LABELS != -100).long()
    a, b = pack_padded_pairs(INPUT_IDS, MASK, LABELS), pack_padded_pairs(INPUT_IDS, MASK, loss_mask=loss_mask)
    for x, y in zip(a, b):
        assert (x == y).all() if isinstance(x, torch.Tensor) else x == y
    # A scored first token (left-padded row 1, column 2) has no position before it: dropped.
    labels = LABELS.clone()
    labels[1, 2] = 9
    assert pack_padded_pairs(INPUT_IDS, MASK, labels).targets.tolist() == a.targets.tolist()


@pytest.mark.parametrize("bad, match", [
    (dict(input_ids=INPUT_IDS[:3], attention_mask=MASK[:3], labels=LABELS[:3]), "even number"),
    (dict(input_ids=INPUT_IDS, attention_mask=MASK[:, :4], labels=LABELS), "attention_mask: expected shape"),
    (dict(input_ids=INPUT_IDS, attention_mask=MASK), "exactly one"),
    (dict(input_ids=INPUT_IDS, attention_mask=MASK, labels=LABELS, loss_mask=MASK), "exactly one"),
    (dict(input_ids=INPUT_IDS, attention_mask=MASK, labels=LABELS.masked_fill(MASK == 0, 3)), r"padded positions"),
    (dict(input_ids=INPUT_IDS[0], attention_mask=MASK[0], labels=LABELS[0]), r"\[2B, L\]"),
])
def test_pack_rejects_malformed(bad, match):
    with pytest.raises(ValueError, match=match):
        pack_padded_pairs(**bad)


def _tiny_llama(vocab=97):
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval()


def _random_batch(n_pairs, vocab, padding_side, generator):
    rows = []
    for _ in range(2 * n_pairs):
        prompt = int(torch.randint(1, 6, (1,), generator=generator))
        response = int(torch.randint(1, 9, (1,), generator=generator))
        rows.append((torch.randint(1, vocab, (prompt + response,), generator=generator), prompt))
    width = max(len(ids) for ids, _ in rows) + 2
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask, labels = torch.zeros_like(input_ids), torch.full_like(input_ids, -100)
    for j, (ids, prompt) in enumerate(rows):
        cols = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        input_ids[j, cols], mask[j, cols] = ids, 1
        labels[j, cols] = torch.cat([torch.full((prompt,), -100), ids[prompt:]])
    return input_ids, mask, labels


def _padded_loss(model, input_ids, mask, labels, impl, **loss_kw):
    """The padded path: attention mask, full [2B, L, H] hidden states, shift, gather the scored positions."""
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    hidden = model.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state
    shifted = labels[:, 1:]
    scored = (shifted != -100) & mask[:, :-1].bool()
    cu = torch.zeros(labels.shape[0] + 1, dtype=torch.int32)
    cu[1:] = scored.sum(1).cumsum(0)
    return fused_linear_rpo_loss(hidden[:, :-1][scored], model.lm_head.weight, shifted[scored], cu, impl=impl,
                                 **loss_kw)


def _packed_loss(model, input_ids, mask, labels, impl, **loss_kw):
    p = pack_padded_pairs(input_ids, mask, labels)
    hidden = model.model(input_ids=p.input_ids, position_ids=p.position_ids, use_cache=False).last_hidden_state
    return fused_linear_rpo_loss(hidden[0, p.response_index], model.lm_head.weight, p.targets,
                                 p.response_cu_seqlens, impl=impl, **loss_kw)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("sft_norm", ["token_mean", "sum", "seq_mean"])
def test_packed_matches_padded_loss_and_grads(padding_side, sft_norm):
    vocab, n_pairs = 97, 3
    model = _tiny_llama(vocab)
    batch = _random_batch(n_pairs, vocab, padding_side, torch.Generator().manual_seed(1))
    ref_logps = -20 * torch.rand(2 * n_pairs)
    loss_kw = dict(beta=0.1, alpha=0.5, sft_norm=sft_norm, ref_logps=ref_logps)

    results = []
    for fn, impl in ((_padded_loss, "dense"), (_packed_loss, "torch")):
        m = copy.deepcopy(model)
        out = fn(m, *batch, impl, **loss_kw)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in m.named_parameters()}))
    (padded, padded_grads), (packed, packed_grads) = results
    for field in ("loss", "nll", "chosen_logps", "rejected_logps", "chosen_token_counts"):
        torch.testing.assert_close(getattr(packed, field), getattr(padded, field), rtol=1e-5, atol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
