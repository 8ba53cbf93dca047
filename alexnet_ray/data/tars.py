"""Tar archives read in place, local or in a bucket: an index of their members, then reads by byte range.

A tar is uncompressed, so a member's bytes lie contiguous in the file, and a tar inside a tar (the
ILSVRC2012 training tarball holds one tar per class) is a window of its parent: the index of the
inner tar, shifted by the window's start, gives offsets into the outer file. Nothing is extracted.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass

import pyarrow.fs as pafs

from alexnet_ray import storage

# How much a tar walk reads at a time. On an object store one request costs far more than its bytes:
# reading 1 MiB around each header reads through members of ~100 kB (ILSVRC's JPEGs) in ~10 times
# fewer requests than one per header, and still skips a 100 MB member (an inner tar) in one seek.
REMOTE_READ_BYTES = 1 << 20
LOCAL_READ_BYTES = 64 << 10


@dataclass(frozen=True)
class TarMember:
    name: str
    offset: int  # of the member's data, in the file that holds the (outermost) tar
    size: int
    data: bytes | None = None  # read during the walk for the names index_tar(read=...) asks for


class _Window(io.RawIOBase):
    """Bytes [base, base + length) of a random-access file, as a seekable raw stream."""

    def __init__(self, reader: "RangeReader", location: str, base: int, length: int):
        self.reader, self.location, self.base, self.length, self.position = reader, location, base, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = max(0, start + offset)
        return self.position

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self.length - self.position))
        data = self.reader.read(self.location, self.base + self.position, count) if count else b""
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


class RangeReader:
    """Byte ranges of files (local paths or URIs), each file opened once; close() when done."""

    def __init__(self):
        self._open: dict[str, object] = {}

    def _file(self, location: str):
        if location not in self._open:
            filesystem, path = storage.resolve(location)
            if isinstance(filesystem, pafs.LocalFileSystem):
                self._open[location] = os.open(path, os.O_RDONLY)
            else:
                self._open[location] = filesystem.open_input_file(path)
        return self._open[location]

    def size(self, location: str) -> int:
        file = self._file(location)
        return os.fstat(file).st_size if isinstance(file, int) else file.size()

    def read(self, location: str, offset: int, size: int) -> bytes:
        file = self._file(location)
        if isinstance(file, int):
            return os.pread(file, size, offset)
        return file.read_at(size, offset)

    def close(self) -> None:
        for file in self._open.values():
            os.close(file) if isinstance(file, int) else file.close()
        self._open.clear()

    def __enter__(self) -> "RangeReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def index_tar(location: str, base: int = 0, length: int | None = None, label: str | None = None,
              read: tuple[str, ...] = ()) -> list[TarMember]:
    """The regular-file members of the tar at `location` (or of the tar held in its bytes [base,
    base + length)): name, offset of the data in `location`, size, and the bytes of members whose
    names end with one of `read` (small ones: WebDataset's .cls). ValueError naming `label` (the
    tar, as the user would name it) when it is not a tar or is truncated."""
    label = label or location
    remote = storage.is_uri(location)
    with RangeReader() as reader:
        try:
            length = reader.size(location) - base if length is None else length
        except OSError as error:
            raise ValueError(f"{label}: cannot read ({str(error).splitlines()[0]})") from None
        window = io.BufferedReader(_Window(reader, location, base, length),
                                   REMOTE_READ_BYTES if remote else LOCAL_READ_BYTES)
        members: list[TarMember] = []
        try:
            with tarfile.open(fileobj=window, mode="r:") as archive:
                for info in archive:
                    if info.offset_data + info.size > length:
                        raise ValueError(f"{label}: truncated tar ({info.name} ends past the end of the file)")
                    if info.isfile():
                        data = archive.extractfile(info).read() if read and info.name.endswith(read) else None
                        members.append(TarMember(info.name, base + info.offset_data, info.size, data))
                end = archive.offset
        except tarfile.TarError as error:
            raise ValueError(f"{label}: not a readable tar ({error})") from None
        # tarfile stops quietly at a short or garbled header; a whole tar ends with a zero block there.
        if end + tarfile.BLOCKSIZE > length or \
                reader.read(location, base + end, tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            raise ValueError(f"{label}: truncated tar (no end-of-archive block after {len(members)} members)")
    return members


def first_member(location: str) -> str | None:
    """The name of the tar's first member (None when it is empty or not a tar): one small read."""
    with RangeReader() as reader:
        try:
            window = io.BufferedReader(_Window(reader, location, 0, reader.size(location)), 64 << 10)
            with tarfile.open(fileobj=window, mode="r:") as archive:
                member = archive.next()
        except (tarfile.TarError, OSError):
            return None
    return member.name if member is not None else None
