"""Top-k predictions for image files, with exactly the preprocessing evaluation sees.

An image goes through the prepare step's conversion (short side resized to the stored size, centre
crop, stored as JPEG at the prepare job's quality), then evaluation's crop (`augment_eval`), then
the model's mean/std normalisation. So a photo predicted here gets the same probabilities as the
same photo evaluated after `jobs/prepare.py`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from alexnet_ray import storage
from alexnet_ray.data.augment import augment_eval
from alexnet_ray.data.images import BadImageError, convert_image, encode_jpeg
from alexnet_ray.eval.scoring import class_probabilities, resolve_checkpoint, top_k
from alexnet_ray.export import ExportError, exported_from_checkpoint, load_exported
from alexnet_ray.model import AlexNet


class UnreadableImageError(ValueError):
    """An image file that cannot be read or decoded; str() names the file and the reason."""


def load_inference_model(path: str | os.PathLike) -> AlexNet:
    """An exported model file, or a training checkpoint (file, directory or run directory), as an
    AlexNet in eval mode with `.classes` and `.preprocessing`. Local paths or URIs."""
    path = path if storage.is_uri(path) else Path(path)
    if not storage.exists(path):
        raise ExportError(f"no model at {path}: expected an exported model file or a checkpoint")
    if storage.is_file(path):
        try:
            return load_exported(path)
        except ExportError as error:
            if "is not an alexnet-ray export" not in str(error):
                raise  # an export file that is corrupt
            if not _is_checkpoint_file(path):
                raise ExportError(f"{path} is neither an exported model (jobs/export.py) nor an alexnet-ray "
                                  "checkpoint") from None
    from alexnet_ray.checkpoint import load_checkpoint

    checkpoint = resolve_checkpoint(path)
    return exported_from_checkpoint(load_checkpoint(checkpoint), str(checkpoint)).build_model()


def _is_checkpoint_file(path: Path | str) -> bool:
    import io

    from alexnet_ray.checkpoint import FORMAT

    data = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    return isinstance(data, dict) and data.get("format") == FORMAT


def prepare_image(data: bytes, preprocessing: dict, *, ten_crop: bool = False, name: str = "image") -> np.ndarray:
    """Image file bytes -> uint8 (s, s, 3), or (10, s, s, 3) with ten_crop."""
    try:
        stored = convert_image(data, int(preprocessing["stored_size"]))
    except BadImageError as error:
        raise UnreadableImageError(f"cannot read image {name}: {error}") from None
    return augment_eval([encode_jpeg(stored)], image_size=int(preprocessing["image_size"]), ten_crop=ten_crop)[0]


def predict_files(model: AlexNet, paths: Sequence[str | os.PathLike], *, k: int = 5, ten_crop: bool = False,
                  batch_size: int = 64) -> list[dict[str, Any]]:
    """For each path, {"image": path, "top5": [[class_name, probability], ...]} (k entries), or
    {"image": path, "error": message} when the file cannot be read as an image."""
    device = next(model.parameters()).device
    results: list[dict[str, Any]] = [{} for _ in paths]
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        images = torch.as_tensor(np.stack([crops for _, crops in pending]))
        probs = class_probabilities(model, images, model.preprocessing, device, ten_crop)
        best = top_k(probs, k)
        for row, (i, _) in enumerate(pending):
            results[i]["top5"] = [[model.classes[int(c)], float(probs[row, c])] for c in best[row]]
        pending.clear()

    for i, path in enumerate(paths):
        results[i]["image"] = str(path)
        try:
            data = storage.read_bytes(path)
            pending.append((i, prepare_image(data, model.preprocessing, ten_crop=ten_crop, name=str(path))))
        except (OSError, ValueError) as error:  # ValueError: UnreadableImageError, a URI without a bucket
            message = str(error) if isinstance(error, UnreadableImageError) else \
                f"cannot read image: {error}" if isinstance(error, ValueError) else \
                f"cannot read image {path}: {error.strerror or error}"
            results[i]["error"] = message
        if len(pending) >= batch_size:
            flush()
    flush()
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    """A readable table: per image, rank, probability and class name."""
    lines = []
    for result in results:
        lines.append(result["image"])
        if "error" in result:
            lines.append(f"  error: {result['error']}")
            continue
        for rank, (name, probability) in enumerate(result["top5"], start=1):
            lines.append(f"  {rank}. {probability:7.2%}  {name}")
    return "\n".join(lines)
