"""Evaluation of a checkpoint on a prepared dataset: Ray Data batch inference over an actor pool.

    read + crop (CPU tasks)          score (actor pool, one GPU each when present)      driver
    row ranges -> uint8 crops  ->    crops -> probabilities -> top-5, p(label)   ->    counts

Every row of the split is read exactly once (contiguous row ranges cut at row-group boundaries),
crops come from the data layer's `augment_eval` (the same code training's evaluation uses), and
the driver checks that each row id came back once before it reports error rates.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch

from alexnet_ray import ray_cluster, storage_retries
from alexnet_ray.checkpoint import load_checkpoint
from alexnet_ray.data.augment import augment_eval
from alexnet_ray.data.manifest import load_manifest
from alexnet_ray.data.shards import ShardIndex
from alexnet_ray.eval.scoring import DatasetMismatchError, check_classes, class_probabilities, resolve_checkpoint, top_k
from alexnet_ray.export import Exported, exported_from_checkpoint

TASK_BYTES = 48 << 20  # output of one read task, at most one row group


def row_ranges(index: ShardIndex, max_rows: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) row ranges covering every row once, none crossing a row group."""
    ranges = []
    for start, rows in zip(index.unit_start.tolist(), index.unit_rows.tolist()):
        for a in range(start, start + rows, max_rows):
            ranges.append((a, min(a + max_rows, start + rows)))
    return ranges


def _read_crops(batch: dict, *, index: ShardIndex, image_size: int, ten_crop: bool) -> dict:
    ids = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in zip(batch["start"], batch["end"])])
    jpegs, labels, _ = index.read(ids)
    return {"images": augment_eval(jpegs, image_size=image_size, ten_crop=ten_crop), "labels": labels, "row": ids}


class _Scorer:
    """One model replica per actor; returns per row its top-k classes and the label's probability."""

    def __init__(self, exported_ref: list, ten_crop: bool, num_threads: int):
        import ray

        exported: Exported = ray.get(exported_ref[0])
        # Ray Data hands over read-only arrays; they are only read here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        torch.set_num_threads(max(1, num_threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = exported.build_model().to(self.device)
        self.preprocessing = exported.preprocessing
        self.ten_crop = ten_crop

    def __call__(self, batch: dict) -> dict:
        probs = class_probabilities(self.model, batch["images"], self.preprocessing, self.device, self.ten_crop)
        labels = torch.as_tensor(batch["labels"], device=probs.device)
        label_prob = probs.gather(1, labels.view(-1, 1)).squeeze(1)
        return {"row": batch["row"], "label": batch["labels"], "topk": top_k(probs, 5).cpu().numpy(),
                "label_prob": label_prob.cpu().numpy()}


class _ProgressBar:
    """A one-line progress bar on stderr (redrawn in place on a terminal, every 10% otherwise)."""

    def __init__(self, total: int, enabled: bool, label: str = "evaluate"):
        self.total, self.enabled, self.label = total, enabled, label
        self.tty = sys.stderr.isatty()
        self.started, self.last_decile = time.perf_counter(), -1

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        fraction = done / max(1, self.total)
        decile = int(fraction * 10)
        if not self.tty and decile == self.last_decile and done < self.total:
            return
        self.last_decile = decile
        rate = done / max(1e-9, time.perf_counter() - self.started)
        bar = "#" * int(fraction * 30)
        line = f"{self.label}: [{bar:<30}] {done}/{self.total} images ({fraction:.0%}) {rate:,.0f} img/s"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        if self.tty and done >= self.total:
            print(file=sys.stderr)


def load_for_evaluation(checkpoint: str | os.PathLike, data_dir: str | os.PathLike, split: str) -> tuple[Exported, Any, ShardIndex]:
    """The checkpoint as an Exported, the manifest and the split's rows; clear errors when they do not fit."""
    path = resolve_checkpoint(checkpoint)
    exported = exported_from_checkpoint(load_checkpoint(path), str(path))
    manifest = load_manifest(data_dir)
    check_classes(exported.classes, manifest.classes, data_dir)
    image_size = int(exported.preprocessing["image_size"])
    if image_size > manifest.size:
        raise DatasetMismatchError(
            f"dataset {data_dir} stores {manifest.size} px images, smaller than the model's {image_size} px crops")
    if split not in manifest.splits:
        raise DatasetMismatchError(f"dataset {data_dir} has no split {split!r} (has {sorted(manifest.splits)})")
    index = ShardIndex.from_manifest(manifest, split)
    if index.num_rows == 0:
        raise DatasetMismatchError(f"dataset {data_dir}: split {split!r} is empty")
    return exported, manifest, index


def evaluate(checkpoint: str | os.PathLike, data_dir: str | os.PathLike, *, split: str = "val",
             ten_crop: bool = False, batch_size: int = 128, actors: int | None = None,
             cpus_per_actor: float = 1.0, use_gpu: str = "auto", progress: bool = True,
             keep_predictions: bool = False, address: str | None = None) -> dict[str, Any]:
    """Top-1/top-5 error of a checkpoint on a prepared dataset's split.

    Returns {"top1_error", "top5_error", "loss", "images", "ten_crop", "split", "checkpoint",
    "actors", "gpu", "seconds"}; with keep_predictions also "rows", "labels", "topk" (numpy, in row order).
    `use_gpu`: "auto" (when the cluster has GPUs), "true" or "false". `actors`: default one per GPU,
    else 2."""
    import ray
    import ray.data

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    exported, manifest, index = load_for_evaluation(checkpoint, data_dir, split)
    ray_cluster.connect(address, say=ray_cluster.say_on_stderr)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    gpu = use_gpu == "true" or (use_gpu == "auto" and gpus > 0)
    if gpu and gpus == 0:
        raise ValueError("use_gpu=true but the Ray cluster has no GPUs")
    actors = actors or (gpus if gpu else 2)
    image_size = int(exported.preprocessing["image_size"])
    row_bytes = image_size * image_size * 3 * (10 if ten_crop else 1)
    ranges = row_ranges(index, max(1, TASK_BYTES // row_bytes))
    starts, ends = (np.array(r, dtype=np.int64) for r in zip(*ranges))

    started = time.perf_counter()
    exported_ref = [ray.put(exported)]
    dataset = ray.data.from_items([{"start": a, "end": b} for a, b in zip(starts.tolist(), ends.tolist())],
                                  override_num_blocks=len(ranges))
    dataset = dataset.map_batches(
        storage_retries.carrying_budget(_read_crops), batch_size=1, batch_format="numpy", num_cpus=1,
        fn_kwargs={"index": index, "image_size": image_size, "ten_crop": ten_crop})
    dataset = dataset.map_batches(
        _Scorer, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=1 if gpu else 0, num_cpus=cpus_per_actor,
        fn_constructor_kwargs={"exported_ref": exported_ref, "ten_crop": ten_crop,
                               "num_threads": int(max(1, cpus_per_actor))})

    total = index.num_rows
    bar = _ProgressBar(total, progress)
    rows, labels, topks, label_probs = [], [], [], []
    done = 0
    for out in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        rows.append(out["row"]), labels.append(out["label"]), topks.append(out["topk"])
        label_probs.append(out["label_prob"])
        done += len(out["row"])
        bar.update(done)

    rows_all = np.concatenate(rows)
    order = np.argsort(rows_all, kind="stable")
    rows_all = rows_all[order]
    if len(rows_all) != total or not np.array_equal(rows_all, np.arange(total)):
        raise RuntimeError(f"evaluation saw {len(rows_all)} rows ({len(np.unique(rows_all))} distinct) of {total}")
    labels_all, topk_all = np.concatenate(labels)[order], np.concatenate(topks)[order]
    probs_all = np.concatenate(label_probs)[order]
    hits = topk_all == labels_all[:, None]
    result: dict[str, Any] = {
        "top1_error": float(1.0 - hits[:, 0].mean()),
        "top5_error": float(1.0 - hits.any(axis=1).mean()),
        "loss": float(-np.log(np.clip(probs_all, 1e-12, None)).mean()),
        "images": int(total),
        "ten_crop": bool(ten_crop),
        "split": split,
        "checkpoint": str(resolve_checkpoint(checkpoint)),
        "actors": int(actors),
        "gpu": bool(gpu),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if keep_predictions:
        result.update(rows=rows_all, labels=labels_all, topk=topk_all)
    return result


def format_summary(result: dict[str, Any]) -> str:
    crops = "10-crop" if result["ten_crop"] else "centre crop"
    return (f"{result['split']}: {result['images']} images, {crops}: top-1 error {result['top1_error']:.4f}, "
            f"top-5 error {result['top5_error']:.4f} ({result['actors']} actor(s), "
            f"{'GPU' if result['gpu'] else 'CPU'}, {result['seconds']:.1f}s)")


