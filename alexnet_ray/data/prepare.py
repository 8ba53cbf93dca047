"""The prepare job: a source tree -> Parquet shards of size x size JPEGs plus manifest.json.

Decoding and resizing run as Ray Data tasks (every CPU of the cluster; SRC must be readable from
every node). The driver streams the results, in order, into shards, so shards are deterministic.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alexnet_ray.data.images import DEFAULT_MAX_PIXELS, BadImageError, convert_image, decode_jpeg, encode_jpeg
from alexnet_ray.data.layouts import SourceImage, find_images
from alexnet_ray.data.manifest import MANIFEST_NAME, Manifest

SHARD_SCHEMA = pa.schema(
    [("jpeg", pa.binary()), ("label", pa.int64()), ("class_name", pa.string()), ("path", pa.string())]
)
ROW_GROUP_ROWS = 128  # the unit the training loader shuffles and reads
TRAIN_ORDER_SEED = 0  # train rows are stored in a seeded random order, so row groups mix classes
IMAGES_PER_TASK = 32


def _convert_batch(batch: dict, size: int, max_pixels: int) -> dict:
    paths = batch["path"]
    n = len(paths)
    jpegs, errors = [], []
    sums, outers = np.zeros((n, 3)), np.zeros((n, 9))
    for i, path in enumerate(paths):
        try:
            with open(path, "rb") as file:
                data = file.read()
            jpeg = encode_jpeg(convert_image(data, size, max_pixels))
            # Statistics of what training will see: the stored JPEG, decoded.
            pixels = decode_jpeg(jpeg).reshape(-1, 3).astype(np.float64) / 255.0
            sums[i] = pixels.sum(axis=0)
            outers[i] = (pixels.T @ pixels).ravel()
            jpegs.append(jpeg)
            errors.append("")
        except (BadImageError, OSError) as error:
            jpegs.append(b"")
            errors.append(str(error) or type(error).__name__)
    return {
        "order": batch["order"],
        "jpeg": np.array(jpegs, dtype=object),
        "error": np.array(errors, dtype=object),
        "sum": sums,
        "outer": outers,
    }


class _ShardWriter:
    """Rolls Parquet files of about `shard_bytes`, in row groups of ROW_GROUP_ROWS."""

    def __init__(self, out: Path, split: str, shard_bytes: int):
        self.out, self.split, self.shard_bytes = out, split, shard_bytes
        self.shards: list[dict] = []
        self._rows: list[tuple] = []
        self._writer: pq.ParquetWriter | None = None
        self._bytes = 0

    def add(self, jpeg: bytes, label: int, class_name: str, path: str) -> None:
        self._rows.append((jpeg, label, class_name, path))
        self._bytes += len(jpeg)
        if len(self._rows) == ROW_GROUP_ROWS or self._bytes >= self.shard_bytes:
            self._flush_group()
        if self._writer is not None and self._bytes >= self.shard_bytes:
            self._close_shard()

    def _flush_group(self) -> None:
        if not self._rows:
            return
        if self._writer is None:
            name = f"{self.split}-{len(self.shards):05d}.parquet"
            # JPEG bytes neither compress nor repeat: no codec, and no dictionary for them (a
            # dictionary page of the first few images, then plain, costs the reader a copy).
            self._writer = pq.ParquetWriter(self.out / name, SHARD_SCHEMA, compression="none",
                                            use_dictionary=["label", "class_name"])
            self.shards.append({"file": name, "rows": 0, "row_groups": []})
        columns = list(zip(*self._rows))
        table = pa.Table.from_arrays([pa.array(c, t.type) for c, t in zip(columns, SHARD_SCHEMA)],
                                     schema=SHARD_SCHEMA)
        self._writer.write_table(table, row_group_size=len(self._rows))
        self.shards[-1]["rows"] += len(self._rows)
        self.shards[-1]["row_groups"].append(len(self._rows))
        self._rows = []

    def _close_shard(self) -> None:
        self._flush_group()
        if self._writer is not None:
            self._writer.close()
        self._writer, self._bytes = None, 0

    def close(self) -> list[dict]:
        self._close_shard()
        return self.shards


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} already exists and is not empty; pass --overwrite to replace it")
        if not (out / MANIFEST_NAME).is_file():
            raise ValueError(f"{out} is not a prepared dataset (no {MANIFEST_NAME}); refusing to overwrite it")
        for stale in [*out.glob("*.parquet"), out / MANIFEST_NAME]:
            stale.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _statistics(count: int, sums: np.ndarray, outers: np.ndarray) -> tuple[list, list, dict]:
    if count == 0:
        return [0.0] * 3, [1.0] * 3, {"eigval": [0.0] * 3, "eigvec": np.eye(3).tolist()}
    mean = sums / count
    covariance = outers / count - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(covariance)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.clip(eigval[order], 0, None), eigvec[:, order]
    std = np.sqrt(np.clip(np.diag(covariance), 1e-12, None))
    return mean.tolist(), std.tolist(), {"eigval": eigval.tolist(), "eigvec": eigvec.tolist()}


def prepare_dataset(
    src: str | Path,
    out: str | Path,
    *,
    layout: str = "auto",
    val_labels: str | Path | None = None,
    size: int = 256,
    on_bad_image: str = "skip",
    shard_mb: float = 256,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Manifest:
    """Convert `src` (ImageNet or folder-per-class layout) into shards and a manifest in `out`."""
    import ray

    src, out = Path(src), Path(out)
    if on_bad_image not in ("skip", "fail"):
        raise ValueError(f"on_bad_image={on_bad_image!r}: choose 'skip' or 'fail'")
    if size < 8:
        raise ValueError(f"size={size}: must be at least 8 pixels")
    if shard_mb <= 0:
        raise ValueError(f"shard_mb={shard_mb}: must be positive")
    if not src.is_dir():
        raise ValueError(f"{src} is not a folder")
    classes, found = find_images(src, layout, val_labels)
    if "train" in found:
        permutation = np.random.default_rng(TRAIN_ORDER_SEED).permutation(len(found["train"]))
        found["train"] = [found["train"][i] for i in permutation]
    created = not out.exists()
    _prepare_out(out, overwrite)
    if not ray.is_initialized():
        ray.init()

    skipped: list[dict] = []
    splits: dict[str, dict] = {}
    sums, outers, pixel_count = np.zeros(3), np.zeros(9), 0
    started = time.monotonic()
    try:
        for split, images in found.items():
            writer = _ShardWriter(out, split, int(shard_mb * (1 << 20)))
            labelled: list[SourceImage] = []
            for image in images:
                if image.label < 0:
                    _bad(skipped, split, image.path, f"no label in {val_labels}", on_bad_image)
                else:
                    labelled.append(image)
            for order, row in _convert_stream(labelled, size, max_pixels):
                image = labelled[order]
                if row["error"]:
                    _bad(skipped, split, image.path, row["error"], on_bad_image)
                    continue
                writer.add(row["jpeg"], image.label, image.class_name, image.path)
                if split == "train":
                    sums += row["sum"]
                    outers += row["outer"]
                    pixel_count += size * size
            shards = writer.close()
            stored = sum(s["rows"] for s in shards)
            splits[split] = {"images": stored, "found": len(images), "shards": shards}
            if stored + sum(s["split"] == split for s in skipped) != len(images):
                raise RuntimeError(f"{split}: counts do not reconcile")  # a bug, not bad input
    except BaseException:
        for partial in out.glob("*.parquet"):
            partial.unlink()
        if created:  # leave no empty OUT behind either
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    mean, std, pca = _statistics(pixel_count, sums, outers.reshape(3, 3))
    manifest = Manifest(classes=classes, splits=splits, size=size, mean=mean, std=std, pca=pca,
                        skipped=skipped, source=str(src))
    manifest.save(out)
    manifest.root = out
    elapsed = time.monotonic() - started
    total = sum(s["images"] for s in splits.values())
    print(f"prepared {total} images ({len(skipped)} skipped) into {out} in {elapsed:.1f}s")
    return manifest


def _bad(skipped: list, split: str, path: str, reason: str, on_bad_image: str) -> None:
    if on_bad_image == "fail":
        raise ValueError(f"{path}: {reason} (--on-bad-image fail)")
    skipped.append({"path": path, "split": split, "reason": reason})


def _convert_stream(images: list[SourceImage], size: int, max_pixels: int):
    """Yield (index into images, converted row) in order."""
    import ray.data

    if not images:
        return
    items = [{"order": i, "path": image.path} for i, image in enumerate(images)]
    blocks = max(1, min(len(items) // IMAGES_PER_TASK, 100_000))
    dataset = ray.data.from_items(items, override_num_blocks=blocks)
    dataset.context.execution_options.preserve_order = True
    dataset = dataset.map_batches(
        _convert_batch, batch_size=IMAGES_PER_TASK, batch_format="numpy",
        fn_kwargs={"size": size, "max_pixels": max_pixels}, num_cpus=1,
    )
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=4):
        for i in range(len(batch["order"])):
            yield int(batch["order"][i]), {
                "jpeg": batch["jpeg"][i], "error": batch["error"][i],
                "sum": batch["sum"][i], "outer": batch["outer"][i],
            }
