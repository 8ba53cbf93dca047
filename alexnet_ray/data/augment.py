"""Augmentation over a batch of stored JPEGs, in numpy, on Ray Data CPU workers.

Training (paper §4.1): random image_size crop, horizontal flip, PCA lighting. Every random number
comes from a counter-based hash of (seed, epoch, row id), so the same row gets the same
augmentation in the same epoch whichever worker, task or batch it lands in. Images stay uint8;
the lighting offset travels as float32 (N, 3) on the [0,1] scale and is added on the device
(alexnet_ray.preprocess.to_model_input) together with mean/std normalisation.
Evaluation: the centre crop, or the paper's ten crops (4 corners + centre, then their mirrors).
"""

from __future__ import annotations

import functools
import io

import numpy as np
import simplejpeg
from PIL import Image

LIGHTING_STD = 0.1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def row_uniforms(seed: int, epoch: int, row_ids: np.ndarray, count: int) -> np.ndarray:
    """(N, count) uniforms in [0, 1), a pure function of (seed, epoch, row id)."""
    key = _mix(np.array([seed & (2**64 - 1)], dtype=np.uint64))
    key = _mix(key ^ np.uint64(epoch & (2**64 - 1)))
    rows = _mix(np.asarray(row_ids, dtype=np.uint64) ^ key)
    with np.errstate(over="ignore"):
        streams = _mix(rows[:, None] + np.arange(1, count + 1, dtype=np.uint64)[None, :] * _GOLDEN)
    return (streams >> np.uint64(11)).astype(np.float64) * 2.0**-53


def train_params(seed: int, epoch: int, row_ids: np.ndarray, stored_size: int, image_size: int):
    """Per-row crop offsets (y, x), flip flags and lighting alphas ~ N(0, LIGHTING_STD)."""
    if not 0 < image_size <= stored_size:
        raise ValueError(f"image_size={image_size} must be between 1 and the stored size {stored_size}")
    u = row_uniforms(seed, epoch, row_ids, 7)
    span = stored_size - image_size + 1
    ys = np.minimum((u[:, 0] * span).astype(np.int64), span - 1)
    xs = np.minimum((u[:, 1] * span).astype(np.int64), span - 1)
    flips = u[:, 2] < 0.5
    # Box-Muller: two pairs of uniforms -> four normals, keep three.
    radius = np.sqrt(-2.0 * np.log1p(-u[:, 3:5]))
    angle = 2.0 * np.pi * u[:, 5:7]
    normals = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], axis=1)[:, :3]
    return ys, xs, flips, normals * LIGHTING_STD


def lighting_offsets(alphas: np.ndarray, eigval: np.ndarray, eigvec: np.ndarray) -> np.ndarray:
    """offset_i = eigvec @ (alpha_i * eigval): (N, 3) float32 RGB offsets on the [0,1] scale."""
    return ((alphas * np.asarray(eigval)[None, :]) @ np.asarray(eigvec).T).astype(np.float32)


_JPEG_MAGIC = b"\xff\xd8"


def _is_jpeg(data) -> bool:
    return bytes(data[:2]) == _JPEG_MAGIC


def stored_height(data) -> int:
    """Rows of a stored image, from its header alone."""
    if _is_jpeg(data):
        try:
            return simplejpeg.decode_jpeg_header(data)[0]
        except ValueError:
            pass
    with Image.open(io.BytesIO(data)) as image:
        return image.size[1]


class _Decoder:
    """Stored image bytes (bytes, memoryview or uint8 array) -> uint8 (H, W, 3), RGB or BGR.

    Decodes a batch's images one after another into one reused buffer: the array it returns
    is overwritten by the next call. JPEGs go straight from libjpeg-turbo into numpy
    (simplejpeg): the same pixels as PIL, whose Image object and copy out to numpy cost about as
    much again as the decode itself, as does a fresh 192 kB array per image (an mmap and its page
    faults). Anything else (PNG, a JPEG simplejpeg refuses) goes through PIL."""

    def __init__(self):
        self._buffer = np.empty(0, np.uint8)

    def __call__(self, data, colorspace: str = "RGB") -> np.ndarray:
        if _is_jpeg(data):
            try:  # the header is read only when the buffer is too small (or the data is bad)
                return simplejpeg.decode_jpeg(data, colorspace=colorspace, buffer=self._buffer)
            except ValueError:
                pass
            try:
                height, width, _, _ = simplejpeg.decode_jpeg_header(data)
                if self._buffer.size < height * width * 3:
                    self._buffer = np.empty(height * width * 3, np.uint8)
                    return simplejpeg.decode_jpeg(data, colorspace=colorspace, buffer=self._buffer)
            except ValueError:
                pass
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
        return rgb if colorspace == "RGB" else np.ascontiguousarray(rgb[..., ::-1])


def _crop_into(out: np.ndarray, rgb: np.ndarray, y: int, x: int) -> None:
    """out[...] = the (size, size) crop of an RGB image at (y, x)."""
    size = out.shape[0]
    out[...] = rgb[y:y + size, x:x + size]


@functools.lru_cache(maxsize=None)
def _row_word(row_bytes: int) -> np.dtype:
    """The widest unsigned integer that divides a row."""
    return np.dtype(f"u{next(w for w in (8, 4, 2, 1) if row_bytes % w == 0)}")


def _mirrored_crop_into(out: np.ndarray, bgr: np.ndarray, y: int, x: int) -> None:
    """out[...] = the (size, size) crop at (y, x), mirrored left-right, in RGB, from the BGR decode.

    A BGR row read backwards byte by byte is the mirrored row in RGB. Reversed as 8-byte words
    (then byte-swapped), numpy copies native integers, 84 per 224-pixel row; mirroring 3-byte
    pixels instead copies 224 opaque 3-byte elements one at a time, about half a decode's cost."""
    size = out.shape[0]
    row_bytes = 3 * size
    word = _row_word(row_bytes)
    rows = bgr[y:y + size, x:x + size].reshape(size, row_bytes).view(word)
    mirrored = out.reshape(size, row_bytes).view(word)
    np.copyto(mirrored, rows[:, ::-1])
    if word.itemsize > 1:
        mirrored.byteswap(inplace=True)


def augment_train(
    jpegs, row_ids: np.ndarray, *, seed: int, epoch: int, image_size: int,
    eigval: np.ndarray, eigvec: np.ndarray, pca_lighting: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode each JPEG once, crop and flip into one uint8 (N, s, s, 3) array; lighting (N, 3)."""
    n = len(jpegs)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    if n == 0:
        return images, np.zeros((0, 3), np.float32)
    ys, xs, flips, alphas = train_params(seed, epoch, row_ids, stored_height(jpegs[0]), image_size)
    decode = _Decoder()
    for i in range(n):
        if flips[i]:
            _mirrored_crop_into(images[i], decode(jpegs[i], "BGR"), int(ys[i]), int(xs[i]))
        else:
            _crop_into(images[i], decode(jpegs[i]), int(ys[i]), int(xs[i]))
    if pca_lighting:
        lighting = lighting_offsets(alphas, eigval, eigvec)
    else:
        lighting = np.zeros((n, 3), np.float32)
    return images, lighting


def ten_crop_offsets(stored_size: int, image_size: int) -> list[tuple[int, int]]:
    """(y, x) of the four corners and the centre; crops 5-9 are the mirrors of crops 0-4."""
    far, mid = stored_size - image_size, (stored_size - image_size) // 2
    return [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)]


def augment_eval(jpegs, *, image_size: int, ten_crop: bool = False) -> np.ndarray:
    """Centre crops (N, s, s, 3), or ten crops (N, 10, s, s, 3), uint8."""
    n = len(jpegs)
    shape = (n, 10, image_size, image_size, 3) if ten_crop else (n, image_size, image_size, 3)
    images = np.empty(shape, dtype=np.uint8)
    decode, decode_bgr = _Decoder(), _Decoder()
    for i in range(n):
        rgb = decode(jpegs[i])
        offsets = ten_crop_offsets(rgb.shape[0], image_size)
        if ten_crop:  # the mirrors from a second, BGR decode: cheaper than mirroring five RGB crops
            bgr = decode_bgr(jpegs[i], "BGR")
            for k, (y, x) in enumerate(offsets):
                _crop_into(images[i, k], rgb, y, x)
                _mirrored_crop_into(images[i, k + 5], bgr, y, x)
        else:
            _crop_into(images[i], rgb, *offsets[4])
    return images
