"""Pictures: kernel chroma on constructed kernels, conv1_kernels.png and curves.png from the tiny run
(size, not blank, both towers drawn), the job's printed statistic, and TensorBoard scalars."""

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_ray import visualize as viz
from alexnet_ray.checkpoint import load_checkpoint
from conftest import run_job



def test_chroma_of_constructed_kernels():
    pattern = torch.randn(11, 11, generator=torch.Generator().manual_seed(0))
    grey = pattern.expand(3, 11, 11)  # R = G = B everywhere
    red = torch.stack([pattern, torch.zeros_like(pattern), torch.zeros_like(pattern)])
    opponent = torch.stack([pattern, -pattern, torch.zeros_like(pattern)])  # channels sum to zero
    chroma = viz.kernel_chroma(torch.stack([grey, red, opponent]))
    np.testing.assert_allclose(chroma, [0.0, math.sqrt(2 / 3), 1.0], atol=1e-6)
    # tower 0 grey, tower 1 colour: the statistic separates them
    assert viz.tower_chroma(torch.stack([grey, grey, red, opponent])) == pytest.approx([0.0, (math.sqrt(2 / 3) + 1) / 2])
    with pytest.raises(ValueError, match="conv1 weights"):
        viz.kernel_chroma(torch.zeros(4, 1, 11, 11))


def test_kernel_grid_layout_sizes():
    # tiny: 12 kernels, 6 per tower in one row; paper: 48 per tower, 12 x 4
    assert viz.kernel_grid_size(6, 11) == (2 * 14 + 440, 14 + 30 + 2 * (26 + 55 + 14))
    assert viz.kernel_grid_size(48, 11) == (2 * 14 + 12 * 58 - 3, 14 + 30 + 2 * (26 + 4 * 58 - 3 + 14))


def blank(image: Image.Image) -> bool:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    return pixels.std() < 5


def test_pictures_of_the_tiny_run(tiny_run, tmp_path):
    result = viz.visualize(tiny_run.checkpoint.path, tmp_path / "pics")
    state = load_checkpoint(tiny_run.checkpoint.path)
    weights = state["model"]["conv1.weight"]
    assert weights.shape == (12, 3, 11, 11)

    kernels = Image.open(result["conv1_kernels"])
    assert kernels.size == viz.kernel_grid_size(6, 11) == (468, 234)
    assert not blank(kernels)
    # each tower's block holds its own kernels: the first kernel's pixels appear where drawn
    top = viz.MARGIN + viz.HEADER_H + viz.BLOCK_TITLE_H
    cell = 11 * viz.KERNEL_SCALE
    drawn = np.asarray(kernels)[top: top + cell: viz.KERNEL_SCALE, viz.MARGIN: viz.MARGIN + cell: viz.KERNEL_SCALE]
    np.testing.assert_array_equal(drawn, np.asarray(viz.kernel_pixels(weights[0].numpy()))[::viz.KERNEL_SCALE, ::viz.KERNEL_SCALE])
    second_top = top + cell + viz.MARGIN + viz.BLOCK_TITLE_H
    drawn = np.asarray(kernels)[second_top: second_top + cell: viz.KERNEL_SCALE, viz.MARGIN: viz.MARGIN + cell: viz.KERNEL_SCALE]
    np.testing.assert_array_equal(drawn, np.asarray(viz.kernel_pixels(weights[6].numpy()))[::viz.KERNEL_SCALE, ::viz.KERNEL_SCALE])

    curves = Image.open(result["curves"])
    assert curves.size == viz.CURVES_SIZE
    assert not blank(curves)
    colours = {tuple(c) for c in np.asarray(curves).reshape(-1, 3)}
    assert {viz.BLUE, viz.ORANGE, viz.GREEN} <= colours  # error, top-5 and loss lines drawn
    assert result["epochs"] == 2
    assert result["tower_chroma"] == pytest.approx(viz.tower_chroma(weights))


def test_curves_from_a_longer_run(tmp_path):
    metrics = [{"epoch": e, "train_loss": 7 / e, "val_loss": 7.5 / e, "train_top1_error": 1 - e / 100,
                "val_top1_error": 1 - e / 120, "train_top5_error": 0.8 - e / 150, "val_top5_error": 0.85 - e / 150}
               for e in range(1, 61)]
    out = viz.draw_curves(metrics, tmp_path / "c.png")
    image = np.asarray(Image.open(out))
    assert image.shape == (viz.CURVES_SIZE[1], viz.CURVES_SIZE[0], 3)
    # the loss panel (left half) falls from top-left to bottom-right: green near both ends
    green = np.argwhere((image == viz.GREEN).all(axis=-1))
    assert green[:, 1].min() < viz.CURVES_SIZE[0] // 4 and green[:, 1].max() > viz.CURVES_SIZE[0] // 3
    with pytest.raises(ValueError, match="no metrics"):
        viz.draw_curves([], tmp_path / "none.png")


def test_visualize_job(capsys, tiny_run, tmp_path):
    code, out, err = run_job(capsys, "visualize", tiny_run.path, "--out", str(tmp_path))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("tower 0: mean conv1 kernel chroma ") and lines[1].startswith("tower 1: ")
    summary = json.loads(lines[-1])
    assert Path(summary["conv1_kernels"]).is_file() and Path(summary["curves"]).is_file()
    code, out, err = run_job(capsys, "visualize", str(tmp_path / "nothing"), "--out", str(tmp_path))
    assert code == 2 and err.startswith("error: no checkpoint at")


def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Scalars from TensorBoard event files (TFRecord framing, Event protos from tensorboardX)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for file in sorted(folder.glob("events.out.tfevents.*")):
        data = file.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset: offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12: offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboardX", reason="TensorBoard events need the [tensorboard] extra (tensorboardX)")
    from alexnet_ray.train import tensorboard

    run_dir = str(tmp_path / "run")
    for epoch in (1, 2):
        assert tensorboard.log_epoch(run_dir, {"epoch": epoch, "train_loss": 2.0 / epoch, "val_top1_error": 0.5,
                                               "val_ten_crop": False, "lr": 0.01})
    tensorboard.close(run_dir)
    scalars = read_scalars(Path(run_dir) / "tensorboard")
    assert scalars["train/loss"] == {1: 2.0, 2: 1.0}
    assert scalars["val/top1_error"] == {1: 0.5, 2: 0.5}
    assert scalars["run/lr"][2] == pytest.approx(0.01)
    assert not any("ten_crop" in tag for tag in scalars)  # booleans are not scalars
