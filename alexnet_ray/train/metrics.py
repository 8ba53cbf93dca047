"""Per-epoch metrics: top-k counting, step-time accounting, progress lines, and the metrics files."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """How many rows have their label among the top-k logits, for each k (k capped at classes)."""
    if logits.numel() == 0:
        return [0 for _ in ks]
    maxk = min(max(ks), logits.shape[-1])
    top = logits.topk(maxk, dim=-1).indices
    hits = top.eq(labels.view(-1, 1))
    return [int(hits[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


@dataclass
class EpochMeter:
    """Sums over one epoch on one replica; `totals()` gives the tensor to all-reduce across replicas."""

    loss_sum: float = 0.0
    images: int = 0
    top1: int = 0
    top5: int = 0
    data_s: float = 0.0
    compute_s: float = 0.0
    exchange_s: float = 0.0
    grad_sync_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add_batch(self, loss: float, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.shape[0]
        self.loss_sum += loss * n
        self.images += n
        c1, c5 = topk_correct(logits, labels)
        self.top1 += c1
        self.top5 += c5

    def totals(self) -> torch.Tensor:
        return torch.tensor([self.loss_sum, self.images, self.top1, self.top5], dtype=torch.float64)


def error_rates(totals: torch.Tensor) -> dict[str, float]:
    """From summed [loss_sum, images, top1_correct, top5_correct]: mean loss and error rates."""
    loss_sum, images, top1, top5 = (float(x) for x in totals)
    if images == 0:
        return {"loss": float("nan"), "top1_error": float("nan"), "top5_error": float("nan"), "images": 0}
    return {
        "loss": loss_sum / images,
        "top1_error": 1.0 - top1 / images,
        "top5_error": 1.0 - top5 / images,
        "images": int(images),
    }


def time_shares(meter: EpochMeter) -> dict[str, float]:
    """Fractions of the epoch's step time spent waiting for data, computing, exchanging, syncing."""
    parts = {
        "data": meter.data_s,
        "compute": max(0.0, meter.compute_s - meter.exchange_s - meter.grad_sync_s),
        "exchange": meter.exchange_s,
        "grad_sync": meter.grad_sync_s,
    }
    total = sum(parts.values()) or 1.0
    return {f"share_{k}": v / total for k, v in parts.items()}


class Progress:
    """A progress line every `interval_s` seconds: epoch, step/steps, loss, images/s, the epoch's
    ETA, and the run's elapsed time and ETA (this worker's start counts as the run's: a resumed
    run estimates from the epochs since it resumed)."""

    def __init__(self, epochs: int, steps: int, interval_s: float, enabled: bool):
        self.epochs, self.steps, self.interval_s, self.enabled = epochs, steps, interval_s, enabled
        self.last = self.started = time.perf_counter()
        self.first_epoch: int | None = None

    def run_clock(self, epoch: int, done: float) -> str:
        """'run 1:05, ETA 3:10': `done` of epoch `epoch` (0-based) is finished."""
        if self.first_epoch is None:
            self.first_epoch = epoch
        elapsed = time.perf_counter() - self.started
        finished = epoch - self.first_epoch + done
        eta = elapsed * (self.epochs - epoch - done) / finished if finished > 0 else float("nan")
        return f"run {clock(elapsed)}, ETA {clock(eta)}"

    def update(self, epoch: int, step: int, loss: float, images: int, elapsed: float, force=False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < self.interval_s):
            return
        self.last = now
        rate = images / elapsed if elapsed > 0 else 0.0
        done = step / max(1, self.steps)
        eta = elapsed * (1 - done) / done if done > 0 else float("nan")
        # sys.stdout, not print: Ray Train patches print to log *and* echo, doubling every line.
        sys.stdout.write(
            f"epoch {epoch + 1}/{self.epochs}  step {step}/{self.steps}  loss {loss:.4f}  "
            f"{rate:,.0f} img/s  epoch ETA {clock(eta)}  {self.run_clock(epoch, done)}\n"
        )
        sys.stdout.flush()


PER_WORKER = ("world_rank", "node_id", "replica", "tower", "rss_mb")


def epoch_record(metrics_per_worker: list[dict]) -> dict:
    """An epoch's metrics file: rank 0's metrics, and where every worker ran."""
    record = {k: v for k, v in metrics_per_worker[0].items() if k not in PER_WORKER}
    record["workers"] = [{k: m.get(k) for k in PER_WORKER} for m in metrics_per_worker]
    return record


def restore_metrics_file(run_dir: str, metrics: dict) -> bool:
    """Write an epoch's metrics file from its checkpoint's (rank 0's) metrics when the file is
    missing: a node lost right after the epoch's report can take the other workers' reports with it,
    and then Ray Train never hands that epoch to the controller's MetricsFiles."""
    from alexnet_ray import storage

    epoch = int(metrics["epoch"])
    if storage.is_file(storage.join(run_dir, "metrics", f"epoch_{epoch:04d}.json")):
        return False
    write_metrics_file(run_dir, epoch, {**epoch_record([metrics]), "restored_from_checkpoint": True})
    return True


def write_metrics_file(run_dir: str, epoch: int, metrics: dict) -> str:
    """Write metrics/epoch_NNNN.json under the run directory (local or shared filesystem)."""
    from alexnet_ray import storage

    fs, root = storage.resolve(run_dir)
    folder = os.path.join(root, "metrics")
    fs.create_dir(folder, recursive=True)
    path = os.path.join(folder, f"epoch_{epoch:04d}.json")
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(metrics, indent=1, sort_keys=True).encode())
    return path


def read_metrics_files(run_dir: str) -> list[dict]:
    """Every metrics/epoch_NNNN.json of a run, in epoch order ([] when there are none)."""
    from alexnet_ray import storage

    folder = storage.join(run_dir, "metrics")
    if not storage.is_dir(folder):
        return []
    names = sorted(i.base_name for i in storage.list_dir(folder) if re.fullmatch(r"epoch_\d{4}\.json", i.base_name))
    return [json.loads(storage.read_text(storage.join(folder, name))) for name in names]


def mean_images_per_s(records: list[dict]) -> float | None:
    """Training images over training seconds across the epochs (each epoch's rate times its time)."""
    seconds = sum(r.get("epoch_s", 0.0) for r in records)
    if seconds <= 0:
        return None
    return sum(r["images_per_s"] * r["epoch_s"] for r in records if "images_per_s" in r) / seconds


def clock(seconds: float) -> str:
    """h:mm:ss, or m:ss under an hour."""
    if seconds != seconds:  # nan: nothing to estimate from yet
        return "?"
    whole = int(round(seconds))
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
