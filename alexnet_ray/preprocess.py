"""The one step that turns a loader batch into model input, on the device: uint8 NHWC -> float NCHW,
shared by training, evaluation and prediction.

x = (pixels / 255 + lighting - mean) / std, with mean/std/lighting on the [0,1] RGB scale (the
manifest's statistics). Doing it here keeps the bytes crossing Ray and the host-device link at
one per pixel. Ten-crop batches come out with the crops of one image adjacent; `average_crops`
turns their logits back into one prediction per image.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def as_tensor(array) -> torch.Tensor:
    # Loader batches are read-only views of Ray's object store; nothing here writes to them.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(array)


def to_model_input(
    images_uint8_nhwc: torch.Tensor | np.ndarray,
    lighting: torch.Tensor | np.ndarray | None,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    device: torch.device | str,
    channels_last: bool = False,
) -> torch.Tensor:
    """(N,H,W,3) uint8 -> (N,3,H,W) float32. Ten-crop batches (N,10,H,W,3) come back as
    (N*10,3,H,W), crops of one image adjacent; their lighting, if given, is (N,3). Accepts the
    loaders' numpy arrays (read-only is fine) or tensors."""
    images = as_tensor(images_uint8_nhwc)
    if images.dtype != torch.uint8 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (..., H, W, 3), got {images.dtype} {tuple(images.shape)}")
    crops = images.shape[1] if images.dim() == 5 else 1
    images = images.reshape(-1, *images.shape[-3:]).to(device, non_blocking=True)
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if lighting is not None:
        offsets = as_tensor(lighting).float().to(device, non_blocking=True)
        x = x + offsets.repeat_interleave(crops, dim=0)[:, :, None, None]
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device)[None, :, None, None]
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device)[None, :, None, None]
    x = (x - mean_t) / std_t
    if channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def average_crops(logits: torch.Tensor) -> torch.Tensor:
    """(N, crops, C) logits -> (N, C): the mean over crops of each crop's softmax."""
    return F.softmax(logits.float(), dim=-1).mean(dim=1)
