"""Checkpoints: atomic writes, last-K pruning, latest-valid lookup, and failures that keep the last good one."""

import errno
import json

import pytest
import torch
from accelerate import Accelerator

from hf_pcme.training.checkpointing import (
    STATE_FILE,
    CheckpointManager,
    find_latest_checkpoint,
    is_valid_checkpoint,
    list_checkpoints,
    read_checkpoint_state,
    write_directory_atomically,
)


@pytest.fixture()
def setup():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def _train_step(model, optimizer):
    loss = model(torch.ones(4, 3)).pow(2).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_keeps_the_last_k_and_finds_the_latest(tmp_path, setup):
    accelerator, model, optimizer = setup
    manager = CheckpointManager(tmp_path / "checkpoints", accelerator, keep_last=2)
    for step in (10, 20, 30):
        _train_step(model, optimizer)
        manager.save(step, {"global_step": step})
    names = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["checkpoint-00000020", "checkpoint-00000030"]
    latest = find_latest_checkpoint(tmp_path / "checkpoints")
    assert latest.name == "checkpoint-00000030"
    assert read_checkpoint_state(latest) == {"global_step": 30}
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_load_restores_weights_and_optimizer_state(tmp_path, setup):
    accelerator, model, optimizer = setup
    manager = CheckpointManager(tmp_path, accelerator, keep_last=1)
    _train_step(model, optimizer)
    saved_weight = model.weight.detach().clone()
    saved_moment = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    path = manager.save(1, {"global_step": 1})
    _train_step(model, optimizer)
    _train_step(model, optimizer)
    assert not torch.equal(model.weight, saved_weight)
    assert manager.load(path) == {"global_step": 1}
    assert torch.equal(model.weight.detach(), saved_weight)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved_moment)


def test_partial_and_damaged_checkpoints_are_ignored(tmp_path, setup):
    accelerator, model, optimizer = setup
    directory = tmp_path / "checkpoints"
    manager = CheckpointManager(directory, accelerator, keep_last=3)
    good = manager.save(5, {"global_step": 5})
    # A run killed mid-write leaves a temporary folder; one without its state file is never renamed,
    # but a hand-copied or truncated folder may exist: all must be skipped.
    (directory / ".tmp-checkpoint-00000009").mkdir()
    (directory / ".tmp-checkpoint-00000009" / "model.safetensors").write_bytes(b"partial")
    (directory / "checkpoint-00000007").mkdir()
    (directory / "checkpoint-00000007" / "model.safetensors").write_bytes(b"no state file")
    truncated = manager.save(8, {"global_step": 8})
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:10])
    assert is_valid_checkpoint(good)
    assert not is_valid_checkpoint(directory / "checkpoint-00000007")
    assert not is_valid_checkpoint(truncated)
    assert find_latest_checkpoint(directory) == good
    # The next save cleans up the leftover temporary folder and supersedes the damaged ones.
    manager.save(9, {"global_step": 9})
    assert find_latest_checkpoint(directory).name == "checkpoint-00000009"
    assert not (directory / ".tmp-checkpoint-00000009").exists()
    assert not (directory / "checkpoint-00000007").exists()


def test_disk_full_during_save_keeps_the_last_good_checkpoint(tmp_path, setup, monkeypatch):
    accelerator, model, optimizer = setup
    directory = tmp_path / "checkpoints"
    manager = CheckpointManager(directory, accelerator, keep_last=1)
    good = manager.save(1, {"global_step": 1})
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def save_state_then_fail(output_dir):
        with open(f"{output_dir}/model.safetensors", "wb") as handle:
            handle.write(b"half of the weights")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accelerator, "save_state", save_state_then_fail)
    _train_step(model, optimizer)
    with pytest.raises(OSError, match="No space left"):
        manager.save(2, {"global_step": 2})
    assert [p.name for p in directory.iterdir()] == [good.name]  # no partial folder, nothing pruned
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert find_latest_checkpoint(directory) == good


def test_state_file_records_every_file_size(tmp_path, setup):
    accelerator, _, _ = setup
    path = CheckpointManager(tmp_path, accelerator).save(3, {"global_step": 3, "phase": 1})
    manifest = json.loads((path / STATE_FILE).read_text())
    on_disk = {p.name: p.stat().st_size for p in path.iterdir() if p.name != STATE_FILE}
    assert manifest["files"] == on_disk and manifest["step"] == 3
    assert "model.safetensors" in on_disk and "optimizer.bin" in on_disk


def test_write_directory_atomically_replaces_only_on_success(tmp_path):
    target = tmp_path / "best"

    def write(content):
        def _write(folder):
            (folder / "weights.txt").write_text(content)
        return _write

    write_directory_atomically(target, write("v1"))
    assert (target / "weights.txt").read_text() == "v1"

    def fail(folder):
        (folder / "weights.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_directory_atomically(target, fail)
    assert (target / "weights.txt").read_text() == "v1"
    write_directory_atomically(target, write("v2"))
    assert (target / "weights.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_keep_last_must_be_positive(tmp_path, setup):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, setup[0], keep_last=0)
