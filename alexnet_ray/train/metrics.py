"""Per-epoch metrics: top-k counting, step-time accounting, progress lines, and the metrics files."""

from __future__ import annotations

import json
import os
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
    """A progress line every `interval_s` seconds: epoch, step/steps, loss, images/s, ETA."""

    def __init__(self, epochs: int, steps: int, interval_s: float, enabled: bool):
        self.epochs, self.steps, self.interval_s, self.enabled = epochs, steps, interval_s, enabled
        self.last = time.perf_counter()

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
            f"{rate:,.0f} img/s  epoch ETA {eta:.0f}s\n"
        )
        sys.stdout.flush()


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
