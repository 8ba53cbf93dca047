"""Test-only fault injection for the reliability tests. Inert unless the driver's environment names
a plan file in ALEXNET_RAY_FAULT_PLAN when `Trainer.fit()` starts: the Trainer then runs its workers
through `train_worker_with_faults`, and the hooks the training loop calls (`point`, `step_done`)
do something. Otherwise every hook returns at once.

A plan is a JSON list of faults, each firing once per plan (a marker file next to the plan), so a
restarted worker group replays past it:

    {"point": "step", "action": "hold", "rank": 1, "epoch": 1, "step": 3}

- point "step": before the step's batch is fetched (the partner waits in the batch broadcast);
  "exchange": the batch has arrived, before forward_backward (the partner waits in an exchange);
  "metrics": before an epoch's metric all-reduce across replicas (step 0: training, 1: evaluation);
  "eval": before evaluation batch `step` is read and broadcast (the partner waits for it);
  "gather": replica 0, before the towers' weights are gathered for the checkpoint;
  "checkpoint": rank 0 has written the checkpoint files and not yet reported them.
  epoch and step are 0-based indices; "gather" and "checkpoint" ignore step.
- action "hold": write held-<i>.json (pid, rank, time) next to the plan and sleep until killed:
  the test sends SIGKILL to that pid. "stall": sleep `seconds`, then carry on. "pause": wait until
  the test calls `resume(plan, i)` (at most `seconds`, else HOLD_LIMIT_S), then carry on.

Every worker appends JSON lines to events.jsonl next to the plan: "start" (pid, rank, node, time),
"fired" (a fault began), "first_step" (the first finished step since this process started), and
"error" (the exception that ended the worker, with its time): enough to measure recovery time.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

PLAN_ENV_VAR = "ALEXNET_RAY_FAULT_PLAN"
LOOP_CONFIG_KEY = "fault_plan"
POINTS = ("step", "exchange", "metrics", "eval", "gather", "checkpoint")
ACTIONS = ("hold", "stall", "pause")
HOLD_LIMIT_S = 300.0  # a hold that nobody kills ends the worker instead of hanging the test


@dataclass
class Fault:
    point: str
    action: str
    rank: int
    epoch: int
    step: int = 0
    seconds: float = 0.0

    def __post_init__(self):
        if self.point not in POINTS:
            raise ValueError(f"fault point {self.point!r}: expected one of {', '.join(POINTS)}")
        if self.action not in ACTIONS:
            raise ValueError(f"fault action {self.action!r}: expected one of {', '.join(ACTIONS)}")


def write_plan(path: str | os.PathLike, faults: list[dict]) -> Path:
    """Write a plan file (validating each fault) and return its path."""
    path = Path(path)
    [Fault(**f) for f in faults]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(faults, indent=1))
    return path


def resume(plan_path: str | os.PathLike, index: int) -> None:
    """Let the worker that a "pause" fault parks carry on."""
    Path(plan_path).with_name(f"resume-{index}").touch()


def read_events(plan_path: str | os.PathLike) -> list[dict]:
    """The events the workers recorded, in the order they were written."""
    events = Path(plan_path).with_name("events.jsonl")
    if not events.exists():
        return []
    return [json.loads(line) for line in events.read_text().splitlines() if line.strip()]


class _Injector:
    def __init__(self, plan_path: str, rank: int):
        self.plan_path = Path(plan_path)
        self.rank = rank
        self.faults = [Fault(**f) for f in json.loads(self.plan_path.read_text())]
        self.stepped = False

    def event(self, kind: str, **fields: Any) -> None:
        record = {"event": kind, "time": time.time(), "rank": self.rank, "pid": os.getpid(), **fields}
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.plan_path.with_name("events.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)  # one O_APPEND write per line: lines from several workers never interleave
        finally:
            os.close(fd)

    def _claim(self, index: int) -> bool:
        try:
            os.close(os.open(self.plan_path.with_name(f"fired-{index}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def point(self, name: str, epoch: int, step: int) -> None:
        for index, fault in enumerate(self.faults):
            if (fault.point, fault.rank, fault.epoch) != (name, self.rank, epoch):
                continue
            if name not in ("gather", "checkpoint") and fault.step != step:
                continue
            if not self._claim(index):
                continue
            self.event("fired", index=index, point=name, action=fault.action, epoch=epoch, step=step)
            if fault.action == "stall":
                time.sleep(fault.seconds)
                continue
            if fault.action == "pause":
                resumed, deadline = self.plan_path.with_name(f"resume-{index}"), time.monotonic() + (fault.seconds or HOLD_LIMIT_S)
                while not resumed.exists() and time.monotonic() < deadline:
                    time.sleep(0.2)
                continue
            held = self.plan_path.with_name(f"held-{index}.json")
            held.with_suffix(".tmp").write_text(json.dumps({"pid": os.getpid(), "rank": self.rank, "time": time.time()}))
            os.replace(held.with_suffix(".tmp"), held)
            time.sleep(fault.seconds or HOLD_LIMIT_S)
            raise RuntimeError(f"fault injection: hold {index} was not killed within {fault.seconds or HOLD_LIMIT_S:g}s")

    def step_done(self, epoch: int, step: int) -> None:
        if not self.stepped:
            self.stepped = True
            self.event("first_step", epoch=epoch, step=step)


_injector: _Injector | None = None


def point(name: str, epoch: int, step: int = 0) -> None:
    """Hook: fire the faults planned for this rank at this point (no-op when injection is off)."""
    if _injector is not None:
        _injector.point(name, epoch, step)


def step_done(epoch: int, step: int) -> None:
    """Hook: a training step finished (records the first one after each worker start)."""
    if _injector is not None:
        _injector.step_done(epoch, step)


def plan_from_environment() -> str | None:
    return os.environ.get(PLAN_ENV_VAR) or None


def _run_with_faults(train_worker: Callable[[dict], None], loop_config: dict) -> None:
    import ray
    import ray.train

    global _injector
    _injector = _Injector(loop_config[LOOP_CONFIG_KEY], ray.train.get_context().get_world_rank())
    _injector.event("start", node=ray.get_runtime_context().get_node_id())
    try:
        train_worker(loop_config)
    except BaseException as error:
        _injector.event("error", type=type(error).__name__, message=str(error))
        raise


def train_worker_with_faults(train_worker: Callable[[dict], None]) -> Callable[[dict], None]:
    """Wrap a train_loop_per_worker: install the injector from loop_config["fault_plan"], record
    the start and any error that ends the worker, then run it."""

    def run(loop_config: dict) -> None:
        # a module-level function: Ray pickles this closure by value, with a copy of its globals,
        # so setting the injector must happen in the worker's imported module
        _run_with_faults(train_worker, loop_config)

    run.__name__ = run.__qualname__ = getattr(train_worker, "__name__", "train_worker")
    return run
