"""Issue 20: jobs beside a running training leave it alone. Each job without an address starts a
local cluster of its own (with its own State API); real processes, real clusters, no mocks.

The victim is the session's `tiny_run` config, run as `jobs/train.py` in a subprocess and parked
(a test-only "pause" fault) at the start of its second epoch, so the neighbours surely run while it
lives: a prepare, an evaluate of its newest checkpoint, and a second training, each with its own
local cluster. Both trainings must end with tiny_run's weights. A `ray start` head recorded where
Ray looks ($RAY_TMPDIR/ray, as /tmp/ray on a workstation) is the cluster Ray Train's placement-group
cleaner used to ask about the victim's controller: told "no such actor", it removed the victim's
placement group and the run died."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import ray_head
from ray_head import last_json_line
from alexnet_ray.checkpoint import load_checkpoint
from alexnet_ray.data.demo import write_demo_dataset
from alexnet_ray.train import fault_injection

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
RAY_NOISE = ("PlacementGroupCleaner", "Failed to query", "Cleaning up placement group")


def job_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def start_job(name: str, args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / f"{name}.py"), *args], cwd=ROOT, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_neighbour_jobs_leave_a_running_training_alone(prepared_demo, tiny_run, tmp_path):
    root = Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))  # Ray's default temp dir for every job here
    machine = {"RAY_TMPDIR": str(root)}
    plan = fault_injection.write_plan(tmp_path / "faults" / "plan.json", [
        {"point": "step", "action": "pause", "rank": 1, "epoch": 1, "step": 0, "seconds": 240}])
    train_args = ["--preset", "tiny", "--data", str(prepared_demo), "--storage", str(tmp_path / "runs"),
                  "--set", "parallel.exchange_timeout_s=300"]  # the partner waits out the pause
    logs = {name: tmp_path / f"{name}.log" for name in ("victim", "second", "prepare", "evaluate")}
    victim = start_job("train", [*train_args, "--name", "victim"],
                       job_env(**machine, **{fault_injection.PLAN_ENV_VAR: str(plan)}), logs["victim"])
    jobs, head = {"victim": victim}, None
    try:
        wait_for(lambda: any(e["event"] == "fired" for e in fault_injection.read_events(plan)) or victim.poll() is not None,
                 300, "the victim never reached its second epoch")
        assert victim.poll() is None, logs["victim"].read_text()[-3000:]
        # rank 1 parks at step 0 while rank 0 may still be persisting the epoch's checkpoint (Ray
        # Train's report lets the ranks go before the upload is done; seen on a loaded machine)
        checkpoint = tmp_path / "runs" / "victim" / "checkpoint_epoch_0001" / "checkpoint.pt"
        wait_for(checkpoint.is_file, 120, "the victim's first checkpoint never appeared")

        # A `ray start` now, recorded where Ray looks, with the token every cluster here shares (the
        # session's cluster wrote it), as on a workstation: Ray Train's cleaner used to ask it about
        # the victim's controller, hear "no such actor", and remove the victim's placement group.
        head = ray_head.start_head(num_cpus=1, token_path=Path.home() / ".ray" / "auth_token", root=root)
        ray_head.wait_recorded(head)
        raw = write_demo_dataset(tmp_path / "raw", seed=1, train_per_class=6, val_per_class=2)
        jobs["second"] = start_job("train", [*train_args, "--name", "second"], job_env(**machine), logs["second"])
        jobs["prepare"] = start_job("prepare", [str(raw), str(tmp_path / "prepared"), "--size", "40"],
                                    job_env(**machine), logs["prepare"])
        jobs["evaluate"] = start_job("evaluate", [str(tmp_path / "runs" / "victim"), "--data", str(prepared_demo),
                                                  "--no-progress"], job_env(**machine), logs["evaluate"])
        for name in ("prepare", "evaluate", "second"):
            assert jobs[name].wait(timeout=300) == 0, logs[name].read_text()[-3000:]
        time.sleep(3)  # the cleaner polls every second
        assert victim.poll() is None, "the victim ended before its neighbours did: " + logs["victim"].read_text()[-3000:]
        fault_injection.resume(plan, 0)
        assert victim.wait(timeout=300) == 0, logs["victim"].read_text()[-3000:]
    finally:
        for job in jobs.values():
            if job.poll() is None:
                os.killpg(job.pid, 9)
        left = ray_head.stop_head(head) if head else {}
        shutil.rmtree(root, ignore_errors=True)
    assert left == {}, f"Ray processes of the recorded head still alive: {left}"

    for name, log in logs.items():
        text = log.read_text()
        said = [line for line in text.splitlines() if line.startswith("ray: ")]
        assert len(said) == 1 and said[0].startswith("ray: started a local cluster of this job's own"), (name, text[-2000:])
        if name != "victim":  # started after the head
            port = head.gcs_address.rsplit(":", 1)[1]  # Ray records the node's address, not 127.0.0.1
            assert re.search(rf"; not joining the cluster recorded at [\d.]+:{port} \(pass --address to use it\)$", said[0])
        assert not [line for line in text.splitlines() if any(n in line for n in RAY_NOISE)], (name, text[-3000:])
    evaluated = last_json_line(logs["evaluate"].read_text())
    assert evaluated["checkpoint"].endswith("checkpoint_epoch_0001") and evaluated["images"] == 100
    reference = load_checkpoint(tiny_run.checkpoint.path)["model"]
    for name in ("victim", "second"):
        summary = last_json_line(logs[name].read_text())
        assert summary["epochs"] == 2
        diff = max_abs_diff(load_checkpoint(summary["checkpoint"])["model"], reference)
        assert diff <= 1e-6, (name, diff)
        assert summary["train_loss"] == pytest.approx(tiny_run.metrics["train_loss"], abs=1e-6)
