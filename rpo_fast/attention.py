"""Packed (varlen) causal attention for transformers models, registered as one `AttentionInterface` entry.

A packed batch is one row of several sequences, `[1, L]`, with `position_ids` restarting at 0 for each
sequence and int32 `cu_seqlens` `[S+1]` marking their boundaries. Attention must stay inside each
sequence. `varlen_attention_forward` is registered under `ATTN_IMPLEMENTATION` ("rpo_varlen") and picks:

- `flash_attn_varlen_func` (flash-attn) on CUDA when installed;
- `torch.nn.attention.varlen.varlen_attn` (PyTorch's own flash kernel) on CUDA otherwise;
- `scaled_dot_product_attention` everywhere else (CPU; fp32 on CUDA outside autocast; a sliding window
  that masks keys where this torch's varlen kernel has no window): once per
  sequence, causal; for a shared-prompt pair the prompt causal, then both responses with one mask when
  that drops at most `MAX_DROPPED_SCORES` scores, else one masked call per response (`_sdpa_per_block`).
  Exact: the same math as unpacked sdpa, with no [L, L] mask.

The CUDA varlen kernels take fp16/bf16 only, all three of q, k, v in one dtype. Under autocast with fp32
weights (mixed_precision="bf16") q and k leave the rotary embedding in fp32 while v is bf16: they are cast
to the autocast dtype (`kernel_dtype`), as transformers' own flash-attention integration does. A sliding
window at least as long as every key segment masks nothing and is dropped (Mistral's 4096 on rows of
shorter sequences), so it never costs a kernel choice.

transformers builds no attention mask for a registered name it does not know (masking_utils returns
None), so the boundaries come from the `cu_seq_lens_q` / `max_length_q` keyword arguments (the
FlashAttention kwargs a model forward passes through to attention), or else from `position_ids`.
Decoding with a KV cache is not packed: switch the model to "sdpa" for generation (`generation_attention`).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "rpo_varlen"
HALF_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    """Whether flash-attn imports. Installed is not enough: a wheel built for another torch fails to load its
    CUDA extension ("undefined symbol"), and torch's own varlen kernel must then be used instead."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def torch_varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_varlen_params() -> frozenset[str]:
    """The parameter names of torch's varlen_attn, which vary by version (scale, window_size, enable_gqa)."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def torch_varlen_takes_window() -> bool:
    """Whether torch's varlen_attn has a sliding window (`window_size`; older builds: causal only)."""
    return "window_size" in _torch_varlen_params()


def select_backend(device: torch.device) -> str:
    """"flash_attn" | "torch_varlen" | "sdpa": the kernel `varlen_attention_forward` uses on `device`."""
    if device.type == "cuda":
        if flash_attn_available():
            return "flash_attn"
        if torch_varlen_available():
            return "torch_varlen"
    return "sdpa"


def kernel_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.dtype | None:
    """The dtype the CUDA varlen kernels (fp16/bf16 only) run q, k, v in: autocast's when it is on for their
    device, else theirs when all three share one half-precision dtype; None otherwise (fp32: sdpa instead)."""
    device_type = query.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return dtype if dtype in HALF_DTYPES else None
    same = query.dtype == key.dtype == value.dtype
    return query.dtype if same and query.dtype in HALF_DTYPES else None


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids [1, L] restarting at 0 per sequence -> cu_seqlens [S+1] int32 (0 ... L).

    Raises:
        ValueError: unless every position is 0 (a sequence starts) or the one before plus 1. A shared-prompt
            row's responses continue from their prompt's length instead: a model whose layers drop the row's
            segments (cu_seq_lens_q, rpo_key_index) on their way to attention gets here with such a row, and
            would read it as one sequence.
    """
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().reshape(-1)
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("position_ids: expected a packed row whose positions restart at 0 for each sequence "
                         f"(first position 0), got {flat[:8].tolist()}...")
    follows = (flat[1:] == flat[:-1] + 1) | (flat[1:] == 0)
    if not bool(follows.all()):
        at = int((~follows).nonzero()[0]) + 1
        raise ValueError(f"position_ids: expected each position to be 0 (a sequence starts) or the previous one plus "
                         f"1, got {flat[at - 1].item()} then {flat[at].item()} at {at}: a shared-prompt row whose "
                         "segments (cu_seq_lens_q, rpo_key_index) did not reach the attention; this model's layers "
                         "do not pass them on, so train it with share_prompt: false")
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, end]).to(torch.int32)


def _causal_mask(n_q: int, n_k: int, sliding_window: int | None, device) -> torch.Tensor:
    """[n_q, n_k] bool: query i sees key j, causal aligned bottom-right (query i sits at key position
    i + n_k - n_q) and, with a window, fewer than `sliding_window` positions back."""
    distance = torch.arange(n_q, device=device)[:, None] + (n_k - n_q) - torch.arange(n_k, device=device)[None, :]
    mask = distance >= 0
    if sliding_window is not None:
        mask &= distance < sliding_window
    return mask


class HostSegments(NamedTuple):
    """A packed row's segments as host lists: `bounds` (cu_seq_lens_q), and for a shared-prompt row `key_bounds`
    (cu_seq_lens_k) and `first_keys`, the row of each segment's first key (else None). The sdpa path plans its
    calls with them; `PackedBatch` reads them while its tensors are on the host and passes them as the
    `rpo_segments` kwarg, or else each layer's attention would read its device tensors back (a sync per layer)."""

    bounds: list[int]
    key_bounds: list[int] | None = None
    first_keys: list[int] | None = None


def host_segments(cu_seq_lens_q: torch.Tensor, key_index: torch.Tensor | None = None,
                  cu_seq_lens_k: torch.Tensor | None = None) -> HostSegments:
    """`HostSegments` of a row's segment tensors (read back: a sync for tensors on a GPU)."""
    if key_index is None:
        return HostSegments(cu_seq_lens_q.tolist())
    key_bounds = cu_seq_lens_k.tolist()
    return HostSegments(cu_seq_lens_q.tolist(), key_bounds, key_index[key_bounds[:-1]].tolist())


def _blocks(bounds: list[int], first_keys: list[int] | None) -> list[list[int]]:
    """The query segments grouped into blocks of rows that attend only among themselves: [[segment, ...], ...].

    Without `first_keys` (each segment's first key row) each segment is a block. With them, a segment whose
    keys start at its own first row (a prompt: keys ascending, as `pack_pairs` lays them out) opens a block,
    and the segments after it whose keys start inside the block (its responses) join it.

    Raises:
        ValueError: for a segment with a key before the block it belongs to.
    """
    if first_keys is None:
        return [[s] for s in range(len(bounds) - 1)]
    blocks: list[list[int]] = []
    for s, first in enumerate(first_keys):
        if first >= bounds[s]:
            blocks.append([s])
        elif blocks and first >= bounds[blocks[-1][0]]:
            blocks[-1].append(s)
        else:
            raise ValueError(f"rpo_key_index: segment {s} (rows {bounds[s]}..{bounds[s + 1] - 1}) has a key at row "
                             f"{first}, before the block it belongs to; expected a row laid out by pack_pairs")
    return blocks


# A block's responses share one sdpa call when that call scores at most this many query-key pairs that its
# mask then drops (each response against the others): about what one more call and its key gather cost
# (forward and backward) on CPU. Short responses (the demo's ~11 tokens: 242 dropped) take one call; long
# ones (UltraFeedback's ~300 and ~250: 150k) take one call each, or the dropped scores would cost 1.5x.
MAX_DROPPED_SCORES = 1024


def _sdpa_per_block(query, key, value, host: HostSegments, *, scale, dropout, sliding_window, enable_gqa,
                    key_index: torch.Tensor | None = None):
    """query [1, H, L, D], key/value [1, Hkv, L, D] -> [1, H, L, D]: causal attention inside each segment
    [bounds[i], bounds[i+1]) of `host`, or with `key_index` from segment i's queries to the keys at
    key_index[key_bounds[i]:key_bounds[i+1]], causal aligned bottom-right.

    The row is split into blocks that attend only among themselves (`_blocks`: a sequence, or a prompt
    with its responses); `split` gives views whose backward is one cat (slicing the row would write a
    full-size zero gradient per block). A block's first segment (a sequence, a prompt) is one causal call
    on its own rows, no mask. Its other segments (the responses) attend to their keys in `key_index`
    through a [queries, keys] boolean mask: all in one call against the whole block when that drops few
    scores (`MAX_DROPPED_SCORES`), else one call each on its keys gathered from the block. A window
    shorter than a segment's keys narrows the masks. Inputs stay 4-D: sdpa's fused (flash) kernels take
    only 4-D tensors, and 3-D ones fall back to the math path, which saves each call's full [H, q, k]
    attention (in fp32 for bf16 inputs)."""
    bounds, key_bounds = host.bounds, host.key_bounds
    blocks = _blocks(bounds, host.first_keys if key_index is not None else None)
    lengths = [bounds[segments[-1] + 1] - bounds[segments[0]] for segments in blocks]
    device, outputs = query.device, []

    def attend(q, k, v, mask):
        outputs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                      is_causal=mask is None, scale=scale, enable_gqa=enable_gqa))

    for q, k, v, segments in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2),
                                 blocks):
        start, first_end, n = bounds[segments[0]], bounds[segments[0] + 1], q.shape[2]
        n_first = first_end - start
        window_mask = (_causal_mask(n_first, n_first, sliding_window, device)
                       if sliding_window is not None and n_first > sliding_window else None)
        if len(segments) == 1:
            attend(q, k, v, window_mask)
            continue
        attend(q[:, :, :n_first], k[:, :, :n_first], v[:, :, :n_first], window_mask)
        responses = [(s, key_index[key_bounds[s]:key_bounds[s + 1]] - start) for s in segments[1:]]
        needed = sum((bounds[s + 1] - bounds[s]) * (key_bounds[s + 1] - key_bounds[s]) for s in segments[1:])
        if (n - n_first) * n - needed <= MAX_DROPPED_SCORES:
            mask = torch.zeros(n - n_first, n, dtype=torch.bool, device=device)
            for s, keys in responses:
                mask[bounds[s] - first_end:bounds[s + 1] - first_end, keys] = _causal_mask(
                    bounds[s + 1] - bounds[s], keys.numel(), sliding_window, device)
            attend(q[:, :, n_first:], k, v, mask)
        else:
            for s, keys in responses:
                attend(q[:, :, bounds[s] - start:bounds[s + 1] - start], k[:, :, keys], v[:, :, keys],
                       _causal_mask(bounds[s + 1] - bounds[s], keys.numel(), sliding_window, device))
    return torch.cat(outputs, dim=2)


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, sliding_window):
    """q [L, H, D], k/v [K, Hkv, D] on CUDA -> [L, H, D] via torch.nn.attention.varlen (signature varies by
    version; its causal mask is aligned bottom-right when a segment has more keys than queries)."""
    from torch.nn.attention.varlen import varlen_attn

    params = _torch_varlen_params()
    kwargs = {}
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None and scale != q.shape[-1] ** -0.5:  # older builds: the default 1/sqrt(D) only
        q = q * (scale * q.shape[-1] ** 0.5)
    if "window_size" in params:  # newer builds: causal is a (left, 0) window
        kwargs["window_size"] = (-1 if sliding_window is None else sliding_window - 1, 0)
    elif sliding_window is not None:  # the caller routes a window that matters elsewhere (sdpa)
        raise ValueError("sliding_window: this torch's varlen_attn has no window_size")
    else:
        kwargs["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    position_ids: torch.Tensor | None = None,
    rpo_key_index: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_k: int | None = None,
    rpo_segments: HostSegments | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention restricted to each packed sequence (the `AttentionInterface` signature).

    Args:
        query: [1, H, L, D]; key, value: [1, Hkv, L, D] (transformers' layout; H a multiple of Hkv).
        attention_mask: must be None (packing replaces padding masks).
        cu_seq_lens_q: [S+1] int32 boundaries, or None to derive them from `position_ids` [1, L].
        max_length_q: longest sequence (a Python int), used by the CUDA kernels.
        rpo_key_index: None, or [K] int64 row positions of each segment's keys (a shared-prompt row), with
            cu_seq_lens_k [S+1] int32 their boundaries and max_length_k the longest (module docstring).
        rpo_segments: None, or these segments as host lists (`HostSegments`), which the sdpa path would
            otherwise read back from the tensors (a sync per layer on a GPU).

    Returns:
        ([1, L, H, D] attention output, None); from the CUDA kernels in `kernel_dtype` (bf16 under bf16
        autocast), else in the inputs' dtype.

    Raises:
        ValueError: for a padding mask, a KV cache (query and key lengths differ), batch > 1 with
            packing information, attention softcapping, or attention sinks.
    """
    if attention_mask is not None:
        raise ValueError(f"attention_mask: expected None with {ATTN_IMPLEMENTATION!r} attention (sequences are "
                         f"packed, not padded), got a tensor of shape {tuple(attention_mask.shape)}")
    if softcap is not None:
        raise ValueError(f"softcap: {ATTN_IMPLEMENTATION!r} attention does not support attention-logit softcapping, "
                         f"got softcap={softcap}")
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"s_aux: {ATTN_IMPLEMENTATION!r} attention does not support attention sinks")
    batch, n_heads, length, _ = query.shape
    if key.shape[2] != length:
        raise ValueError(f"key: expected as many keys as queries ({length}) -- {ATTN_IMPLEMENTATION!r} attention is "
                         f"for packed training, not KV-cache decoding; wrap generation in generation_attention(model)")
    dropout = dropout if module.training else 0.0

    if batch > 1:  # an ordinary unpacked, unpadded batch: nothing to split
        if cu_seq_lens_q is not None:
            raise ValueError(f"cu_seq_lens_q: expected batch size 1 for a packed row, got batch {batch}")
        window = sliding_window is not None and length > sliding_window
        out = F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, is_causal=not window, scale=scaling,
            attn_mask=_causal_mask(length, length, sliding_window, query.device) if window else None,
            enable_gqa=key.shape[1] != n_heads)
        return out.transpose(1, 2).contiguous(), None

    if rpo_key_index is not None and (cu_seq_lens_q is None or cu_seq_lens_k is None):
        raise ValueError("rpo_key_index: a shared-prompt row needs cu_seq_lens_q and cu_seq_lens_k too, got None")
    if cu_seq_lens_q is None:
        cu_seq_lens_q = (cu_seqlens_from_position_ids(position_ids) if position_ids is not None
                         else torch.tensor([0, length], dtype=torch.int32, device=query.device))
        max_length_q = rpo_segments = None
    if rpo_key_index is None:  # each segment attends to itself
        cu_seq_lens_k, max_length_k = cu_seq_lens_q, max_length_q
    max_k = int(cu_seq_lens_k.diff().max()) if max_length_k is None else int(max_length_k)
    if sliding_window is not None and max_k <= sliding_window:
        sliding_window = None  # every key of every segment is inside the window: it masks nothing
    backend = select_backend(query.device)
    dtype = None if backend == "sdpa" else kernel_dtype(query, key, value)
    if dtype is None:  # the CPU, or fp32 outside autocast (the varlen kernels refuse fp32)
        backend = "sdpa"
    if backend == "torch_varlen" and sliding_window is not None and not torch_varlen_takes_window():
        backend = "sdpa"  # a window that masks keys, which this torch's varlen kernel cannot do
    if backend == "sdpa":
        key_index = None if rpo_key_index is None else rpo_key_index.to(query.device)
        if rpo_segments is None:
            rpo_segments = host_segments(cu_seq_lens_q, key_index, cu_seq_lens_k)
        out = _sdpa_per_block(query, key, value, rpo_segments, scale=scaling, dropout=dropout,
                              sliding_window=sliding_window, enable_gqa=key.shape[1] != n_heads, key_index=key_index)
        return out.transpose(1, 2).contiguous(), None

    # CUDA kernels take [total_tokens, heads, dim] (last dim contiguous) and int32 boundaries on the device.
    q, k, v = (t[0].transpose(0, 1).to(dtype, memory_format=torch.contiguous_format) for t in (query, key, value))
    if rpo_key_index is not None:  # the gathered key row: each segment's keys, prompt first
        rows = rpo_key_index.to(query.device)
        k, v = k[rows], v[rows]
    cu_q = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
    cu_k = cu_seq_lens_k.to(device=query.device, dtype=torch.int32)
    max_q = int(cu_q.diff().max()) if max_length_q is None else int(max_length_q)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        # causal=True is aligned bottom-right when a segment has more keys than queries (flash-attn >= 2.1)
        window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout,
                                     softmax_scale=scaling, causal=True, window_size=window)
    else:
        if dropout:
            raise ValueError(f"dropout: torch varlen_attn has no attention dropout, got {dropout}")
        out = _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, sliding_window=sliding_window)
    return out.unsqueeze(0), None


def register() -> str:
    """Registers `varlen_attention_forward` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)
    return ATTN_IMPLEMENTATION


@contextlib.contextmanager
def generation_attention(model):
    """Temporarily switches `model` to "sdpa" attention, for `generate()` with a KV cache and padding."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
