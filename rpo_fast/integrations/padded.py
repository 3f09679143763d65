"""Padded preference batches (OpenRLHF, TRL, HF collators) -> rpo_fast's packed form.

A padded batch holds 2B rows, chosen 0..B-1 then rejected B..2B-1, each row one sequence (prompt +
response) with left or right padding marked by `attention_mask`. Packing drops the padding, lays the 2B
sequences end to end in one row with `position_ids` restarting at 0 per sequence (what FlashAttention
varlen, and transformers' eager/sdpa with `attention_mask=None`, read as sequence boundaries), and lists
the positions whose next token is a response token: only those reach the LM head.

    packed = pack_padded_pairs(input_ids, attention_mask, labels)
    hidden = backbone(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
    out = rpo_fast.fused_linear_rpo_loss(hidden.last_hidden_state[0, packed.response_index], lm_head.weight,
                                         packed.targets, packed.response_cu_seqlens, ...)

gives the same loss and gradients as the padded computation (`tests/test_padded.py`). The formula is
whatever `fused_linear_rpo_loss` is asked for; OpenRLHF's `nll_loss_coef` is `sft_norm="seq_mean"`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class PackedPairs(NamedTuple):
    """A packed preference batch. N_resp = number of scored response tokens."""

    input_ids: torch.Tensor  # [1, total] int64, the attended tokens of the 2B rows, row after row
    position_ids: torch.Tensor  # [1, total] int64, 0..len_j-1 for each sequence j
    cu_seqlens: torch.Tensor  # [2B+1] int32, sequence boundaries in the packed row
    max_seqlen: int  # longest sequence
    response_index: torch.Tensor  # [N_resp] int64, packed positions whose next token is scored
    targets: torch.Tensor  # [N_resp] int64, those next tokens
    response_cu_seqlens: torch.Tensor  # [2B+1] int32, per-sequence boundaries in response_index / targets


def pairs_from_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      ignore_index: int = -100) -> list | None:
    """The B `PreferenceExample`s of a padded [2B, L] batch (chosen rows first; labels HF-style, as in
    `pack_padded_pairs`), for `rpo_fast.packing.pack_pairs(..., share_prompt=True)`; None when some pair does
    not split as one prompt shared by both rows followed by labelled responses (labels on every token from the
    first labelled one to the row's end, equal to the tokens, after at least one unlabelled token)."""
    from ..data import PreferenceExample

    n_pairs = input_ids.shape[0] // 2
    parts = []
    for j in range(2 * n_pairs):
        attended = attention_mask[j].bool()
        tokens, lab = input_ids[j][attended].tolist(), labels[j][attended].tolist()
        first = next((t for t, x in enumerate(lab) if x != ignore_index), None)
        if first is None or first == 0 or lab[first:] != tokens[first:]:
            return None
        parts.append((tokens[:first], tokens[first:]))
    if any(parts[i][0] != parts[n_pairs + i][0] for i in range(n_pairs)):
        return None
    return [PreferenceExample(parts[i][0], parts[i][1], parts[n_pairs + i][1], i) for i in range(n_pairs)]


def check_no_label_under_padding(labels: torch.Tensor, attention_mask: torch.Tensor, ignore_index: int = -100) -> None:
    """Raises ValueError for a scored label at a padded position (attention_mask == 0) of a [2B, L] batch: it
    has no token to score, and with right padding the last real token would predict it."""
    stray = (labels != ignore_index) & ~attention_mask.bool()
    if bool(stray.any()):
        j, t = (int(i) for i in stray.nonzero()[0])
        raise ValueError(f"labels: expected {ignore_index} at padded positions (attention_mask == 0), got "
                         f"{int(labels[j, t])} at [{j}, {t}]")


def _shape(t) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" if isinstance(t, torch.Tensor) else type(t).__name__


def pack_padded_pairs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    loss_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> PackedPairs:
    """Packs a padded [2B, L] preference batch (chosen rows first) into one row of 2B sequences.

    Args:
        input_ids: [2B, L] int64.
        attention_mask: [2B, L] 0/1 (or bool); each row's ones are its sequence, left or right padded.
        labels: [2B, L] int64 aligned with input_ids, HF-style: `labels[j, t]` is the token to predict at
            position t (from position t-1), `ignore_index` where nothing is scored (prompt, padding).
        loss_mask: instead of labels, [2B, L] 0/1 marking the response tokens of input_ids (TRL's
            `completion_mask`; OpenRLHF's loss mask before its shift). Give exactly one of the two.
        ignore_index: the label value that is not scored.

    Returns:
        PackedPairs. The first token of a sequence has no position to predict it from, so it is never scored.

    Raises:
        ValueError: on shapes that differ or are not [2B, L] with an even 2B >= 2, on both or neither of
            labels / loss_mask, or on a scored label at a padded position.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected a [2B, L] tensor, got {_shape(input_ids)}")
    n_seqs, _ = input_ids.shape
    if n_seqs < 2 or n_seqs % 2:
        raise ValueError(f"input_ids: expected an even number (>= 2) of rows, 2B chosen-then-rejected, got {n_seqs}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} like input_ids, "
                         f"got {_shape(attention_mask)}")
    if (labels is None) == (loss_mask is None):
        raise ValueError("labels / loss_mask: expected exactly one of them, got "
                         f"{'both' if labels is not None else 'neither'}")
    attended = attention_mask.bool()
    if loss_mask is not None:
        if not isinstance(loss_mask, torch.Tensor) or loss_mask.shape != input_ids.shape:
            raise ValueError(f"loss_mask: expected shape {tuple(input_ids.shape)} like input_ids, "
                             f"got {_shape(loss_mask)}")
        labels = input_ids.masked_fill(~loss_mask.bool(), ignore_index)
    elif not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
        raise ValueError(f"labels: expected shape {tuple(input_ids.shape)} like input_ids, got {_shape(labels)}")
    check_no_label_under_padding(labels, attended, ignore_index)
    scored = labels != ignore_index

    device = input_ids.device
    position_in_seq = attended.long().cumsum(1) - 1  # position within its sequence, for attended tokens
    seqlens = attended.sum(1)
    cu_seqlens = torch.zeros(n_seqs + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = seqlens.cumsum(0)
    # Packed index of every attended token (row-major order = sequence after sequence).
    packed_index = attended.flatten().long().cumsum(0).view_as(input_ids) - 1
    scored = scored & (position_in_seq > 0)  # a sequence's first token has nothing before it to predict it
    response_counts = scored.sum(1)
    response_cu_seqlens = torch.zeros(n_seqs + 1, dtype=torch.int32, device=device)
    response_cu_seqlens[1:] = response_counts.cumsum(0)
    return PackedPairs(
        input_ids=input_ids[attended].unsqueeze(0),
        position_ids=position_in_seq[attended].unsqueeze(0),
        cu_seqlens=cu_seqlens,
        max_seqlen=int(seqlens.max()),
        response_index=packed_index[scored] - 1,  # the hidden state one position earlier predicts the label
        targets=labels[scored].long(),
        response_cu_seqlens=response_cu_seqlens,
    )
