"""Training's side of checkpoints: what a worker resumes from, and each epoch's checkpoint
assembled from the towers, written and reported to Ray Train. The format: alexnet_ray.checkpoint.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import time
from pathlib import Path

import torch

import ray.train

from alexnet_ray.checkpoint import (CheckpointError, NoGoodCheckpointError, checkpoint_dirs, load_checkpoint,
                                    load_newest_good_checkpoint, save_checkpoint)
from alexnet_ray.model import merge_state_dicts
from alexnet_ray.parallel.mappings import gather_tower_state_dicts
from alexnet_ray.train import fault_injection
from alexnet_ray.train.config import Config
from alexnet_ray.train.worker_state import WorkerState

CHECKPOINT_TMP_PREFIX = "alexnet-ckpt-"  # + writer's pid: a checkpoint being written before its upload


def momentum_by_name(tower: torch.nn.Module, optimizer: torch.optim.SGD) -> dict:
    buffers = {}
    for name, param in tower.named_parameters():
        buf = optimizer.state.get(param, {}).get("momentum_buffer")
        if buf is not None:
            buffers[name] = buf.detach()
    return buffers


def load_momentum(tower: torch.nn.Module, optimizer: torch.optim.SGD, buffers: dict) -> None:
    for name, param in tower.named_parameters():
        if name in buffers:
            optimizer.state[param]["momentum_buffer"] = buffers[name].to(param.device, param.dtype).clone()


def load_resume_state(config: Config) -> dict | None:
    """The newest good checkpoint of this run, else an explicit `run.resume_from` checkpoint (which
    may come from another layout), else None.

    This run's checkpoints: Ray's latest (after a worker failure, or a re-run of the same name) and
    every checkpoint_epoch_* in the run directory, newest first. The run directory may hold a newer
    one than Ray's latest (uploaded, but its report died with the worker before the controller took
    it) or Ray's latest may be corrupt: the first that passes its checksum wins. A checkpoint of
    this run comes back with "of_this_run": True.
    """
    ckpt = ray.train.get_checkpoint()
    storage = ray.train.get_context().get_storage()
    fs = storage.storage_filesystem
    candidates = checkpoint_dirs(storage.experiment_fs_path, fs)
    if ckpt is not None and ckpt.path not in candidates:
        candidates.insert(0, ckpt.path)
    if candidates:
        return {**load_newest_good_checkpoint(candidates, fs)[0], "of_this_run": True}
    if config.run.resume_from:
        try:
            return load_checkpoint(config.run.resume_from)
        except CheckpointError as error:  # checked on the driver; broken since: a retry cannot help
            raise NoGoodCheckpointError(f"run.resume_from: {error}") from None
    return None


def remove_stale_checkpoint_dirs() -> None:
    """Remove temporary checkpoint directories whose writer is gone (killed before it cleaned up)."""
    for path in Path(tempfile.gettempdir()).glob(f"{CHECKPOINT_TMP_PREFIX}*-*"):
        pid = path.name[len(CHECKPOINT_TMP_PREFIX):].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def checkpoint_dir_name(epoch: int) -> str:
    """checkpoint_epoch_NNNN, or with a _retry suffix when the name exists already (a corrupt or
    never-registered one from before a restart): Ray's retention would otherwise delete the old
    entry's directory, which would then be the new checkpoint."""
    name = f"checkpoint_epoch_{epoch:04d}"
    storage = ray.train.get_context().get_storage()
    taken = {posixpath.basename(p) for p in checkpoint_dirs(storage.experiment_fs_path, storage.storage_filesystem)}
    return name if name not in taken else f"{name}_retry{int(time.time())}"


def _to_cpu(state: dict) -> dict:
    return {k: v.cpu() for k, v in state.items()}


def checkpoint_state(w: WorkerState, weights: list[dict], momentum: list[dict], epoch: int, metrics: dict,
                     manifest) -> dict:
    """The checkpoint of `epoch` (see alexnet_ray.checkpoint) from the towers' gathered state dicts."""
    return {
        "model": _to_cpu(merge_state_dicts(weights)),
        "optimizer": {"momentum_buffer": _to_cpu(merge_state_dicts(momentum)) if momentum[0] else {},
                      "lr": metrics["lr"]},
        "epoch": epoch + 1,
        "scheduler": w.schedule.state_dict(),
        "loss_scaler": w.scaler.state_dict(),
        "data_state": {"seed": w.config.run.seed, "epoch": epoch + 1,
                       "global_batch_size": w.config.data.global_batch_size},
        "config": w.config.to_dict(),
        "metrics": metrics,
        "classes": list(manifest.classes),
        "preprocessing": {"stored_size": manifest.size, "image_size": w.config.model.image_size,
                          "mean": list(manifest.mean), "std": list(manifest.std)},
    }


def save_and_report(state: dict, epoch: int, metrics: dict) -> str:
    """Write the checkpoint to a temporary directory and hand it to Ray Train with the metrics;
    returns the checkpoint directory's name in the run directory."""
    remove_stale_checkpoint_dirs()
    name = checkpoint_dir_name(epoch + 1)
    with tempfile.TemporaryDirectory(prefix=f"{CHECKPOINT_TMP_PREFIX}{os.getpid()}-") as tmp:
        save_checkpoint(tmp, state)
        fault_injection.point("checkpoint", epoch)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    return name


def report_epoch(w: WorkerState, epoch: int, metrics: dict, manifest, rank: int) -> str | None:
    """Every worker reports (Ray's barrier); replica 0's tower 0 assembles and writes the checkpoint
    (and returns its directory's name; None elsewhere)."""
    tower = w.model.tower
    if w.groups.replica != 0:  # replicas hold identical weights; replica 0's pair assembles them
        ray.train.report(metrics, checkpoint=None)
        return None
    # Gathered where they live: NCCL moves only CUDA tensors. Merged copies go to the CPU.
    timeout = w.config.parallel.exchange_timeout_s
    fault_injection.point("gather", epoch)
    weights = gather_tower_state_dicts({k: v.detach() for k, v in tower.state_dict().items()}, w.groups,
                                       f"epoch {epoch + 1} checkpoint weights", timeout)
    momentum = gather_tower_state_dicts(momentum_by_name(tower, w.optimizer), w.groups,
                                        f"epoch {epoch + 1} checkpoint momentum", timeout)
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return None
    return save_and_report(checkpoint_state(w, weights, momentum, epoch, metrics, manifest), epoch, metrics)
