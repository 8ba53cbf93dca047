"""Local paths and object-store URIs (s3://, gs://, anything pyarrow.fs resolves), one way.

Every place that reads or writes a dataset, a checkpoint, a run or an export goes through here:
`resolve(location)` gives (pyarrow filesystem, path on it), and the helpers below cover the few
operations the project needs. A remote filesystem comes wrapped in the one retry policy
(alexnet_ray.storage_retries): transient errors are retried for `storage_retries.retry_budget()`
seconds, writes are uploaded whole; Ray Train is handed the same wrapped filesystem.
S3-compatible endpoints (MinIO, Ceph, R2, a test server) come from the standard AWS_ENDPOINT_URL
(or AWS_ENDPOINT_URL_S3); credentials come from the usual AWS/GCP sources and never appear in
configs, URIs we print, or logs.
"""

from __future__ import annotations

import functools
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from alexnet_ray import storage_retries

_TMP_MARK = ".tmp-"  # a local file being written: NAME.tmp-<random>, renamed to NAME when whole


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def _s3(bucket: str) -> pafs.FileSystem:
    # Our policy retries, for minutes; pyarrow's own retries (3 attempts in under a second by
    # default) would only multiply the requests, so it makes one. Synchronous writes: the retrying
    # wrapper uploads in the caller's thread, which may itself be one of Arrow's I/O threads.
    options = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1), "background_writes": False}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:  # AWS itself: the bucket's region
        return pafs.S3FileSystem(region=pafs.resolve_s3_region(bucket), **options)
    # pyarrow 26 honours AWS_ENDPOINT_URL itself; passing it keeps older versions right too.
    scheme, _, host = endpoint.rpartition("://")
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return pafs.S3FileSystem(endpoint_override=host, scheme=scheme or "https", region=region, **options)


@functools.lru_cache(maxsize=64)
def _remote(scheme: str, bucket: str, endpoint: str | None, budget: float) -> pafs.FileSystem:
    """One filesystem object per bucket (and endpoint, and budget) per process: readers call
    resolve() per file."""
    uri = f"{scheme}://{bucket}/"
    fs = _s3(bucket) if scheme == "s3" else pafs.FileSystem.from_uri(uri)[0]
    return pafs.PyFileSystem(storage_retries.RetryingHandler(fs, scheme, budget))


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a local path (~ expanded, made absolute) or a URI.

    ValueError with one clear line for a URI without a bucket or a scheme pyarrow does not know."""
    text = str(location)
    if not is_uri(text):
        local = text[len("file://"):] if text.startswith("file://") else text
        return pafs.LocalFileSystem(), str(Path(local).expanduser().absolute())
    scheme, _, rest = text.partition("://")
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise ValueError(f"{text}: no bucket in the URI (expected {scheme}://BUCKET/path)")
    path = rest.rstrip("/") or bucket
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    try:
        return _remote(scheme, bucket, endpoint, storage_retries.retry_budget()), path
    except (pa.ArrowException, ValueError, OSError) as error:
        raise ValueError(f"{text}: cannot open this location ({str(error).splitlines()[0]})") from None


def join(location: str | os.PathLike, *names: str) -> str:
    """`location`/name/...: posix joining for URIs, os.path for local paths."""
    text = str(location)
    if is_uri(text):
        return posixpath.join(text.rstrip("/"), *names)
    return os.path.join(text, *names)


def parent(location: str | os.PathLike) -> str:
    text = str(location).rstrip("/")
    return posixpath.dirname(text) if is_uri(text) else os.path.dirname(text)


def base_name(location: str | os.PathLike) -> str:
    return posixpath.basename(str(location).rstrip("/"))


def absolute(location: str | os.PathLike) -> str:
    """A URI as given; a local path expanded and made absolute (so it means the same on every node)."""
    return str(location) if is_uri(location) else resolve(location)[1]


def _type(location) -> pafs.FileType:
    fs, path = resolve(location)
    return fs.get_file_info(path).type


def exists(location) -> bool:
    return _type(location) != pafs.FileType.NotFound


def is_file(location) -> bool:
    return _type(location) == pafs.FileType.File


def is_dir(location) -> bool:
    return _type(location) == pafs.FileType.Directory


def list_dir(location, recursive: bool = False) -> list[pafs.FileInfo]:
    """Entries under a directory ([] when it does not exist), sorted by path."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    return sorted(infos, key=lambda i: i.path)


def read_bytes(location) -> bytes:
    """The file's bytes; a local file's errors are Python's own (FileNotFoundError with strerror)."""
    if not is_uri(location):  # the prepare job reads every source image through here
        with open(os.path.expanduser(str(location)), "rb") as file:
            return file.read()
    fs, path = resolve(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_text(location) -> str:
    return read_bytes(location).decode()


def open_input(location):
    """A random-access file (pyarrow NativeFile): local files are memory-mapped. The training
    loader's row-group reads go through here (alexnet_ray.data.shards.read_row_groups)."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        return pa.memory_map(path)
    return fs.open_input_file(path)


def file_size(location) -> int:
    """The file's size in bytes (one metadata request on an object store, no body)."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{location}: no such file")
    return int(info.size)


def read_range(location, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of a file: one ranged GET on an object store. The shard
    footers the training loader keeps are read through here (alexnet_ray.data.shards.read_footer)."""
    with open_input(location) as file:
        return file.read_at(length, offset)


def make_dirs(location) -> None:
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)


def write_bytes_atomic(location, data: bytes) -> None:
    """`data` appears at `location` whole or not at all: locally written under a temporary name in
    the same folder, synced and renamed; on an object store one upload, which becomes visible only
    when complete (a PUT, or a multipart upload that is completed only after the last byte)."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}{_TMP_MARK}{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    # The whole object is in memory and goes out in one write: a killed writer never completes it.
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def write_text_atomic(location, text: str) -> None:
    write_bytes_atomic(location, text.encode())


def is_temporary(name: str) -> bool:
    """A local file left by an interrupted write_bytes_atomic."""
    return _TMP_MARK in name


def delete_file(location) -> None:
    fs, path = resolve(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def remove_empty_dir(location) -> None:
    """Remove a folder that holds nothing (a local one; object stores have no empty folders to leave)."""
    fs, path = resolve(location)
    if not is_uri(location) and not fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        fs.delete_dir(path)


def upload_dir(local_dir: str | os.PathLike, location) -> None:
    """Copy a local directory's files to `location` (a directory there)."""
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


class LocalCopy:
    """`with LocalCopy(location) as local:` a local path holding `location` (a file or a directory):
    the path itself when it is local, else a temporary download removed on exit."""

    def __init__(self, location):
        self.location = location
        self._tmp: str | None = None

    def __enter__(self) -> Path:
        fs, path = resolve(self.location)
        if isinstance(fs, pafs.LocalFileSystem):
            return Path(path)
        self._tmp = tempfile.mkdtemp(prefix="alexnet-ray-download-")
        info = fs.get_file_info(path)
        target = Path(self._tmp) / base_name(path)
        if info.type == pafs.FileType.File:
            pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        elif info.type == pafs.FileType.Directory:
            target.mkdir()
            pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return target  # a missing location: a path that does not exist, for the caller's own message

    def __exit__(self, *exc) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
