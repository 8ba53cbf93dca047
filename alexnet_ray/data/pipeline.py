"""Ray Data pipelines over prepared shards: TrainLoader (shuffled, augmented, sliced per replica)
and EvalLoader (centre crop or ten crops, every image exactly once).

The global batch defines the run (docs/data-loading.md). The training epoch's order is a pure
function of (seed, epoch, global batch) and the manifest, never of the replica count:
  1. permute the row groups and shuffle the rows inside each (ILSVRC rows were stored in a random
     order by prepare, so a row group is a random sample): one stream of rows;
  2. cut the stream into windows of `window_steps` global batches (about WINDOW_GROUPS row
     groups); inside a window, every global batch is a *stripe*: WINDOW_GROUPS slots in a fixed
     order, slot s taking its next rows from the s-th contiguous piece of the window's stream, so
     every batch of a window has the same layout;
  3. step k is rows [k*G, (k+1)*G) of that order (the last step takes the rest); replica r takes
     the r-th near-equal contiguous slice of each step's rows (possibly none of a short last
     batch), and micro-batches slice that again.
Replica r's slices cover the same slots, hence the same row groups, in every batch of a window.
One Ray Data task per replica per window reads those row groups once, then decodes and yields
batch by batch; so each row group is read once an epoch cluster-wide when R divides WINDOW_GROUPS
and the row groups are whole slots, and at most about 1 + R/WINDOW_GROUPS times otherwise.
Footers are read once per loader and travel with the tasks.
Augmentation is keyed by (seed, epoch, row id) (alexnet_ray.data.augment); blocks come back in
order (preserve_order), so a fixed seed gives bit-identical batches. Only the replica's tower 0
iterates; its partner receives the batch over the pair group. Batches are numpy views of Ray's
object store (read-only, no copy): hand them to alexnet_ray.preprocess.to_model_input.
"""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from alexnet_ray import storage, storage_retries
from alexnet_ray.data.augment import augment_eval, augment_train
from alexnet_ray.data.manifest import Manifest, load_manifest
from alexnet_ray.data.shards import ReadCount, ShardIndex, chunk_ranges, parse_footer

if TYPE_CHECKING:
    import pyarrow as pa

WINDOW_GROUPS = 16  # slots per global batch, and row groups per shuffle window
FOOTER_THREADS = 16  # a loader reads the shards' footers it lacks this many at a time
# Evaluation tasks: whole batches, about TASK_BYTES of output and at most TASK_ROWS rows.
TASK_BYTES = 96 << 20
TASK_ROWS = 512


def split_evenly(total: int, parts: int) -> np.ndarray:
    """Sizes of `parts` contiguous slices of `total`, the first total % parts one larger."""
    sizes = np.full(parts, total // parts, dtype=np.int64)
    sizes[: total % parts] += 1
    return sizes


def replica_offsets(total: int, replicas: int) -> np.ndarray:
    """Where each replica's contiguous slice of `total` rows starts, then `total`: replica r owns
    rows [offsets[r], offsets[r + 1])."""
    return np.concatenate([[0], np.cumsum(split_evenly(total, replicas))])


def global_batch_sizes(num_rows: int, global_batch: int) -> list[int]:
    """Rows of each step's global batch: `global_batch`, the last step the rest."""
    if global_batch < 1:
        raise ValueError(f"global_batch_size={global_batch} must be at least 1")
    full, rest = divmod(num_rows, global_batch)
    return [global_batch] * full + ([rest] if rest else [])


def window_steps(group_rows: int, global_batch: int) -> int:
    """Global batches per window: WINDOW_GROUPS row groups' worth of rows, in whole batches."""
    return max(1, round(group_rows * WINDOW_GROUPS / global_batch))


def stripe(stream: np.ndarray, sizes: list[int]) -> np.ndarray:
    """One window's rows (`stream`, in row-group order) arranged into its batches of `sizes` rows:
    batch b is, slot after slot, slot s's next split_evenly(sizes[b], WINDOW_GROUPS)[s] rows, and
    slot s reads the s-th contiguous piece of the stream."""
    q = np.stack([split_evenly(g, WINDOW_GROUPS) for g in sizes])  # (batches, slots)
    slot_start = np.concatenate([[0], np.cumsum(q.sum(axis=0))[:-1]])
    starts = (slot_start[None, :] + np.cumsum(q, axis=0) - q).ravel()
    lengths = q.ravel()
    before = np.cumsum(lengths) - lengths
    return stream[np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()))]


def row_stream(index: ShardIndex, rng: np.random.Generator) -> np.ndarray:
    """Every row id once: the row groups in a random order, each one's rows shuffled. Groups
    smaller than the split's row-group size (shard tails) go last, so every full window is whole
    row groups (slot pieces fall on their edges) and only the last window mixes sizes."""
    units = rng.permutation(index.num_units)
    units = np.concatenate([units[index.unit_rows[units] == group_rows(index)],
                            units[index.unit_rows[units] != group_rows(index)]])
    rows = index.unit_rows[units]
    before = np.cumsum(rows) - rows
    ids = np.repeat(index.unit_start[units] - before, rows) + np.arange(int(rows.sum()))
    place = np.repeat(np.arange(len(units)), rows)
    return ids[np.lexsort((rng.random(len(ids)), place))]


def epoch_order(index: ShardIndex, seed: int, epoch: int, global_batch: int) -> np.ndarray:
    """The epoch's global row order (a permutation of all row ids): step k is rows
    [k * global_batch, (k + 1) * global_batch)."""
    stream = row_stream(index, np.random.default_rng([seed, epoch, 0x5EED]))
    sizes = global_batch_sizes(len(stream), global_batch)
    per_window = window_steps(group_rows(index), global_batch)
    order, row = np.empty_like(stream), 0
    for first in range(0, len(sizes), per_window):
        window = sizes[first: first + per_window]
        end = row + sum(window)
        order[row:end] = stripe(stream[row:end], window)
        row = end
    return order


def group_rows(index: ShardIndex) -> int:
    """The split's row-group size (its largest; only shard tails and skipped images are smaller)."""
    return int(index.unit_rows.max()) if index.num_units else 1


def batch_tasks(sizes: list[int], row_bytes: int) -> list[tuple[int, int]]:
    """Evaluation: group consecutive batches into tasks of about TASK_BYTES: [(first, end batch)].

    The first task holds one batch and each next one twice as many rows, up to the limits: the
    first batch waits for one batch's decodes, not for a whole task's."""
    tasks, first, rows, cap = [], 0, 0, sizes[0] if sizes else 0
    for b, size in enumerate(sizes):
        if b > first and ((rows + size) * row_bytes > TASK_BYTES or rows + size > min(cap, TASK_ROWS)):
            tasks.append((first, b))
            first, rows, cap = b, 0, 2 * cap
        rows += size
    if sizes:
        tasks.append((first, len(sizes)))
    return tasks


class Footers:
    """The footers of a split's shards, each read once (a few at a time) and kept."""

    def __init__(self, index: ShardIndex):
        self.index, self.footers, self.read = index, {}, ReadCount()

    def get(self, files) -> dict[int, bytes]:
        missing = sorted(set(int(f) for f in files) - set(self.footers))
        if missing:
            with ThreadPoolExecutor(min(FOOTER_THREADS, len(missing))) as pool:
                for f, footer in zip(missing, pool.map(self.index.read_footer, missing)):
                    self.footers[f] = footer
                    self.read.bytes += len(footer)
        return {int(f): self.footers[int(f)] for f in files}


def _task_item(ids: np.ndarray, batch_of_row: np.ndarray, index: ShardIndex, footers: Footers) -> dict:
    files = np.unique(index.unit_file[index.unit_of(ids)])
    return {"ids": ids.astype(np.int64).tobytes(), "batch": batch_of_row.astype(np.int64).tobytes(),
            "footers": pickle.dumps(footers.get(files))}


def task_reads(ids: np.ndarray, index: ShardIndex, footers: Footers) -> ReadCount:
    """What one task reading `ids` fetches: its row groups' column chunks, as coalesced."""
    units = np.unique(index.unit_of(ids))
    count = ReadCount(row_groups=len(units))
    for f in np.unique(index.unit_file[units]).tolist():
        groups = index.unit_group[units[index.unit_file[units] == f]].tolist()
        metadata = parse_footer(footers.get([f])[f])
        count.bytes += sum(b - a for a, b in chunk_ranges(metadata, groups))
    return count


def _task_items(row_ids: np.ndarray, sizes: list[int], row_bytes: int, index: ShardIndex,
                footers: Footers) -> list[dict]:
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    items = []
    for first, end in batch_tasks(sizes, row_bytes):
        batch_of_row = np.repeat(np.arange(first, end, dtype=np.int64), sizes[first:end])
        items.append(_task_item(row_ids[bounds[first]: bounds[end]], batch_of_row, index, footers))
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


def _item_arrays(batch: dict) -> tuple[np.ndarray, np.ndarray, dict[int, bytes]]:
    return (np.frombuffer(batch["ids"][0], dtype=np.int64), np.frombuffer(batch["batch"][0], dtype=np.int64),
            pickle.loads(batch["footers"][0]))


def _train_task(batch: dict, *, index: ShardIndex, seed: int, epoch: int, image_size: int,
                eigval: np.ndarray, eigvec: np.ndarray, pca_lighting: bool) -> Iterator["pa.Table"]:
    """Read the task's row groups once, then decode and yield one batch at a time."""
    ids, numbers, footers = _item_arrays(batch)
    jpegs, labels, _ = index.read(ids, footers)
    cuts = np.flatnonzero(np.diff(numbers)) + 1
    for a, b in zip(np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [len(ids)]]).tolist()):
        images, lighting = augment_train(jpegs[a:b], ids[a:b], seed=seed, epoch=epoch, image_size=image_size,
                                         eigval=eigval, eigvec=eigvec, pca_lighting=pca_lighting)
        yield _to_table({"images": images, "labels": labels[a:b], "lighting": lighting, "batch": numbers[a:b]})


def _eval_task(batch: dict, *, index: ShardIndex, image_size: int, ten_crop: bool) -> "pa.Table":
    ids, numbers, footers = _item_arrays(batch)
    jpegs, labels, _ = index.read(ids, footers)
    return _to_table({"images": augment_eval(jpegs, image_size=image_size, ten_crop=ten_crop),
                      "labels": labels, "batch": numbers})


def _blocks(items: list[dict], task, fn_kwargs: dict, prefetch: int, columns: dict[str, tuple]
            ) -> Iterator[tuple[int, dict]]:
    """Run one Ray Data task per item, in order: (batch number, a piece of that batch's rows)."""
    import ray.data

    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    context = dataset.context
    context.execution_options.preserve_order = True  # a fixed seed gives identical batches
    context.enable_progress_bars = False  # one dataset per epoch: no bars in training logs
    # Per-operator reservations split the budget between operators; with our one map operator
    # they held it to about one task at a time on 2 CPUs (tasks ran back to back on one worker).
    # Without: +50% images per wall-second, +6% per CPU-second, the same peak memory; Ray Data's
    # global object-store limit still bounds what is queued.
    context.op_resource_reservation_enabled = False
    dataset = dataset.map_batches(storage_retries.carrying_budget(task), batch_size=None, batch_format="numpy", fn_kwargs=fn_kwargs,
                                  num_cpus=1, zero_copy_batch=True)
    for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch):
        numbers = table.column("batch").to_numpy()
        block = {name: _from_column(table.column(name), dtype, shape) for name, (dtype, shape) in columns.items()}
        cuts = np.flatnonzero(np.diff(numbers)) + 1
        for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(numbers)]])):
            yield int(numbers[a]), {k: v[a:b] for k, v in block.items()}


def _run(items: list[dict], task, fn_kwargs: dict, sizes: list[int], prefetch: int,
         columns: dict[str, tuple]) -> Iterator[dict]:
    """The planned batches, in order, from the tasks' pieces (a batch may come in several pieces,
    from one task's blocks or from two tasks); a batch planned empty is handed out empty.
    `columns`: name -> (dtype, per-row shape) of the arrays handed out."""
    empty = {name: np.zeros((0, *shape), dtype) for name, (dtype, shape) in columns.items()}
    pending: list[dict] = []
    current = 0
    for number, piece in (_blocks(items, task, fn_kwargs, prefetch, columns) if items else ()):
        while current < number:
            yield _finish(pending, current, sizes, empty)
            pending, current = [], current + 1
        if number != current:
            raise RuntimeError(f"batch {number} arrived after batch {current}")
        pending.append(piece)
    while current < len(sizes):
        yield _finish(pending, current, sizes, empty)
        pending, current = [], current + 1


def _finish(parts: list[dict], number: int, sizes: list[int], empty: dict) -> dict:
    if not parts:
        batch = empty
    elif len(parts) == 1:
        batch = parts[0]
    else:  # a batch split across blocks or tasks: join its parts
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if number >= len(sizes) or len(batch["labels"]) != sizes[number]:
        planned = sizes[number] if number < len(sizes) else "none"
        raise RuntimeError(f"batch {number} has {len(batch['labels'])} rows, planned {planned}")
    return batch


def _check_image_size(manifest: Manifest, image_size: int) -> None:
    if not 0 < image_size <= manifest.size:
        raise ValueError(f"image_size={image_size} must be between 1 and the prepared size {manifest.size}")


class TrainLoader:
    """Shuffled, augmented training batches: step k's global batch, sliced for one replica."""

    def __init__(self, data_dir: str | Path, *, global_batch_size: int, replicas: int, image_size: int = 224,
                 seed: int = 0, pca_lighting: bool = True, prefetch_batches: int = 2):
        if replicas < 1:
            raise ValueError(f"replicas={replicas} must be at least 1")
        if global_batch_size < replicas:
            raise ValueError(f"global_batch_size={global_batch_size} is smaller than replicas={replicas}: "
                             "every replica needs a row of each full batch")
        self.manifest = load_manifest(data_dir)
        _check_image_size(self.manifest, image_size)
        self.index = ShardIndex.from_manifest(self.manifest, "train")
        self.global_batch_size, self.replicas, self.image_size = global_batch_size, replicas, image_size
        self.seed, self.pca_lighting, self.prefetch_batches = seed, pca_lighting, prefetch_batches
        self.num_images = self.index.num_rows
        if self.num_images == 0:
            raise ValueError(f"{data_dir}: the train split has no images")
        self.global_rows = global_batch_sizes(self.num_images, global_batch_size)
        self.steps_per_window = window_steps(group_rows(self.index), global_batch_size)
        self.footers = Footers(self.index)
        self.reads: dict[tuple[int, int], ReadCount] = {}  # (epoch, replica) -> what its tasks read

    @property
    def batches_per_epoch(self) -> int:
        return len(self.global_rows)

    @property
    def split_bytes(self) -> int:
        """The train shards' size in bytes (from the manifest, or asked of storage once)."""
        if getattr(self, "_split_bytes", None) is None:
            self._split_bytes = sum(size if size is not None else storage.file_size(path)
                                    for path, size in zip(self.index.files, self.index.sizes))
        return self._split_bytes

    def share(self, replica: int) -> tuple[list[int], list[int]]:
        """Per step: where replica `replica`'s rows start in the global batch, and how many (0 for a
        replica past the rows of a short last batch). The same every epoch."""
        if not 0 <= replica < self.replicas:
            raise ValueError(f"replica={replica} must be in [0, {self.replicas})")
        offsets = [replica_offsets(g, self.replicas)[replica: replica + 2] for g in self.global_rows]
        return [int(a) for a, _ in offsets], [int(b - a) for a, b in offsets]

    def batch_sizes(self, replica: int) -> list[int]:
        """Rows in each of replica `replica`'s batches, the same every epoch."""
        return self.share(replica)[1]

    def epoch_order(self, epoch: int) -> np.ndarray:
        return epoch_order(self.index, self.seed, epoch, self.global_batch_size)

    def replica_rows(self, epoch: int, replica: int) -> np.ndarray:
        """Global row ids replica `replica` trains on in `epoch`, in order."""
        return np.concatenate(self._replica_steps(self.epoch_order(epoch), replica)).astype(np.int64)

    def _replica_steps(self, order: np.ndarray, replica: int) -> list[np.ndarray]:
        offsets, sizes = self.share(replica)
        starts = np.concatenate([[0], np.cumsum(self.global_rows)[:-1]])
        return [order[s + a: s + a + n] for s, a, n in zip(starts.tolist(), offsets, sizes)]

    def _items(self, epoch: int, replica: int) -> list[dict]:
        """One task per window: the replica's rows of its steps, numbered by step."""
        steps = self._replica_steps(self.epoch_order(epoch), replica)
        before = self.footers.read.bytes
        count, items = ReadCount(), []
        for first in range(0, len(steps), self.steps_per_window):
            window = steps[first: first + self.steps_per_window]
            ids = np.concatenate(window).astype(np.int64)
            if len(ids) == 0:
                continue
            numbers = np.repeat(np.arange(first, first + len(window)), [len(w) for w in window])
            items.append(_task_item(ids, numbers, self.index, self.footers))
            count.add(task_reads(ids, self.index, self.footers))
        count.bytes += self.footers.read.bytes - before
        self.reads[(epoch, replica)] = count
        return items

    def iter_epoch(self, epoch: int, replica: int) -> Iterator[dict]:
        """Batches {"images": uint8 (N,H,W,3), "labels": int64 (N,), "lighting": float32 (N,3)},
        one per step (N = 0 for a replica past the rows of a short last batch). Once the first is
        out, `reads[(epoch, replica)]` holds what the epoch's tasks read (footers included)."""
        items = self._items(epoch, replica)
        kwargs = {"index": self.index, "seed": self.seed, "epoch": epoch, "image_size": self.image_size,
                  "eigval": self.manifest.eigval(), "eigvec": self.manifest.eigvec(),
                  "pca_lighting": self.pca_lighting}
        size = self.image_size
        columns = {"images": (np.uint8, (size, size, 3)), "labels": (np.int64, ()),
                   "lighting": (np.float32, (3,))}
        yield from _run(items, _train_task, kwargs, self.batch_sizes(replica), self.prefetch_batches, columns)


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
        self.footers = Footers(self.index)

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
        items = _task_items(rows, sizes, row_bytes, self.index, self.footers)
        kwargs = {"index": self.index, "image_size": self.image_size, "ten_crop": self.ten_crop}
        size = self.image_size
        shape = (10, size, size, 3) if self.ten_crop else (size, size, 3)
        columns = {"images": (np.uint8, shape), "labels": (np.int64, ())}
        yield from _run(items, _eval_task, kwargs, sizes, self.prefetch_batches, columns)
