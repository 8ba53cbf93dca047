"""Finding the images of a source tree: ImageNet (train/<wnid>/, flat val/ + labels) or folder-per-class,
its validation split named val/, validation/ or test/."""

from __future__ import annotations

import csv
import posixpath
from pathlib import Path

import pyarrow.fs as pafs

from alexnet_ray import storage
from alexnet_ray.data.images import IMAGE_EXTENSIONS
from alexnet_ray.data.sources import VAL_SPLITS, Listing, SourceImage, choose_val_split, image_name

LAYOUTS = ("auto", "imagenet", "folder")


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


def _folder_split(folder: str, dirs: list[str], files: dict[str, list[str]],
                  class_index: dict[str, int]) -> list[SourceImage]:
    images = []
    for name in dirs:
        if name not in class_index:
            raise ValueError(f"{storage.join(folder, name)}: class {name!r} is not among train/'s classes")
        images += [SourceImage(path, class_index[name], name, image_name(name, path)) for path in files.get(name, [])]
    return images


def _has_images(paths: list[str]) -> bool:
    return any(posixpath.splitext(p)[1].lower() in IMAGE_EXTENSIONS for p in paths)


def find_images(src: str | Path, layout: str = "auto", val_labels: str | Path | None = None,
                val_split: str | None = None) -> Listing:
    """Classes (sorted train/ folder names; index = label) and every file found, for train and
    the validation split (val/, validation/ or test/: `val_split`, see sources.choose_val_split),
    prepared as "val". `src` is a local path or a URI. ValueError, before any work, when train/ is
    missing, has no class folders, or has a class folder without files (a class may have no
    validation images), or when there is no validation split or several."""
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
    if layout == "folder" and val_labels is not None:
        raise ValueError("--val-labels applies to the imagenet layout only")
    class_index = {name: i for i, name in enumerate(classes)}
    splits = {"train": [SourceImage(p, class_index[c], c, image_name(c, p)) for c in classes for p in train_files[c]]}
    trees = {name: _tree(storage.join(src, name)) for name in VAL_SPLITS if storage.is_dir(storage.join(src, name))}

    def flat(name: str) -> bool:
        dirs, files = trees[name]
        return layout == "imagenet" or (layout == "auto" and _has_images(files.get("", [])))

    labelled = [name for name, (dirs, files) in trees.items()
                if (flat(name) and (name == "val" or val_labels is not None)) or (not flat(name) and dirs)]
    if val_labels is not None and not storage.is_file(val_labels):
        raise ValueError(f"--val-labels {val_labels} does not exist")
    chosen = choose_val_split(src, list(trees), labelled, val_split)
    listing = Listing("tree", classes, splits, labels_from=str(val_labels or ""))
    if chosen is None:
        return listing
    folder = storage.join(src, chosen)
    dirs, files = trees[chosen]
    if not flat(chosen):
        splits["val"] = _folder_split(folder, dirs, files, class_index)
        return listing
    if val_labels is None:
        raise ValueError(f"{folder} is a flat ImageNet val/ folder: pass --val-labels")
    splits["val"] = label_flat(files.get("", []), read_val_labels(val_labels), class_index, f"--val-labels {val_labels}")
    return listing


def label_flat(locations: list[str], wnids: dict[str, str], class_index: dict[str, int], named: str,
               refs: list[tuple] | None = None) -> list[SourceImage]:
    """Flat val images labelled by file stem -> wnid (-1 where the labels have none)."""
    unknown = sorted(set(wnids.values()) - set(class_index))
    if unknown:
        raise ValueError(f"{named}: classes {unknown[:5]} are not in train")
    images = []
    for i, location in enumerate(locations):
        wnid = wnids.get(_stem(location), "")
        images.append(SourceImage(location, class_index.get(wnid, -1), wnid, image_name(wnid, location),
                                  refs[i] if refs else ()))
    return images
