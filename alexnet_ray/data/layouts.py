"""Finding the images of a source tree: ImageNet (train/<wnid>/, flat val/ + labels) or folder-per-class."""

from __future__ import annotations

import csv
import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from alexnet_ray import storage
from alexnet_ray.data.images import IMAGE_EXTENSIONS

LAYOUTS = ("auto", "imagenet", "folder")


@dataclass(frozen=True)
class SourceImage:
    path: str
    label: int  # -1: no label found (reported as skipped)
    class_name: str


def _tree(folder: str) -> tuple[list[str], dict[str, list[str]]]:
    """One listing of `folder` (a local path or URI, recursive: one paginated listing on an object
    store): its visible subfolders' names and, per subfolder, the visible files directly in it.
    Files directly in `folder` are listed under ""."""
    root = storage.resolve(folder)[1].rstrip("/")
    dirs: set[str] = set()
    files: dict[str, list[str]] = {}
    for info in storage.list_dir(folder, recursive=True):
        parts = info.path[len(root) + 1:].split("/")
        if any(part.startswith(".") for part in parts) or len(parts) > 2:
            continue
        if info.type == pafs.FileType.Directory and len(parts) == 1:
            dirs.add(parts[0])
        elif info.type == pafs.FileType.File:
            if len(parts) == 2:
                dirs.add(parts[0])  # object stores have no folder entries, only keys
            files.setdefault(parts[0] if len(parts) == 2 else "", []).append(storage.join(folder, *parts))
    return sorted(dirs), {name: sorted(paths) for name, paths in files.items()}


def detect_layout(src: str) -> str:
    """'imagenet' when val/ holds images directly, otherwise 'folder'."""
    _, files = _tree(storage.join(src, "val"))
    if any(posixpath.splitext(p)[1].lower() in IMAGE_EXTENSIONS for p in files.get("", [])):
        return "imagenet"
    return "folder"


def read_val_labels(path: str | Path) -> dict[str, str]:
    """File stem -> wnid, from Kaggle's LOC_val_solution.csv or lines of `filename wnid`."""
    if not storage.is_file(path):
        raise ValueError(f"--val-labels {path} does not exist")
    text = storage.read_text(path)
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


def _stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


def _folder_split(folder: str, class_index: dict[str, int]) -> list[SourceImage]:
    dirs, files = _tree(folder)
    images = []
    for name in dirs:
        if name not in class_index:
            raise ValueError(f"{storage.join(folder, name)}: class {name!r} is not among train/'s classes")
        images += [SourceImage(path, class_index[name], name) for path in files.get(name, [])]
    return images


def find_images(
    src: str | Path, layout: str = "auto", val_labels: str | Path | None = None
) -> tuple[list[str], dict[str, list[SourceImage]]]:
    """Classes (sorted train/ folder names; index = label) and every file found, per split.
    `src` is a local path or a URI. ValueError, before any work, when train/ is missing, has no
    class folders, or has a class folder without files (a class may have no validation images)."""
    src = storage.absolute(src)
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose one of {', '.join(LAYOUTS)}")
    train = storage.join(src, "train")
    if not storage.is_dir(train):
        raise ValueError(f"{src}: no train/ folder (expected train/<class>/<image>)")
    classes, train_files = _tree(train)
    if not classes:
        raise ValueError(f"{train}: no class folders (expected train/<class>/<image>)")
    empty = [name for name in classes if not train_files.get(name)]
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise ValueError(f"{storage.join(train, empty[0])}: class folder without training images{more}")
    class_index = {name: i for i, name in enumerate(classes)}
    if layout == "auto":
        layout = detect_layout(src)
    splits = {"train": [SourceImage(p, class_index[c], c) for c in classes for p in train_files[c]]}
    val = storage.join(src, "val")
    if layout == "folder":
        if val_labels is not None:
            raise ValueError("--val-labels applies to the imagenet layout only")
        if storage.is_dir(val):
            splits["val"] = _folder_split(val, class_index)
        return classes, splits
    if not storage.is_dir(val):
        return classes, splits
    if val_labels is None:
        raise ValueError(f"{val} is a flat ImageNet val/ folder: pass --val-labels")
    wnids = read_val_labels(val_labels)
    unknown = sorted(set(wnids.values()) - set(class_index))
    if unknown:
        raise ValueError(f"--val-labels {val_labels}: classes {unknown[:5]} are not in train/")
    splits["val"] = [
        SourceImage(p, class_index.get(wnids.get(_stem(p), ""), -1), wnids.get(_stem(p), ""))
        for p in _tree(val)[1].get("", [])
    ]
    return classes, splits
