"""The per-worker training loop: one Ray Train worker owns one tower of one replica.

`train_worker(loop_config)` is a plain, importable function; `Trainer.fit()` hands it to Ray Train's
TorchTrainer, and tests can run it under a small local Ray cluster. It reads like torchvision's
classification reference: set up, then per epoch `train_one_epoch`, `validate`, report.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import ray
import ray.train
import ray.train.torch

from alexnet_ray import storage, storage_retries
from alexnet_ray.data.manifest import load_manifest
from alexnet_ray.data.pipeline import EvalLoader, TrainLoader
from alexnet_ray.model import AlexNet, Tower, split_state_dict
from alexnet_ray.model.compiled import begin_step, compile_stages
from alexnet_ray.parallel import Topology, TowerParallel, init_parallel_groups
from alexnet_ray.parallel.mappings import all_reduce_sum
from alexnet_ray.preprocess import average_crops, to_model_input
from alexnet_ray.train import fault_injection
from alexnet_ray.train.batch_feed import EarlyStart, eval_batches, training_batches
from alexnet_ray.train.checkpointing import load_momentum, load_resume_state, report_epoch
from alexnet_ray.train.config import Config
from alexnet_ray.train.elastic import attempt_layout, idle_worker, note_attempt
from alexnet_ray.train.metrics import EpochMeter, Progress, error_rates, restore_metrics_file, time_shares
from alexnet_ray.train.precision import LossScaler, device_capability, resolve_precision
from alexnet_ray.train.ray_logs import quiet_ray_logs
from alexnet_ray.train.schedule import make_lr_schedule
from alexnet_ray.train.worker_state import WorkerState
from alexnet_ray.train.tracking import open_tracker


# NCCL refuses two ranks on one device unless this is set (NCCL 2.30+; older ones refuse regardless)
SHARED_GPU_ENV = "NCCL_MULTI_RANK_GPU_ENABLE"


def _set_determinism(config: Config, cpus: float) -> None:
    """Threads, and which kernels may run. Deterministic: cuBLAS needs a fixed workspace (read when
    its handle is made, so before the first CUDA matmul) or torch refuses every GPU matmul.
    Otherwise cuDNN times its algorithms for each new shape and keeps the fastest (off by default in
    torch; AlexNet's grouped and 11x11/4 convolutions are where its heuristics pick slow ones)."""
    torch.set_num_threads(max(1, int(cpus)))
    if config.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def _initial_weights(config: Config) -> dict:
    """The reference model's initial weights, identical on every rank (same seed)."""
    torch.manual_seed(config.run.seed)
    return AlexNet(config.model).state_dict()


def setup_worker(loop_config: dict) -> WorkerState | int:
    """The worker's state; for a spare worker of an elastic group (elastic.attempt_layout), the
    epoch the attempt starts at instead."""
    config, _ = attempt_layout(Config.from_dict(loop_config["config"]), ray.train.get_context().get_world_size())
    topology = Topology(config.parallel.towers, config.parallel.replicas)
    _set_determinism(config, config.parallel.cpus_per_worker)
    storage_retries.set_retry_budget(config.run.storage_retry_s)  # this worker's reads, its loaders' tasks
    if config.parallel.gpus_per_worker < 1:  # read when NCCL makes its communicators: at the first collective
        os.environ.setdefault(SHARED_GPU_ENV, "1")
    # A partner's read-ahead can hold up any exchange of the pair or the replicas: they all wait
    # for the data wait (the backend's own timeout, too); checkpoint gathers need no read.
    groups = init_parallel_groups(topology, timeout=config.data_wait_s)
    state = load_resume_state(config)
    if groups is None:
        return int(state["epoch"]) if state is not None else 0
    device = ray.train.torch.get_device()

    full = state["model"] if state is not None else _initial_weights(config)
    tower = Tower(groups.tower, topology.towers, config.model)
    tower.load_state_dict(split_state_dict(full, topology.towers)[groups.tower])
    tower.to(device)
    if device.type == "cuda":
        tower.to(memory_format=torch.channels_last)
    if config.run.compile:
        compile_stages(tower, mode=config.run.compile_mode)
    model = TowerParallel(tower, groups, microbatches=config.parallel.microbatches,
                          exchange_timeout=config.data_wait_s,
                          microbatch_rows=config.microbatch_rows)
    opt = config.optimizer
    optimizer = torch.optim.SGD(
        tower.parameters(), lr=loop_config["base_lr"], momentum=opt.momentum, weight_decay=opt.weight_decay
    )
    schedule = make_lr_schedule(config.schedule, loop_config["base_lr"], config.run.epochs)
    precision = resolve_precision(config.run.precision, device.type, device_capability(device))
    if precision.name == "fp32":  # IEEE fp32: torch lets cuDNN's convolutions round to TF32 by default
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    scaler = LossScaler(precision.scale_loss, groups, timeout=config.parallel.exchange_timeout_s)
    start_epoch = 0
    if state is not None:
        momentum = state["optimizer"].get("momentum_buffer") or {}
        if momentum:
            load_momentum(tower, optimizer, split_state_dict(momentum, topology.towers)[groups.tower])
        if state.get("scheduler"):
            schedule.load_state_dict(state["scheduler"])
        if state.get("loss_scaler") and scaler.enabled:
            scaler.load_state_dict(state["loss_scaler"])
        start_epoch = int(state["epoch"])
    resumed = state.get("metrics") if state is not None and state.get("of_this_run") else None
    return WorkerState(config, groups, device, model, optimizer, schedule, start_epoch,
                       precision.autocast(device.type), scaler, resumed)


@dataclasses.dataclass
class EpochTools:
    """What every training step uses besides the model: the loader and its plan, the manifest's
    normalisation, progress."""
    loader: TrainLoader
    sizes: list[int]  # this replica's rows per step (0 past the rows of a short last batch)
    row_offsets: list[int]  # where they start in each step's global batch
    global_rows: list[int]  # each step's global batch: the same on every layout
    mean: list[float]
    std: list[float]
    progress: Progress
    rank: int


def epoch_tools(w: WorkerState, manifest) -> EpochTools:
    config, groups = w.config, w.groups
    rank = ray.train.get_context().get_world_rank()
    loader = TrainLoader(
        config.data.path, global_batch_size=config.data.global_batch_size, replicas=config.parallel.replicas,
        image_size=config.model.image_size, seed=config.run.seed, pca_lighting=config.data.pca_lighting,
        prefetch_batches=config.data.prefetch_batches,
    )
    progress = Progress(config.run.epochs, loader.batches_per_epoch, config.run.progress_interval_s, rank == 0)
    row_offsets, sizes = loader.share(groups.replica)
    return EpochTools(loader, sizes, row_offsets, list(loader.global_rows), manifest.mean, manifest.std,
                      progress, rank)


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
    quiet_ray_logs()
    w = setup_worker(loop_config)
    if isinstance(w, int):
        return idle_worker(Config.from_dict(loop_config["config"]), w)
    config, groups = w.config, w.groups
    manifest = load_manifest(config.data.path)
    tools = epoch_tools(w, manifest)
    resize = {}
    if tools.rank == 0:
        resize = note_attempt(config.parallel.replicas, w.start_epoch)
        if w.resumed_metrics:
            restore_metrics_file(loop_config["run_dir"], w.resumed_metrics)
    early = None  # tower 0: the next epoch's loader, started before this epoch's evaluation
    run_storage = ray.train.get_context().get_storage()
    tracker = open_tracker(config, tools.rank, run_storage.experiment_fs_path, run_storage.storage_filesystem,
                           loop_config.get("tracking_env"))
    logged, checkpoint = [], None
    for epoch in range(w.start_epoch, config.run.epochs):
        lr = w.schedule.lr(epoch)
        for group in w.optimizer.param_groups:
            group["lr"] = lr
        meter, elapsed = train_one_epoch(w, tools, epoch, early)
        if groups.tower == 0 and epoch + 1 < config.run.epochs:
            early = EarlyStart(tools.loader.iter_epoch(epoch + 1, groups.replica))
        fault_injection.point("metrics", epoch)
        train = replicas_error_rates(w, meter, f"epoch {epoch + 1} training metrics")
        reads = replicas_reads(w, tools, epoch)

        ten_crop = epoch == config.run.epochs - 1 and config.data.ten_crop_final_eval
        val = validate(w, tools, ten_crop=ten_crop, epoch=epoch)
        w.schedule.observe(val["top1_error"])

        metrics = {**epoch_metrics(epoch, lr, elapsed, meter, train, val, ten_crop, groups), **reads,
                   "replicas": config.parallel.replicas, **(resize if epoch == w.start_epoch else {})}
        if tools.rank == 0:
            print_epoch_summary(metrics, config.run.epochs, tools.progress.run_clock(epoch, 1.0))
        tracker.log_epoch(metrics)  # before the report: a run killed in between logs this epoch again
        logged.append(metrics)
        checkpoint = report_epoch(w, epoch, metrics, manifest, tools.rank) or checkpoint
    finish_tracking(tracker, loop_config, checkpoint, logged)


def finish_tracking(tracker, loop_config: dict, checkpoint: str | None, metrics: list[dict]) -> None:
    """Rank 0, the run done: the pictures (drawn by loop_config["pictures"], when the caller gave one)
    and the final checkpoint's path go to the tracker."""
    if tracker.run_id is None:
        return
    run_dir = loop_config["run_dir"]
    final = storage.join(run_dir, checkpoint) if checkpoint else None
    draw = loop_config.get("pictures")
    with tempfile.TemporaryDirectory(prefix="alexnet-tracked-") as tmp:
        pictures = [str(p) for p in draw(final, run_dir, tmp, metrics)] if draw and final else []
        tracker.finish(final, pictures)


def train_one_epoch(w: WorkerState, tools: EpochTools, epoch: int, early: EarlyStart | None
                    ) -> tuple[EpochMeter, float]:
    """One pass over the replica's planned batches. Returns the epoch's meter (timings included)
    and its seconds. Tower 0 reads the batches from `early` when the loader was started ahead."""
    config, groups = w.config, w.groups
    w.model.train()
    w.model.reset_stats()
    meter = EpochMeter()
    source = None
    if groups.tower == 0:
        source = iter(early) if early is not None else tools.loader.iter_epoch(epoch, groups.replica)
    batches = training_batches(source, tools.sizes, config.model.image_size, groups, w.device,
                               timeout=config.data_wait_s, label=f"epoch {epoch + 1} training batch")
    images_done = 0  # the global batches' rows so far
    for step in itertools.count():
        fault_injection.point("step", epoch, step)
        t0 = time.perf_counter()
        item = next(batches, None)
        t1 = time.perf_counter()
        meter.data_s += t1 - t0
        if item is None:
            break
        train_step(w, tools, epoch, step, item, meter)
        images_done += tools.global_rows[step]
        fault_injection.step_done(epoch, step)
        tools.progress.update(epoch, step + 1, meter.loss_sum / max(1, meter.images),
                              images_done, time.perf_counter() - meter.started)
    stats = w.model.stats
    meter.exchange_s, meter.grad_sync_s = stats["exchange_s"], stats["grad_sync_s"]
    return meter, time.perf_counter() - meter.started


def train_step(w: WorkerState, tools: EpochTools, epoch: int, step: int, item: list[torch.Tensor],
               meter: EpochMeter) -> None:
    """Forward, backward, gradient sync and optimiser step on one batch; its loss and compute time
    go to `meter`."""
    config, device = w.config, w.device
    started = time.perf_counter()
    images, labels, lighting = item
    x = to_model_input(images, lighting, tools.mean, tools.std, device, channels_last=device.type == "cuda")
    fault_injection.point("exchange", epoch, step)
    w.model.step = epoch * tools.loader.batches_per_epoch + step  # named in exchange errors
    begin_step(w.model.tower)  # run.compile_mode with CUDA graphs
    with w.autocast:
        loss, logits = w.model.forward_backward(
            x, labels, row_offset=tools.row_offsets[step], global_rows=tools.global_rows[step],
            dropout_step=(config.run.seed, epoch, step), loss_scale=w.scaler.loss_scale)
    w.model.sync_gradients()
    w.scaler.step(w.optimizer)  # fp16: unscale, skip the step on any rank's overflow
    w.optimizer.zero_grad(set_to_none=True)
    meter.compute_s += time.perf_counter() - started
    if config.run.compile and tools.rank == 0 and epoch == w.start_epoch and step == 0:
        print(f"run.compile: first step {time.perf_counter() - started:.1f} s, compiling the tower's stages", flush=True)
    meter.add_batch(float(loss), logits.float(), labels)


def replicas_error_rates(w: WorkerState, meter: EpochMeter, label: str) -> dict:
    """Loss and error rates over every replica's images (an all-reduce of the meters' counts)."""
    totals = all_reduce_sum(meter.totals().to(w.device), w.groups.dp_group, label, w.config.data_wait_s)
    return error_rates(totals.cpu())


def replicas_reads(w: WorkerState, tools: EpochTools, epoch: int) -> dict:
    """What the epoch's training loaders read, summed over replicas (tower 0 of each reads)."""
    count = tools.loader.reads.pop((epoch, w.groups.replica), None) if w.groups.tower == 0 else None
    local = torch.tensor([count.bytes, count.row_groups] if count else [0, 0], dtype=torch.float64)
    totals = all_reduce_sum(local.to(w.device), w.groups.dp_group, f"epoch {epoch + 1} read counts",
                            w.config.data_wait_s).cpu()
    read_bytes, row_groups = int(totals[0]), int(totals[1])
    split = tools.loader.split_bytes
    return {"read_bytes": read_bytes, "read_row_groups": row_groups,
            "train_row_groups": tools.loader.index.num_units,
            "read_amplification": read_bytes / split if split else None}


def validate(w: WorkerState, tools: EpochTools, *, ten_crop: bool, epoch: int = 0) -> dict:
    """Top-1/top-5 error on the validation split; every image counted exactly once across replicas."""
    config, groups, device = w.config, w.groups, w.device
    w.model.eval()
    loader = EvalLoader(config.data.path, batch_size=config.data.eval_batch_size or config.replica_share,
                        replicas=config.parallel.replicas, image_size=config.model.image_size, ten_crop=ten_crop,
                        prefetch_batches=config.data.prefetch_batches)
    meter = EpochMeter()
    source = loader.iter(groups.replica) if groups.tower == 0 else None
    with torch.no_grad():
        for images, labels in eval_batches(source, groups, device, config.data_wait_s, epoch):
            if ten_crop:  # scores: the crops' averaged probabilities
                n, crops = images.shape[:2]
                x = to_model_input(images.flatten(0, 1), None, tools.mean, tools.std, device)
                scores = average_crops(w.model(x).view(n, crops, -1))
                loss = F.nll_loss(scores.clamp_min(1e-12).log(), labels)
            else:  # scores: logits
                scores = w.model(to_model_input(images, None, tools.mean, tools.std, device)).float()
                loss = F.cross_entropy(scores, labels)
            meter.add_batch(float(loss), scores, labels)
    fault_injection.point("metrics", epoch, 1)
    return replicas_error_rates(w, meter, f"epoch {epoch + 1} evaluation metrics")


def epoch_metrics(epoch: int, lr: float, elapsed: float, meter: EpochMeter, train: dict, val: dict,
                  ten_crop: bool, groups) -> dict:
    """The epoch's reported metrics (what metrics/epoch_*.json and the checkpoint hold)."""
    return {
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


def print_epoch_summary(metrics: dict, epochs: int, run_clock: str) -> None:
    """The one line per epoch that rank 0 prints."""
    sys.stdout.write(
        f"epoch {metrics['epoch']}/{epochs}: train loss {metrics['train_loss']:.4f}, "
        f"val top-1/top-5 error {metrics['val_top1_error']:.3f}/{metrics['val_top5_error']:.3f}"
        f"{' (10 crops)' if metrics['val_ten_crop'] else ''}, {metrics['images_per_s']:,.0f} img/s, "
        f"lr {metrics['lr']:.5g}, {run_clock}\n"
    )
    sys.stdout.flush()
