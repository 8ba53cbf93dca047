"""Measuring on a shared machine: CPU seconds and peak memory of a set of processes (read from
/proc), and contenders timed in interleaved rounds. Used by every benchmark here."""

from __future__ import annotations

import os
import threading
import time


def interleaved_best(rounds: int, contenders: dict) -> dict:
    """Run every contender once per round, in turn, for `rounds` rounds; keep each one's best
    round. Each returns (images per CPU-second, ...); best = the highest first figure. The speed
    of a shared machine drifts over minutes: interleaving gives every contender the same drift,
    which timing them one after another does not (their ratios moved by 20% between runs)."""
    best: dict = {}
    for _ in range(rounds):
        for name, run_round in contenders.items():
            result = run_round()
            if name not in best or result[0] > best[name][0]:
                best[name] = result
    return best


def descendants(root: int) -> list[int]:
    """`root` and every process below it (read from /proc), for CPU time and memory accounting."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    parent = int(file.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack += children.get(pid, [])
    return found


def _cpu_seconds(pids: list[int]) -> dict[int, float]:
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
            seconds[pid] = (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            continue
    return seconds


class CpuTime:
    """CPU seconds used while the block runs by the processes `pids()` names, by default this
    process and its descendants (DataLoader workers, Ray's processes): the machine may be shared,
    so rates are also given per CPU-second."""

    def __init__(self, pids=None):
        self._pids = pids or (lambda: descendants(os.getpid()))

    def __enter__(self) -> "CpuTime":
        self._before = _cpu_seconds(self._pids())
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall
        after = _cpu_seconds(self._pids())
        self.seconds = sum(v - self._before.get(pid, 0.0) for pid, v in after.items())


def _pss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as file:
                for line in file:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total / 1024


class PeakMemory:
    """Samples the PSS of the processes `pids()` names, by default this process and its
    descendants (local Ray's raylet, workers, store)."""

    def __init__(self, interval: float = 0.1, pids=None):
        self.interval, self.peak = interval, 0.0
        self._pids = pids or (lambda: descendants(os.getpid()))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pids = self._pids()
        last = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - last > 1.0:
                pids, last = self._pids(), time.monotonic()
            self.peak = max(self.peak, _pss_mb(pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
