"""TensorBoard event files for a run, when the optional extra (tensorboardX) is installed.

    log_epoch(run_dir, metrics)    # once per epoch, where metrics/epoch_NNNN.json is written

writes every numeric metric as a scalar at step metrics["epoch"] under RUN_DIR/tensorboard/
(`tensorboard --logdir RUN_DIR/tensorboard`). One writer per run directory stays open for the
process's lifetime and is flushed after each epoch. Without tensorboardX it does nothing.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

TENSORBOARD_DIR = "tensorboard"
_writers: dict[str, Any] = {}
_warned: set[str] = set()


def available() -> bool:
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


def tensorboard_dir(run_dir: str) -> str:
    from alexnet_ray import storage

    return storage.join(run_dir, TENSORBOARD_DIR)


def _writer(run_dir: str):
    if run_dir not in _writers:
        from tensorboardX import SummaryWriter

        _writers[run_dir] = SummaryWriter(logdir=tensorboard_dir(run_dir), flush_secs=30)
    return _writers[run_dir]


def log_epoch(run_dir: str, metrics: dict[str, Any]) -> bool:
    """Write the epoch's numeric metrics as scalars; True if written, False without the extra.
    Never raises for TensorBoard trouble (training matters more): it warns once per run instead."""
    if not available() or "epoch" not in metrics:
        return False
    try:
        writer = _writer(run_dir)
        step = int(metrics["epoch"])
        for name, value in sorted(metrics.items()):
            if name != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                writer.add_scalar(_tag(name), float(value), global_step=step)
        writer.flush()
        return True
    except Exception as error:  # an unwritable or remote storage without its client library
        if run_dir not in _warned:
            _warned.add(run_dir)
            warnings.warn(f"TensorBoard events not written to {tensorboard_dir(run_dir)}: {error}")
        return False


def _tag(name: str) -> str:
    """Group scalars in TensorBoard: train_loss -> train/loss, val_top1_error -> val/top1_error."""
    for prefix in ("train_", "val_", "share_"):
        if name.startswith(prefix):
            return f"{prefix[:-1]}/{name[len(prefix):]}"
    return f"run/{name}"


def close(run_dir: str | None = None) -> None:
    """Close one run's writer (or all)."""
    for key in [run_dir] if run_dir is not None else list(_writers):
        writer = _writers.pop(key, None)
        if writer is not None:
            writer.close()
