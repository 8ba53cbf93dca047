"""Finding the images of a source tree: ImageNet (train/<wnid>/, flat val/ + labels) or folder-per-class."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from alexnet_ray.data.images import IMAGE_EXTENSIONS

LAYOUTS = ("auto", "imagenet", "folder")


@dataclass(frozen=True)
class SourceImage:
    path: str
    label: int  # -1: no label found (reported as skipped)
    class_name: str


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect_layout(src: Path) -> str:
    """'imagenet' when val/ holds images directly, otherwise 'folder'."""
    val = src / "val"
    if val.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in _visible_files(val)):
        return "imagenet"
    return "folder"


def read_val_labels(path: Path) -> dict[str, str]:
    """File stem -> wnid, from Kaggle's LOC_val_solution.csv or lines of `filename wnid`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--val-labels {path} does not exist")
    text = path.read_text()
    labels: dict[str, str] = {}
    if text.startswith("ImageId,"):
        for row in csv.DictReader(text.splitlines()):
            prediction = (row.get("PredictionString") or "").split()
            if not prediction:
                raise ValueError(f"{path}: row {row.get('ImageId')} has no PredictionString")
            labels[Path(row["ImageId"]).stem] = prediction[0]
    else:
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ValueError(f"{path}:{number}: expected 'filename wnid', got {line!r}")
            labels[Path(fields[0]).stem] = fields[1]
    if not labels:
        raise ValueError(f"--val-labels {path} holds no labels")
    return labels


def _folder_split(folder: Path, class_index: dict[str, int]) -> list[SourceImage]:
    images = []
    for class_dir in _class_dirs(folder):
        if class_dir.name not in class_index:
            raise ValueError(f"{class_dir}: class {class_dir.name!r} is not among train/'s classes")
        label = class_index[class_dir.name]
        images += [SourceImage(str(p), label, class_dir.name) for p in _visible_files(class_dir)]
    return images


def find_images(
    src: Path, layout: str = "auto", val_labels: str | Path | None = None
) -> tuple[list[str], dict[str, list[SourceImage]]]:
    """Classes (sorted train/ folder names; index = label) and every file found, per split."""
    src = Path(src)
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose one of {', '.join(LAYOUTS)}")
    train = src / "train"
    if not train.is_dir():
        raise ValueError(f"{src}: no train/ folder (expected train/<class>/<image>)")
    classes = [p.name for p in _class_dirs(train)]
    if not classes:
        raise ValueError(f"{train}: no class folders")
    class_index = {name: i for i, name in enumerate(classes)}
    if layout == "auto":
        layout = detect_layout(src)
    splits = {"train": _folder_split(train, class_index)}
    val = src / "val"
    if layout == "folder":
        if val_labels is not None:
            raise ValueError("--val-labels applies to the imagenet layout only")
        if val.is_dir():
            splits["val"] = _folder_split(val, class_index)
        return classes, splits
    if not val.is_dir():
        return classes, splits
    if val_labels is None:
        raise ValueError(f"{val} is a flat ImageNet val/ folder: pass --val-labels")
    wnids = read_val_labels(Path(val_labels))
    unknown = sorted(set(wnids.values()) - set(class_index))
    if unknown:
        raise ValueError(f"--val-labels {val_labels}: classes {unknown[:5]} are not in train/")
    splits["val"] = [
        SourceImage(str(p), class_index.get(wnids.get(p.stem, ""), -1), wnids.get(p.stem, ""))
        for p in _visible_files(val)
    ]
    return classes, splits
