"""The prepare job: a source (formats.py: a folder tree, the ILSVRC2012 tarballs, Hugging Face Parquet,
WebDataset shards) -> Parquet shards of size x size JPEGs plus manifest.json.

SRC and OUT are local paths (NFS on a cluster) or URIs (s3://, gs://). The driver lists SRC once
(archives are indexed by tasks: each tar's members, each Parquet file's labels) and plans the
shards: which images, in which order, under which name, a pure function of the listing. Images
read one by one (files, tar members) are sorted by (label, name) and train is put in a seeded
random order, so row groups mix classes and the same images give the same shards whichever format
held them. Parquet rows are read a row group at a time, so there train's row groups are put in a
seeded random order and the rows shuffled within each shard. One Ray task per
shard reads its images from SRC (whole files, byte ranges of tars, row groups), converts them and
writes the shard straight to OUT, whole or not
at all (storage.write_bytes_atomic); it returns only counts and the pixel statistics' sufficient
statistics (exact integer sums of pixels and of their outer products), which the driver adds up.
The manifest is written last: a dataset without one is visibly incomplete.

Each shard carries, in its Parquet footer, a key of its planned inputs and its own results, so a
re-run after an interruption keeps every finished shard whose key still matches and writes the rest.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageChops

from alexnet_ray import ray_cluster, storage, storage_retries
from alexnet_ray.data.images import DEFAULT_MAX_PIXELS, JPEG_QUALITY, BadImageError, convert_image, encode_jpeg
from alexnet_ray.data.formats import list_source
from alexnet_ray.data.manifest import MANIFEST_NAME, Manifest
from alexnet_ray.data.shards import footer_range, read_footer
from alexnet_ray.data.sources import SourceImage, read_images

SHARD_SCHEMA = pa.schema(
    [("jpeg", pa.binary()), ("label", pa.int64()), ("class_name", pa.string()), ("path", pa.string())]
)
# The unit the training loader shuffles and reads: a global batch takes rows from 16 row groups
# (alexnet_ray.data.pipeline.WINDOW_GROUPS), and a replica reads whole row groups, so smaller groups
# mean smaller shuffle windows and tasks; 64 rows at 256 px are about 1.6 MB, one ranged read that
# object storage serves at full speed (docs/data-loading.md). Datasets prepared with 128 still load.
ROW_GROUP_ROWS = 64
TRAIN_ORDER_SEED = 0  # train rows are stored in a seeded random order, so row groups mix classes
# Planning happens before any image is converted, so a shard's image count comes from an estimate
# of the stored JPEG's size: PIL's headers and tables (about 600 bytes), then quality 90 photos
# average about 0.35 bytes per pixel.
JPEG_HEADER_BYTES, JPEG_BYTES_PER_PIXEL = 600, 0.35
# Shards are also the unit of parallel work: a split of fewer images than MIN_SHARDS shards of
# shard_mb is cut finer (down to one row group a shard), so a small set still uses every core.
MIN_SHARDS = 64
SHARD_FORMAT = 2  # 2: rows keyed and named by class/file, whichever format held them
FOOTER_KEY = b"alexnet_ray.shard"
SHARD_NAME = re.compile(r"[a-z]+-\d{5}\.parquet")
PROGRESS_INTERVAL_S = 10.0


@dataclass(frozen=True)
class ShardPlan:
    split: str
    file: str
    # (how to read it: SourceImage.ref, label, class name, name, location), in row order
    images: tuple[tuple, ...]
    key: str  # a digest of everything that decides the shard's bytes (not where the images are read from)
    row_group_rows: int = ROW_GROUP_ROWS


def plan_shards(found: dict[str, list[tuple]], size: int, shard_bytes: int, max_pixels: int,
                shuffle_within: frozenset = frozenset(), row_group_rows: int = ROW_GROUP_ROWS) -> list[ShardPlan]:
    """Cut each split's images, in order, into shards of the same image count (a function of the
    listing and the arguments only, never of the cluster); the rows of `shuffle_within` splits'
    shards in a seeded random order; whole row groups where they can be."""
    by_bytes = max(1, int(shard_bytes / (JPEG_HEADER_BYTES + size * size * JPEG_BYTES_PER_PIXEL)))
    if by_bytes >= row_group_rows:
        by_bytes -= by_bytes % row_group_rows  # whole row groups when nothing is skipped
    plans = []
    for split, images in found.items():
        small_set = -(-max(row_group_rows, -(-len(images) // MIN_SHARDS)) // row_group_rows) * row_group_rows
        per_shard = min(by_bytes, small_set)
        for n, start in enumerate(range(0, len(images), per_shard)):
            chunk = tuple(images[start: start + per_shard])
            if split in shuffle_within:
                order = np.random.default_rng([TRAIN_ORDER_SEED, n]).permutation(len(chunk))
                chunk = tuple(chunk[i] for i in order)
            recipe = json.dumps([SHARD_FORMAT, size, max_pixels, JPEG_QUALITY, row_group_rows,
                                 [image[1:4] for image in chunk]]).encode()
            plans.append(ShardPlan(split, f"{split}-{n:05d}.parquet", chunk, hashlib.sha256(recipe).hexdigest(),
                                   row_group_rows))
    return plans


def _read_footer(path: str) -> dict | None:
    """The results a finished shard recorded in its footer, or None when it is not one of ours."""
    try:
        with storage.open_input(path) as source:
            metadata = pq.read_metadata(source).metadata or {}
        return json.loads(metadata[FOOTER_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None


def write_shard(plan: ShardPlan, out: str, size: int, max_pixels: int, fail_on_bad: bool) -> dict:
    """Convert a shard's images and write it to out/plan.file; returns its counts, skipped files
    and statistics (or {"error": ...} in fail mode, with nothing written). A shard already there
    with the same key is kept."""
    target = storage.join(out, plan.file)
    done = _read_footer(target) if storage.exists(target) else None
    if done is not None and done.get("key") == plan.key:
        size = storage.file_size(target)
        footer = read_footer(target, size)
        return {**done, "bytes": size, "footer": [size - len(footer), len(footer)], "reused": True}
    rows: list[tuple] = []
    skipped: list[dict] = []
    sums, outers = np.zeros(3, np.int64), np.zeros(9, np.int64)
    for (_, label, class_name, name, path), data in read_images(list(plan.images)):
        try:
            if isinstance(data, Exception):
                raise data
            jpeg = encode_jpeg(convert_image(data, size, max_pixels))
        except (BadImageError, OSError) as error:
            reason = str(error) or type(error).__name__
            if fail_on_bad:
                return {"error": f"{path}: {reason} (--on-bad-image fail)"}
            skipped.append({"path": path, "split": plan.split, "reason": reason})
            continue
        if plan.split == "train":  # statistics of what training will see: the stored JPEG, decoded
            with Image.open(io.BytesIO(jpeg)) as stored:  # encode_jpeg stores RGB
                image_sums, image_outer = pixel_moments(stored)
            sums += image_sums
            outers += image_outer.ravel()
        rows.append((jpeg, label, class_name, name))
    step = plan.row_group_rows
    groups = [len(rows[i: i + step]) for i in range(0, len(rows), step)]
    result = {"key": plan.key, "file": plan.file, "split": plan.split, "rows": len(rows), "row_groups": groups,
              "skipped": skipped, "sum": sums.tolist(), "outer": outers.tolist(),
              "pixels": len(rows) * size * size if plan.split == "train" else 0}
    data = _parquet_bytes(rows, result, step)
    storage.write_bytes_atomic(target, data)
    return {**result, "bytes": len(data), "footer": list(footer_range(data)), "reused": False}


_LEVELS = np.arange(256, dtype=np.int64)


def pixel_moments(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Exact integer sums of an RGB image's 0..255 values (3) and of their products (3x3), from
    histograms: sum(x * y) = (sum(x^2) + sum(y^2) - sum((x - y)^2)) / 2 with |x - y| an 8-bit
    image. Five times cheaper than a float64 matrix product over the pixels, and exact."""
    histogram = np.asarray(image.histogram(), np.int64).reshape(3, 256)
    squares = histogram @ (_LEVELS * _LEVELS)
    outer = np.diag(squares)
    bands = image.split()
    for i, j in ((0, 1), (0, 2), (1, 2)):
        gaps = np.asarray(ImageChops.difference(bands[i], bands[j]).histogram(), np.int64) @ (_LEVELS * _LEVELS)
        outer[i, j] = outer[j, i] = (squares[i] + squares[j] - gaps) // 2
    return histogram @ _LEVELS, outer


def _parquet_bytes(rows: list[tuple], result: dict, row_group_rows: int) -> bytes:
    schema = SHARD_SCHEMA.with_metadata({FOOTER_KEY: json.dumps(result, sort_keys=True)})
    buffer = io.BytesIO()
    # JPEG bytes neither compress nor repeat: no codec, and no dictionary for them (a dictionary
    # page of the first few images, then plain, costs the reader a copy). Statistics only for the
    # label: min/max JPEGs and paths would only fatten the footer every loader reads.
    with pq.ParquetWriter(buffer, schema, compression="none", use_dictionary=["label", "class_name"],
                          write_statistics=["label"]) as writer:
        for start in range(0, len(rows), row_group_rows):
            columns = list(zip(*rows[start: start + row_group_rows]))
            table = pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(columns, SHARD_SCHEMA)], schema=schema)
            writer.write_table(table, row_group_size=len(columns[0]))
    return buffer.getvalue()


def _prepare_out(out: str, overwrite: bool) -> None:
    """Refuse a finished dataset unless `overwrite` (then remove it, manifest first) and anything
    that is not a prepared dataset; keep the shards of an interrupted run; drop half-written files."""
    try:
        storage.make_dirs(out)
    except OSError as error:
        raise ValueError(f"{out}: cannot write here ({str(error).splitlines()[0]})") from None
    names = [i.base_name for i in storage.list_dir(out)]
    finished = MANIFEST_NAME in names
    if finished and not overwrite:
        raise ValueError(f"{out} already holds a prepared dataset; pass --overwrite to replace it")
    foreign = [n for n in names if n != MANIFEST_NAME and not SHARD_NAME.fullmatch(n) and not storage.is_temporary(n)]
    if foreign:
        raise ValueError(f"{out} is not a prepared dataset (no {MANIFEST_NAME}, holds {foreign[0]}); "
                         "refusing to write into it")
    if finished:
        storage.delete_file(storage.join(out, MANIFEST_NAME))
    for name in names:
        if storage.is_temporary(name) or (finished and SHARD_NAME.fullmatch(name)):
            storage.delete_file(storage.join(out, name))


def _statistics(count: int, sums: np.ndarray, outers: np.ndarray) -> tuple[list, list, dict]:
    """Mean, std and the covariance's eigen-decomposition on [0, 1] pixels, from 0..255 sums."""
    if count == 0:
        return [0.0] * 3, [1.0] * 3, {"eigval": [0.0] * 3, "eigvec": np.eye(3).tolist()}
    mean = sums / (255.0 * count)
    covariance = outers / (255.0 * 255.0 * count) - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(covariance)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.clip(eigval[order], 0, None), eigvec[:, order]
    std = np.sqrt(np.clip(np.diag(covariance), 1e-12, None))
    return mean.tolist(), std.tolist(), {"eigval": eigval.tolist(), "eigvec": eigvec.tolist()}


class _Progress:
    """Images done, images/s and ETA, on stderr every PROGRESS_INTERVAL_S and at the end."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done = total, enabled, 0
        self.started = self.last = time.monotonic()

    def add(self, images: int) -> None:
        self.done += images
        now = time.monotonic()
        if not self.enabled or (now - self.last < PROGRESS_INTERVAL_S and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?"
        print(f"prepare: {self.done:,}/{self.total:,} images ({self.done / max(self.total, 1):.0%}), "
              f"{rate:,.0f} images/s, ETA {eta_text}", file=sys.stderr, flush=True)


def _run_shards(plans: list[ShardPlan], out: str, size: int, max_pixels: int, fail: bool, use_ray: bool,
                progress: _Progress, stats: dict):
    """Yield each shard's result as it finishes (Ray tasks, or in this process)."""
    if not use_ray:
        for plan in plans:
            result = write_shard(plan, out, size, max_pixels, fail)
            progress.add(len(plan.images))
            yield result
        return
    import ray

    task = ray.remote(num_cpus=1, max_retries=3)(storage_retries.carrying_budget(write_shard))  # a killed worker's shard is redone
    pending = {task.remote(plan, out, size, max_pixels, fail): plan for plan in plans}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=PROGRESS_INTERVAL_S)
            for ref in ready:
                result = ray.get(ref)
                stats["driver_bytes_received"] += len(pickle.dumps(result))
                progress.add(len(pending.pop(ref).images))
                yield result
            if not ready:
                progress.add(0)
    finally:
        for ref in pending:  # stopped early (fail mode, an error, Ctrl-C): stop the rest
            ray.cancel(ref)
        if pending:
            ray.wait(list(pending), num_returns=len(pending), timeout=60)


def order_images(split: str, images: list[SourceImage]) -> list[SourceImage]:
    """A split's images in stored order, a function of what was listed (see the module docstring)."""
    units: dict[str, list[SourceImage]] = {}
    for image in images:
        units.setdefault(image.unit, []).append(image)
    if "" not in units:  # read by row group (Parquet): keep each group's rows together
        groups = list(units.values())
        if split == "train":
            groups = [groups[i] for i in np.random.default_rng(TRAIN_ORDER_SEED).permutation(len(groups))]
        return [image for group in groups for image in group]
    ordered = sorted(images, key=lambda i: (i.label, i.name, i.location))
    if split == "train":
        ordered = [ordered[i] for i in np.random.default_rng(TRAIN_ORDER_SEED).permutation(len(ordered))]
    return ordered


def _connect_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray_cluster.connect(address, say=ray_cluster.say_on_stderr)


def prepare_dataset(
    src: str | Path,
    out: str | Path,
    *,
    source_format: str = "auto",
    layout: str = "auto",
    val_labels: str | Path | None = None,
    devkit: str | Path | None = None,
    class_names: str | Path | None = None,
    val_split: str | None = None,
    size: int = 256,
    on_bad_image: str = "skip",
    shard_mb: float = 64,
    row_group_rows: int = ROW_GROUP_ROWS,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    use_ray: bool = True,
    progress: bool = True,
    stats: dict | None = None,
    address: str | None = None,
) -> Manifest:
    """Convert `src` (a local path or a URI holding any format of formats.FORMATS, found by its
    contents unless `source_format` names one) into shards and a manifest in `out` (a local path
    or a URI). `val_split` names the split prepared as val (None: the one there is; "none": train
    alone). `use_ray=False` converts in this process; otherwise on the Ray cluster at `address`
    (else $RAY_ADDRESS), or on a local cluster of its own. `stats`, when given, receives {"seconds",
    "images", "shards", "reused_shards", "driver_bytes_received", "listing_seconds"}."""
    if on_bad_image not in ("skip", "fail"):
        raise ValueError(f"on_bad_image={on_bad_image!r}: choose 'skip' or 'fail'")
    if size < 8:
        raise ValueError(f"size={size}: must be at least 8 pixels")
    if shard_mb <= 0:
        raise ValueError(f"shard_mb={shard_mb}: must be positive")
    if row_group_rows < 1:
        raise ValueError(f"row_group_rows={row_group_rows}: must be at least 1")
    src, out = storage.absolute(src), storage.absolute(out)
    storage.resolve(out)  # a URI without a bucket fails here, before any work
    if not storage.is_dir(src):
        raise ValueError(f"{src} is not a folder")
    listed = time.monotonic()
    listing = list_source(src, source_format, layout=layout, val_labels=val_labels, devkit=devkit,
                          class_names=class_names, val_split=val_split, use_ray=use_ray,
                          before_tasks=lambda: _connect_ray(address))
    listing_seconds = time.monotonic() - listed
    classes, found = listing.classes, {split: order_images(split, images) for split, images in listing.splits.items()}
    if progress and listing.format != "tree":
        print(f"prepare: {listing.format}: listed {sum(map(len, found.values())):,} images in "
              f"{listing_seconds:.1f}s", file=sys.stderr, flush=True)
    skipped: list[dict] = []
    labelled: dict[str, list[tuple]] = {}
    for split, images in found.items():
        for image in images:
            if image.label < 0:
                _bad(skipped, split, image.location, image.problem or f"no label in {listing.labels_from}",
                     on_bad_image)
        labelled[split] = [(i.ref, i.label, i.class_name, i.name, i.location) for i in images if i.label >= 0]
    blocked = frozenset(split for split, images in found.items() if images and images[0].unit)
    plans = plan_shards(labelled, size, int(shard_mb * (1 << 20)), max_pixels, blocked & {"train"}, row_group_rows)
    created = not storage.exists(out)
    _prepare_out(out, overwrite)
    planned = {plan.file for plan in plans}
    for info in storage.list_dir(out):  # shards of an earlier plan that this one does not have
        if SHARD_NAME.fullmatch(info.base_name) and info.base_name not in planned:
            storage.delete_file(storage.join(out, info.base_name))
    if use_ray:
        _connect_ray(address)

    run_stats = stats if stats is not None else {}
    run_stats.update(driver_bytes_received=0, reused_shards=0, shards=len(plans), listing_seconds=listing_seconds)
    started = time.monotonic()
    results: dict[str, dict] = {}
    bar = _Progress(sum(len(p.images) for p in plans), progress)
    runner = _run_shards(plans, out, size, max_pixels, on_bad_image == "fail", use_ray, bar, run_stats)
    try:
        for result in runner:
            if "error" in result:
                runner.close()  # the other shards' tasks stop before their files are removed
                _remove_shards(out, planned)
                if created:  # leave no empty OUT behind either
                    storage.remove_empty_dir(out)
                raise ValueError(result["error"])
            results[result["file"]] = result
            run_stats["reused_shards"] += bool(result["reused"])
    finally:
        runner.close()

    splits: dict[str, dict] = {}
    sums, outers, pixel_count = [0] * 3, [0] * 9, 0  # exact integers
    for split, images in found.items():
        shard_results = [results[p.file] for p in plans if p.split == split]
        for r in shard_results:
            skipped.extend(r["skipped"])
            sums = [a + b for a, b in zip(sums, r["sum"])]
            outers = [a + b for a, b in zip(outers, r["outer"])]
            pixel_count += r["pixels"]
        stored = sum(r["rows"] for r in shard_results)
        splits[split] = {"images": stored, "found": len(images),
                         "shards": [{"file": r["file"], "rows": r["rows"], "row_groups": r["row_groups"],
                                     "bytes": r["bytes"], "footer": r["footer"]}
                                    for r in shard_results]}
        if stored + sum(s["split"] == split for s in skipped) != len(images):
            raise RuntimeError(f"{split}: counts do not reconcile")  # a bug, not bad input
    mean, std, pca = _statistics(pixel_count, np.array(sums, np.float64), np.array(outers, np.float64).reshape(3, 3))
    manifest = Manifest(classes=classes, splits=splits, size=size, mean=mean, std=std, pca=pca,
                        skipped=skipped, source=src, source_format=listing.format)
    manifest.save(out)
    manifest.root = out
    elapsed = time.monotonic() - started
    total = sum(s["images"] for s in splits.values())
    run_stats.update(seconds=elapsed, images=total)
    reused = f", {run_stats['reused_shards']} finished shard(s) kept" if run_stats["reused_shards"] else ""
    print(f"prepared {total} images ({len(skipped)} skipped{reused}) into {out} in {elapsed:.1f}s")
    return manifest


def _remove_shards(out: str, names: set[str]) -> None:
    for name in names:
        storage.delete_file(storage.join(out, name))


def _bad(skipped: list, split: str, path: str, reason: str, on_bad_image: str) -> None:
    if on_bad_image == "fail":
        raise ValueError(f"{path}: {reason} (--on-bad-image fail)")
    skipped.append({"path": path, "split": split, "reason": reason})
