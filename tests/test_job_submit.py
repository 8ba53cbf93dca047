"""`ray job submit` against a head started with `ray start --head` and token auth, as the README shows.

Needs the dashboard (`ray[default]`); skipped with the reason when it is not installed.
"""

import importlib.util
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import ray_head
from alexnet_ray.data.demo import write_demo_dataset

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("aiohttp", "aiohttp_cors", "grpc", "opencensus")),
        reason="`ray job submit` needs the Ray dashboard: pip install 'ray[default]'",
    ),
]


def check_training_summary(printed: dict, storage, name: str) -> None:
    assert {"val_top1_error", "val_top5_error", "train_loss", "epochs", "checkpoint"} <= printed.keys()
    # the tiny preset learns (dropout 0.5, two epochs): top-5 well above chance (0.5)
    assert printed["epochs"] == 2 and printed["val_top5_error"] < 0.35 and printed["val_top1_error"] < 0.9
    assert (storage / name / "checkpoint_epoch_0002" / "checkpoint.pt").is_file()
    assert sorted(p.name for p in (storage / name / "metrics").glob("epoch_*.json")) == ["epoch_0001.json", "epoch_0002.json"]
    assert printed["checkpoint"] == str(storage / name / "checkpoint_epoch_0002")


def test_job_submit_with_token_auth_and_stop_by_pid(tmp_path):
    """Two trainings submitted at once to one head each keep their own workers, checkpoints and
    metrics (issue 20); and a job started without an address beside that head, on a machine where
    a plain `ray.init()` would join it, starts a cluster of its own and says so."""
    head = ray_head.start_head(num_cpus=6)
    try:
        # token auth is on: the jobs API refuses a client without the token
        status, _ = ray_head.dashboard_get(head, "/api/jobs/", token=False)
        assert status == 401

        machine = {"RAY_TMPDIR": str(head.temp_dir.parent)}  # where this head is recorded, as /tmp/ray is
        ray_head.wait_recorded(head)
        probe = subprocess.run([sys.executable, "-c", "import ray; ray.init(); print(ray.get_runtime_context().gcs_address)"],
                               env={**head.env, **machine}, capture_output=True, text=True, timeout=120)
        port = head.gcs_address.rsplit(":", 1)[1]  # Ray records the node's address, not 127.0.0.1
        joined = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else probe.stderr[-2000:]
        assert joined.endswith(f":{port}"), joined  # the trap is real: a plain ray.init() joins the head

        raw = write_demo_dataset(tmp_path / "raw", train_per_class=4, val_per_class=2)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        local = subprocess.run([sys.executable, str(ray_head.REPO / "jobs" / "prepare.py"), str(raw),
                                str(tmp_path / "prepared"), "--size", "40"], cwd=ray_head.REPO,
                               env={**env, **machine, "PYTHONPATH": str(ray_head.REPO)},
                               capture_output=True, text=True, timeout=300)
        assert local.returncode == 0, local.stderr[-3000:]
        said = [line for line in local.stderr.splitlines() if line.startswith("ray: ")]
        assert len(said) == 1 and said[0].startswith("ray: started a local cluster of this job's own ("), local.stderr[-2000:]
        assert re.search(rf"; not joining the cluster recorded at [\d.]+:{port} \(pass --address to use it\)$", said[0])
        assert (tmp_path / "prepared" / "manifest.json").is_file()

        names = ("first", "second")
        with ThreadPoolExecutor(len(names)) as pool:
            results = dict(zip(names, pool.map(lambda name: ray_head.submit_and_wait(
                head, [*ray_head.JOB_ENTRYPOINT, "--storage", str(tmp_path / "runs"), "--name", name], timeout_s=400),
                names)))
        for name, result in results.items():
            assert result["returncode"] == 0, result["submit_output"][-3000:]
            assert result["status"] == "SUCCEEDED", result
            assert "ray: joined the cluster at" in result["logs"]
            assert "Cleaning up placement group" not in result["logs"] and "Failed to query" not in result["logs"]
            check_training_summary(ray_head.last_json_line(result["logs"]), tmp_path / "runs", name)
    finally:
        left = ray_head.stop_head(head)
    assert left == {}, f"Ray processes of this head still alive: {left}"
    assert not ray_head.session_pids(head), "processes naming the head's temp dir remain"
