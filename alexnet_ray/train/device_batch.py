"""The one step that turns a loader batch into model input, on the device: uint8 NHWC -> float NCHW.

x = (pixels / 255 + lighting - mean) / std, with mean/std/lighting on the [0,1] RGB scale (the
manifest's statistics). Doing it here keeps the bytes crossing Ray and the host-device link at
one per pixel.
"""

from __future__ import annotations

from typing import Sequence

import torch


def to_model_input(
    images_uint8_nhwc: torch.Tensor,
    lighting: torch.Tensor | None,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    device: torch.device | str,
    channels_last: bool = False,
) -> torch.Tensor:
    """(N,H,W,3) uint8 -> (N,3,H,W) float32. Ten-crop batches (N,10,H,W,3) come back as
    (N*10,3,H,W), crops of one image adjacent; their lighting, if given, is (N,3)."""
    images = torch.as_tensor(images_uint8_nhwc)
    if images.dtype != torch.uint8 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (..., H, W, 3), got {images.dtype} {tuple(images.shape)}")
    crops = images.shape[1] if images.dim() == 5 else 1
    images = images.reshape(-1, *images.shape[-3:]).to(device, non_blocking=True)
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if lighting is not None:
        offsets = torch.as_tensor(lighting, dtype=torch.float32).to(device, non_blocking=True)
        x = x + offsets.repeat_interleave(crops, dim=0)[:, :, None, None]
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device)[None, :, None, None]
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device)[None, :, None, None]
    x = (x - mean_t) / std_t
    if channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()
