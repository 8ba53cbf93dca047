"""Random access to the rows of a split's shards by global row id (shard order, then row order).

The unit of reading is one Parquet row group; a row id maps to (shard, row group, offset).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alexnet_ray import storage
from alexnet_ray.data.manifest import Manifest


@dataclass(frozen=True)
class ShardIndex:
    """Row groups of one split: unit u lives in files[unit_file[u]], row group unit_group[u],
    and holds global rows unit_start[u] .. unit_start[u] + unit_rows[u] - 1."""

    files: tuple[str, ...]
    unit_file: np.ndarray
    unit_group: np.ndarray
    unit_start: np.ndarray
    unit_rows: np.ndarray

    @classmethod
    def from_manifest(cls, manifest: Manifest, split: str) -> "ShardIndex":
        paths = manifest.shard_paths(split)
        unit_file, unit_group, unit_rows = [], [], []
        for f, shard in enumerate(manifest.splits[split]["shards"]):
            for g, rows in enumerate(shard["row_groups"]):
                unit_file.append(f)
                unit_group.append(g)
                unit_rows.append(rows)
        rows = np.asarray(unit_rows, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
        return cls(tuple(storage.absolute(p) for p in paths), np.asarray(unit_file, np.int64),
                   np.asarray(unit_group, np.int64), starts, rows)

    @property
    def num_rows(self) -> int:
        return int(self.unit_rows.sum())

    @property
    def num_units(self) -> int:
        return len(self.unit_rows)

    def unit_of(self, row_ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.unit_start, row_ids, side="right") - 1

    def read(self, row_ids: np.ndarray) -> tuple[list[memoryview], np.ndarray]:
        """JPEG bytes (zero-copy views of the read row groups) and labels of `row_ids`, in that
        order; each needed row group is read once."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        units = self.unit_of(row_ids)
        jpegs: list = [None] * len(row_ids)
        labels = np.empty(len(row_ids), dtype=np.int64)
        open_files: dict[int, tuple] = {}
        for unit in np.unique(units):
            f = int(self.unit_file[unit])
            if f not in open_files:
                source = storage.open_input(self.files[f])  # memory-mapped when local
                open_files[f] = (source, pq.ParquetFile(source))
            # One thread: loader tasks already run one per CPU; Arrow's pool would only add to that.
            table = open_files[f][1].read_row_group(int(self.unit_group[unit]), columns=["jpeg", "label"],
                                                 use_threads=False)
            where = np.nonzero(units == unit)[0]
            offsets = row_ids[where] - self.unit_start[unit]
            for i, value in zip(where.tolist(), _binary_values(table.column("jpeg"), offsets)):
                jpegs[i] = value
            labels[where] = table.column("label").to_numpy()[offsets]
        for source, file in open_files.values():
            file.close()
            source.close()
        return jpegs, labels


def _binary_values(column: pa.ChunkedArray, rows: np.ndarray) -> list[memoryview]:
    """Values `rows` of a binary column as memoryviews of its data buffer (no bytes objects made)."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    _, offsets_buffer, data = array.buffers()
    offset_type = np.int64 if pa.types.is_large_binary(array.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[array.offset: array.offset + len(array) + 1]
    view = memoryview(data).cast("B")  # pyarrow exports signed chars; decoders want unsigned
    return [view[offsets[r]: offsets[r + 1]] for r in rows.tolist()]
