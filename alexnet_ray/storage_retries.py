"""The one retry policy for object-store I/O (alexnet_ray.storage wraps every remote filesystem in it).

Transient errors — HTTP 500/502/503/504, SlowDown, RequestTimeout, a connection reset, refused or
cut mid-body, a read timeout — are retried with exponential backoff and jitter until the request
has been failing for the budget (`run.storage_retry_s`; ALEXNET_RAY_STORAGE_RETRY_S for the other
jobs). Everything else (403, 404, a bad key, a corrupt file) fails at once. A retried read returns
the same bytes, so a blip inside the budget changes nothing but time; a write is buffered and
uploaded whole on close, so an object is whole or absent whatever the store answered.

Each process prints one line per episode (from the first failure to the moment nothing is being
retried any more): `storage: 22 reads of s3://b/data/… answered 503 SlowDown, retried for 10.4 s`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import sys
import tempfile
import threading
import time

import pyarrow as pa
import pyarrow.fs as pafs

DEFAULT_RETRY_S = 300.0
RETRY_ENV = "ALEXNET_RAY_STORAGE_RETRY_S"
FIRST_DELAY_S, MAX_DELAY_S = 0.1, 2.0  # backoff doubles from the first to the cap, times U(0.5, 1)

# (pattern in pyarrow's error text, what the warning calls it); the first match wins. pyarrow
# reports S3's answers as "AWS Error <CODE>" or "(HTTP status <n>)" and curl's as "curlCode: <n>".
_TRANSIENT = [
    (r"SLOW_DOWN|SERVICE_UNAVAILABLE|HTTP status 503|SlowDown", "503 SlowDown"),
    (r"HTTP status (500|502|504)|INTERNAL_FAILURE|InternalError", "a server error (5xx)"),
    (r"REQUEST_TIMEOUT|RequestTimeout|curlCode: 28|[Tt]imed? ?out", "a read timeout"),
    (r"curlCode: 18|partial file", "a connection closed mid-body"),
    (r"[Cc]onnection reset|ECONNRESET|curlCode: 56", "a connection reset"),
    (r"[Cc]onnection refused|curlCode: 7\b|Couldn't connect", "a connection refused"),
    (r"THROTTLING|Throttling", "throttling"),
    (r"NETWORK_CONNECTION|curlCode", "a network error"),
]
_PERMANENT = re.compile(r"ACCESS_DENIED|AccessDenied|HTTP status 40\d|NoSuchBucket|NoSuchKey|InvalidAccessKeyId|"
                        r"SignatureDoesNotMatch")


def retry_budget() -> float:
    """Seconds a failing request is retried in this process (the environment's, else the default)."""
    return _budget[0]


def set_retry_budget(seconds: float) -> None:
    """Set this process's budget (a training worker, a loader task: from run.storage_retry_s)."""
    _budget[0] = float(seconds)


@contextlib.contextmanager
def budget(seconds: float):
    """This process's budget is `seconds` inside the block, and what it was after it."""
    saved = retry_budget()
    set_retry_budget(seconds)
    try:
        yield
    finally:
        set_retry_budget(saved)


def carrying_budget(fn):
    """`fn` as a Ray task or map function that runs under this process's budget, wherever it runs
    (a Ray worker's own environment was fixed when the cluster started)."""
    budget = retry_budget()

    @functools.wraps(fn)
    def run(*args, **kwargs):
        set_retry_budget(budget)
        return fn(*args, **kwargs)

    return run


def _from_env() -> float:
    text = os.environ.get(RETRY_ENV)
    try:
        return float(text) if text else DEFAULT_RETRY_S
    except ValueError:
        raise ValueError(f"{RETRY_ENV}={text!r}: not a number of seconds") from None


_budget = [_from_env()]


def transient(error: BaseException) -> str | None:
    """What the warning calls a transient error; None for one that retrying cannot help."""
    if not isinstance(error, OSError) or isinstance(error, (FileNotFoundError, PermissionError)):
        return None
    text = str(error)
    if _PERMANENT.search(text):
        return None
    return next((label for pattern, label in _TRANSIENT if re.search(pattern, text)), None)


class StorageRetryError(OSError):
    """A transient error that outlasted the retry budget: one line with the URI, the error, the time."""


_GAVE_UP = re.compile(r"storage: \S+: [^\n]*?\(retried for [\d.]+ s, the budget run\.storage_retry_s=[\d.]+\)")


def causes(error: BaseException):
    """The error, the exception Ray wraps around a worker's or task's own (_base_exc), their causes."""
    seen, stack = set(), [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [getattr(current, "_base_exc", None), current.__cause__, current.__context__]


def gave_up_line(error: BaseException) -> str | None:
    """A StorageRetryError's one line anywhere in `error`, however Ray wrapped it; else None."""
    return next((m.group(0) for e in causes(error) if (m := _GAVE_UP.search(str(e)))), None)


class _Episodes:
    """This process's current episode of failing requests: counted, then reported in one line."""

    def __init__(self):
        self.lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.retrying, self.failures, self.started, self.uris, self.kinds, self.labels = 0, 0, None, set(), set(), []

    def failed(self, uri: str, kind: str, label: str, first: bool, since: float) -> None:
        """A request failed; `since`: when it was first sent (a read timeout fails seconds later)."""
        with self.lock:
            self.started = since if self.started is None else min(self.started, since)
            self.retrying += first
            self.failures += 1
            self.uris.add(uri)
            self.kinds.add(kind)
            self.labels.append(label)

    def done(self, gave_up: bool) -> None:
        """A retried request ended; the last one to end closes the episode (and says so, unless it
        gave up: then its own error is the line)."""
        with self.lock:
            self.retrying -= 1
            if self.retrying:
                return
            line = None if gave_up else self._line()
            self._reset()
        if line:  # not print: Ray Train's workers echo a print, which would double the line
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def _line(self) -> str:
        uris = sorted(self.uris)
        where = uris[0] if len(uris) == 1 else _common_prefix(uris)
        kind = self.kinds.pop() + "s" if len(self.kinds) == 1 else "requests"
        label = max(set(self.labels), key=self.labels.count)
        return (f"storage: {self.failures} {kind} of {where} answered {label}, "
                f"retried for {time.monotonic() - self.started:.1f} s")


def _common_prefix(uris: list[str]) -> str:
    return os.path.commonprefix(uris) + "…"


EPISODES = _Episodes()
_jitter = random.Random()  # never the global stream: the training's randomness is its own


def call(fn, uri: str, kind: str, budget: float):
    """fn() retried while it fails transiently and the budget lasts; `kind` is read or write."""
    started, attempt = time.monotonic(), 0
    while True:
        try:
            result = fn()
        except OSError as error:
            label = transient(error)
            waited = time.monotonic() - started
            if label is None or waited >= budget:
                if attempt:
                    EPISODES.done(gave_up=True)
                if label is None:
                    raise
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise StorageRetryError(f"storage: {uri}: {first} (retried for {waited:.1f} s, the budget "
                                        f"run.storage_retry_s={budget:g})") from None
            EPISODES.failed(uri, kind, label, first=attempt == 0, since=started)
            delay = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** attempt) * _jitter.uniform(0.5, 1.0)
            time.sleep(min(delay, max(0.0, budget - waited)))
            attempt += 1
            continue
        if attempt:
            EPISODES.done(gave_up=False)
        return result


class RetryingHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem (pafs.PyFileSystem(RetryingHandler(fs, uri_prefix, budget))) whose every
    call goes through `call`. Picklable, budget included: Ray Train's controller and workers get
    the driver's policy with the filesystem."""

    def __init__(self, fs: pafs.FileSystem, scheme: str, budget: float):
        self.fs, self.scheme, self.budget = fs, scheme, float(budget)

    def _call(self, fn, path: str, kind: str = "read"):
        return call(fn, f"{self.scheme}://{path}", kind, self.budget)

    def __eq__(self, other):
        return isinstance(other, RetryingHandler) and (self.fs, self.budget) == (other.fs, other.budget)

    def __ne__(self, other):
        return not self == other

    def get_type_name(self) -> str:
        return f"retrying-{self.fs.type_name}"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self._call(lambda: self.fs.get_file_info(paths), paths[0] if paths else "")

    def get_file_info_selector(self, selector):
        return self._call(lambda: self.fs.get_file_info(selector), selector.base_dir)

    def create_dir(self, path, recursive):
        self._call(lambda: self.fs.create_dir(path, recursive=recursive), path, "write")

    def delete_dir(self, path):
        self._call(lambda: self.fs.delete_dir(path), path, "write")

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._call(lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok), path, "write")

    def delete_root_dir_contents(self):
        self._call(lambda: self.fs.delete_dir_contents("/", accept_root_dir=True), "/", "write")

    def delete_file(self, path):
        self._call(lambda: self.fs.delete_file(path), path, "write")

    def move(self, src, dest):
        self._call(lambda: self.fs.move(src, dest), dest, "write")

    def copy_file(self, src, dest):
        self._call(lambda: self.fs.copy_file(src, dest), dest, "write")

    def open_input_stream(self, path):
        return pa.PythonFile(_Input(self, path), mode="r")

    def open_input_file(self, path):
        return pa.PythonFile(_Input(self, path), mode="r")

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_Output(self, path, metadata), mode="w")

    def open_append_stream(self, path, metadata):
        raise NotImplementedError("object stores have no append")


class _Input:
    """A remote file read by ranged reads, each retried on its own (the same bytes come back)."""

    def __init__(self, handler: RetryingHandler, path: str):
        self.handler, self.path, self.pos, self.closed = handler, path, 0, False
        self.file = handler._call(lambda: handler.fs.open_input_file(path), path)
        self.size = self.file.size()

    def read(self, nbytes: int = -1) -> bytes:
        n = self.size - self.pos if nbytes is None or nbytes < 0 else min(nbytes, self.size - self.pos)
        if n <= 0:
            return b""
        data = self.handler._call(lambda: self.file.read_at(n, self.pos), self.path)
        self.pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.file.close()


class _Output:
    """Bytes spooled here and uploaded whole on close, the upload retried from its start: an
    interrupted upload is never completed (S3 shows an object only when its upload completes)."""

    SPOOL_BYTES = 64 << 20  # beyond this the spool is a temporary file

    def __init__(self, handler: RetryingHandler, path: str, metadata):
        self.handler, self.path, self.metadata, self.closed = handler, path, metadata, False
        self.spool = tempfile.SpooledTemporaryFile(max_size=self.SPOOL_BYTES, prefix="alexnet-ray-upload-")

    def write(self, data) -> int:
        return self.spool.write(data)

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return self.spool.tell()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.handler._call(self._upload, self.path, "write")
        finally:
            self.spool.close()

    def _upload(self) -> None:
        self.spool.seek(0)
        with self.handler.fs.open_output_stream(self.path, metadata=self.metadata) as out:
            while chunk := self.spool.read(8 << 20):
                out.write(chunk)
