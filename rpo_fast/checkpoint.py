"""Atomic training checkpoints: a crash mid-write never leaves a checkpoint that looks complete.

Layout, under `<output_dir>/checkpoints/`:

    step-000040/
        model/              save_pretrained (safetensors): the full model, or the LoRA adapter; + tokenizer
                            (under FSDP gathered on rank 0: for use and inspection, not read by --resume)
        optimizer.pt        optimizer.state_dict()                       (one process or DDP)
        sharded/            torch.distributed.checkpoint: every rank's shard of the model and optimizer
                            state, `.metadata` + `__<rank>_0.distcp`      (FSDP, instead of optimizer.pt)
        scheduler.pt        scheduler.state_dict()
        rng-rank0.pt ...    python / numpy / torch (/ cuda) RNG states of every process
        trainer_state.json  step, data position (epoch, step in epoch), counters, metric history
        config.yaml         the resolved TrainConfig
        COMPLETE            written last: {"step", "files": {relative path: [bytes, sha256]}}

Writing: everything goes into a hidden `.tmp-step-000040/` directory, each file is fsynced, the
`COMPLETE` manifest is written and fsynced last, then the directory is renamed to `step-000040`
(atomic on POSIX) and its parent fsynced. Reading: `latest_checkpoint` takes the highest step whose
`COMPLETE` manifest is present and matches every file's size and hash, so a torn write, a leftover
temp dir or a truncated file is skipped in favour of the previous checkpoint.

Loading never runs code named by a file: the `.pt` files are read with `torch.load(weights_only=True)`
(tensors and plain data, plus the numpy types of an RNG state), and the sharded state's pickled DCP
metadata and non-tensor values (optimizer hyperparameters) through the same kind of allowlist. A file
that names anything else is refused with `UnsafeCheckpointError`, whose message says which file.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

MARKER = "COMPLETE"
SHARDED = "sharded"  # the torch.distributed.checkpoint directory inside a checkpoint written under FSDP
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER)


def temp_dir(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` is written before the rename (the same path on every process)."""
    return checkpoint_root(output_dir) / f".tmp-{step_dir_name(step)}"


def begin(output_dir: str | Path, step: int) -> Path:
    """Creates (empty; a leftover of a crashed write is removed) and returns the temp dir of `step`."""
    checkpoint_root(output_dir).mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(output_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, step: int) -> Path:
    """Fsyncs every file in `tmp`, writes the COMPLETE manifest last and renames `tmp` into place.

    Returns the final directory. An existing checkpoint of the same step is replaced: moved aside, the new one
    renamed into place, then the old one deleted (a crash while deleting leaves the new one in place, and the
    `.old-` leftover for `prune`).
    """
    manifest = {"step": step, "files": {}}
    for path in _files(tmp):
        _fsync_file(path)
        manifest["files"][path.relative_to(tmp).as_posix()] = [path.stat().st_size, _sha256(path)]
    for directory in sorted({p.parent for p in _files(tmp)}, key=lambda p: -len(p.parts)):
        _fsync_dir(directory)
    marker = tmp / MARKER
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    final = tmp.parent / step_dir_name(step)
    trash = None
    if final.exists():
        trash = tmp.parent / f".old-{final.name}-{os.getpid()}"
        final.rename(trash)
    tmp.rename(final)
    _fsync_dir(tmp.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def problem(directory: Path, verify_hashes: bool = True) -> str | None:
    """Why `directory` is not a complete checkpoint (its COMPLETE manifest missing, or not matching a file's size
    or, if asked, hash), in words naming the file; None when it is complete."""
    try:
        manifest = json.loads((directory / MARKER).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MARKER} manifest"
    if not files:
        return f"an empty {MARKER} manifest"
    for rel, (size, digest) in files.items():
        path = directory / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, its manifest says {size}"
        if verify_hashes and _sha256(path) != digest:
            return f"{rel} does not match its sha256 in the manifest"
    return None


def is_complete(directory: Path, verify_hashes: bool = True) -> bool:
    """Whether `directory` holds a COMPLETE manifest that matches its files (sizes, and hashes if asked)."""
    return problem(directory, verify_hashes) is None


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every `step-N` directory (complete or not), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(output_dir: str | Path, verify_hashes: bool = True) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    for _, directory in reversed(list_checkpoints(output_dir)):
        if is_complete(directory, verify_hashes):
            return directory
    return None


def prune(output_dir: str | Path, keep: int, protect: Path | None = None) -> None:
    """Deletes all but the `keep` newest complete checkpoints, incomplete ones, and stale temp dirs; never
    `protect`, the checkpoint just committed.

    Completeness is judged by sizes (hashing every checkpoint at each save would cost minutes on a large model),
    so a damaged higher-numbered checkpoint (skipped by `--resume`, which continued from an older one) counts
    as complete: without `protect`, the resumed run's new checkpoints would be the ones deleted.
    """
    root = checkpoint_root(output_dir)
    complete = [d for _, d in list_checkpoints(output_dir) if is_complete(d, verify_hashes=False)]
    doomed = complete[:-keep] if keep > 0 else complete
    doomed += [d for _, d in list_checkpoints(output_dir) if d not in complete]
    if root.is_dir():
        doomed += [p for p in root.iterdir() if p.name.startswith((".tmp-", ".old-")) and p.is_dir()]
    for directory in doomed:
        if protect is None or directory != Path(protect):
            shutil.rmtree(directory, ignore_errors=True)


# --- training state --------------------------------------------------------------------------------------


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_torch(obj, path: Path) -> None:
    torch.save(obj, path)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file names Python objects beyond tensors and plain data: loading it could run code."""


def _numpy_rng_types() -> list:
    """What a pickled `np.random.get_state()` needs besides plain data (as transformers' Trainer allows for
    its RNG file): the ndarray reconstructor, ndarray, dtype and the uint32 dtype's class."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 / 1
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_torch(path: Path):
    """A file written by `save_torch`, read with `weights_only=True`: tensors, numbers, strings, containers
    and the numpy RNG types only.

    Raises:
        UnsafeCheckpointError: when the file names anything else (nothing it names is imported or called).
    """
    try:
        with torch.serialization.safe_globals(_numpy_rng_types()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"resume: {path} holds Python objects other than tensors and plain data, so loading it could run "
            f"code; refusing it. Checkpoints written by rpo-fast never do: this file was changed or comes from "
            f"elsewhere. Delete the checkpoint directory (or resume=false) to start over. "
            f"({str(err).splitlines()[0]})") from None


def write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def load_model_weights(model: torch.nn.Module, model_dir: Path) -> None:
    """Loads weights written by `save_pretrained` into `model` in place, bit for bit.

    A peft model gets its adapter (`adapter_model.safetensors`); a full model its `model*.safetensors`
    shards, where a missing key is accepted only for a parameter tied to a loaded one (lm_head/embeddings).

    Raises:
        ValueError: when the files do not fit the model (missing or unexpected keys, naming a few).
    """
    from safetensors.torch import load_file

    from .modeling import tied_parameter_names

    adapter = model_dir / "adapter_model.safetensors"
    if hasattr(model, "get_base_model") and adapter.is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter))
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"checkpoint {model_dir}: adapter keys that do not fit the model: {unexpected[:5]}")
        return
    shards = sorted(model_dir.glob("model*.safetensors"))
    if not shards:
        raise ValueError(f"checkpoint {model_dir}: expected model*.safetensors or adapter_model.safetensors, "
                         f"found {sorted(p.name for p in model_dir.iterdir())}")
    state = {}
    for shard in shards:
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = set(missing) - set(tied_parameter_names(model))
    if missing or unexpected:
        raise ValueError(f"checkpoint {model_dir}: weights do not fit the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")


# --- sharded state (FSDP): torch.distributed.checkpoint ------------------------------------------------
# (imported on first use: torch.distributed.checkpoint takes seconds to import)


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Writes every rank's shard of the model and optimizer state to `directory` (a collective: call it on
    every rank, with the same path). Parameters and optimizer states are keyed by parameter name, so
    `load_sharded` can read them back at another world size (DCP reshards) or into an unsharded model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state},
             storage_writer=dcp.FileSystemWriter(directory, sync_files=True))


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Loads what `save_sharded` wrote into `model` and `optimizer` in place, whatever their sharding now
    (FSDP at any world size, DDP, one process). A collective when a process group is up.

    Raises:
        UnsafeCheckpointError: when the metadata or a stored value names objects beyond plain data.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    read_sharded_metadata(directory)  # refused here, on every rank alike, before any collective
    reader, planner = _data_only_dcp()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, storage_reader=reader(directory), planner=planner())
    except dcp.api.CheckpointException as err:  # DCP gathers every rank's failure into one exception
        refused = [exc for exc, _ in err.failures.values() if isinstance(exc, UnsafeCheckpointError)]
        if refused:
            raise refused[0] from None
        raise
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def read_sharded_metadata(directory: Path):
    """The DCP `Metadata` of a sharded state, unpickled with an allowlist of DCP's own metadata classes and
    torch's sizes, dtypes and layouts (`FileSystemReader` would run any pickle).

    Raises:
        UnsafeCheckpointError: for a metadata file that names anything else.
    """
    import torch.distributed.checkpoint.filesystem  # noqa: F401 - the modules the allowlist resolves
    import torch.distributed.checkpoint.metadata  # noqa: F401

    path = Path(directory) / ".metadata"
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"resume: {path} {err}, so loading it could run code; refusing it. "
                                    "Checkpoints written by rpo-fast never do: the file was changed or comes "
                                    "from elsewhere") from None


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals a DCP metadata file consists of (the `find_class` allowlist of the pickle docs'
    "Restricting Globals")."""

    ALLOWED = {  # module -> names; "*": any class of the module (DCP's metadata records)
        "torch.distributed.checkpoint.metadata": "*",
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module: str, name: str):
        allowed = self.ALLOWED.get(module, set())
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if allowed == "*" or name in allowed or is_dtype:
            value = super().find_class(module, name)
            if allowed != "*" or isinstance(value, type):
                return value
        raise UnsafeCheckpointError(f"names {module}.{name}, which is not DCP metadata")


@functools.cache
def _data_only_dcp() -> tuple[type, type]:
    """(a FileSystemReader, a DefaultLoadPlanner) that unpickle nothing but plain data: the reader reads the
    metadata with `read_sharded_metadata` (tensors it already loads with weights_only=True), the planner the
    non-tensor values (optimizer hyperparameters, parameter names) with weights_only=True."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses
    from torch.distributed.checkpoint.metadata import StorageMeta

    class DataOnlyReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_sharded_metadata(self.path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class DataOnlyLoadPlanner(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as err:
                raise UnsafeCheckpointError(
                    f"resume: the sharded state's value {read_item.dest_index.fqn!r} holds Python objects other "
                    f"than plain data, so loading it could run code; refusing it "
                    f"({str(err).splitlines()[0]})") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return DataOnlyReader, DataOnlyLoadPlanner
