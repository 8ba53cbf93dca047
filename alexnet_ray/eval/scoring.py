"""Turning uint8 crops into class probabilities, the way training's evaluation does it.

Centre crop: softmax of the logits. Ten crops (paper §4.1: the four corners and the centre of the
stored image, and their mirrors): the softmax of each crop's logits, averaged over the ten.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from alexnet_ray import storage
from alexnet_ray.checkpoint import CHECKPOINT_DIR, WEIGHTS_FILE
from alexnet_ray.preprocess import average_crops, to_model_input


class DatasetMismatchError(ValueError):
    """A dataset that does not fit the model (other classes, too small a stored size)."""


def resolve_checkpoint(path: str | os.PathLike) -> Path | str:
    """A checkpoint directory or file as given; a run directory resolves to its latest checkpoint.
    Local paths come back as Path, URIs as str."""
    if storage.is_uri(path):
        if storage.is_dir(path) and not storage.exists(storage.join(path, WEIGHTS_FILE)):
            names = sorted(i.base_name for i in storage.list_dir(path) if CHECKPOINT_DIR.fullmatch(i.base_name)
                           and storage.exists(storage.join(path, i.base_name, WEIGHTS_FILE)))
            if names:
                return storage.join(path, names[-1])
        return str(path)
    path = Path(path)
    if path.is_dir() and not (path / WEIGHTS_FILE).exists():
        candidates = sorted(p for p in path.glob("checkpoint_epoch_*") if (p / WEIGHTS_FILE).exists())
        if candidates:
            return candidates[-1]
    return path


def check_classes(model_classes: Sequence[str], dataset_classes: Sequence[str], dataset: Any) -> None:
    """DatasetMismatchError naming the first difference unless the class lists are identical."""
    model_classes, dataset_classes = list(model_classes), list(dataset_classes)
    if model_classes == dataset_classes:
        return
    if len(model_classes) != len(dataset_classes):
        detail = f"the model has {len(model_classes)} classes, the dataset {len(dataset_classes)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(model_classes, dataset_classes)) if a != b)
        detail = f"class {i} is {model_classes[i]!r} in the model but {dataset_classes[i]!r} in the dataset"
    raise DatasetMismatchError(f"classes of dataset {dataset} do not match the checkpoint's: {detail}")


def class_probabilities(model: torch.nn.Module, images: torch.Tensor, preprocessing: dict, device,
                        ten_crop: bool) -> torch.Tensor:
    """uint8 (N, H, W, 3) centre crops or (N, 10, H, W, 3) ten crops -> probabilities (N, C), float32."""
    images = torch.as_tensor(images)
    x = to_model_input(images, None, preprocessing["mean"], preprocessing["std"], device)
    with torch.no_grad():
        logits = model(x).float()
    if ten_crop:
        return average_crops(logits.view(images.shape[0], images.shape[1], -1))
    return F.softmax(logits, dim=-1)


def top_k(probabilities: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Indices of the k most probable classes (k capped at the class count), most probable first."""
    return probabilities.topk(min(k, probabilities.shape[-1]), dim=-1).indices
