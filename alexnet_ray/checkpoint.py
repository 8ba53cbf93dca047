"""The one portable checkpoint format.

A checkpoint is a directory holding `checkpoint.pt` and `checkpoint.sha256`. The `.pt` file is a
plain dict of tensors and plain data, readable with `torch.load(..., weights_only=True)` and no Ray:

    model        the merged reference state dict (`AlexNet(ModelConfig(**config["model"])).load_state_dict` works)
    optimizer    {"momentum_buffer": merged name-keyed dict, "lr": float}
    epoch        epochs completed; training resumes at this epoch index
    scheduler    the LR schedule's state_dict()
    loss_scaler  fp16's {"scale", "clean_steps"} (train/precision.py LossScaler; absent in older checkpoints)
    data_state   {"seed": int, "epoch": int}: the data order resumes from it
    config       Config.to_dict() of the run that wrote it
    metrics      the epoch's metrics
    classes      class names, index = label
    preprocessing  {"stored_size", "image_size", "mean", "std"}

Files are written to a temporary name and renamed, and the checksum is written last, so a crash
never leaves a checkpoint that passes verification but is incomplete. A resumed run loads the
newest checkpoint_epoch_* directory of its run directory that passes (`load_newest_good_checkpoint`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from alexnet_ray import storage

FORMAT = "alexnet-ray/1"
WEIGHTS_FILE = "checkpoint.pt"
CHECKSUM_FILE = "checkpoint.sha256"
REQUIRED_KEYS = ("format", "model", "optimizer", "epoch", "config")
# The trainer's checkpoint directory names (a _retry suffix after resuming past a corrupt one):
# sorted by name, newest last.
CHECKPOINT_DIR = re.compile(r"checkpoint_epoch_\d+(_retry\d+)?")

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or not in this project's format."""


class NoGoodCheckpointError(CheckpointError):
    """None of a run's checkpoints can be loaded: resuming cannot succeed, however often it is tried."""


def first_line(error: BaseException) -> str:
    """An exception's message up to its first line break: errors here are reported in one line, and
    torch's unpickling errors run to a paragraph of advice."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` (see the module docstring) into `directory`; returns the weights file path."""
    missing = [k for k in REQUIRED_KEYS if k != "format" and k not in state]
    if missing:
        raise CheckpointError(f"checkpoint state lacks {missing}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    _write_atomic(weights, lambda f: torch.save({"format": FORMAT, **state}, f))
    checksum = _sha256(weights)
    _write_atomic(directory / CHECKSUM_FILE, lambda f: f.write(f"{checksum}  {WEIGHTS_FILE}\n".encode()))
    return weights


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The weights file of a checkpoint given as its directory or the file itself."""
    path = Path(path)
    return path / WEIGHTS_FILE if path.is_dir() else path


def verify_checkpoint(path: str | os.PathLike) -> Path:
    """Raise CheckpointError unless the checkpoint exists and matches its checksum."""
    weights = checkpoint_file(path)
    if not weights.is_file():
        raise CheckpointError(f"no checkpoint at {path}: {weights.name} not found")
    checksum_path = weights.with_name(CHECKSUM_FILE)
    if not checksum_path.is_file():
        raise CheckpointError(f"checkpoint {weights} has no {CHECKSUM_FILE}: incomplete write?")
    expected = checksum_path.read_text().split()[0] if checksum_path.read_text().strip() else ""
    actual = _sha256(weights)
    if actual != expected:
        raise CheckpointError(f"checkpoint {weights} is corrupt: sha256 {actual[:12]}… != recorded {expected[:12]}…")
    return weights


def load_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint (a directory or its checkpoint.pt; local or a URI) as tensors and plain
    data only (weights_only=True: no code is unpickled)."""
    if storage.is_uri(path):
        return _load_remote(str(path), verify)
    weights = verify_checkpoint(path) if verify else checkpoint_file(path)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as e:  # pickle errors, refused globals, truncated zip archives
        raise CheckpointError(f"cannot read checkpoint {weights}: {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{weights} is not an alexnet-ray checkpoint (format {FORMAT!r} expected)")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {weights} lacks {missing}")
    return state


def _load_remote(uri: str, verify: bool) -> dict[str, Any]:
    """Download the checkpoint directory (only it) and load it; errors name the URI."""
    directory = storage.parent(uri) if storage.base_name(uri) == WEIGHTS_FILE else uri
    try:
        present = storage.exists(storage.join(directory, WEIGHTS_FILE))
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {uri}: {str(e).splitlines()[0]}") from None
    if not present:
        raise CheckpointError(f"no checkpoint at {uri}: {WEIGHTS_FILE} not found")
    with storage.LocalCopy(directory) as local:
        try:
            return load_checkpoint(local, verify=verify)
        except CheckpointError as e:
            raise CheckpointError(str(e).replace(str(local), directory)) from None


def checkpoint_dirs(run_dir: str, filesystem=None) -> list[str]:
    """The checkpoint_epoch_* directories of a run directory (on a pyarrow `filesystem`, default
    local), newest first; [] when there are none."""
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    infos = fs.get_file_info(pafs.FileSelector(str(run_dir), allow_not_found=True))
    names = [i.base_name for i in infos if i.type == pafs.FileType.Directory and CHECKPOINT_DIR.fullmatch(i.base_name)]
    return [posixpath.join(str(run_dir), n) for n in sorted(names, reverse=True)]


def _load_from(fs, path: str) -> dict[str, Any]:
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        return load_checkpoint(path)
    with tempfile.TemporaryDirectory(prefix="alexnet-ckpt-download-") as local:
        try:
            pafs.copy_files(path, local, source_filesystem=fs)
        except (OSError, ValueError) as e:  # pyarrow errors are OSError or ValueError subclasses
            raise CheckpointError(f"cannot download checkpoint {path}: {e}") from None
        return load_checkpoint(local)


def load_newest_good_checkpoint(candidates: list[str], filesystem=None) -> tuple[dict[str, Any], str]:
    """Load the first of `candidates` (checkpoint directories, newest first) that passes its
    checksum and reads as a checkpoint, logging a warning for every one skipped. Returns
    (state, the path loaded); raises NoGoodCheckpointError naming each candidate's problem when none is good."""
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    problems = []
    for candidate in candidates:
        try:
            state = _load_from(fs, str(candidate))
        except CheckpointError as error:
            problems.append(str(error))
            continue
        if problems:
            logger.warning("resuming from the older checkpoint %s; skipped: %s", candidate, "; ".join(problems))
        return state, str(candidate)
    raise NoGoodCheckpointError(f"no good checkpoint to resume from ({len(problems)} tried): " + "; ".join(problems))

