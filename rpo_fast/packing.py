"""Padding-free packing of preference pairs, the padded equivalent, and token-budget batching.

Two layouts of a micro-batch of B pairs in one row: unshared (below), or shared-prompt (further down),
which encodes each prompt once. Either way the head sees 2B sequences of response rows, chosen 0..B-1
first, then rejected B..2B-1, so pair i is (i, B+i) as in `fused_linear_rpo_loss`.

Unshared: one row of 2B sequences (prompt + response each), chosen first. Attention sees the
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

Shared prompt (`share_prompt=True`): pair by pair, `[prompt][chosen][rejected]`. The row is cut into 3B
query segments; each attends causally to its own keys, which the attention function gathers from the row
through `key_index`: the prompt to itself, the chosen response to the prompt then itself, the rejected
response to the prompt then itself (never to the chosen one). Causality is aligned bottom-right (the last
query sees all its keys), and a segment's key k sits at position k, so positions, RoPE and sliding windows
are those of the unshared layout, and so are the numbers. The first token of both responses is predicted
from the prompt's last position (twice in `response_index`). The same example:

    input_ids           p p p c c r | q q d s s s
    position_ids        0 1 2 3 4 3 | 0 1 2 2 3 4
    cu_seqlens          [0, 3, 5, 6, 8, 9, 12]           (query segments: prompt, chosen, rejected per pair)
    key_index           [0 1 2, 0 1 2 3 4, 0 1 2 5, 6 7, 6 7 8, 6 7 9 10 11]
    cu_seqlens_k        [0, 3, 8, 12, 14, 17, 22]
    response_index      [2, 3, 7, 2, 7, 9, 10]           (targets: c c d r s s s, chosen first)
    response_cu_seqlens [0, 2, 3, 4, 7]
"""
from __future__ import annotations

import dataclasses
import random
from array import array
from dataclasses import dataclass
from typing import Sequence

import torch

from . import checks, host_sync
from .attention import HostSegments, host_segments
from .data import PreferenceExample

IGNORE_INDEX = -100

__all__ = ["PackedBatch", "pack_pairs", "pad_pairs", "batch_by_token_budget", "IGNORE_INDEX"]


@dataclass
class PackedBatch:
    """B preference pairs packed into one row without padding, unshared or shared-prompt (module docstring).

    Attention: S query segments `cu_seqlens`; with `key_index` None each attends causally to itself (the
    unshared layout, S = 2B), else to the gathered keys `key_index[cu_seqlens_k[s]:cu_seqlens_k[s+1]]`
    with bottom-right aligned causality (shared prompt, S = 3B).
    """

    input_ids: torch.Tensor  # [1, L] int64
    position_ids: torch.Tensor  # [1, L] int64, each sequence's positions from 0 (shared: responses go on from P)
    cu_seqlens: torch.Tensor  # [S+1] int32 boundaries of the query segments in the row, 0 .. L
    max_seqlen: int  # longest query segment
    response_index: torch.Tensor  # [N] int64 row positions whose hidden state predicts `targets`, chosen first
    targets: torch.Tensor  # [N] int64 response tokens, chosen of pairs 0..B-1, then rejected
    response_cu_seqlens: torch.Tensor  # [2B+1] int32 boundaries of each sequence's rows in response_index, 0 .. N
    n_pairs: int  # B
    example_index: torch.Tensor  # [B] int64 PreferenceExample.index of each pair
    sequence_tokens: int = 0  # tokens of the 2B full sequences (sum of num_tokens), whatever the layout
    key_index: torch.Tensor | None = None  # [K] int64 row positions of the gathered keys (shared prompt only)
    cu_seqlens_k: torch.Tensor | None = None  # [S+1] int32 boundaries in key_index, 0 .. K (shared prompt only)
    max_seqlen_k: int | None = None  # longest key segment (shared prompt only)
    host_segments: HostSegments | None = None  # the segments above as host lists (set by `to` from host tensors)

    @property
    def shares_prompt(self) -> bool:
        return self.key_index is not None

    def attention_kwargs(self) -> dict:
        """The segment description for `rpo_fast.attention.varlen_attention_forward`, as backbone kwargs."""
        shared = self.shares_prompt
        return {"cu_seq_lens_q": self.cu_seqlens, "max_length_q": self.max_seqlen,
                "cu_seq_lens_k": self.cu_seqlens_k if shared else self.cu_seqlens,
                "max_length_k": self.max_seqlen_k if shared else self.max_seqlen,
                "rpo_key_index": self.key_index, "rpo_segments": self.host_segments}

    @property
    def num_tokens(self) -> int:
        """L, the packed length (every token the backbone processes; < sequence_tokens with a shared prompt)."""
        return self.input_ids.shape[1]

    @property
    def num_response_tokens(self) -> int:
        """N, the rows that go through the LM head."""
        return self.targets.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """A copy with every tensor on `device` (dtypes unchanged). Host tensors bound for CUDA are copied from
        pinned memory without blocking the host, whatever `non_blocking` says (`host_sync.to_device`)."""
        moved = {f.name: host_sync.to_device(getattr(self, f.name), device, non_blocking=non_blocking)
                 for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        if self.host_segments is None and self.cu_seqlens.device.type == "cpu":  # free to read here, not there
            moved["host_segments"] = host_segments(self.cu_seqlens, self.key_index, self.cu_seqlens_k)
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


def _sequences(examples: Sequence[PreferenceExample]) -> tuple[list[array], list[int]]:
    """The 2B token arrays (chosen first, then rejected) and their prompt lengths."""
    seqs = [ex.prompt_ids + ex.chosen_ids for ex in examples] + [ex.prompt_ids + ex.rejected_ids for ex in examples]
    return seqs, [len(ex.prompt_ids) for ex in examples] * 2


def _ids_tensor(seqs: Sequence[array]) -> torch.Tensor:
    """The int64 tensor of the token ids of `seqs` (non-empty `array("i")`s, as `PreferenceExample` stores
    them) one after the other."""
    flat = array("i")
    for seq in seqs:
        flat += seq
    return torch.frombuffer(flat, dtype=torch.int32).to(torch.int64)


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu


def pack_pairs(examples: Sequence[PreferenceExample], *, share_prompt: bool = False) -> PackedBatch:
    """Packs B pairs into one padding-free row: 2B sequences, chosen first (pair i = sequences i, B+i), or
    with `share_prompt` `[prompt][chosen][rejected]` per pair (see the module docstring).

    Every response token is a target, predicted from the position before it (the last prompt token for
    the first one), so sequence j contributes len(response_j) head rows.

    Returns:
        PackedBatch on the CPU (move it with `.to(device)`).

    Raises:
        ValueError: for no examples, or an example with an empty prompt or response.
    """
    _check_examples(examples)
    if share_prompt:
        return _pack_shared_prompt(examples)
    seqs, prompt_lens = _sequences(examples)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    prompt_lengths = torch.tensor(prompt_lens, dtype=torch.int64)
    response_lengths = lengths - prompt_lengths
    cu_seqlens = _cumulative(lengths)
    response_cu_seqlens = _cumulative(response_lengths)
    starts = cu_seqlens[:-1].long()
    total = int(cu_seqlens[-1])

    input_ids = _ids_tensor(seqs).unsqueeze(0)
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
        sequence_tokens=total,
    )


def _pack_shared_prompt(examples: Sequence[PreferenceExample]) -> PackedBatch:
    """`pack_pairs(examples, share_prompt=True)`: pair by pair [prompt][chosen][rejected] (module docstring)."""
    tokens, positions, q_bounds, keys, k_bounds = array("i"), [], [0], [], [0]
    rows = {"chosen": [], "rejected": []}  # head rows of each response, then their targets
    targets = {"chosen": [], "rejected": []}
    for ex in examples:
        start, n_prompt = len(tokens), len(ex.prompt_ids)
        prompt = list(range(start, start + n_prompt))
        tokens += ex.prompt_ids
        positions += range(n_prompt)
        q_bounds.append(len(tokens))
        keys += prompt
        k_bounds.append(len(keys))
        for kind, response in (("chosen", ex.chosen_ids), ("rejected", ex.rejected_ids)):
            first = len(tokens)
            own = list(range(first, first + len(response)))
            tokens += response
            positions += range(n_prompt, n_prompt + len(response))
            q_bounds.append(len(tokens))
            keys += prompt + own
            k_bounds.append(len(keys))
            rows[kind].append([prompt[-1]] + own[:-1])  # token t is predicted from the position before it
            targets[kind].append(response)
    head_rows = rows["chosen"] + rows["rejected"]
    cu_seqlens = torch.tensor(q_bounds, dtype=torch.int32)
    cu_seqlens_k = torch.tensor(k_bounds, dtype=torch.int32)
    return PackedBatch(
        input_ids=_ids_tensor([tokens]).unsqueeze(0),
        position_ids=torch.tensor(positions, dtype=torch.int64).unsqueeze(0),
        cu_seqlens=cu_seqlens,
        max_seqlen=int(cu_seqlens.diff().max()),
        response_index=torch.tensor([r for seq in head_rows for r in seq], dtype=torch.int64),
        targets=_ids_tensor(targets["chosen"] + targets["rejected"]),
        response_cu_seqlens=_cumulative(torch.tensor([len(seq) for seq in head_rows], dtype=torch.int64)),
        n_pairs=len(examples),
        example_index=torch.tensor([ex.index for ex in examples], dtype=torch.int64),
        sequence_tokens=sum(ex.num_tokens for ex in examples),
        key_index=torch.tensor(keys, dtype=torch.int64),
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_k=int(cu_seqlens_k.diff().max()),
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
        tokens = _ids_tensor([seq])
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
    if not checks.is_int(token_budget) or token_budget < 1:
        raise ValueError(f"token_budget: expected an int >= 1, got {token_budget!r}")
    if max_pairs is not None and (not checks.is_int(max_pairs) or max_pairs < 1):
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
