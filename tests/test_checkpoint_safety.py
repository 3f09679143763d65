"""Loading a checkpoint never runs code a file names: a planted pickle (an object whose unpickling creates a
marker file) in a state file, the DCP metadata or a DCP value is refused with a message naming the file, and
the marker never appears; what rpo-fast writes (numpy RNG states included) still loads."""
import io
import pickle

import pytest
import torch

from rpo_fast import checkpoint, cli
from rpo_fast.config import load_config
from rpo_fast.trainer import train
from tiny_lm import build_tiny_model_dir, tiny_overrides


class CreatesFile:
    """Unpickling this calls open(path, "w"): the file appears iff the loader ran code from the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def recommit(directory):
    """Rewrites the COMPLETE manifest after a file was replaced, as anyone sharing a checkpoint can."""
    (directory / checkpoint.MARKER).unlink()
    tmp = directory.parent / f".tmp-{directory.name}"
    directory.rename(tmp)
    return checkpoint.commit(tmp, int(directory.name.split("-")[1]))


def test_load_torch_reads_rng_state_and_refuses_code(tmp_path):
    state = checkpoint.rng_state()
    checkpoint.save_torch(state, tmp_path / "rng.pt")
    loaded = checkpoint.load_torch(tmp_path / "rng.pt")
    assert loaded["python"] == state["python"] and torch.equal(loaded["torch"], state["torch"])
    assert all((a == b).all() if hasattr(a, "all") else a == b for a, b in zip(loaded["numpy"], state["numpy"]))

    marker = tmp_path / "ran"
    torch.save({"python": CreatesFile(marker)}, tmp_path / "evil.pt")
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=r"evil\.pt holds Python objects other than"):
        checkpoint.load_torch(tmp_path / "evil.pt")
    assert not marker.exists()
    pickle.loads(pickle.dumps(CreatesFile(marker)))  # the planted object does run code when unpickled
    assert marker.exists()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("planted", ["rng-rank0.pt", "optimizer.pt", "scheduler.pt"])
def test_resume_refuses_a_planted_pickle(tiny_model_dir, tmp_path, capsys, planted):
    overrides = tiny_overrides(tiny_model_dir, tmp_path, max_steps=2, save_every=1, eval_file="none")
    train(load_config(None, overrides))
    latest = checkpoint.latest_checkpoint(overrides["output_dir"])
    marker = tmp_path / "ran"
    torch.save({"state": CreatesFile(marker)}, latest / planted)
    assert checkpoint.latest_checkpoint(overrides["output_dir"]) != latest  # the manifest catches a changed file...
    latest = recommit(latest)
    assert checkpoint.latest_checkpoint(overrides["output_dir"]) == latest  # ...unless it is rewritten too

    args = [f"--{k}={v}" for k, v in {**overrides, "resume": True, "max_steps": 3}.items()]
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert f"{latest / planted} holds Python objects other than tensors and plain data" in err
    assert "refusing it" in err and "Traceback" not in err
    assert not marker.exists()


def sharded_checkpoint(tmp_path):
    """A sharded state of a small model and its AdamW (written in one process: DCP needs no process group)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 5)).sum().backward()
    optimizer.step()
    checkpoint.save_sharded(model, optimizer, tmp_path / "sharded")
    return model, optimizer


def fresh():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=0.5)


def test_sharded_state_round_trips(tmp_path):
    model, optimizer = sharded_checkpoint(tmp_path)
    other, other_optimizer = fresh()
    checkpoint.load_sharded(other, other_optimizer, tmp_path / "sharded")
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert other_optimizer.param_groups[0]["lr"] == 1e-2
    for p, q in zip(model.parameters(), other.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], other_optimizer.state[q][key]), key


def test_sharded_metadata_with_code_is_refused(tmp_path):
    sharded_checkpoint(tmp_path)
    marker = tmp_path / "ran"
    with open(tmp_path / "sharded" / ".metadata", "wb") as f:
        pickle.dump(CreatesFile(marker), f)
    with pytest.raises(checkpoint.UnsafeCheckpointError,
                       match=r"\.metadata names io\.open, which is not DCP metadata, so loading it could run code"):
        checkpoint.load_sharded(*fresh(), tmp_path / "sharded")
    assert not marker.exists()


def test_sharded_value_with_code_is_refused(tmp_path):
    """A non-tensor value of the sharded state (here the learning rate) that would run code."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = sharded_checkpoint(tmp_path)
    marker = tmp_path / "ran"
    model_state, optimizer_state = get_state_dict(model, optimizer)
    optimizer_state["param_groups"][0]["lr"] = CreatesFile(marker)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp_path / "evil")
    assert not marker.exists()
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=r"'optimizer\.param_groups\.0\.lr' holds Python"):
        checkpoint.load_sharded(*fresh(), tmp_path / "evil")
    assert not marker.exists()
    value = io.BytesIO()
    torch.save(CreatesFile(marker), value)
    value.seek(0)
    torch.load(value, weights_only=False)  # what DCP's own planner would have done
    assert marker.exists()
