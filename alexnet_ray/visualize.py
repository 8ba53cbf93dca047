"""Pictures of a run, drawn with Pillow only: the paper's Figure 3 and the training curves.

conv1_kernels.png: the first layer's kernels, one labelled block per tower (tower t owns output
channels [t*C/2, (t+1)*C/2) of conv1, as the reference's grouped conv2 reads them). Each kernel is
shown as 0.5 + 0.5 * w / max|w| (its own scale, the same for R, G and B, so zero is mid-grey and
hues are kept).

Chroma of a kernel (a number for the paper's observation that one tower learns colour-agnostic
kernels and the other colour-specific ones): sum over pixels of |w_p - mean(w_p)| (the RGB vector
minus its grey part) divided by the sum over pixels of |w_p|. 0 for a grey kernel, 0.816 for a
single-channel kernel, 1 for a kernel whose channels sum to zero everywhere (opponent colours).

curves.png: training loss (and validation loss) and top-1/top-5 train/val error against epoch,
from the run's metrics/epoch_NNNN.json files.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from alexnet_ray import storage

# conv1_kernels.png layout (pixels)
KERNEL_SCALE = 5  # each kernel pixel drawn as a 5x5 block
KERNEL_GAP = 3
MARGIN = 14
HEADER_H = 30  # the image's title line
BLOCK_TITLE_H = 26  # each tower block's label line
MIN_CONTENT_W = 440
# curves.png
CURVES_SIZE = (1000, 440)

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
MUTED = (120, 120, 120)
GRID = (228, 228, 228)
BLUE, ORANGE, GREEN = (31, 119, 180), (230, 120, 20), (44, 160, 44)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


# --------------------------------------------------------------------------- kernels


def kernel_chroma(weights: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per-kernel chroma (see the module docstring) of conv1 weights (C, 3, k, k)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"conv1 weights must be (C, 3, k, k), got {w.shape}")
    rgb = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1, 3)  # (C, pixels, 3)
    colour = rgb - rgb.mean(axis=2, keepdims=True)
    total = np.linalg.norm(rgb, axis=2).sum(axis=1)
    return np.linalg.norm(colour, axis=2).sum(axis=1) / np.maximum(total, 1e-12)


def tower_chroma(weights: torch.Tensor | np.ndarray, towers: int = 2) -> list[float]:
    """Mean kernel chroma of each tower's share of conv1's kernels."""
    chroma = kernel_chroma(weights)
    return [float(part.mean()) for part in np.array_split(chroma, towers)]


def kernel_columns(per_tower: int) -> int:
    """Kernels per row in one tower's block: all in one row up to 16, else about 3 wide by 1 high."""
    return per_tower if per_tower <= 16 else math.ceil(math.sqrt(3 * per_tower))


def kernel_grid_size(per_tower: int, kernel_size: int, towers: int = 2) -> tuple[int, int]:
    """(width, height) of conv1_kernels.png."""
    cell = kernel_size * KERNEL_SCALE
    cols = kernel_columns(per_tower)
    rows = math.ceil(per_tower / cols)
    content_w = max(MIN_CONTENT_W, cols * (cell + KERNEL_GAP) - KERNEL_GAP)
    block_h = BLOCK_TITLE_H + rows * (cell + KERNEL_GAP) - KERNEL_GAP
    return 2 * MARGIN + content_w, MARGIN + HEADER_H + towers * (block_h + MARGIN)


def kernel_pixels(kernel: np.ndarray) -> Image.Image:
    """(3, k, k) weights -> RGB image, 0 at mid-grey, scaled by the kernel's max |w|."""
    scale = max(float(np.abs(kernel).max()), 1e-12)
    pixels = np.clip(np.rint(255 * (0.5 + 0.5 * kernel / scale)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels.transpose(1, 2, 0), "RGB")
    return image.resize((image.width * KERNEL_SCALE, image.height * KERNEL_SCALE), Image.NEAREST)


def draw_conv1_kernels(weights: torch.Tensor | np.ndarray, out: str | os.PathLike, *, towers: int = 2,
                       title: str = "conv1 kernels") -> Path:
    """Write the kernel grid PNG (one labelled block per tower); returns its path."""
    w = np.asarray(weights, dtype=np.float32)
    chroma = tower_chroma(w, towers)
    per_tower, kernel_size = w.shape[0] // towers, w.shape[-1]
    width, height = kernel_grid_size(per_tower, kernel_size, towers)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, MARGIN), title, fill=INK, font=_font(17))
    cell = kernel_size * KERNEL_SCALE
    cols = kernel_columns(per_tower)
    rows = math.ceil(per_tower / cols)
    y = MARGIN + HEADER_H
    order = np.argsort(chroma)  # the lower-chroma tower is the colour-agnostic one
    for t in range(towers):
        kind = ""
        if towers == 2 and abs(chroma[0] - chroma[1]) > 0.05:
            kind = "  - colour-agnostic" if t == order[0] else "  - colour-specific"
        label = f"tower {t}: kernels {t * per_tower}-{(t + 1) * per_tower - 1}, mean chroma {chroma[t]:.3f}{kind}"
        draw.text((MARGIN, y + 4), label, fill=INK, font=_font(14))
        top = y + BLOCK_TITLE_H
        block_w = cols * (cell + KERNEL_GAP) - KERNEL_GAP
        block_h = rows * (cell + KERNEL_GAP) - KERNEL_GAP
        draw.rectangle([MARGIN - 2, top - 2, MARGIN + block_w + 1, top + block_h + 1], fill=(128, 128, 128))
        for i in range(per_tower):
            r, c = divmod(i, cols)
            canvas.paste(kernel_pixels(w[t * per_tower + i]), (MARGIN + c * (cell + KERNEL_GAP), top + r * (cell + KERNEL_GAP)))
        y = top + block_h + MARGIN
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


# --------------------------------------------------------------------------- curves


def read_run_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The run's metrics/epoch_NNNN.json files (local or a URI), in epoch order ([] if there are none)."""
    folder = storage.join(run_dir, "metrics")
    files = [storage.join(folder, i.base_name) for i in storage.list_dir(folder)
             if i.base_name.startswith("epoch_") and i.base_name.endswith(".json")]
    records = []
    for file in files:
        try:
            records.append(json.loads(storage.read_text(file)))
        except json.JSONDecodeError as error:
            raise ValueError(f"metrics file {file} is not valid JSON: {error}") from None
    return sorted(records, key=lambda m: m.get("epoch", 0))


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((s * magnitude for s in (1, 2, 2.5, 5, 10) if s * magnitude >= raw), default=raw)
    first = math.floor(lo / step) * step
    ticks, value = [], first
    while value <= hi + step * 1e-6:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _dashed(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], colour, width: int,
            on: float = 7.0, off: float = 5.0) -> None:
    """A dashed polyline whose dash pattern runs on across vertices (dense points stay dashed)."""
    phase = 0.0  # distance into the current on+off period
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        done = 0.0
        while done < length:
            step = min(length - done, (on - phase) if phase < on else (on + off - phase))
            if phase < on:
                a, b = done / length, (done + step) / length
                draw.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                          fill=colour, width=width)
            done += step
            phase = (phase + step) % (on + off)


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, epochs: Sequence[float],
           series: list[tuple[str, Sequence[float], tuple, bool]], y_min: float | None = None, *,
           x_label: str = "epoch", lines: bool = True) -> None:
    """One line chart in `box` (left, top, right, bottom); series = (name, values, colour, dashed), with
    x = `epochs` (integer ticks), or any numbers when `x_label` is not "epoch" (then `lines=False`
    draws points only). The legend is one row under the title, so it never hides a line."""
    left, top, right, bottom = box
    font, small = _font(14), _font(12)
    draw.text((left, top), title, fill=INK, font=_font(15))
    legend_x = left + 52
    for name, _, colour, dashed in series:
        y = top + 30
        (_dashed if dashed else _solid)(draw, [(legend_x, y), (legend_x + 26, y)], colour, 2)
        draw.text((legend_x + 32, y), name, fill=INK, font=small, anchor="lm")
        legend_x += 44 + int(draw.textlength(name, font=small))
    plot = (left + 52, top + 48, right - 10, bottom - 40)
    values = [v for _, vs, _, _ in series for v in vs if v is not None and math.isfinite(v)]
    lo = min(values) if values else 0.0
    hi = max(values) if values else 1.0
    lo = y_min if y_min is not None else lo - 0.05 * (hi - lo or 1)
    hi = hi + 0.05 * (hi - lo or 1)
    ticks = [t for t in _nice_ticks(lo, hi) if lo - 1e-9 <= t <= hi + 1e-9]
    e_lo, e_hi = (min(epochs), max(epochs)) if epochs else (0, 1)
    if e_hi == e_lo:
        e_lo, e_hi = e_lo - 1, e_hi + 1

    def at(epoch: float, value: float) -> tuple[float, float]:
        x = plot[0] + (epoch - e_lo) / (e_hi - e_lo) * (plot[2] - plot[0])
        y = plot[3] - (value - lo) / (hi - lo) * (plot[3] - plot[1])
        return x, y

    for t in ticks:
        _, y = at(e_lo, t)
        draw.line([(plot[0], y), (plot[2], y)], fill=GRID)
        draw.text((plot[0] - 6, y), f"{t:g}", fill=MUTED, font=small, anchor="rm")
    if x_label == "epoch":
        x_ticks = [int(t) for t in _nice_ticks(e_lo, e_hi, 8) if t == int(t) and e_lo <= t <= e_hi] if epochs else []
        x_ticks = sorted(set(x_ticks) | ({min(epochs)} if epochs else set()))
    else:
        x_ticks = [t for t in _nice_ticks(e_lo, e_hi, 6) if e_lo - 1e-9 <= t <= e_hi + 1e-9]
    for e in x_ticks:
        x, _ = at(e, lo)
        draw.line([(x, plot[3]), (x, plot[3] + 4)], fill=INK)
        draw.text((x, plot[3] + 6), f"{e:g}", fill=MUTED, font=small, anchor="mt")
    draw.rectangle(plot, outline=INK)
    draw.text(((plot[0] + plot[2]) / 2, bottom - 14), x_label, fill=INK, font=font, anchor="mm")
    for name, vals, colour, dashed in series:
        points = [at(e, v) for e, v in zip(epochs, vals) if v is not None and math.isfinite(v)]
        if lines and len(points) > 1:
            (_dashed if dashed else _solid)(draw, points, colour, 2)
        for x, y in points if len(points) <= 30 or not lines else points[-1:]:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)


def _solid(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], colour, width: int) -> None:
    draw.line(points, fill=colour, width=width, joint="curve")


def draw_curves(metrics: list[dict[str, Any]], out: str | os.PathLike, *, title: str = "training curves") -> Path:
    """Write curves.png: loss (left) and top-1/top-5 error (right) against epoch."""
    if not metrics:
        raise ValueError("no metrics to plot: the run has no metrics/epoch_NNNN.json files")
    epochs = [int(m.get("epoch", i + 1)) for i, m in enumerate(metrics)]

    def column(key: str) -> list[float | None]:
        return [m.get(key) if isinstance(m.get(key), (int, float)) else None for m in metrics]

    width, height = CURVES_SIZE
    canvas = Image.new("RGB", CURVES_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, 10), title, fill=INK, font=_font(17))
    half = width // 2
    # train dashed, validation solid; top-1 blue, top-5 orange
    _panel(draw, (MARGIN, 40, half - MARGIN, height - 6), "loss (cross-entropy)", epochs,
           [("train", column("train_loss"), GREEN, True), ("val", column("val_loss"), GREEN, False)])
    _panel(draw, (half + MARGIN, 40, width - MARGIN, height - 6), "error rate", epochs,
           [("train top-1", column("train_top1_error"), BLUE, True), ("val top-1", column("val_top1_error"), BLUE, False),
            ("train top-5", column("train_top5_error"), ORANGE, True), ("val top-5", column("val_top5_error"), ORANGE, False)],
           y_min=0.0)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def draw_sweep(panels: list[tuple[str, bool, list[tuple[float, float, bool]]]], out: str | os.PathLike, *,
               title: str = "sweep") -> str:
    """Write sweep.png: one panel per swept field, each trial's final val top-1 error against its value.
    panels = (field, log scale, [(value, error, stopped early)]); a log-scale field is drawn against
    log10(value). Trials that ran every epoch in blue, those stopped early in orange. The drawing is
    the training curves' (`_panel`). `out` may be a URI. Returns where it was written."""
    if not panels:
        raise ValueError("no swept fields to plot")
    columns = min(2, len(panels))
    rows = math.ceil(len(panels) / columns)
    width, panel_h = CURVES_SIZE[0], CURVES_SIZE[1] - 40
    canvas = Image.new("RGB", (width, 40 + rows * panel_h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, 10), title, fill=INK, font=_font(17))
    cell_w = width // columns
    for i, (name, log_scale, points) in enumerate(panels):
        r, c = divmod(i, columns)
        box = (c * cell_w + MARGIN, 40 + r * panel_h, (c + 1) * cell_w - MARGIN, 40 + (r + 1) * panel_h - 6)
        xs = [math.log10(v) if log_scale else float(v) for v, _, _ in points]
        done = [e if not stopped else None for _, e, stopped in points]
        stopped = [e if stopped else None for _, e, stopped in points]
        _panel(draw, box, f"final val top-1 error vs {name}", xs,
               [("ran every epoch", done, BLUE, False), ("stopped early", stopped, ORANGE, False)],
               y_min=0.0, x_label=f"log10({name})" if log_scale else name, lines=False)
    with tempfile.TemporaryDirectory(prefix="alexnet-sweep-") as tmp:
        local = Path(tmp) / "sweep.png"
        canvas.save(local)
        if storage.is_uri(out):
            storage.write_bytes_atomic(str(out), local.read_bytes())
        else:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_bytes(local.read_bytes())
    return str(out)


# --------------------------------------------------------------------------- the job's library call


def run_dir_of(checkpoint: Path | str) -> Path | str:
    """The run directory holding a checkpoint_epoch_NNNN directory (its parent)."""
    if storage.is_uri(checkpoint):
        directory = checkpoint if storage.is_dir(checkpoint) else storage.parent(checkpoint)
        return storage.parent(directory) if storage.base_name(directory).startswith("checkpoint_") else directory
    directory = checkpoint if checkpoint.is_dir() else checkpoint.parent
    return directory.parent if directory.name.startswith("checkpoint_") else directory


def run_pictures(checkpoint: str, run_dir: str, out_dir: str | os.PathLike,
                 metrics: Sequence[dict[str, Any]] = ()) -> list[Path]:
    """conv1_kernels.png and curves.png of a run just finished, into the local `out_dir`: what a
    tracked run logs as artifacts (Trainer(pictures=run_pictures)). `metrics` are epochs the caller
    holds that the run's metrics files may not have yet (the last one is written as the run ends)."""
    from alexnet_ray.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    by_epoch = {m.get("epoch"): m for m in read_run_metrics(run_dir)}
    by_epoch.update({m.get("epoch"): m for m in metrics})
    name = storage.base_name(run_dir)
    out = Path(out_dir)
    return [draw_conv1_kernels(state["model"]["conv1.weight"], out / "conv1_kernels.png",
                               title=f"conv1 kernels - {name}, epoch {state['epoch']}"),
            draw_curves([by_epoch[e] for e in sorted(by_epoch)], out / "curves.png", title=f"training curves - {name}")]


def visualize(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Draw conv1_kernels.png and curves.png for a checkpoint (or a run directory: its latest).

    Returns {"conv1_kernels", "curves", "tower_chroma", "epochs"}."""
    from alexnet_ray.checkpoint import load_checkpoint
    from alexnet_ray.eval.scoring import resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path)
    weights = state["model"]["conv1.weight"]
    name = state["config"].get("run", {}).get("name") or storage.base_name(run_dir_of(path))
    run = run_dir if run_dir is not None else run_dir_of(path)
    metrics = read_run_metrics(run) or ([state["metrics"]] if state.get("metrics") else [])
    remote = storage.is_uri(out_dir)
    with tempfile.TemporaryDirectory(prefix="alexnet-pictures-") as tmp:
        local = Path(tmp) if remote else Path(out_dir)
        kernels = draw_conv1_kernels(weights, local / "conv1_kernels.png",
                                     title=f"conv1 kernels - {name}, epoch {state['epoch']}")
        curves = draw_curves(metrics, local / "curves.png", title=f"training curves - {name}")
        if remote:
            for picture in (kernels, curves):
                storage.write_bytes_atomic(storage.join(out_dir, picture.name), picture.read_bytes())
    where = (lambda p: storage.join(out_dir, p.name)) if remote else str
    return {"conv1_kernels": where(kernels), "curves": where(curves), "tower_chroma": tower_chroma(weights),
            "epochs": len(metrics)}
