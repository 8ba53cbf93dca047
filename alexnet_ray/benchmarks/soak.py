"""Soak: the demo workload (2 towers x 2 replicas) for many epochs, watching each worker's memory.

    python jobs/benchmark.py soak            # 30 epochs
    python jobs/benchmark.py soak --quick    # 5 epochs
    python jobs/benchmark.py soak --epochs 60 --keep /tmp/soak

Every worker reports its resident set size (`rss_mb`) with each epoch's metrics; the trainer's
metrics files keep it per worker. The slope is a least-squares fit of RSS against epoch per worker,
leaving out the first epoch (allocator and pipeline warm-up) when there are at least three.
The last line printed is one JSON object: epochs, rss_mb_per_epoch (per worker),
rss_slope_mb_per_epoch (the largest worker's slope), and the per-worker slopes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def least_squares_slope(ys: list[float]) -> float:
    """Slope of the least-squares line through (i, ys[i])."""
    n = len(ys)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(ys) / n
    sxx = sum((i - mean_x) ** 2 for i in range(n))
    return sum((i - mean_x) * (y - mean_y) for i, y in enumerate(ys)) / sxx


def rss_per_worker(run_dir: Path) -> dict[str, list[float]]:
    """{"rank0": [rss_mb of epoch 1, epoch 2, ...], ...} from the run's metrics files."""
    series: dict[str, list[float]] = {}
    for path in sorted((run_dir / "metrics").glob("epoch_*.json")):
        for worker in json.loads(path.read_text())["workers"]:
            series.setdefault(f"rank{worker['world_rank']}", []).append(round(worker["rss_mb"], 1))
    return dict(sorted(series.items()))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="benchmark.py soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 epochs instead of 30")
    parser.add_argument("--epochs", type=int, help="number of epochs (overrides --quick)")
    parser.add_argument("--keep", metavar="DIR", help="keep the run under DIR (default: a temporary directory)")
    args = parser.parse_args(argv)
    epochs = args.epochs or (5 if args.quick else 30)

    import ray

    from alexnet_ray.train.config import load_config
    from alexnet_ray.train.trainer import Trainer

    storage = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="alexnet-soak-"))
    name = time.strftime("soak-%Y%m%d-%H%M%S")
    config = load_config("demo", overrides=[
        "parallel.towers=2", "parallel.replicas=2", f"run.epochs={epochs}", f"run.storage={storage}",
        f"run.name={name}", "run.progress_interval_s=30", "data.ten_crop_final_eval=false",
        "schedule.warmup_epochs=0",
    ])
    started = time.perf_counter()
    try:
        result = Trainer(config).fit()
        series = rss_per_worker(Path(result.path))
    finally:
        ray.shutdown()  # so no worker log line lands after the JSON line
        if not args.keep:
            shutil.rmtree(storage, ignore_errors=True)
    wall = time.perf_counter() - started

    skip = 1 if epochs >= 3 else 0
    slopes = {worker: round(least_squares_slope(values[skip:]), 3) for worker, values in series.items()}
    print(f"\nsoak: demo preset, 2 towers x 2 replicas, {epochs} epochs in {wall:.0f}s")
    print(f"{'worker':<8} {'first MB':>9} {'last MB':>9} {'max MB':>9} {'slope MB/epoch':>15}")
    for worker, values in series.items():
        print(f"{worker:<8} {values[0]:>9.1f} {values[-1]:>9.1f} {max(values):>9.1f} {slopes[worker]:>15.3f}")
    print(json.dumps({
        "epochs": epochs,
        "rss_mb_per_epoch": series,
        "rss_slope_mb_per_epoch": max(slopes.values()),
        "rss_slope_per_worker": slopes,
        "slope_skips_first_epochs": skip,
        "wall_s": round(wall, 1),
    }))
    return 0
