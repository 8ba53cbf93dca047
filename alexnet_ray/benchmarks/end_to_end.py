"""End to end: `Trainer(config).fit()` (Ray Data + Ray Train) vs a plain torch.multiprocessing loop.

    python jobs/benchmark.py end-to-end            # 2000 demo images, 4 epochs, 2 rounds
    python jobs/benchmark.py end-to-end --quick    # 800 demo images, 3 epochs, 1 round

The same workload both ways: the embedded demo dataset prepared at 73 px, the `demo` preset's
network (width 0.25, image_size 64, 10 classes), 2 towers x 1 replica, batch 32, the same epochs
of the same batches, the same torch threads per process (the worker's rule: int(cpus_per_worker),
at least 1), the same step (to_model_input, forward_backward, sync_gradients, SGD, loss/top-k).

  (a) Ray: `Trainer(config).fit()`. Images/s = training images / training time of the epochs after
      the first, from the per-epoch metrics files (worker.py's `images_per_s`: the clock runs from
      the epoch's first request for a batch to after its last step, so it includes waiting for
      data and the batch broadcast to tower 1, not evaluation or checkpoints; the next epoch's
      Ray Data execution starts before this epoch's evaluation, so its start-up overlaps that).
  (b) Plain: 2 processes (torch.multiprocessing.spawn, gloo) over the same Tower/TowerParallel,
      each holding every batch of every epoch in memory, decoded and augmented beforehand with the
      pipeline's own functions (so the pixels are identical). Timed the same way, epochs after the
      first. The processes run at Ray's worker niceness (15: Ray starts every worker process with
      RAY_worker_niceness), or on a shared machine other load would slow only the Ray contender.
      The last epoch's train loss must come out identical: the same work was done.
  --diagnose adds the plain loop with the Ray worker's per-step batch broadcast (tower 0 -> 1).
  Then, alone: the Ray Data pipeline with no training beside it (first-batch latency, images/s).

One-off start-up (Ray cluster, worker group, process spawn, first epoch) is excluded from both
figures; the whole wall-clock time of each run (start-up, evaluation and checkpoints included for
Ray) is printed beside them. Contenders run interleaved (ray, plain, ray, plain, ...) with Ray shut
down between its rounds; each keeps its best round, because other processes on a shared machine
slow rounds unevenly. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alexnet_ray.data.augment import augment_train
from alexnet_ray.data.demo import DEMO_NUM_CLASSES, write_demo_dataset
from alexnet_ray.data.manifest import load_manifest
from alexnet_ray.data.pipeline import TrainLoader
from alexnet_ray.data.prepare import prepare_dataset
from alexnet_ray.model import AlexNet, Tower, split_state_dict
from alexnet_ray.parallel import Topology, TowerParallel, init_parallel_groups
from alexnet_ray.parallel.mappings import broadcast_from_tower0
from alexnet_ray.preprocess import to_model_input
from alexnet_ray.train.config import Config, load_config
from alexnet_ray.train.metrics import EpochMeter
from alexnet_ray.train.schedule import make_lr_schedule

# Ray starts its worker processes (Train workers, Data tasks) at this niceness (RAY_worker_niceness)
RAY_WORKER_NICENESS = int(os.environ.get("RAY_worker_niceness", 15))
STORED_SIZE = 73  # round(64 * 256 / 224), what Trainer prepares the demo dataset at for image_size 64


def prepare_demo(root: Path, train_images: int) -> Path:
    raw = write_demo_dataset(root / "raw", num_classes=DEMO_NUM_CLASSES, train_per_class=train_images // DEMO_NUM_CLASSES,
                             val_per_class=5)
    out = root / f"prepared-{STORED_SIZE}px-{train_images}"
    try:
        load_manifest(out)  # prepared by an earlier run with --keep
    except ValueError:
        prepare_dataset(raw, out, layout="folder", size=STORED_SIZE, overwrite=True)
    return out


def benchmark_config(data_dir: Path, storage: Path, epochs: int, batch: int) -> Config:
    return load_config("demo", overrides=[
        f"data.path={data_dir}", f"data.global_batch_size={batch}", "data.ten_crop_final_eval=false",
        "parallel.towers=2", "parallel.replicas=1", "parallel.use_gpu=false",
        f"run.epochs={epochs}", f"run.storage={storage}", "run.progress_interval_s=1000000",
    ])


def torch_threads(config: Config) -> int:
    return max(1, int(config.parallel.cpus_per_worker))  # worker.py's _set_determinism


def _steady(epochs: list[dict]) -> dict:
    """Images/s over the epochs after the first, and the per-epoch times."""
    later = epochs[1:]
    images = sum(e["images"] for e in later)
    seconds = sum(e["epoch_s"] for e in later)
    return {"images_per_s": images / seconds, "epoch_s": [round(e["epoch_s"], 3) for e in epochs]}


# ------------------------------------------------------------------------------------------ Ray

def run_ray(config: Config, name: str) -> dict:
    import ray

    from alexnet_ray.train.trainer import Trainer

    config = dataclasses.replace(config, run=dataclasses.replace(config.run, name=name))
    start = time.perf_counter()
    Trainer(config).fit()
    wall = time.perf_counter() - start
    ray.shutdown()  # the plain loop's rounds run without Ray's daemons
    folder = Path(config.run.storage) / name / "metrics"
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("epoch_*.json"))]
    if len(records) != config.run.epochs:
        raise RuntimeError(f"{folder}: {len(records)} epoch metrics files, expected {config.run.epochs}")
    epochs = [{"images": r["images_per_s"] * r["epoch_s"], "epoch_s": r["epoch_s"]} for r in records]
    shares = {k: float(np.mean([r[f"share_{k}"] for r in records[1:]]))
              for k in ("data", "compute", "exchange", "grad_sync")}
    return {**_steady(epochs), "wall_s": wall, "shares": shares, "final_loss": records[-1]["train_loss"]}


def profile_data(config: Config, epochs: int) -> dict:
    """The Ray Data pipeline alone, on a cluster sized like Trainer's: per epoch, seconds to the
    first batch (execution start-up + the first task) and images/s with no training beside it."""
    import ray

    from alexnet_ray.train.ray_logs import quiet_ray_logs
    from alexnet_ray.train.trainer import Trainer

    Trainer(config).connect()
    quiet_ray_logs()
    loader = TrainLoader(config.data.path, global_batch_size=config.data.global_batch_size, replicas=1,
                         image_size=config.model.image_size, seed=config.run.seed,
                         pca_lighting=config.data.pca_lighting, prefetch_batches=config.data.prefetch_batches)
    first, rates = [], []
    for epoch in range(epochs):
        start = time.perf_counter()
        count, first_s = 0, None
        for batch in loader.iter_epoch(epoch, 0):
            first_s = time.perf_counter() - start if first_s is None else first_s
            count += len(batch["labels"])
        first.append(first_s)
        rates.append(count / (time.perf_counter() - start))
    ray.shutdown()
    later = slice(1, None)  # the first epoch also starts Ray Data's worker processes
    return {"first_batch_s": float(np.median(first[later])), "images_per_s": float(np.median(rates[later])),
            "first_batch_s_all": [round(x, 3) for x in first]}


# ---------------------------------------------------------------------------------------- plain

def make_batches(config: Config, epochs: int) -> list[list[dict[str, torch.Tensor]]]:
    """Every epoch's batches for replica 0, exactly as TrainLoader plans and augments them."""
    loader = TrainLoader(config.data.path, global_batch_size=config.data.global_batch_size, replicas=1,
                         image_size=config.model.image_size, seed=config.run.seed,
                         pca_lighting=config.data.pca_lighting)
    sizes = loader.global_rows
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    manifest = loader.manifest
    out = []
    for epoch in range(epochs):
        rows = loader.replica_rows(epoch, 0)
        batches = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            ids = rows[a:b]
            jpegs, labels, _ = loader.index.read(ids)
            images, lighting = augment_train(jpegs, ids, seed=config.run.seed, epoch=epoch,
                                             image_size=config.model.image_size, eigval=manifest.eigval(),
                                             eigvec=manifest.eigvec(), pca_lighting=config.data.pca_lighting)
            batches.append({"images": torch.from_numpy(images), "labels": torch.from_numpy(labels),
                            "lighting": torch.from_numpy(lighting)})
        out.append(batches)
    return out


def _plain_worker(rank: int, config_dict: dict, batches_path: str, store: str, out_path: str,
                  broadcast: bool, niceness: int) -> None:
    config = Config.from_dict(config_dict)
    os.nice(max(0, niceness - os.nice(0)))  # Ray's priority, so other load slows both contenders alike
    torch.set_num_threads(torch_threads(config))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=600))
    groups = init_parallel_groups(Topology(2, 1))
    torch.manual_seed(config.run.seed)
    full = AlexNet(config.model).state_dict()
    tower = Tower(groups.tower, 2, config.model)
    tower.load_state_dict(split_state_dict(full, 2)[groups.tower])
    model = TowerParallel(tower, groups, microbatches=config.parallel.microbatches,
                          exchange_timeout=config.parallel.exchange_timeout_s)
    base_lr = config.effective_lr()
    opt = config.optimizer
    optimizer = torch.optim.SGD(tower.parameters(), lr=base_lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    schedule = make_lr_schedule(config.schedule, base_lr, config.run.epochs)
    manifest = load_manifest(config.data.path)
    all_batches = torch.load(batches_path)
    epochs = []
    dist.barrier()
    for epoch, batches in enumerate(all_batches):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(epoch)
        model.train()
        model.reset_stats()
        meter = EpochMeter()
        for step, batch in enumerate(batches):
            if broadcast:  # as the Ray worker does: tower 0 sends the batch to its partner
                sent = [batch["images"], batch["labels"], batch["lighting"]] if rank == 0 else []
                batch = dict(zip(("images", "labels", "lighting"), broadcast_from_tower0(sent, groups)))
            x = to_model_input(batch["images"], batch["lighting"], manifest.mean, manifest.std, "cpu")
            loss, logits = model.forward_backward(x, batch["labels"], dropout_step=(config.run.seed, epoch, step))
            model.sync_gradients()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            meter.add_batch(float(loss), logits.float(), batch["labels"])
        epochs.append({"images": meter.images, "epoch_s": time.perf_counter() - meter.started,
                       "exchange_s": model.stats["exchange_s"], "loss": meter.loss_sum / meter.images})
        dist.barrier()  # the Ray worker's end-of-epoch all-reduce keeps the towers in step the same way
    if rank == 0:
        Path(out_path).write_text(json.dumps(epochs))
    dist.destroy_process_group()


def run_plain(config: Config, batches_path: str, tmp: Path, name: str, niceness: int,
              broadcast: bool = False) -> dict:
    store, out = tmp / f"{name}.store", tmp / f"{name}.json"
    start = time.perf_counter()
    mp.spawn(_plain_worker, args=(config.to_dict(), batches_path, str(store), str(out), broadcast, niceness),
             nprocs=2, join=True)
    wall = time.perf_counter() - start
    epochs = json.loads(out.read_text())
    steady = _steady(epochs)
    later = epochs[1:]
    steady["exchange_share"] = sum(e["exchange_s"] for e in later) / sum(e["epoch_s"] for e in later)
    return {**steady, "wall_s": wall, "final_loss": epochs[-1]["loss"]}


# ----------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmark.py end-to-end", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="800 images, 3 epochs, 1 round")
    parser.add_argument("--images", type=int, default=None, help="training images (default 2000; 800 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run, the first excluded (default 4; 3)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per contender (default 2; 1)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--diagnose", action="store_true",
                        help="also run the plain loop with the Ray worker's per-step batch broadcast to tower 1")
    parser.add_argument("--niceness", type=int, default=RAY_WORKER_NICENESS,
                        help=f"the plain processes' niceness (default {RAY_WORKER_NICENESS}, Ray's worker niceness)")
    parser.add_argument("--keep", default=None, help="directory to keep the dataset and runs in (default: a temp dir)")
    args = parser.parse_args(argv)
    images = args.images or (800 if args.quick else 2000)
    epochs = args.epochs or (3 if args.quick else 4)
    rounds = args.rounds or (1 if args.quick else 2)
    if epochs < 2 or images < DEMO_NUM_CLASSES * 2:
        parser.error("--epochs must be at least 2 (the first is excluded) and --images at least 20")

    with tempfile.TemporaryDirectory(prefix="alexnet-e2e-") as scratch:
        root = Path(args.keep or scratch)
        root.mkdir(parents=True, exist_ok=True)
        data_dir = prepare_demo(root / "data", images)
        config = benchmark_config(data_dir, root / "runs", epochs, args.batch)
        batches_path = str(root / "batches.pt")
        torch.save(make_batches(config, epochs), batches_path)
        stamp = time.strftime("%H%M%S")
        ray_runs, plain_runs, broadcast_runs = [], [], []
        for r in range(rounds):
            ray_runs.append(run_ray(config, f"e2e-ray-{stamp}-{r}"))
            plain_runs.append(run_plain(config, batches_path, root, f"plain-{r}", args.niceness))
            if args.diagnose:
                broadcast_runs.append(run_plain(config, batches_path, root, f"broadcast-{r}", args.niceness,
                                                broadcast=True))
        data = profile_data(config, epochs)
    return report(config, ray_runs, plain_runs, broadcast_runs, data, images, epochs, rounds, args.quick,
                  args.niceness)


def report(config: Config, ray_runs: list[dict], plain_runs: list[dict], broadcast_runs: list[dict], data: dict,
           images: int, epochs: int, rounds: int, quick: bool, niceness: int) -> int:
    ray_best = max(ray_runs, key=lambda r: r["images_per_s"])
    plain_best = max(plain_runs, key=lambda r: r["images_per_s"])
    ratio = ray_best["images_per_s"] / plain_best["images_per_s"]
    m, p = config.model, config.parallel
    load = os.getloadavg()
    print(f"AlexNet width={m.width} image={m.image_size} classes={m.num_classes}, {images} demo images "
          f"stored at {STORED_SIZE}px, batch {config.data.global_batch_size}, {p.towers} towers x {p.replicas} replica, "
          f"{torch_threads(config)} torch thread(s) per process, niceness {niceness} (Ray: {RAY_WORKER_NICENESS}), "
          f"{epochs} epochs, {rounds} round(s), CPU, gloo")
    print("images/s: epochs 2..N only (start-up and first epoch excluded from both); "
          "wall s: whole run, start-up included")
    print(f"{'contender':<34}{'round':>6}{'images/s':>10}{'wall s':>9}  epoch s")
    contenders = [("Ray: Trainer.fit() (Data + Train)", ray_runs), ("plain: mp.spawn + gloo, in memory", plain_runs),
                  ("plain + per-step batch broadcast", broadcast_runs)]
    for name, runs in contenders:
        for r, run in enumerate(runs):
            print(f"{name:<34}{r:>6}{run['images_per_s']:>10.1f}{run['wall_s']:>9.1f}  {run['epoch_s']}")
    shares = ray_best["shares"]
    print(f"Ray step-time shares (epochs 2..N, best round): data wait {shares['data']:.1%}, compute "
          f"{shares['compute']:.1%}, exchange {shares['exchange']:.1%}, grad sync {shares['grad_sync']:.1%}; "
          f"plain exchange share {plain_best['exchange_share']:.1%}")
    same = all(r["final_loss"] == p["final_loss"] for r, p in zip(ray_runs, plain_runs))
    print(f"same work: last epoch's train loss Ray {ray_runs[0]['final_loss']:.10f}, plain "
          f"{plain_runs[0]['final_loss']:.10f} ({'identical' if same else 'DIFFERENT'} in every round)")
    print(f"Ray Data alone (no training, epochs 2..N, median): first batch after {data['first_batch_s']:.2f} s, "
          f"{data['images_per_s']:.0f} images/s (per-epoch first batch s: {data['first_batch_s_all']})")
    print(f"ratio Ray / plain (best rounds): {ratio:.3f}  (goal >= 0.9); load average {load[0]:.2f} {load[1]:.2f}")
    figures = {
        "ray_images_per_s": round(ray_best["images_per_s"], 2),
        "plain_images_per_s": round(plain_best["images_per_s"], 2),
        "ratio": round(ratio, 3),
        "startup_excluded": True,
        "ray_rounds_images_per_s": [round(r["images_per_s"], 2) for r in ray_runs],
        "plain_rounds_images_per_s": [round(r["images_per_s"], 2) for r in plain_runs],
        "ray_wall_s": [round(r["wall_s"], 2) for r in ray_runs],
        "plain_wall_s": [round(r["wall_s"], 2) for r in plain_runs],
        "ray_share_data": round(shares["data"], 4),
        "ray_share_exchange": round(shares["exchange"], 4),
        "plain_exchange_share": round(plain_best["exchange_share"], 4),
        "same_final_loss": same,
        "plain_broadcast_rounds_images_per_s": [round(r["images_per_s"], 2) for r in broadcast_runs],
        "data_only_first_batch_s": round(data["first_batch_s"], 3),
        "data_only_images_per_s": round(data["images_per_s"], 1),
        "images": images, "epochs": epochs, "rounds": rounds, "batch": config.data.global_batch_size,
        "width": m.width, "image_size": m.image_size, "torch_threads": torch_threads(config),
        "plain_niceness": niceness, "ray_worker_niceness": RAY_WORKER_NICENESS,
        "load_average_1m": round(load[0], 2), "quick": quick,
    }
    print(json.dumps(figures))
    return 0
