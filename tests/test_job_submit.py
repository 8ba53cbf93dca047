"""`ray job submit` against a head started with `ray start --head` and token auth, as the README shows.

Needs the dashboard (`ray[default]`); skipped with the reason when it is not installed.
"""

import importlib.util

import pytest

import ray_head

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("aiohttp", "aiohttp_cors", "grpc", "opencensus")),
        reason="`ray job submit` needs the Ray dashboard: pip install 'ray[default]'",
    ),
]


def test_job_submit_with_token_auth_and_stop_by_pid(tmp_path):
    head = ray_head.start_head(num_cpus=4)
    try:
        # token auth is on: the jobs API refuses a client without the token
        status, _ = ray_head.dashboard_get(head, "/api/jobs/", token=False)
        assert status == 401

        result = ray_head.submit_and_wait(
            head, [*ray_head.JOB_ENTRYPOINT, "--storage", str(tmp_path), "--name", "submitted"], timeout_s=300
        )
        assert result["returncode"] == 0, result["submit_output"][-3000:]
        assert result["status"] == "SUCCEEDED", result
        printed = ray_head.last_json_line(result["logs"])
        if ray_head.JOB_ENTRYPOINT == ray_head.PROBE_ENTRYPOINT:
            assert printed["preset"] == "tiny" and printed["num_workers"] == 2 and printed["width"] == 0.125
            # the job imported this package from its uploaded working_dir, not from the test's PYTHONPATH
            assert "runtime_resources/working_dir_files" in printed["package"]
            assert printed["auth_mode"] == "token"
            assert "alexnet_ray" in printed["uploaded"] and "cluster" in printed["uploaded"]
            assert not {".git", ".venv", "runs", "data"} & set(printed["uploaded"])
        else:  # jobs/train.py: its last line is the run summary
            assert {"val_top1_error", "val_top5_error", "train_loss", "epochs", "checkpoint"} <= printed.keys()
            # the tiny preset learns (dropout 0.5, two epochs): top-5 well above chance (0.5)
            assert printed["epochs"] == 2 and printed["val_top5_error"] < 0.35 and printed["val_top1_error"] < 0.9
            assert (tmp_path / "submitted" / "checkpoint_epoch_0002" / "checkpoint.pt").is_file()
            assert printed["checkpoint"].endswith("checkpoint_epoch_0002")
    finally:
        left = ray_head.stop_head(head)
    assert left == {}, f"Ray processes of this head still alive: {left}"
    assert not ray_head.session_pids(head), "processes naming the head's temp dir remain"
