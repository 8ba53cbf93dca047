"""The embedded demo dataset: ten classes of coloured shapes on noisy backgrounds, as JPEGs.

Each class is a shape (disk, square, ring, bars, ...) in its own hue, drawn at a random size and
position with colour jitter and noise, on an image of random size and aspect ratio. A small
AlexNet (width 0.25, image_size 64 from 72-pixel stored images) learns it well above chance in a
few CPU epochs. Nothing is downloaded; the same seed writes the same files.
"""

from __future__ import annotations

import colorsys
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = ("disk", "square", "ring", "hbars", "vbars", "checker", "cross", "diagonal", "dots", "triangle")
MARKER = ".demo.json"
DEMO_NUM_CLASSES = 10  # the demo preset's model.num_classes; up to 10 x len(SHAPES) can be written


def _shape_mask(shape: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    short = min(h, w)
    radius = short * rng.uniform(0.25, 0.42)
    cy = rng.uniform(radius, h - radius) if h > 2 * radius else h / 2
    cx = rng.uniform(radius, w - radius) if w > 2 * radius else w / 2
    dy, dx = (y - cy) / radius, (x - cx) / radius
    inside = (np.abs(dy) <= 1) & (np.abs(dx) <= 1)
    period = short * rng.uniform(0.12, 0.2)
    if shape == "disk":
        return dy**2 + dx**2 <= 1
    if shape == "square":
        return inside
    if shape == "ring":
        r2 = dy**2 + dx**2
        return (r2 <= 1) & (r2 >= 0.45)
    if shape == "hbars":
        return inside & ((y // (period / 2)) % 2 == 0)
    if shape == "vbars":
        return inside & ((x // (period / 2)) % 2 == 0)
    if shape == "checker":
        return inside & (((y // period) + (x // period)) % 2 == 0)
    if shape == "cross":
        return inside & ((np.abs(dy) <= 0.3) | (np.abs(dx) <= 0.3))
    if shape == "diagonal":
        return inside & (((x + y) // (period / 1.5)) % 2 == 0)
    if shape == "dots":
        return inside & ((((y % period) - period / 2) ** 2 + ((x % period) - period / 2) ** 2) <= (period / 3.5) ** 2)
    if shape == "triangle":
        return (dy <= 1) & (np.abs(dx) <= (dy + 1) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _demo_image(label: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    aspect = rng.uniform(0.6, 1.6)
    short = int(rng.integers(72, 128))
    h, w = (short, int(short * aspect)) if aspect >= 1 else (int(short / aspect), short)
    background = rng.uniform(0.15, 0.85) + rng.normal(0, 0.08, (h, w, 1))
    image = np.repeat(background, 3, axis=2)
    hue = (label / num_classes + rng.normal(0, 0.015)) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)))
    mask = _shape_mask(SHAPES[label % len(SHAPES)], h, w, rng)
    image[mask] = colour
    image += rng.normal(0, 0.05, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def write_demo_dataset(
    root: str | Path,
    *,
    seed: int = 0,
    num_classes: int = DEMO_NUM_CLASSES,
    train_per_class: int = 40,
    val_per_class: int = 10,
) -> Path:
    """Write root/{train,val}/<class>/<n>.jpg (folder layout). Idempotent: an existing dataset
    written with the same arguments is left as it is. Returns root."""
    if not 2 <= num_classes <= 10 * len(SHAPES):
        raise ValueError(f"num_classes={num_classes}: must be between 2 and {10 * len(SHAPES)}")
    if train_per_class < 1 or val_per_class < 0:
        raise ValueError("train_per_class must be >= 1 and val_per_class >= 0")
    root = Path(root)
    params = {"seed": seed, "num_classes": num_classes, "train_per_class": train_per_class,
              "val_per_class": val_per_class, "version": 1}
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    if root.exists() and any(root.iterdir()) and not marker.is_file():
        raise ValueError(f"{root} exists and is not a demo dataset; choose an empty folder")
    for split in ("train", "val"):  # a demo written with other arguments
        shutil.rmtree(root / split, ignore_errors=True)
    rng = np.random.default_rng(seed)
    names = [f"{i:02d}_{SHAPES[i % len(SHAPES)]}" for i in range(num_classes)]
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                pixels = _demo_image(label, num_classes, rng)
                Image.fromarray(pixels).save(folder / f"{n:04d}.jpg", quality=int(rng.integers(80, 96)))
    marker.write_text(json.dumps(params))
    return root
