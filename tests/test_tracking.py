"""Issue 24: experiment trackers from rank 0 (alexnet_ray/train/tracking.py), against real trackers.

A real `mlflow server` on 127.0.0.1 (SQLite backend, artifacts in a temp folder, a free port),
started here. One tiny run whose rank-0 worker is SIGKILLed in epoch 2 (the reliability tests'
fault injection) and resumed by Ray Train serves every MLflow assertion: the params, each epoch's
metrics against the run's own metrics files, the pictures, the final checkpoint, and that the
resumed run continued the same MLflow run. W&B runs offline; its run folder's transaction log is
read back with the library's own record schema.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import mlflow  # the client: mlflow-skinny, the [mlflow] extra
import pytest

from alexnet_ray.checkpoint import load_checkpoint
from alexnet_ray.train import fault_injection
from alexnet_ray.train.trainer import Trainer
from alexnet_ray.visualize import read_run_metrics, run_pictures
from conftest import run_job, start_ray, tiny_config
from test_reliability import Killer

# The server is the full mlflow, which caps pyarrow below what the project runs with: `make setup`
# installs it in a venv of its own, as a team's tracking server is a service of its own.
SERVER_PYTHON = Path(os.environ.get("MLFLOW_SERVER_PYTHON",
                                    Path(__file__).resolve().parents[1] / ".venv" / "mlflow-server" / "bin" / "python"))
METRICS = ("train_loss", "train_top1_error", "val_loss", "val_top1_error", "val_top5_error", "lr")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    assert SERVER_PYTHON.exists(), f"{SERVER_PYTHON}: no mlflow server; `make setup` installs it"
    server = subprocess.Popen(
        [str(SERVER_PYTHON), "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], cwd=root, stdout=(root / "server.log").open("wb"), stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                break
        except OSError:
            assert server.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-2000:]
            time.sleep(0.5)
    yield uri
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def tracked_faulted_run(prepared_demo, tmp_path_factory, mlflow_server):
    """The tiny run (2 towers, 2 epochs) tracked to MLflow, rank 0 killed at epoch 2's third step."""
    start_ray()
    root = tmp_path_factory.mktemp("tracked")
    plan = fault_injection.write_plan(root / "faults" / "plan.json",
                                      [{"point": "step", "action": "hold", "rank": 0, "epoch": 1, "step": 2}])
    config = tiny_config(prepared_demo, root, "run.name=tracked", "run.max_failures=2", "run.tracking=mlflow",
                         f"run.tracking_uri={mlflow_server}", "run.tracking_project=issue-24")
    os.environ[fault_injection.PLAN_ENV_VAR] = str(plan)
    try:
        with Killer(plan) as killer:
            result = Trainer(config, pictures=run_pictures).fit()
    finally:
        del os.environ[fault_injection.PLAN_ENV_VAR]
    assert sorted(killer.killed) == [0]
    return result, config


@pytest.mark.ray
@pytest.mark.slow
def test_mlflow_run_holds_params_every_epoch_pictures_and_one_run_across_the_restart(tracked_faulted_run,
                                                                                     mlflow_server):
    result, config = tracked_faulted_run
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("issue-24")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # the restarted worker group continued it
    run = runs[0]
    assert json.loads((Path(result.path) / "tracking.json").read_text())["run_id"] == run.info.run_id
    params = run.data.params
    expected = {f"{s}.{k}": v for s, values in config.to_dict().items() for k, v in values.items()}
    assert params.keys() == expected.keys()
    assert params["optimizer.lr"] == "0.005" and params["run.tracking"] == "mlflow"
    assert params["parallel.towers"] == "2" and params["run.name"] == "tracked"
    # The run's own record of each epoch: the metrics every epoch's checkpoint holds (the same dict
    # as metrics/epoch_NNNN.json; after this worker restart epoch_0001.json was missing, see the report)
    own = [load_checkpoint(Path(result.path) / f"checkpoint_epoch_{e:04d}")["metrics"] for e in (1, 2)]
    files = {m["epoch"]: m for m in read_run_metrics(result.path)}
    for epoch, metrics in files.items():
        assert {k: metrics[k] for k in METRICS} == {k: own[epoch - 1][k] for k in METRICS}
    for name in METRICS:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert history == {m["epoch"]: pytest.approx(m[name], rel=1e-12) for m in own}, name
    assert run.data.tags["final_checkpoint"] == result.checkpoint.path
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["conv1_kernels.png", "curves.png"]
    local = client.download_artifacts(run.info.run_id, "curves.png", str(Path(result.path) / "downloaded"))
    assert Path(local).read_bytes().startswith(b"\x89PNG")


def wandb_records(run_file: Path) -> list:
    """The records of a W&B run's transaction log (`run-<id>.wandb`): a 7-byte header (":W&B", magic,
    version), then LevelDB-log blocks of 32 KiB whose records (crc32, length, type: full/first/middle/
    last) hold wandb_internal_pb2.Record messages, parsed with the library's own schema."""
    from wandb.proto import wandb_internal_pb2

    data, block, records, pending = run_file.read_bytes(), 32768, [], b""
    assert data[:4] == b":W&B", data[:7]
    offset = 7
    while offset + 7 <= len(data):
        left = block - offset % block
        if left < 7:
            offset += left
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        if length == 0 and kind == 0:
            offset += left
            continue
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.ray
@pytest.mark.slow
def test_wandb_offline_run_folder_holds_the_config_and_every_epoch(prepared_demo, tmp_path, monkeypatch):
    start_ray()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    config = tiny_config(prepared_demo, tmp_path, "run.name=wb", "run.tracking=wandb", "run.tracking_group=sweep-x")
    result = Trainer(config, pictures=run_pictures).fit()
    run_dir = Path(result.path)
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    records = wandb_records(offline[0] / f"run-{run_id}.wandb")
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    epochs = [h for h in history if "val_top1_error" in h]
    files = read_run_metrics(run_dir)
    assert [h["epoch"] for h in epochs] == [m["epoch"] for m in files] == [1, 2]
    for logged, written in zip(epochs, files):
        for name in METRICS:
            assert logged[name] == pytest.approx(written[name], rel=1e-12), name
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_record.run_id == run_id and run_record.run_group == "sweep-x"
    config_items = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    expected = {f"{s}.{k}": v for s, values in config.to_dict().items() for k, v in values.items()}
    assert {k: config_items[k] for k in expected} == expected
    assert sorted(p.name for p in (offline[0] / "files").glob("*.png")) == ["conv1_kernels.png", "curves.png"]


@pytest.mark.parametrize("tracking, env, message", [
    ("mlflow", {}, "the MLflow server does not answer"),
    ("wandb", {"WANDB_MODE": "online"}, "run.tracking=wandb: no WANDB_API_KEY in the environment"),
])
def test_a_tracker_that_cannot_work_fails_up_front_in_one_line(tracking, env, message, capsys, monkeypatch, tmp_path):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init was called for a tracker that cannot work")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, out, err = run_job(capsys, "train", "--preset", "tiny", "--storage", str(tmp_path / "runs"),
                             "--set", f"run.tracking={tracking}", "--set", f"run.tracking_uri={uri}")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert message in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()
