"""The per-worker training loop: one Ray Train worker owns one tower of one replica.

`train_worker(loop_config)` is a plain, importable function; `Trainer.fit()` hands it to Ray Train's
TorchTrainer, and tests can run it under a small local Ray cluster.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import logging
import os
import posixpath
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

import ray
import ray.data
import ray.train
import ray.train.torch

from alexnet_ray.checkpoint import (CheckpointError, NoGoodCheckpointError, checkpoint_dirs, load_checkpoint,
                                   load_newest_good_checkpoint, save_checkpoint)
from alexnet_ray.data.manifest import load_manifest
from alexnet_ray.data.pipeline import EvalLoader, TrainLoader
from alexnet_ray.model import AlexNet, Tower, merge_state_dicts, split_state_dict
from alexnet_ray.model.compiled import compile_stages
from alexnet_ray.parallel import Topology, TowerParallel, init_parallel_groups
from alexnet_ray.parallel.mappings import all_reduce_sum, broadcast_from_tower0, gather_tower_state_dicts
from alexnet_ray.preprocess import as_tensor, to_model_input
from alexnet_ray.train import fault_injection
from alexnet_ray.train.batch_feed import EarlyStart, training_batches
from alexnet_ray.train.config import Config
from alexnet_ray.train.metrics import EpochMeter, Progress, error_rates, time_shares
from alexnet_ray.train.precision import LossScaler, device_capability, resolve_precision
from alexnet_ray.train.schedule import make_lr_schedule


@dataclasses.dataclass
class WorkerState:
    config: Config
    groups: Any
    device: torch.device
    model: TowerParallel
    optimizer: torch.optim.SGD
    schedule: Any
    start_epoch: int


def model_kwargs(config: Config) -> dict:
    return dataclasses.asdict(config.model)


def _set_determinism(config: Config, cpus: float) -> None:
    torch.set_num_threads(max(1, int(cpus)))
    if config.run.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _initial_weights(config: Config) -> dict:
    """The reference model's initial weights, identical on every rank (same seed)."""
    torch.manual_seed(config.run.seed)
    return AlexNet(**model_kwargs(config)).state_dict()


def _momentum_by_name(tower: torch.nn.Module, optimizer: torch.optim.SGD) -> dict:
    buffers = {}
    for name, param in tower.named_parameters():
        buf = optimizer.state.get(param, {}).get("momentum_buffer")
        if buf is not None:
            buffers[name] = buf.detach()
    return buffers


def _load_momentum(tower: torch.nn.Module, optimizer: torch.optim.SGD, buffers: dict) -> None:
    for name, param in tower.named_parameters():
        if name in buffers:
            optimizer.state[param]["momentum_buffer"] = buffers[name].to(param.device, param.dtype).clone()


def _load_resume_state(config: Config) -> dict | None:
    """The newest good checkpoint of this run, else an explicit `run.resume_from` checkpoint (which
    may come from another layout), else None.

    This run's checkpoints: Ray's latest (after a worker failure, or a re-run of the same name) and
    every checkpoint_epoch_* in the run directory, newest first. The run directory may hold a newer
    one than Ray's latest (uploaded, but its report died with the worker before the controller took
    it) or Ray's latest may be corrupt: the first that passes its checksum wins.
    """
    ckpt = ray.train.get_checkpoint()
    storage = ray.train.get_context().get_storage()
    fs = storage.storage_filesystem
    candidates = checkpoint_dirs(storage.experiment_fs_path, fs)
    if ckpt is not None and ckpt.path not in candidates:
        candidates.insert(0, ckpt.path)
    if candidates:
        return load_newest_good_checkpoint(candidates, fs)[0]
    if config.run.resume_from:
        try:
            return load_checkpoint(config.run.resume_from)
        except CheckpointError as error:  # checked on the driver; broken since: a retry cannot help
            raise NoGoodCheckpointError(f"run.resume_from: {error}") from None
    return None


CHECKPOINT_TMP_PREFIX = "alexnet-ckpt-"  # + writer's pid: a checkpoint being written before its upload


def _remove_stale_checkpoint_dirs() -> None:
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


def _checkpoint_dir_name(epoch: int) -> str:
    """checkpoint_epoch_NNNN, or with a _retry suffix when the name exists already (a corrupt or
    never-registered one from before a restart): Ray's retention would otherwise delete the old
    entry's directory, which would then be the new checkpoint."""
    name = f"checkpoint_epoch_{epoch:04d}"
    storage = ray.train.get_context().get_storage()
    taken = {posixpath.basename(p) for p in checkpoint_dirs(storage.experiment_fs_path, storage.storage_filesystem)}
    return name if name not in taken else f"{name}_retry{int(time.time())}"


def setup_worker(loop_config: dict) -> WorkerState:
    config = Config.from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    topology = Topology(config.parallel.towers, config.parallel.replicas)
    if ctx.get_world_size() != topology.world_size:
        raise ValueError(f"world size {ctx.get_world_size()} != towers x replicas = {topology.world_size}")
    _set_determinism(config, config.parallel.cpus_per_worker)
    groups = init_parallel_groups(topology, timeout=config.parallel.exchange_timeout_s)
    device = ray.train.torch.get_device()

    state = _load_resume_state(config)
    full = state["model"] if state is not None else _initial_weights(config)
    tower = Tower(groups.tower, topology.towers, **model_kwargs(config))
    tower.load_state_dict(split_state_dict(full, topology.towers)[groups.tower])
    tower.to(device)
    if device.type == "cuda":
        tower.to(memory_format=torch.channels_last)
    if config.run.compile:
        compile_stages(tower)
    model = TowerParallel(tower, groups, microbatches=config.parallel.microbatches,
                          exchange_timeout=config.parallel.exchange_timeout_s)
    opt = config.optimizer
    optimizer = torch.optim.SGD(
        tower.parameters(), lr=loop_config["base_lr"], momentum=opt.momentum, weight_decay=opt.weight_decay
    )
    schedule = make_lr_schedule(config.schedule, loop_config["base_lr"], config.run.epochs)
    start_epoch = 0
    if state is not None:
        momentum = state["optimizer"].get("momentum_buffer") or {}
        if momentum:
            _load_momentum(tower, optimizer, split_state_dict(momentum, topology.towers)[groups.tower])
        if state.get("scheduler"):
            schedule.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
    return WorkerState(config, groups, device, model, optimizer, schedule, start_epoch)


def _eval_batches(source: Iterator[dict] | None, groups, device, timeout: float | None = None,
                  epoch: int = 0) -> Iterator[list[torch.Tensor]]:
    """[images, labels] of each evaluation batch on every tower of the replica: tower 0 reads it,
    its partner receives it over the pair group (shapes travel too: ten-crop batches and the last
    batch differ), waiting at most `timeout` seconds. An empty broadcast marks the end. Training
    batches: batch_feed.training_batches."""
    for index in itertools.count():
        fault_injection.point("eval", epoch, index)
        tensors = []
        if groups.tower == 0:
            batch = next(source, None)
            if batch is not None:
                tensors = [as_tensor(batch["images"]).to(device), as_tensor(batch["labels"]).to(device)]
        received = broadcast_from_tower0(tensors, groups, label=f"epoch {epoch + 1} evaluation batch {index}",
                                         timeout=timeout)
        if not received:
            return
        yield received


def _quiet_ray_logs() -> None:
    """Per-epoch loaders start small Ray Data executions, and every report logs a line per rank:
    together they would drown the progress lines."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # Ray Train V2 logs every report of every rank at INFO through a logger named by its file path.
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def resident_memory_mb() -> float | None:
    """This process's resident set size in MiB (Linux /proc; None elsewhere), reported every epoch."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _placement(groups) -> dict:
    """Where this worker runs, reported every epoch so placement can be checked from the metrics."""
    return {"node_id": ray.get_runtime_context().get_node_id(), "world_rank": ray.train.get_context().get_world_rank(),
            "replica": groups.replica, "tower": groups.tower}


def train_worker(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    _quiet_ray_logs()
    w = setup_worker(loop_config)
    config, groups, device = w.config, w.groups, w.device
    manifest = load_manifest(config.data.path)
    mean, std = manifest.mean, manifest.std
    rank = ray.train.get_context().get_world_rank()
    batch_size = config.data.batch_size
    train_loader = TrainLoader(
        config.data.path, batch_size=batch_size, replicas=config.parallel.replicas,
        image_size=config.model.image_size, seed=config.run.seed, pca_lighting=config.data.pca_lighting,
        prefetch_batches=config.data.prefetch_batches,
    )
    progress = Progress(config.run.epochs, train_loader.batches_per_epoch, config.run.progress_interval_s, rank == 0)
    precision = resolve_precision(config.run.precision, device.type, device_capability(device))
    autocast = precision.autocast(device.type)
    scaler = LossScaler(precision.scale_loss, groups)

    sizes = train_loader.batch_sizes(groups.replica)
    # Each step's global batch is the replicas' batches in replica order (the last ones may differ).
    plan = [train_loader.batch_sizes(r) for r in range(config.parallel.replicas)]
    row_offsets = [sum(p[step] for p in plan[:groups.replica]) for step in range(len(sizes))]
    global_rows = [sum(p[step] for p in plan) for step in range(len(sizes))]
    early = None  # tower 0: the next epoch's loader, started before this epoch's evaluation
    for epoch in range(w.start_epoch, config.run.epochs):
        lr = w.schedule.lr(epoch)
        for group in w.optimizer.param_groups:
            group["lr"] = lr
        w.model.train()
        w.model.reset_stats()
        meter = EpochMeter()
        source = None
        if groups.tower == 0:
            source = iter(early) if early is not None else train_loader.iter_epoch(epoch, groups.replica)
        batches = training_batches(source, sizes, config.model.image_size, groups, device,
                                   timeout=config.parallel.exchange_timeout_s, label=f"epoch {epoch + 1} training batch")
        step = 0
        while True:
            fault_injection.point("step", epoch, step)
            t0 = time.perf_counter()
            item = next(batches, None)
            t1 = time.perf_counter()
            meter.data_s += t1 - t0
            if item is None:
                break
            images, labels, lighting = item
            x = to_model_input(images, lighting, mean, std, device, channels_last=device.type == "cuda")
            fault_injection.point("exchange", epoch, step)
            w.model.step = epoch * train_loader.batches_per_epoch + step  # named in exchange errors
            with autocast:
                loss, logits = w.model.forward_backward(
                    x, labels, row_offset=row_offsets[step], global_rows=global_rows[step],
                    dropout_step=(config.run.seed, epoch, step), loss_scale=scaler.loss_scale)
            w.model.sync_gradients()
            scaler.step(w.optimizer)  # fp16: unscale, skip the step on any rank's overflow
            w.optimizer.zero_grad(set_to_none=True)
            meter.compute_s += time.perf_counter() - t1
            if config.run.compile and rank == 0 and epoch == w.start_epoch and step == 0:
                print(f"run.compile: first step {time.perf_counter() - t1:.1f} s, compiling the tower's stages", flush=True)
            meter.add_batch(float(loss), logits.float(), labels)
            fault_injection.step_done(epoch, step)
            step += 1
            progress.update(epoch, step, meter.loss_sum / max(1, meter.images), meter.images * config.parallel.replicas,
                            time.perf_counter() - meter.started)
        stats = w.model.stats
        meter.exchange_s, meter.grad_sync_s = stats["exchange_s"], stats["grad_sync_s"]
        elapsed = time.perf_counter() - meter.started
        if groups.tower == 0 and epoch + 1 < config.run.epochs:
            early = EarlyStart(train_loader.iter_epoch(epoch + 1, groups.replica))
        fault_injection.point("metrics", epoch)
        train = error_rates(all_reduce_sum(meter.totals().to(device), groups.dp_group, f"epoch {epoch + 1} training metrics",
                                           config.parallel.exchange_timeout_s).cpu())

        final = epoch == config.run.epochs - 1
        ten_crop = final and config.data.ten_crop_final_eval
        val = evaluate(w.model, config.data.path, config, groups, device, mean, std, ten_crop=ten_crop, epoch=epoch)
        w.schedule.observe(val["top1_error"])

        metrics = {
            "epoch": epoch + 1,
            "train_loss": train["loss"],
            "train_top1_error": train["top1_error"],
            "train_top5_error": train["top5_error"],
            "val_loss": val["loss"],
            "val_top1_error": val["top1_error"],
            "val_top5_error": val["top5_error"],
            "val_images": val["images"],
            "val_ten_crop": ten_crop,
            "images_per_s": train["images"] / elapsed if elapsed > 0 else 0.0,
            "lr": lr,
            "epoch_s": elapsed,
            "rss_mb": resident_memory_mb(),
            **time_shares(meter),
            **_placement(groups),
        }
        if rank == 0:
            sys.stdout.write(
                f"epoch {epoch + 1}/{config.run.epochs}: train loss {metrics['train_loss']:.4f}, "
                f"val top-1/top-5 error {metrics['val_top1_error']:.3f}/{metrics['val_top5_error']:.3f}"
                f"{' (10 crops)' if ten_crop else ''}, {metrics['images_per_s']:,.0f} img/s, lr {lr:.5g}\n"
            )
            sys.stdout.flush()
        _report(w, epoch, metrics, manifest, rank)


def evaluate(model: TowerParallel, data_dir: str, config: Config, groups, device, mean, std, *, ten_crop: bool,
             epoch: int = 0) -> dict:
    """Top-1/top-5 error on the validation split; every image counted exactly once across replicas."""
    model.eval()
    loader = EvalLoader(data_dir, batch_size=config.data.eval_batch_size or config.data.batch_size,
                        replicas=config.parallel.replicas, image_size=config.model.image_size, ten_crop=ten_crop,
                        prefetch_batches=config.data.prefetch_batches)
    meter = EpochMeter()
    timeout = config.parallel.exchange_timeout_s
    source = loader.iter(groups.replica) if groups.tower == 0 else None
    with torch.no_grad():
        for images, labels in _eval_batches(source, groups, device, timeout, epoch):
            if ten_crop:
                n, crops = images.shape[:2]
                x = to_model_input(images.flatten(0, 1), None, mean, std, device)
                probs = F.softmax(model(x).float(), dim=-1).view(n, crops, -1).mean(dim=1)
                loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels)
                logits = probs
            else:
                logits = model(to_model_input(images, None, mean, std, device)).float()
                loss = F.cross_entropy(logits, labels)
            meter.add_batch(float(loss), logits, labels)
    fault_injection.point("metrics", epoch, 1)
    totals = all_reduce_sum(meter.totals().to(device), groups.dp_group, f"epoch {epoch + 1} evaluation metrics", timeout)
    return error_rates(totals.cpu())


def _to_cpu(state: dict) -> dict:
    return {k: v.cpu() for k, v in state.items()}


def _report(w: WorkerState, epoch: int, metrics: dict, manifest, rank: int) -> None:
    """Every worker reports (Ray's barrier); replica 0's tower 0 assembles and writes the checkpoint."""
    tower = w.model.tower
    if w.groups.replica != 0:  # replicas hold identical weights; replica 0's pair assembles them
        ray.train.report(metrics, checkpoint=None)
        return
    # Gathered where they live: NCCL moves only CUDA tensors. Merged copies go to the CPU.
    timeout = w.config.parallel.exchange_timeout_s
    fault_injection.point("gather", epoch)
    weights = gather_tower_state_dicts({k: v.detach() for k, v in tower.state_dict().items()}, w.groups,
                                       f"epoch {epoch + 1} checkpoint weights", timeout)
    momentum = gather_tower_state_dicts(_momentum_by_name(tower, w.optimizer), w.groups,
                                        f"epoch {epoch + 1} checkpoint momentum", timeout)
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    state = {
        "model": _to_cpu(merge_state_dicts(weights)),
        "optimizer": {"momentum_buffer": _to_cpu(merge_state_dicts(momentum)) if momentum[0] else {},
                      "lr": metrics["lr"]},
        "epoch": epoch + 1,
        "scheduler": w.schedule.state_dict(),
        "data_state": {"seed": w.config.run.seed, "epoch": epoch + 1},
        "config": w.config.to_dict(),
        "metrics": metrics,
        "classes": list(manifest.classes),
        "preprocessing": {"stored_size": manifest.size, "image_size": w.config.model.image_size,
                          "mean": list(manifest.mean), "std": list(manifest.std)},
    }
    _remove_stale_checkpoint_dirs()
    with tempfile.TemporaryDirectory(prefix=f"{CHECKPOINT_TMP_PREFIX}{os.getpid()}-") as tmp:
        save_checkpoint(tmp, state)
        fault_injection.point("checkpoint", epoch)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=_checkpoint_dir_name(epoch + 1))
