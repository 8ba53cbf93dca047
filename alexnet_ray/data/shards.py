"""Random access to the rows of a split's shards by global row id (shard order, then row order).

The unit of reading is one Parquet row group; a row id maps to (shard, row group, offset).

Reading goes through two functions, so what reaches storage is easy to see (and to wrap):
`read_footer` (a shard's footer, by exact ranged reads: the manifest records where it is; an older
manifest costs one more small read for its length) and `read_row_groups` (the row groups a task
needs from one shard, given that shard's footer: pyarrow pre-buffers and coalesces the column
chunks, so adjacent row groups come in one ranged read and no footer is read again).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alexnet_ray import storage
from alexnet_ray.data.manifest import Manifest

READ_COLUMNS = ("jpeg", "label")
HOLE_BYTES = 8192  # pyarrow's pre-buffer coalesces column chunks closer than this (hole_size_limit)
_MAGIC = b"PAR1"


def read_footer(path: str, size: int | None = None, footer: tuple[int, int] | None = None) -> bytes:
    """A Parquet file's footer (its Thrift metadata, length word and magic), by ranged reads."""
    if footer is not None:
        return storage.read_range(path, footer[0], footer[1])
    size = storage.file_size(path) if size is None else size
    tail = storage.read_range(path, size - 8, 8)
    if tail[4:] != _MAGIC:
        raise ValueError(f"{path}: not a Parquet file (no {_MAGIC!r} at its end)")
    length = int.from_bytes(tail[:4], "little") + 8
    return storage.read_range(path, size - length, length)


def footer_range(data: bytes) -> tuple[int, int]:
    """(offset, length) of the footer in a whole Parquet file's bytes: what the manifest records."""
    length = int.from_bytes(data[-8:-4], "little") + 8
    return len(data) - length, length


@functools.lru_cache(maxsize=4096)
def parse_footer(footer: bytes) -> pq.FileMetaData:
    return pq.read_metadata(pa.BufferReader(_MAGIC + footer))


def chunk_ranges(metadata: pq.FileMetaData, groups, columns=READ_COLUMNS) -> list[tuple[int, int]]:
    """The byte ranges [start, end) reading `groups` fetches, coalesced as pyarrow's pre-buffer does."""
    spans = []
    for g in groups:
        group = metadata.row_group(int(g))
        for i in range(group.num_columns):
            column = group.column(i)
            if column.path_in_schema in columns:
                start = column.dictionary_page_offset or column.data_page_offset
                if column.dictionary_page_offset is not None:
                    start = min(start, column.data_page_offset)
                spans.append((start, start + column.total_compressed_size))
    spans.sort()
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start - merged[-1][1] <= HOLE_BYTES:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def read_row_groups(path: str, footer: bytes, groups: list[int]) -> pa.Table:
    """Columns READ_COLUMNS of row groups `groups` (ascending) of one shard, in that order."""
    with storage.open_input(path) as source:  # memory-mapped when local
        # One thread: loader tasks already run one per CPU; Arrow's pool would only add to that.
        file = pq.ParquetFile(source, metadata=parse_footer(footer), pre_buffer=True)
        try:
            return file.read_row_groups(groups, columns=list(READ_COLUMNS), use_threads=False)
        finally:
            file.close()


@dataclass
class ReadCount:
    """What reading cost: row groups, and bytes (column chunks as coalesced, and footers)."""

    row_groups: int = 0
    bytes: int = 0

    def add(self, other: "ReadCount") -> None:
        self.row_groups += other.row_groups
        self.bytes += other.bytes


@dataclass(frozen=True)
class ShardIndex:
    """Row groups of one split: unit u lives in files[unit_file[u]], row group unit_group[u],
    and holds global rows unit_start[u] .. unit_start[u] + unit_rows[u] - 1. `sizes` and
    `footers` (per file, None where the manifest predates them) say where each footer is."""

    files: tuple[str, ...]
    unit_file: np.ndarray
    unit_group: np.ndarray
    unit_start: np.ndarray
    unit_rows: np.ndarray
    sizes: tuple[int | None, ...] = ()
    footer_ranges: tuple[tuple[int, int] | None, ...] = ()

    @classmethod
    def from_manifest(cls, manifest: Manifest, split: str) -> "ShardIndex":
        paths = manifest.shard_paths(split)
        unit_file, unit_group, unit_rows = [], [], []
        shards = manifest.splits[split]["shards"]
        for f, shard in enumerate(shards):
            for g, rows in enumerate(shard["row_groups"]):
                unit_file.append(f)
                unit_group.append(g)
                unit_rows.append(rows)
        rows = np.asarray(unit_rows, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
        sizes = tuple(s.get("bytes") for s in shards)
        footers = tuple(tuple(s["footer"]) if s.get("footer") else None for s in shards)
        return cls(tuple(storage.absolute(p) for p in paths), np.asarray(unit_file, np.int64),
                   np.asarray(unit_group, np.int64), starts, rows, sizes, footers)

    @property
    def num_rows(self) -> int:
        return int(self.unit_rows.sum())

    @property
    def num_units(self) -> int:
        return len(self.unit_rows)

    def unit_of(self, row_ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.unit_start, row_ids, side="right") - 1

    def read_footer(self, f: int) -> bytes:
        sizes, ranges = self.sizes or (None,) * len(self.files), self.footer_ranges or (None,) * len(self.files)
        return read_footer(self.files[f], sizes[f], ranges[f])

    def read(self, row_ids: np.ndarray, footers: dict[int, bytes] | None = None
             ) -> tuple[list[memoryview], np.ndarray, ReadCount]:
        """JPEG bytes (zero-copy views of the read row groups) and labels of `row_ids`, in that
        order, and what the read cost; each needed row group is read once, each shard opened once.
        `footers`: the shards' footers by file index (those missing are read here, and counted)."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        units = self.unit_of(row_ids)
        jpegs: list = [None] * len(row_ids)
        labels = np.empty(len(row_ids), dtype=np.int64)
        count = ReadCount()
        needed = np.unique(units)
        for f in np.unique(self.unit_file[needed]).tolist():
            file_units = needed[self.unit_file[needed] == f]  # ascending row groups of file f
            footer = (footers or {}).get(f)
            if footer is None:
                footer = self.read_footer(f)
                count.bytes += len(footer)
            groups = self.unit_group[file_units].tolist()
            table = read_row_groups(self.files[f], footer, groups)
            count.row_groups += len(groups)
            count.bytes += sum(b - a for a, b in chunk_ranges(parse_footer(footer), groups))
            jpeg_column, label_column = table.column("jpeg"), table.column("label").to_numpy()
            base = np.concatenate([[0], np.cumsum(self.unit_rows[file_units])[:-1]])
            where = np.nonzero(np.isin(units, file_units))[0]
            positions = base[np.searchsorted(file_units, units[where])] + row_ids[where] - self.unit_start[units[where]]
            for i, value in zip(where.tolist(), _binary_values(jpeg_column, positions)):
                jpegs[i] = value
            labels[where] = label_column[positions]
        return jpegs, labels, count


def _binary_values(column: pa.ChunkedArray, rows: np.ndarray) -> list[memoryview]:
    """Values `rows` of a binary column as memoryviews of its data buffers (no bytes objects made,
    no chunks joined: a read of several row groups comes back as a chunk per row group)."""
    views, offsets = [], []
    for array in column.chunks:
        _, offsets_buffer, data = array.buffers()
        offset_type = np.int64 if pa.types.is_large_binary(array.type) else np.int32
        offsets.append(np.frombuffer(offsets_buffer, dtype=offset_type)[array.offset: array.offset + len(array) + 1])
        views.append(memoryview(data).cast("B") if data is not None else memoryview(b""))  # unsigned for decoders
    starts = np.cumsum([0] + [len(a) for a in column.chunks])
    chunk_of = np.searchsorted(starts, rows, side="right") - 1
    local = rows - starts[chunk_of]
    return [views[c][offsets[c][r]: offsets[c][r + 1]] for c, r in zip(chunk_of.tolist(), local.tolist())]
