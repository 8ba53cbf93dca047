"""Issue 23: what a newcomer sees. A healthy demo-sized run through jobs/train.py, in its own local
cluster, prints Ray's start-up lines and then only the project's own: the cluster it uses, the demo
data, the run directory, progress, one line per epoch, the done line and the JSON summary."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
WORKER_PREFIX = re.compile(r"^\((RayTrainWorker|TrainController|PlacementGroupCleaner|\w+) pid=\d+(, ip=[\d.]+)?\) ")
OURS = ("ray: started a local cluster of this job's own", "prepared ", "run directory: ", "epoch ", "done: ", "{")


def test_a_healthy_run_prints_only_the_projects_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--epochs", "2", "--storage",
                           str(tmp_path / "runs"), "--name", "console", "--set", "run.progress_interval_s=1"],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    lines = [ANSI.sub("", line) for line in done.stdout.splitlines() if line.strip()]  # as a terminal shows them
    started = [i for i, line in enumerate(lines) if "Started a local Ray instance" in line]
    assert started, lines
    after = lines[started[0] + 1:]
    for line in after:
        assert not any(noise in line for noise in ("PlacementGroupCleaner", "core_worker.cc", "Progress bars disabled"))
        assert WORKER_PREFIX.sub("", line).startswith(OURS), f"not the project's line: {line!r}\nall:\n" + "\n".join(after)
    summary = json.loads(after[-1])
    assert summary["epochs"] == 2 and summary["checkpoint"] == str(tmp_path / "runs" / "console" / "checkpoint_epoch_0002")
    done_line = next(line for line in after if line.startswith("done: "))
    assert re.match(r"done: 2 epochs in \d+:\d\d, [\d,]+ img/s on average, val top-1 error", done_line), done_line
    progress = [WORKER_PREFIX.sub("", line) for line in after if re.search(r"step \d+/\d+", line)]
    assert progress and all(re.search(r"epoch ETA (\d+:\d\d|\?)  run \d+:\d\d, ETA (\d+:\d\d|\?)$", p) for p in progress), progress
    epochs = [WORKER_PREFIX.sub("", line) for line in after if re.match(r"(\(.*\) )?epoch \d/2: ", line)]
    assert len(epochs) == 2 and epochs[-1].endswith(", run " + epochs[-1].rsplit(", run ", 1)[1])
    assert epochs[-1].endswith("ETA 0:00"), epochs
