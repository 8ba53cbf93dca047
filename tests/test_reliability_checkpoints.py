"""Issue 6, item 4: a corrupt latest checkpoint is detected and the run resumes from the previous
good one (or fails clearly); nothing but tensors and plain data is ever unpickled."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch

from alexnet_ray.checkpoint import (
    CHECKSUM_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    _sha256,
    checkpoint_dirs,
    load_checkpoint,
    load_newest_good_checkpoint,
    save_checkpoint,
)


def small_state(epoch: int) -> dict:
    return {"model": {"fc8.weight": torch.full((2, 3), float(epoch))}, "optimizer": {"momentum_buffer": {}},
            "epoch": epoch, "config": {"run": {"seed": 0}}}


@pytest.fixture
def run_dir(tmp_path):
    for epoch in (1, 2, 3):
        save_checkpoint(tmp_path / f"checkpoint_epoch_{epoch:04d}", small_state(epoch))
    (tmp_path / "metrics").mkdir()  # not a checkpoint
    return tmp_path


def truncate(checkpoint: Path) -> None:
    weights = checkpoint / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def flip_one_byte(checkpoint: Path) -> None:
    weights = checkpoint / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))


def test_checkpoint_dirs_newest_first(run_dir):
    save_checkpoint(run_dir / "checkpoint_epoch_0003_retry1795982182", small_state(3))
    names = [Path(p).name for p in checkpoint_dirs(str(run_dir))]
    assert names == ["checkpoint_epoch_0003_retry1795982182", "checkpoint_epoch_0003", "checkpoint_epoch_0002",
                     "checkpoint_epoch_0001"]
    assert checkpoint_dirs(str(run_dir / "missing")) == []


@pytest.mark.parametrize("damage", [truncate, flip_one_byte], ids=["truncated", "one-byte"])
def test_corrupt_latest_is_detected_and_the_previous_good_one_loads(run_dir, damage, caplog):
    damage(run_dir / "checkpoint_epoch_0003")
    with pytest.raises(CheckpointError, match="corrupt: sha256"):
        load_checkpoint(run_dir / "checkpoint_epoch_0003")
    with caplog.at_level(logging.WARNING, logger="alexnet_ray.checkpoint"):
        state, loaded = load_newest_good_checkpoint(checkpoint_dirs(str(run_dir)))
    assert Path(loaded).name == "checkpoint_epoch_0002" and state["epoch"] == 2
    assert torch.equal(state["model"]["fc8.weight"], torch.full((2, 3), 2.0))
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "resuming from the older checkpoint" in warning and "checkpoint_epoch_0003" in warning


def test_missing_checksum_or_weights_is_refused(run_dir):
    (run_dir / "checkpoint_epoch_0003" / CHECKSUM_FILE).unlink()  # killed between the two writes
    with pytest.raises(CheckpointError, match="has no checkpoint.sha256"):
        load_checkpoint(run_dir / "checkpoint_epoch_0003")
    (run_dir / "checkpoint_epoch_0002" / WEIGHTS_FILE).unlink()
    state, loaded = load_newest_good_checkpoint(checkpoint_dirs(str(run_dir)))
    assert state["epoch"] == 1


def test_no_good_checkpoint_fails_clearly(run_dir):
    for epoch in (1, 2, 3):
        truncate(run_dir / f"checkpoint_epoch_{epoch:04d}")
    with pytest.raises(CheckpointError) as error:
        load_newest_good_checkpoint(checkpoint_dirs(str(run_dir)))
    message = str(error.value)
    assert message.startswith("no good checkpoint to resume from (3 tried)")
    for epoch in (1, 2, 3):
        assert f"checkpoint_epoch_{epoch:04d}" in message


class RunsShellCommand:
    """A pickle that would run a shell command when loaded by an unrestricted unpickler."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "checkpoint_epoch_0001"
    checkpoint.mkdir()
    payload = {"format": "alexnet-ray/1", **small_state(1), "extra": RunsShellCommand(marker)}
    weights = checkpoint / WEIGHTS_FILE
    if writer == "torch.save":
        torch.save(payload, weights)
    else:
        weights.write_bytes(pickle.dumps(payload))
    # a valid checksum, so the file reaches the unpickler: weights_only must be what refuses it
    (checkpoint / CHECKSUM_FILE).write_text(f"{_sha256(weights)}  {WEIGHTS_FILE}\n")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="no good checkpoint"):
        load_newest_good_checkpoint([str(checkpoint)])
    assert not marker.exists(), "the pickle's payload ran"
    # the same bytes under an unrestricted unpickler do run it: the test can fail
    if writer == "torch.save":
        torch.load(weights, weights_only=False)
    else:
        pickle.loads(weights.read_bytes())
    assert marker.exists()


@pytest.mark.ray
def test_run_resumes_from_the_previous_checkpoint_when_the_latest_is_corrupt(prepared_demo, tmp_path, tiny_run):
    """A finished 2-epoch run whose epoch-2 checkpoint is then truncated, started again: it warns,
    re-trains epoch 2 from the epoch-1 checkpoint, and ends with the uninterrupted run's weights."""
    from alexnet_ray.train.trainer import Trainer
    from conftest import start_ray, tiny_config

    start_ray()
    run = tmp_path / "runs" / "corrupt-latest"
    shutil.copytree(tiny_run.path, run)  # the finished run, with Ray's checkpoint snapshot
    truncate(run / "checkpoint_epoch_0002")
    result = Trainer(tiny_config(prepared_demo, tmp_path / "runs", "run.name=corrupt-latest")).fit()
    assert result.metrics["epoch"] == 2  # epoch 2 was trained again
    assert Path(result.checkpoint.path).name.startswith("checkpoint_epoch_0002_retry")  # no name reuse
    final = load_checkpoint(result.checkpoint.path)["model"]
    reference = load_checkpoint(tiny_run.checkpoint.path)["model"]
    assert max(float((final[k] - reference[k]).abs().max()) for k in final) <= 1e-6


@pytest.mark.ray
@pytest.mark.slow
def test_retrying_forever_ends_when_no_checkpoint_is_usable(prepared_demo, tmp_path, capsys):
    """Issue 14: run.max_failures=-1 (retry forever) and every checkpoint of the run corrupt: the
    first worker group fails to resume and the run ends with that reason instead of restarting."""
    from conftest import start_ray, run_job

    start_ray()
    run = tmp_path / "runs" / "all-corrupt"
    for epoch in (1, 2):
        save_checkpoint(run / f"checkpoint_epoch_{epoch:04d}", small_state(epoch))
        truncate(run / f"checkpoint_epoch_{epoch:04d}")
    started = time.time()
    code, out, err = run_job(capsys, "train", "--preset", "tiny", "--data", str(prepared_demo), "--storage",
                             str(tmp_path / "runs"), "--name", "all-corrupt", "--set", "run.max_failures=-1")
    print(f"\nrefused after {time.time() - started:.1f}s")
    assert code == 1, (out, err)
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: training failed: RunCannotRecoverError: worker "), line
    assert "no good checkpoint to resume from (2 tried)" in line and "checkpoint_epoch_0002" in line, line
    assert not list(run.glob("checkpoint_epoch_*_retry*"))  # no worker got as far as writing one
