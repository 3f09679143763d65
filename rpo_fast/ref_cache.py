"""Reference log-probs computed once before training and cached on disk, so no reference model stays resident.

The cache file of a (reference model, dataset, precision) is `<cache_dir>/ref-logps-<key>.pt`, where
`key` hashes the model's weights (names, dtypes, shapes, bytes), the tokenized examples (index and token
ids, so the truncation settings are in it too) and the autocast dtype the log-probs were computed under
(with `mixed_precision` the reference runs under the training run's autocast, as `reference: model` runs
it, so the cache holds the numbers that reference gives). Any change to these gives a new file; a stale
cache, or one computed in another precision, is never used. The file holds `logps` [n, 2] float32
(summed chosen, rejected log-probs) for the examples with `example_index` [n]; `ReferenceCache.lookup`
turns a packed batch's `example_index` into the [2B] `ref_logps` that `fused_linear_rpo_loss` takes.

`rpo-fast precompute-ref --config FILE.yaml` fills the cache ahead of time; with `reference: cache`
the trainer computes whatever is missing itself before the first step.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import host_sync
from .autocast import autocast_dtype
from .data import PreferenceExample
from .logprobs import linear_logprobs
from .segments import segment_sum
from .modeling import reference_head_inputs
from .packing import batch_by_token_budget, pack_pairs

FORMAT_VERSION = 1


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer of `model` (name, dtype, shape, bytes): identical weights,
    identical fingerprint, whatever file they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def data_fingerprint(examples: Sequence[PreferenceExample]) -> str:
    """SHA-256 over each example's `repr((index, prompt_ids, chosen_ids, rejected_ids))`, the ids as lists (as
    they were stored before they became arrays: the digest keys caches on disk and run folders' resume check)."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(repr((ex.index, ex.prompt_ids.tolist(), ex.chosen_ids.tolist(),
                            ex.rejected_ids.tolist())).encode())
    return digest.hexdigest()


def cache_key(model_fp: str, data_fp: str, precision: str | None = None) -> str:
    """`precision`: the autocast dtype of the computation ("bfloat16"), None without autocast (the key of a
    cache computed without mixed precision is the one it had before precision was part of the key)."""
    tail = "" if precision is None else f":autocast={precision}"
    return hashlib.sha256(f"v{FORMAT_VERSION}:{model_fp}:{data_fp}{tail}".encode()).hexdigest()[:24]


def autocast_precision(autocast: Callable[[], contextlib.AbstractContextManager], device: torch.device) -> str | None:
    """The dtype `autocast()` turns autocast on with for `device` ("bfloat16", "float16"), or None."""
    with autocast():
        dtype = autocast_dtype(device)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"ref-logps-{key}.pt"


@torch.no_grad()
def compute_reference_logps(model: torch.nn.Module, examples: Sequence[PreferenceExample], *, token_budget: int,
                            impl: str = "auto", progress: bool = False, share_prompt: bool = False,
                            autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                            ) -> torch.Tensor:
    """Summed response log-probs of every example under `model`: [len(examples), 2] float32 (chosen, rejected),
    row k for examples[k]. Runs packed micro-batches of at most `token_budget` tokens (counted unshared), in
    order, in the shared-prompt layout when `share_prompt` (the same numbers, each prompt encoded once).

    `autocast`: the training run's autocast context (`accelerator.autocast`). The reference runs as the trainer's
    `reference: model` runs it: the backbone under it, then the head on `reference_head_inputs` (autocast's
    dtype) with autocast off, as `fused_linear_rpo_loss` computes `ref_hidden`'s log-probs."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout in the reference
    out = torch.empty(len(examples), 2, dtype=torch.float32)
    groups = batch_by_token_budget(examples, token_budget, shuffle=False, seed=0, epoch=0)
    for group in tqdm(groups, desc="reference log-probs", disable=not progress, unit="batch"):
        batch = pack_pairs([examples[i] for i in group], share_prompt=share_prompt).to(device)
        with autocast():
            hidden, weight, bias = reference_head_inputs(model, batch)
        with torch.autocast(device.type, enabled=False):
            lp = linear_logprobs(hidden, weight, batch.targets, bias, impl=impl)
        sums = segment_sum(lp, batch.response_cu_seqlens.diff()).cpu()
        out[group, 0] = sums[:batch.n_pairs]
        out[group, 1] = sums[batch.n_pairs:]
    model.train(was_training)
    return out


@dataclass
class ReferenceCache:
    """Cached reference log-probs of one dataset: `logps` [n, 2] for `example_index` [n]."""

    key: str
    example_index: torch.Tensor  # [n] int64
    logps: torch.Tensor  # [n, 2] float32
    path: Path | None = None

    def lookup(self, example_index: torch.Tensor) -> torch.Tensor:
        """A batch's `example_index` [B] -> ref_logps [2B] float32 (chosen of all pairs, then rejected).

        Raises:
            KeyError: for an example the cache does not hold.
        """
        try:
            rows = torch.tensor([self._positions[int(i)] for i in example_index.tolist()], dtype=torch.int64)
        except KeyError as e:
            raise KeyError(f"example_index: example {e.args[0]} is not in the reference cache {self.path}") from None
        picked = self.logps[rows]
        return host_sync.to_device(torch.cat([picked[:, 0], picked[:, 1]]), example_index.device)

    @functools.cached_property
    def _positions(self) -> dict[int, int]:
        """{example index: its row in `logps`}, built once (a dataset's worth of entries), not per batch."""
        return {int(i): k for k, i in enumerate(self.example_index.tolist())}

    def save(self, path: Path) -> Path:
        """Writes atomically (temp file, fsync, rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"version": FORMAT_VERSION, "key": self.key, "example_index": self.example_index,
                    "logps": self.logps}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.path = path
        return path

    @classmethod
    def load(cls, path: Path, key: str) -> "ReferenceCache":
        """Raises ValueError when the file is not a cache for `key` (or is unreadable)."""
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or foreign file
            raise ValueError(f"reference cache {path}: unreadable ({type(e).__name__}: {e})") from None
        if blob.get("version") != FORMAT_VERSION or blob.get("key") != key:
            raise ValueError(f"reference cache {path}: expected key {key} (format v{FORMAT_VERSION}), got "
                             f"{blob.get('key')} (v{blob.get('version')})")
        return cls(key=key, example_index=blob["example_index"], logps=blob["logps"], path=path)


def load_or_compute(model: torch.nn.Module, examples: Sequence[PreferenceExample], cache_dir: str | Path, *,
                    token_budget: int, impl: str = "auto", model_fp: str | None = None, write: bool = True,
                    progress: bool = False, share_prompt: bool = False,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                    ) -> ReferenceCache:
    """The cache of (`model`, `examples`) under `autocast` (see `compute_reference_logps`): read from `cache_dir`
    when present and valid, else computed (and written when `write`; `share_prompt` picks the packing layout,
    which does not change the values). Pass `model_fp` to reuse one fingerprint for several datasets."""
    precision = autocast_precision(autocast, next(model.parameters()).device)
    key = cache_key(model_fp or model_fingerprint(model), data_fingerprint(examples), precision)
    path = cache_path(cache_dir, key)
    if path.is_file():
        try:
            return ReferenceCache.load(path, key)
        except ValueError:
            pass  # unreadable: recompute and overwrite
    logps = compute_reference_logps(model, examples, token_budget=token_budget, impl=impl, progress=progress,
                                    share_prompt=share_prompt, autocast=autocast)
    cache = ReferenceCache(key=key, example_index=torch.tensor([ex.index for ex in examples], dtype=torch.int64),
                           logps=logps, path=path)
    if write:
        cache.save(path)
    return cache
