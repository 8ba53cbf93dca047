"""Ray Data pipelines over prepared shards: TrainLoader (shuffled, augmented, split per replica)
and EvalLoader (centre crop or ten crops, every image exactly once).

Training epoch plan, a pure function of (seed, epoch) and the manifest:
  1. permute the row groups (ILSVRC rows were stored in a random order by prepare), then permute
     rows inside windows of WINDOW_UNITS consecutive row groups: the epoch's global row order;
  2. replica r takes a contiguous slice of that order (sizes differ by at most one row), so it
     reads only about 1/replicas of the shards;
  3. each replica cuts its slice into `batches_per_epoch` batches (the same count on every
     replica, so data-parallel all-reduces never wait on a missing batch); when a replica's rows
     would leave its last batch empty, its last two batches share the rows instead.
Ray Data tasks each take a few whole batches, read the row groups they need, decode every JPEG
once and crop/flip/light it (alexnet_ray.data.augment); blocks come back in order
(preserve_order), so a fixed seed gives bit-identical batches. Only the replica's tower 0 iterates;
its partner receives the batch over the pair group. Batches are numpy views of Ray's object store
(read-only, no copy): hand them to alexnet_ray.preprocess.to_model_input.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from alexnet_ray.data.augment import augment_eval, augment_train
from alexnet_ray.data.manifest import Manifest, load_manifest
from alexnet_ray.data.shards import ShardIndex

if TYPE_CHECKING:
    import pyarrow as pa

WINDOW_UNITS = 4  # row groups whose rows are shuffled together
TASK_BYTES = 96 << 20  # target output of one Ray Data task (whole batches, at least one);
# at 224 px that is 4 batches of 128 = one window of rows, so each row group is read about once
TASK_ROWS = 512  # and at most this many rows (small images), so tasks spread over the CPUs


def split_evenly(total: int, parts: int) -> np.ndarray:
    """Sizes of `parts` contiguous slices of `total`, the first total % parts one larger."""
    sizes = np.full(parts, total // parts, dtype=np.int64)
    sizes[: total % parts] += 1
    return sizes


def replica_offsets(total: int, replicas: int) -> np.ndarray:
    """Where each replica's contiguous slice of `total` rows starts, then `total`: replica r owns
    rows [offsets[r], offsets[r + 1])."""
    return np.concatenate([[0], np.cumsum(split_evenly(total, replicas))])


def replica_batch_sizes(num_rows: int, batch_size: int, replicas: int) -> list[list[int]]:
    """Per replica, its batch sizes: the same number of non-empty batches on every replica."""
    if batch_size < 1 or replicas < 1:
        raise ValueError(f"batch_size={batch_size} and replicas={replicas} must be at least 1")
    if num_rows < replicas:
        raise ValueError(f"{num_rows} training images cannot feed replicas={replicas}")
    rows = split_evenly(num_rows, replicas)
    batches = -(-int(rows.max()) // batch_size)
    plan = []
    for n in rows:
        sizes = [batch_size] * (batches - 1) + [int(n) - batch_size * (batches - 1)]
        if sizes[-1] == 0:  # share the last two batches' rows
            together = sizes[-2]
            sizes[-2:] = [together - together // 2, together // 2]
        if min(sizes) < 1:
            raise ValueError(
                f"batch_size={batch_size} with replicas={replicas} and {num_rows} images leaves a "
                "replica an empty batch; choose another batch_size"
            )
        plan.append(sizes)
    return plan


def epoch_order(index: ShardIndex, seed: int, epoch: int) -> np.ndarray:
    """The epoch's global row order (a permutation of all row ids)."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    units = rng.permutation(index.num_units)
    pieces = [np.arange(index.unit_start[u], index.unit_start[u] + index.unit_rows[u]) for u in units]
    order = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    bounds = np.concatenate([[0], np.cumsum(index.unit_rows[units])])
    for w in range(0, len(units), WINDOW_UNITS):
        a, b = bounds[w], bounds[min(w + WINDOW_UNITS, len(units))]
        order[a:b] = order[a:b][rng.permutation(b - a)]
    return order


def batch_tasks(sizes: list[int], row_bytes: int) -> list[tuple[int, int]]:
    """Group consecutive batches into tasks of about TASK_BYTES: [(first batch, end batch)].

    The first task holds one batch and each next one twice as many rows, up to the limits: the
    step waits for one batch's decodes at the start of an epoch, not for a whole task's."""
    tasks, first, rows, cap = [], 0, 0, sizes[0] if sizes else 0
    for b, size in enumerate(sizes):
        if b > first and ((rows + size) * row_bytes > TASK_BYTES or rows + size > min(cap, TASK_ROWS)):
            tasks.append((first, b))
            first, rows, cap = b, 0, 2 * cap
        rows += size
    if sizes:
        tasks.append((first, len(sizes)))
    return tasks


def _task_items(row_ids: np.ndarray, sizes: list[int], row_bytes: int) -> list[dict]:
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    items = []
    for first, end in batch_tasks(sizes, row_bytes):
        batch_of_row = np.repeat(np.arange(first, end, dtype=np.int64), sizes[first:end])
        ids = row_ids[bounds[first]: bounds[end]]
        items.append({"ids": ids.astype(np.int64).tobytes(), "batch": batch_of_row.tobytes()})
    return items


def _to_table(columns: dict[str, np.ndarray]) -> "pa.Table":
    """Arrow table over the numpy arrays without copying them: each row's array becomes one
    fixed-size binary value (Ray's tensor extension type costs a copy per block)."""
    import pyarrow as pa

    arrays = {}
    for name, array in columns.items():
        array = np.ascontiguousarray(array)
        if array.ndim == 1:
            arrays[name] = pa.array(array)
        else:
            width = array.itemsize * int(np.prod(array.shape[1:]))
            arrays[name] = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(array),
                                                                [None, pa.py_buffer(array)])
    return pa.table(arrays)


def _from_column(column, dtype, shape: tuple) -> np.ndarray:
    """Inverse of _to_table for one column: a zero-copy numpy view (a copy if chunked)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if not pa.types.is_fixed_size_binary(column.type):
        return column.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    width = column.type.byte_width
    values = np.frombuffer(column.buffers()[1], dtype=np.uint8, count=len(column) * width,
                           offset=column.offset * width)
    return values.view(dtype).reshape(len(column), *shape)


def _train_task(batch: dict, *, index: ShardIndex, seed: int, epoch: int, image_size: int,
                eigval: np.ndarray, eigvec: np.ndarray, pca_lighting: bool) -> "pa.Table":
    ids = np.frombuffer(batch["ids"][0], dtype=np.int64)
    jpegs, labels = index.read(ids)
    images, lighting = augment_train(jpegs, ids, seed=seed, epoch=epoch, image_size=image_size,
                                     eigval=eigval, eigvec=eigvec, pca_lighting=pca_lighting)
    return _to_table({"images": images, "labels": labels, "lighting": lighting,
                      "batch": np.frombuffer(batch["batch"][0], dtype=np.int64)})


def _eval_task(batch: dict, *, index: ShardIndex, image_size: int, ten_crop: bool) -> "pa.Table":
    ids = np.frombuffer(batch["ids"][0], dtype=np.int64)
    jpegs, labels = index.read(ids)
    return _to_table({"images": augment_eval(jpegs, image_size=image_size, ten_crop=ten_crop),
                      "labels": labels, "batch": np.frombuffer(batch["batch"][0], dtype=np.int64)})


def _run(items: list[dict], task, fn_kwargs: dict, sizes: list[int], prefetch: int,
         columns: dict[str, tuple]) -> Iterator[dict]:
    """Run one Ray Data task per item, in order, and re-cut the output into the planned batches.
    `columns`: name -> (dtype, per-row shape) of the arrays handed out."""
    import ray.data

    if not items:
        return
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    context = dataset.context
    context.execution_options.preserve_order = True  # a fixed seed gives identical batches
    context.enable_progress_bars = False  # one dataset per epoch: no bars in training logs
    # Per-operator reservations split the budget between operators; with our one map operator
    # they held it to about one task at a time on 2 CPUs (tasks ran back to back on one worker).
    # Without: +50% images per wall-second, +6% per CPU-second, the same peak memory; Ray Data's
    # global object-store limit still bounds what is queued.
    context.op_resource_reservation_enabled = False
    dataset = dataset.map_batches(task, batch_size=None, batch_format="numpy", fn_kwargs=fn_kwargs,
                                  num_cpus=1, zero_copy_batch=True)
    pending: list[dict] = []
    current = 0
    for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch):
        numbers = table.column("batch").to_numpy()
        block = {name: _from_column(table.column(name), dtype, shape) for name, (dtype, shape) in columns.items()}
        cuts = np.flatnonzero(np.diff(numbers)) + 1
        starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(numbers)]])
        for a, b in zip(starts, ends):
            number = int(numbers[a])
            if number != current:
                yield _finish(pending, current, sizes)
                pending, current = [], number
            pending.append({k: v[a:b] for k, v in block.items()})
    if pending:
        yield _finish(pending, current, sizes)


def _finish(parts: list[dict], number: int, sizes: list[int]) -> dict:
    if len(parts) == 1:
        batch = parts[0]
    else:  # a batch split across blocks (rare): join its parts
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if len(batch["labels"]) != sizes[number]:
        raise RuntimeError(f"batch {number} has {len(batch['labels'])} rows, planned {sizes[number]}")
    return batch


def _check_image_size(manifest: Manifest, image_size: int) -> None:
    if not 0 < image_size <= manifest.size:
        raise ValueError(f"image_size={image_size} must be between 1 and the prepared size {manifest.size}")


class TrainLoader:
    """Shuffled, augmented training batches for one data-parallel replica at a time."""

    def __init__(self, data_dir: str | Path, *, batch_size: int, replicas: int, image_size: int = 224,
                 seed: int = 0, pca_lighting: bool = True, prefetch_batches: int = 2):
        self.manifest = load_manifest(data_dir)
        _check_image_size(self.manifest, image_size)
        self.index = ShardIndex.from_manifest(self.manifest, "train")
        self.batch_size, self.replicas, self.image_size = batch_size, replicas, image_size
        self.seed, self.pca_lighting, self.prefetch_batches = seed, pca_lighting, prefetch_batches
        self.num_images = self.index.num_rows
        self._plan = replica_batch_sizes(self.num_images, batch_size, replicas)
        self._offsets = replica_offsets(self.num_images, replicas)

    @property
    def batches_per_epoch(self) -> int:
        return len(self._plan[0])

    def batch_sizes(self, replica: int) -> list[int]:
        """Rows in each of replica `replica`'s batches, the same every epoch."""
        return list(self._plan[replica])

    def step_rows(self, replica: int) -> tuple[list[int], list[int]]:
        """Per step: the row where replica `replica`'s batch starts in the step's global batch, and
        the global batch's rows. A global batch is the replicas' batches in replica order (the last
        ones may differ in size)."""
        steps = range(self.batches_per_epoch)
        row_offsets = [sum(sizes[step] for sizes in self._plan[:replica]) for step in steps]
        global_rows = [sum(sizes[step] for sizes in self._plan) for step in steps]
        return row_offsets, global_rows

    def replica_rows(self, epoch: int, replica: int) -> np.ndarray:
        """Global row ids replica `replica` trains on in `epoch`, in order."""
        if not 0 <= replica < self.replicas:
            raise ValueError(f"replica={replica} must be in [0, {self.replicas})")
        order = epoch_order(self.index, self.seed, epoch)
        return order[self._offsets[replica]: self._offsets[replica + 1]]

    def iter_epoch(self, epoch: int, replica: int) -> Iterator[dict]:
        """Batches {"images": uint8 (N,H,W,3), "labels": int64 (N,), "lighting": float32 (N,3)}."""
        rows = self.replica_rows(epoch, replica)
        sizes = self._plan[replica]
        items = _task_items(rows, sizes, self.image_size**2 * 3)
        kwargs = {"index": self.index, "seed": self.seed, "epoch": epoch, "image_size": self.image_size,
                  "eigval": self.manifest.eigval(), "eigvec": self.manifest.eigvec(),
                  "pca_lighting": self.pca_lighting}
        size = self.image_size
        columns = {"images": (np.uint8, (size, size, 3)), "labels": (np.int64, ()),
                   "lighting": (np.float32, (3,))}
        yield from _run(items, _train_task, kwargs, sizes, self.prefetch_batches, columns)


class EvalLoader:
    """Evaluation batches: replica r takes the r-th contiguous slice of the split, nothing dropped."""

    def __init__(self, data_dir: str | Path, *, batch_size: int, replicas: int, image_size: int = 224,
                 split: str = "val", ten_crop: bool = False, prefetch_batches: int = 2):
        if batch_size < 1 or replicas < 1:
            raise ValueError(f"batch_size={batch_size} and replicas={replicas} must be at least 1")
        self.manifest = load_manifest(data_dir)
        _check_image_size(self.manifest, image_size)
        self.index = ShardIndex.from_manifest(self.manifest, split)
        self.batch_size, self.replicas, self.image_size = batch_size, replicas, image_size
        self.split, self.ten_crop, self.prefetch_batches = split, ten_crop, prefetch_batches
        self.num_images = self.index.num_rows
        self._offsets = replica_offsets(self.num_images, replicas)

    def replica_rows(self, replica: int) -> np.ndarray:
        if not 0 <= replica < self.replicas:
            raise ValueError(f"replica={replica} must be in [0, {self.replicas})")
        return np.arange(self._offsets[replica], self._offsets[replica + 1], dtype=np.int64)

    def num_batches(self, replica: int) -> int:
        return -(-len(self.replica_rows(replica)) // self.batch_size)

    def iter(self, replica: int) -> Iterator[dict]:
        """Batches {"images": uint8 (N,H,W,3) or (N,10,H,W,3), "labels": int64 (N,)}."""
        rows = self.replica_rows(replica)
        full, rest = divmod(len(rows), self.batch_size)
        sizes = [self.batch_size] * full + ([rest] if rest else [])
        row_bytes = self.image_size**2 * 3 * (10 if self.ten_crop else 1)
        items = _task_items(rows, sizes, row_bytes)
        kwargs = {"index": self.index, "image_size": self.image_size, "ten_crop": self.ten_crop}
        size = self.image_size
        shape = (10, size, size, 3) if self.ten_crop else (size, size, 3)
        columns = {"images": (np.uint8, shape), "labels": (np.int64, ())}
        yield from _run(items, _eval_task, kwargs, sizes, self.prefetch_batches, columns)
