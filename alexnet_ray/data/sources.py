"""What every source format lists (SourceImage, Listing), how its splits are named and chosen, and
how a shard task reads its images: whole files, byte ranges of tars, or rows of Parquet files."""

from __future__ import annotations

import collections
import posixpath
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

from alexnet_ray import storage
from alexnet_ray.data.images import BadImageError
from alexnet_ray.data.tars import RangeReader

VAL_SPLITS = ("val", "validation", "test")  # the names a validation split goes by, in this order
NO_VAL = "none"  # --val-split none: prepare train alone, on purpose
SPLIT_WORD = re.compile(r"(?:^|[-_.])(train|val|validation|test)(?:[-_.]|$)")
PREFETCH = 8  # reads in flight per shard task: an object store's latency, not its bandwidth, is the limit


@dataclass(frozen=True)
class SourceImage:
    """One image of a source. `name` (class/file) is what the shard stores as its path: the same
    whichever format held the image, so the same images prepare to the same shards. `ref` says how
    to read it: () the file at `location`; ("range", file, offset, size) bytes of a tar;
    ("row", file, row_group, row, column) a Parquet row. `unit` groups images read together
    (a Parquet row group); "" for images read one by one."""

    location: str
    label: int  # -1: no label found (reported as skipped)
    class_name: str
    name: str
    ref: tuple = ()
    unit: str = ""
    problem: str = ""  # why it has no label (label -1), when the labels' file is not the reason


@dataclass
class Listing:
    format: str
    classes: list[str]
    splits: dict[str, list[SourceImage]]  # "train", and "val" when the source has one
    labels_from: str = ""  # where val labels came from, for "no label in ..." reasons
    notes: list[str] = field(default_factory=list)


def image_name(class_name: str, file_name: str) -> str:
    return f"{class_name}/{posixpath.basename(file_name)}"


def relative_files(src: str, suffix: str) -> list[tuple[str, str]]:
    """(location, path relative to src) of the visible files under `src` ending with `suffix`."""
    root = storage.resolve(src)[1].rstrip("/")
    found = []
    for info in storage.list_dir(src, recursive=True):
        relative = info.path[len(root) + 1:]
        if info.is_file and relative.lower().endswith(suffix) and not any(p.startswith(".") for p in relative.split("/")):
            found.append((storage.join(src, *relative.split("/")), relative))
    return found


def files_by_split(src: str, files: list[tuple[str, str]], kind: str) -> dict[str, list[str]]:
    """split -> its files, from a split word in each file's name or folders; ValueError naming a
    file with none, or when there is no train split."""
    splits: dict[str, list[str]] = {}
    for location, relative in files:
        split = split_of(relative)
        if split is None:
            raise ValueError(f"{location}: no split (train, val, validation or test) in its name or folder")
        splits.setdefault(split, []).append(location)
    if "train" not in splits:
        raise ValueError(f"{src}: no train split among its {kind} (found {', '.join(sorted(splits))})")
    return {split: sorted(locations) for split, locations in splits.items()}


def split_of(relative: str) -> str | None:
    """The split a file belongs to, from a split word in its name, else in its folders' names:
    data/train-00000-of-00004.parquet and validation/0000.tar -> train, validation."""
    for part in reversed(relative.lower().split("/")):
        match = SPLIT_WORD.search(part)
        if match:
            return match.group(1)
    return None


def choose_val_split(src: str, present: list[str], labelled: list[str], requested: str | None) -> str | None:
    """The split to prepare as val: `requested` (None: the one labelled val, validation or test;
    NO_VAL: none). ValueError before any work when there is none, or several to choose from."""
    if requested == NO_VAL:
        return None
    if requested is not None:
        if requested not in present:
            raise ValueError(f"--val-split {requested}: {src} has no such split (it has {', '.join(present)})")
        if requested not in labelled:
            raise ValueError(f"--val-split {requested}: the {requested} split of {src} has no labels")
        return requested
    candidates = [name for name in VAL_SPLITS if name in labelled]
    if len(candidates) > 1:
        raise ValueError(f"{src} has several validation splits ({', '.join(candidates)}): "
                         "choose one with --val-split NAME")
    if not candidates:
        unlabelled = [name for name in VAL_SPLITS if name in present]
        what = f" (its {', '.join(unlabelled)} split has no labels)" if unlabelled else ""
        raise ValueError(f"{src}: no validation split: no labelled val, validation or test{what}; "
                         "pass --val-split none to prepare train alone")
    return candidates[0]


def map_tasks(function: Callable, calls: list[tuple], use_ray: bool) -> list:
    """function(*call) for each call, in order: one Ray task each (the index of one tar or one
    Parquet file), or here. A task's ValueError comes back as a plain ValueError."""
    if not use_ray or not calls:
        return [function(*call) for call in calls]
    import ray

    from alexnet_ray.storage_retries import carrying_budget

    task = ray.remote(num_cpus=1, max_retries=3)(carrying_budget(function))
    try:
        return ray.get([task.remote(*call) for call in calls])
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, ValueError):
            raise ValueError(str(error.cause)) from None
        raise


class _Ranges(RangeReader):
    """A RangeReader shared by prefetch threads (pyarrow's read_at and os.pread are thread-safe)."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()

    def _file(self, location: str):
        with self._lock:
            return super()._file(location)


def _parquet_rows(images: list[tuple]) -> dict[tuple, bytes | None]:
    """The image bytes of the Parquet rows among `images`, each row group read once (its image
    column only)."""
    import pyarrow.parquet as pq

    wanted: dict[tuple, set[int]] = collections.defaultdict(set)
    for ref, *_ in images:
        if ref and ref[0] == "row":
            wanted[(ref[1], ref[2], ref[4])].add(ref[3])
    found: dict[tuple, bytes | None] = {}
    for (file, group, column), rows in sorted(wanted.items()):
        with storage.open_input(file) as source:
            table = pq.ParquetFile(source).read_row_group(group, columns=[f"{column}.bytes"], use_threads=False)
        values = table.column(column).combine_chunks().field("bytes")
        for row in rows:
            found[(file, group, row, column)] = values[row].as_py()
    return found


def read_images(images: list[tuple]) -> Iterator[tuple[tuple, bytes | Exception]]:
    """(image, its bytes or the error reading them) for each planned image (ref, label, class
    name, name, location), in order; files and ranges are read PREFETCH at a time."""
    rows = _parquet_rows(images)
    ranges = _Ranges()

    def read(image: tuple) -> bytes | Exception:
        ref, location = image[0], image[4]
        try:
            if not ref:
                return storage.read_bytes(location)
            if ref[0] == "range":
                return ranges.read(ref[1], ref[2], ref[3])
            data = rows[(ref[1], ref[2], ref[3], ref[4])]
            return data if data is not None else BadImageError("no image bytes in the Parquet row")
        except OSError as error:
            return error

    try:
        with ThreadPoolExecutor(PREFETCH) as pool:
            pending: collections.deque = collections.deque()
            for image in images:
                pending.append((image, pool.submit(read, image)))
                if len(pending) > PREFETCH:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
    finally:
        ranges.close()
