"""OUT/manifest.json of a prepared dataset."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from alexnet_ray import storage

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class Manifest:
    """classes[label] = name; splits[split] = {"images", "found", "shards": [{"file", "rows",
    "row_groups": [rows, ...], "bytes": file size, "footer": [offset, length]}]} ("bytes" and
    "footer" since the loader reads footers by range; older manifests lack them); mean/std per RGB channel and pca {"eigval", "eigvec"} (columns
    are eigenvectors, eigenvalues descending) of the training split on [0,1]-scaled pixels."""

    classes: list[str]
    splits: dict[str, dict]
    size: int
    mean: list[float]
    std: list[float]
    pca: dict[str, list]
    skipped: list[dict] = field(default_factory=list)
    source: str = ""
    source_format: str = ""  # formats.FORMATS: what SRC held
    format_version: int = FORMAT_VERSION
    root: str | None = None  # the folder or URI the manifest was loaded from (not stored)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def eigval(self) -> np.ndarray:
        return np.asarray(self.pca["eigval"], dtype=np.float32)

    def eigvec(self) -> np.ndarray:
        return np.asarray(self.pca["eigvec"], dtype=np.float32)

    def shard_paths(self, split: str) -> list[str]:
        """The split's shard files: local paths or URIs, like the dataset's root."""
        if split not in self.splits:
            raise ValueError(f"{self.root}: no split {split!r} (has {sorted(self.splits)})")
        return [storage.join(self.root or ".", s["file"]) for s in self.splits[split]["shards"]]

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("root")
        return data

    def save(self, folder: str | Path) -> str:
        """Write folder/manifest.json whole (the last file of a prepared dataset)."""
        path = storage.join(folder, MANIFEST_NAME)
        storage.write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def load_manifest(path: str | Path) -> Manifest:
    """Load from a prepared dataset folder (local path or URI) or its manifest.json."""
    path = storage.absolute(path)
    file = path if storage.base_name(path) == MANIFEST_NAME else storage.join(path, MANIFEST_NAME)
    try:
        text = storage.read_text(file)
    except (FileNotFoundError, IsADirectoryError):
        raise ValueError(f"{path} is not a prepared dataset (no {MANIFEST_NAME}); run jobs/prepare.py") from None
    except OSError as error:
        raise ValueError(f"cannot read {file}: {str(error).splitlines()[0]}") from None
    try:
        manifest = Manifest(**json.loads(text))
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"{file}: unreadable manifest ({error})") from None
    if manifest.format_version != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {manifest.format_version}, expected {FORMAT_VERSION}")
    manifest.root = storage.parent(file)
    return manifest
