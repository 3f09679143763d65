"""Padding-free packing of preference pairs, the padded equivalent, and token-budget batching.

A micro-batch of B pairs becomes one row of 2B sequences (prompt + response each), chosen 0..B-1 first,
then rejected B..2B-1, so pair i is (i, B+i) as in `fused_linear_rpo_loss`. Attention sees the
sequence boundaries through `cu_seqlens` (FlashAttention varlen) or restarting `position_ids`
(transformers' packed path with `attention_mask=None`). Only the positions whose next token is a
response token go through the LM head: `response_index` selects them from the backbone's hidden states
and `targets` are the tokens they predict, so

    hidden = backbone(input_ids, position_ids)[0, response_index]      # [N, H]
    fused_linear_rpo_loss(hidden, lm_head.weight, targets, response_cu_seqlens, ...)

Example: pair 0 = prompt [p p p], chosen [c c], rejected [r]; pair 1 = prompt [q q], chosen [d],
rejected [s s s]:

    input_ids           p p p c c | q q d | p p p r | q q s s s
    position_ids        0 1 2 3 4 | 0 1 2 | 0 1 2 3 | 0 1 2 3 4
    cu_seqlens          [0, 5, 8, 12, 17]
    response_index      [2, 3, 6, 10, 13, 14, 15]        (targets: c c d r s s s)
    response_cu_seqlens [0, 2, 3, 4, 7]
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from .data import PreferenceExample

IGNORE_INDEX = -100

__all__ = ["PackedBatch", "pack_pairs", "pad_pairs", "batch_by_token_budget", "IGNORE_INDEX"]


@dataclass
class PackedBatch:
    """B preference pairs packed into one row of 2B sequences without padding (see the module docstring)."""

    input_ids: torch.Tensor  # [1, L] int64: chosen sequences (prompt + response) then rejected ones
    position_ids: torch.Tensor  # [1, L] int64, restarting at 0 for each sequence
    cu_seqlens: torch.Tensor  # [2B+1] int32 boundaries of the 2B sequences in the row, 0 .. L
    max_seqlen: int  # longest of the 2B sequences
    response_index: torch.Tensor  # [N] int64 positions p whose next token p+1 (same sequence) is a response token
    targets: torch.Tensor  # [N] int64: input_ids[0, response_index + 1]
    response_cu_seqlens: torch.Tensor  # [2B+1] int32 boundaries of each sequence's rows in response_index, 0 .. N
    n_pairs: int  # B
    example_index: torch.Tensor  # [B] int64 PreferenceExample.index of each pair

    @property
    def num_tokens(self) -> int:
        """L, the packed length (every token the backbone processes)."""
        return self.input_ids.shape[1]

    @property
    def num_response_tokens(self) -> int:
        """N, the rows that go through the LM head."""
        return self.targets.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """A copy with every tensor on `device` (dtypes unchanged)."""
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                 for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)


def _check_examples(examples: Sequence[PreferenceExample]) -> None:
    if len(examples) == 0:
        raise ValueError("examples: expected at least one PreferenceExample, got an empty sequence")
    for k, ex in enumerate(examples):
        if not isinstance(ex, PreferenceExample):
            raise ValueError(f"examples[{k}]: expected a PreferenceExample, got {type(ex).__name__}")
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if len(getattr(ex, name)) == 0:
                raise ValueError(f"examples[{k}] (index {ex.index}): expected non-empty {name}, got [] (a response "
                                 f"needs a token before it to be predicted, and at least one token to score)")


def _sequences(examples: Sequence[PreferenceExample]) -> tuple[list[list[int]], list[int]]:
    """The 2B token lists (chosen first, then rejected) and their prompt lengths."""
    seqs = [ex.prompt_ids + ex.chosen_ids for ex in examples] + [ex.prompt_ids + ex.rejected_ids for ex in examples]
    return seqs, [len(ex.prompt_ids) for ex in examples] * 2


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu


def pack_pairs(examples: Sequence[PreferenceExample]) -> PackedBatch:
    """Packs B pairs into one padding-free row of 2B sequences, chosen first (pair i = sequences i, B+i).

    Every response token is a target, predicted from the position before it (the last prompt token for
    the first one), so sequence j contributes len(response_j) head rows.

    Returns:
        PackedBatch on the CPU (move it with `.to(device)`).

    Raises:
        ValueError: for no examples, or an example with an empty prompt or response.
    """
    _check_examples(examples)
    seqs, prompt_lens = _sequences(examples)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    prompt_lengths = torch.tensor(prompt_lens, dtype=torch.int64)
    response_lengths = lengths - prompt_lengths
    cu_seqlens = _cumulative(lengths)
    response_cu_seqlens = _cumulative(response_lengths)
    starts = cu_seqlens[:-1].long()
    total = int(cu_seqlens[-1])

    input_ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64).unsqueeze(0)
    position_ids = (torch.arange(total) - torch.repeat_interleave(starts, lengths)).unsqueeze(0)
    # head row r of sequence j: position start_j + P_j - 1 + (r - first row of j)
    seq_of_row = torch.repeat_interleave(torch.arange(lengths.numel()), response_lengths)
    row_in_seq = torch.arange(int(response_cu_seqlens[-1])) - response_cu_seqlens[:-1].long()[seq_of_row]
    response_index = starts[seq_of_row] + prompt_lengths[seq_of_row] - 1 + row_in_seq
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=int(lengths.max()),
        response_index=response_index,
        targets=input_ids[0, response_index + 1],
        response_cu_seqlens=response_cu_seqlens,
        n_pairs=len(examples),
        example_index=torch.tensor([ex.index for ex in examples], dtype=torch.int64),
    )


def pad_pairs(examples: Sequence[PreferenceExample], pad_id: int) -> dict[str, torch.Tensor]:
    """The padded [2B, T] equivalent of `pack_pairs` (right padding, same sequence order), for comparisons
    and for code paths that need an attention mask.

    Labels follow the Hugging Face convention: they are *not* shifted. `labels[j, t]` is the token at
    position t when it is a response token, else -100; it is predicted by the logits at position t-1,
    so a sequence's log-prob is `log_softmax(logits[:, :-1]).gather(labels[:, 1:])` over labels != -100.
    In packed terms: the labelled positions of sequence j are `response_index - cu_seqlens[j] + 1`.

    Returns:
        {"input_ids": [2B, T] int64 (pad_id after each sequence), "attention_mask": [2B, T] int64 (1 on
        tokens), "labels": [2B, T] int64, "position_ids": [2B, T] int64 (0.. on tokens, 0 on padding),
        "example_index": [B] int64}, T = the longest sequence.

    Raises:
        ValueError: like `pack_pairs`, or for a non-int `pad_id`.
    """
    _check_examples(examples)
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise ValueError(f"pad_id: expected an int token id, got {pad_id!r}")
    seqs, prompt_lens = _sequences(examples)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.int64)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.int64)
    position_ids = torch.zeros((len(seqs), width), dtype=torch.int64)
    for j, (seq, n_prompt) in enumerate(zip(seqs, prompt_lens)):
        tokens = torch.tensor(seq, dtype=torch.int64)
        input_ids[j, :len(seq)] = tokens
        attention_mask[j, :len(seq)] = 1
        labels[j, n_prompt:len(seq)] = tokens[n_prompt:]
        position_ids[j, :len(seq)] = torch.arange(len(seq))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "position_ids": position_ids,
            "example_index": torch.tensor([ex.index for ex in examples], dtype=torch.int64)}


def batch_by_token_budget(
    examples: Sequence[PreferenceExample],
    token_budget: int,
    *,
    max_pairs: int | None = None,
    shuffle: bool,
    seed: int,
    epoch: int,
) -> list[list[int]]:
    """Groups example positions into micro-batches whose packed length fits `token_budget`.

    Walks the examples in order (a permutation fixed by (seed, epoch) when `shuffle`) and starts a new
    group when the next pair's `num_tokens` (its two full sequences) would push the group past
    `token_budget`, or the group already has `max_pairs` pairs. A pair longer than the budget on its own
    gets a group of its own (it is never dropped or split; check `TokenizeStats.max_pair_tokens` against
    the budget to avoid it).

    Args:
        examples: the tokenized pairs; groups hold positions into this sequence.
        token_budget: the most tokens per packed micro-batch, >= 1.
        max_pairs: the most pairs per group, or None for no limit.
        shuffle, seed, epoch: shuffle with a generator seeded by (seed, epoch); the same three give the
            same groups on any machine and Python version.

    Returns:
        a list of groups, each a non-empty list of positions; every position appears exactly once.

    Raises:
        ValueError: for token_budget < 1 or max_pairs < 1.
    """
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
        raise ValueError(f"token_budget: expected an int >= 1, got {token_budget!r}")
    if max_pairs is not None and (isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1):
        raise ValueError(f"max_pairs: expected None or an int >= 1, got {max_pairs!r}")
    order = list(range(len(examples)))
    if shuffle:
        # A string seed hashes with SHA-512: stable across runs, machines and PYTHONHASHSEED.
        random.Random(f"rpo_fast.batch_by_token_budget:{seed}:{epoch}").shuffle(order)
    groups: list[list[int]] = []
    group: list[int] = []
    group_tokens = 0
    for position in order:
        n = examples[position].num_tokens
        full = max_pairs is not None and len(group) >= max_pairs
        if group and (group_tokens + n > token_budget or full):
            groups.append(group)
            group, group_tokens = [], 0
        group.append(position)
        group_tokens += n
    if group:
        groups.append(group)
    return groups
