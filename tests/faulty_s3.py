"""Faults in front of a real S3 server: a WSGI wrapper around moto's server app that, for a chosen
time window, answers chosen requests with what a troubled object store sends.

    faults.add("503", method="GET", contains="/data/train", seconds=10, skip=2)

opens a 10-second window at the third matching request (so it starts mid-epoch, not at the
first read); inside it every matching request gets the fault. Faults:
  "503"    503 SlowDown with S3's XML error body (what S3 answers a hot prefix);
  "reset"  the real response's headers and half its body, then the connection is closed;
  "delay"  the real response, sent after `delay_s` seconds (past the client's read timeout);
  "403"    403 AccessDenied (wrong credentials; not a window: every matching request).
Each rule counts the requests it answered (`hits`). Outside every window the server is moto's.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

_ERROR = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
          '<RequestId>faulty-s3</RequestId></Error>')
_STATUS = {"503": ("503 Slow Down", "SlowDown", "Please reduce your request rate."),
           "403": ("403 Forbidden", "AccessDenied", "Access Denied")}


@dataclass
class Rule:
    fault: str
    method: str
    contains: str
    seconds: float = float("inf")
    skip: int = 0  # matching requests let through before the window opens
    delay_s: float = 0.0
    seen: int = 0
    hits: int = 0
    opened: float | None = None
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def applies(self, method: str, path: str) -> bool:
        if self.closed or method != self.method or self.contains not in path:
            return False
        with self.lock:
            self.seen += 1
            if self.seen <= self.skip:
                return False
            now = time.monotonic()
            self.opened = now if self.opened is None else self.opened
            if now - self.opened > self.seconds:
                self.closed = True
                return False
            self.hits += 1
            return True


class Faults:
    """The WSGI middleware: `add` rules, `clear` them; a request matches the first open rule."""

    def __init__(self, app):
        self.app, self.rules = app, []

    def add(self, fault: str, *, method: str, contains: str, seconds: float = float("inf"), skip: int = 0,
            delay_s: float = 0.0) -> Rule:
        if fault not in ("503", "reset", "delay", "403"):
            raise ValueError(f"unknown fault {fault!r}")
        rule = Rule(fault, method, contains, seconds, skip, delay_s)
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        self.rules = []

    def __call__(self, environ, start_response):
        method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
        rule = next((r for r in list(self.rules) if r.applies(method, path)), None)
        if rule is None:
            return self.app(environ, start_response)
        if rule.fault in _STATUS:
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))  # the client's body, unread
            status, code, message = _STATUS[rule.fault]
            body = _ERROR.format(code=code, message=message).encode()
            start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body]
        if rule.fault == "delay":
            time.sleep(rule.delay_s)
            return self.app(environ, start_response)
        return _half_then_close(self.app(environ, start_response))


def _half_then_close(body):
    """The body's first half; then an error, on which the server drops the connection (the headers,
    Content-Length included, are out already, so the client sees a response cut short)."""
    data = b"".join(body)
    if hasattr(body, "close"):
        body.close()
    yield data[: len(data) // 2]
    raise ConnectionResetError("faulty_s3: connection closed mid-body")
