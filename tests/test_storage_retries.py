"""Issue 28: a bucket that answers 503 SlowDown, cuts a response short or stalls past the client's
read timeout for a few seconds costs time, never the run. The S3 server is moto's, on loopback,
with faults injected in front of it (tests/faulty_s3.py); pyarrow, Ray and gloo are real.

One dataset is prepared into the bucket (small shards of 16-row groups, so an epoch makes many
GETs); one undisturbed run per layout is the reference the disturbed runs must equal exactly (the
1x2 one epoch long, the 2x1 two: the outage test resumes into its second epoch).
"""

import glob
import json
import os
import re
import time

import pytest
import torch
from conftest import S3_FAULTS, make_bucket, run_job, tiny_config

from alexnet_ray import storage, storage_retries
from alexnet_ray.checkpoint import load_checkpoint
from alexnet_ray.data.demo import write_demo_dataset
from alexnet_ray.data.manifest import load_manifest
from alexnet_ray.data.prepare import prepare_dataset
from alexnet_ray.data.shards import ShardIndex
from alexnet_ray.train.metrics import read_metrics_files
from alexnet_ray.train.trainer import Trainer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BUCKET = "retries"
PREPARE = {"layout": "folder", "size": 73, "shard_mb": 0.05, "row_group_rows": 16}
EPISODE = re.compile(r"^storage: (\d+) (reads|writes|requests) of (s3://\S+) answered (.+), retried for ([\d.]+) s$")


@pytest.fixture(scope="module")
def dataset(s3_endpoint, tmp_path_factory):
    """The demo images (a local tree and a copy in the bucket) and their prepared shards in the bucket."""
    bucket = make_bucket(BUCKET)
    raw = write_demo_dataset(tmp_path_factory.mktemp("raw") / "raw", seed=0, train_per_class=20, val_per_class=5)
    storage.upload_dir(raw, f"{bucket}/src")
    prepare_dataset(f"{bucket}/src", f"{bucket}/data", progress=False, **PREPARE)
    return {"src": f"{bucket}/src", "data": f"{bucket}/data", "runs": f"{bucket}/runs"}


def _config(dataset, name, towers, replicas, *overrides):
    return tiny_config(dataset["data"], dataset["runs"], f"run.name={name}", f"parallel.towers={towers}",
                       f"parallel.replicas={replicas}", *overrides)


def _train(dataset, name, towers, replicas, *overrides):
    result = Trainer(_config(dataset, name, towers, replicas, *overrides)).fit()
    assert result.error is None
    return result


@pytest.fixture(scope="module")
def baselines(dataset):
    """The undisturbed run of each layout."""
    return {(1, 2): _train(dataset, "base-1x2", 1, 2, "run.epochs=1"), (2, 1): _train(dataset, "base-2x1", 2, 1)}


def _losses(run_uri: str, epochs: int | None = None) -> list[float]:
    return [r["train_loss"] for r in read_metrics_files(run_uri)][:epochs]


def _weights(checkpoint: str) -> dict:
    return load_checkpoint(checkpoint)["model"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ in {different}"


def _worker_log_lines() -> dict[str, list[str]]:
    """Every Ray worker log's lines (the cluster's processes print their episode lines there)."""
    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()
    lines = {}
    for path in glob.glob(os.path.join(logs, "worker-*")):
        with open(path, errors="replace") as file:
            lines[path] = file.read().splitlines()
    return lines


def _new_episode_lines(before: dict, after: dict) -> dict[str, list[str]]:
    """Per log file, the episode lines written since `before` (Ray may prefix a line with its process)."""
    found = {}
    for path, lines in after.items():
        new = [re.sub(r"^\(\S+ pid=\d+\S*\) ", "", line) for line in lines[len(before.get(path, [])):]]
        episodes = [line for line in new if line.startswith("storage: ")]
        if episodes:
            found[path] = episodes
    return found


def _assert_one_line_per_episode(found: dict[str, list[str]], label: str, where: str) -> None:
    """Each process that met the fault said so once: one line per episode, not one per request."""
    matching = {path: [line for line in lines if f"answered {label}" in line] for path, lines in found.items()}
    matching = {path: lines for path, lines in matching.items() if lines}
    assert matching, f"no episode line for {label}: {found}"
    for path, lines in matching.items():
        assert len(lines) == 1, f"{path}: {lines}"
        match = EPISODE.match(lines[0])
        assert match, lines[0]
        assert int(match.group(1)) >= 1 and where in match.group(3)


# ---- permanent errors fail at once ----------------------------------------------------------------

def test_403_and_404_fail_at_once_without_retrying(dataset, s3_faults):
    manifest = storage.join(dataset["data"], "manifest.json")
    denied = s3_faults.add("403", method="GET", contains=f"/{BUCKET}/data/manifest.json")
    started = time.monotonic()
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        storage.read_bytes(manifest)
    assert time.monotonic() - started < 1.0 and denied.hits == 1  # one request: neither we nor pyarrow retried
    started = time.monotonic()
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("s3://no-such-bucket-28/data/manifest.json")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(dataset["data"], "no-such-key.json"))
    assert time.monotonic() - started < 1.0


def test_a_mistyped_endpoint_is_refused_before_the_run_within_the_preflight_limit(monkeypatch, tmp_path):
    """Connection refused is retried (a store restarting refuses too), but the config check before
    any worker starts waits PREFLIGHT_RETRY_S, not the run's minutes, and says where it looked."""
    from ray_head import free_port

    from alexnet_ray.train.config import ConfigError, load_config
    from alexnet_ray.train.config.validation import PREFLIGHT_RETRY_S

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"^data.path=s3://retries/data: cannot reach it \(storage: s3://retries/data: "
                                          r".*retried for 1\d\.\d s"):
        load_config("tiny", overrides=["data.path=s3://retries/data", f"run.storage={tmp_path}"])
    assert PREFLIGHT_RETRY_S <= time.monotonic() - started < PREFLIGHT_RETRY_S + 10
    assert storage_retries.retry_budget() == 300  # the run's own budget is back


# ---- a blip inside the budget: the same bytes, one line -------------------------------------------

@pytest.mark.parametrize("fault", ["503", "reset", "delay"])
def test_a_blip_returns_the_same_rows_and_says_so_once(dataset, s3_faults, capfd, fault):
    """Row-group reads of the train split (the loader's reads) during a 3-second window of `fault`."""
    index = ShardIndex.from_manifest(load_manifest(dataset["data"]), "train")
    rows = list(range(0, index.num_rows, 3))
    expected_jpegs, expected_labels, _ = index.read(rows)
    expected = [bytes(j) for j in expected_jpegs]
    capfd.readouterr()
    rule = s3_faults.add(fault, method="GET", contains=f"/{BUCKET}/data/train", seconds=3, skip=1, delay_s=3.5)
    started = time.monotonic()
    jpegs, labels, _ = index.read(rows)
    took = time.monotonic() - started
    assert [bytes(j) for j in jpegs] == expected and labels.tolist() == expected_labels.tolist()
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("storage: ")]
    label = {"503": "503 SlowDown", "reset": "a connection closed mid-body", "delay": "a read timeout"}[fault]
    assert len(lines) == 1 and EPISODE.match(lines[0]), lines
    assert f"answered {label}" in lines[0] and f"s3://{BUCKET}/data/train" in lines[0]
    assert rule.hits >= 1 and took > 2.5, (rule.hits, took)  # it waited the window out


# ---- training through the faults: the undisturbed run's losses and weights -----------------------

def test_training_through_a_10s_503_window_1x2(dataset, baselines, s3_faults):
    """1 tower x 2 replicas: train GETs answer 503 SlowDown for 10 s mid-epoch. Replica 1 waits for
    replica 0's gradients meanwhile, longer than parallel.exchange_timeout_s=5: the data wait allows
    for the retries. Prints how much longer the epoch took (docs/reliability.md quotes it)."""
    before = _worker_log_lines()
    window = s3_faults.add("503", method="GET", contains=f"/{BUCKET}/data/train", seconds=10, skip=6)
    result = _train(dataset, "blip-1x2", 1, 2, "run.epochs=1", "parallel.exchange_timeout_s=5")
    base = baselines[(1, 2)]
    assert window.hits >= 2 and window.closed
    assert _losses(result.run_uri) == _losses(base.run_uri)
    _assert_same_weights(_weights(result.checkpoint_uri), _weights(base.checkpoint_uri))
    found = _new_episode_lines(before, _worker_log_lines())
    _assert_one_line_per_episode(found, "503 SlowDown", f"s3://{BUCKET}/data/train")
    blip, undisturbed = (read_metrics_files(r.run_uri)[0]["epoch_s"] for r in (result, base))
    print(f"\n1x2, a 10-s 503 SlowDown window on the train shards mid-epoch: epoch {blip:.1f} s against "
          f"{undisturbed:.1f} s undisturbed (+{blip - undisturbed:.1f} s); {window.hits} GETs refused; "
          f"{'; '.join(line for lines in found.values() for line in lines)}")


@pytest.fixture(scope="module")
def blip_2x1(dataset, baselines):
    """The first epoch of a 2 towers x 1 replica run, through its faults: train GETs cut mid-body
    for 4 s mid-epoch, the epoch's checkpoint upload answered 503 SlowDown for 10 s."""
    faults = S3_FAULTS[0]
    faults.clear()
    before = _worker_log_lines()
    faults.add("reset", method="GET", contains=f"/{BUCKET}/data/train", seconds=4, skip=3)
    throttled = faults.add("503", method="PUT", contains=f"/{BUCKET}/runs/blip-2x1/checkpoint_epoch_0001",
                           seconds=10)
    try:
        result = _train(dataset, "blip-2x1", 2, 1, "run.epochs=1", "parallel.exchange_timeout_s=5")
    finally:
        faults.clear()
    return {"result": result, "throttled": throttled, "episodes": _new_episode_lines(before, _worker_log_lines())}


def test_training_through_resets_and_a_throttled_checkpoint_upload_2x1(blip_2x1, baselines):
    """The checkpoint completes and loads, with the undisturbed run's first-epoch weights."""
    result, throttled, found = blip_2x1["result"], blip_2x1["throttled"], blip_2x1["episodes"]
    base = baselines[(2, 1)]
    assert throttled.hits >= 2 and throttled.closed
    assert result.checkpoint_uri == f"{result.run_uri}/checkpoint_epoch_0001"
    assert _losses(result.run_uri) == _losses(base.run_uri, epochs=1)
    _assert_same_weights(_weights(result.checkpoint_uri), _weights(f"{base.run_uri}/checkpoint_epoch_0001"))
    _assert_one_line_per_episode(found, "a connection closed mid-body", f"s3://{BUCKET}/data/train")
    _assert_one_line_per_episode(found, "503 SlowDown", f"s3://{BUCKET}/runs/blip-2x1/checkpoint_epoch_0001")


# ---- prepare and evaluate under faults -----------------------------------------------------------

def _objects(root: str) -> dict[str, bytes]:
    prefix = storage.resolve(root)[1]
    return {i.path[len(prefix):]: storage.read_bytes(f"s3://{i.path}")
            for i in storage.list_dir(root, recursive=True) if i.type.name == "File"}


def test_prepare_under_faults_writes_the_same_shards_and_manifest(dataset, s3_faults):
    """The source in the bucket: its GETs are cut mid-body for 3 s, and the shard PUTs answer 503
    for 3 s; the shards and manifest are those of the undisturbed prepare of the same images."""
    src, out = dataset["src"], f"s3://{BUCKET}/prepared-under-faults"
    gets = s3_faults.add("reset", method="GET", contains=f"/{BUCKET}/src/", seconds=3, skip=20)
    puts = s3_faults.add("503", method="PUT", contains=f"/{BUCKET}/prepared-under-faults/", seconds=3, skip=2)
    faulted = prepare_dataset(src, out, progress=False, **PREPARE)
    assert gets.hits >= 1 and puts.hits >= 2
    assert faulted.to_dict() == load_manifest(dataset["data"]).to_dict()
    assert _objects(out) == _objects(dataset["data"])


def test_evaluate_under_faults_gives_the_same_figures(dataset, baselines, s3_faults):
    """Val GETs stall past the client's read timeout for 4 s."""
    from alexnet_ray.eval.batch import evaluate

    checkpoint = baselines[(2, 1)].checkpoint_uri
    clean = evaluate(checkpoint, dataset["data"], actors=1, progress=False)
    gets = s3_faults.add("delay", method="GET", contains=f"/{BUCKET}/data/val", seconds=4, skip=1, delay_s=3.5)
    faulted = evaluate(checkpoint, dataset["data"], actors=1, progress=False)
    assert gets.hits >= 1
    figures = ("top1_error", "top5_error", "loss", "images")
    assert {k: faulted[k] for k in figures} == {k: clean[k] for k in figures}


# ---- past the budget -----------------------------------------------------------------------------

def test_an_outage_past_the_budget_ends_the_run_in_one_line_and_the_rerun_resumes(dataset, baselines, blip_2x1,
                                                                                    s3_faults, capsys, monkeypatch):
    """The 2x1 run goes on to its second epoch, whose checkpoint upload meets 503s for longer than
    run.storage_retry_s=2: the job says so in one line, exits non-zero, leaves no
    checkpoint_epoch_0002; a re-run resumes from the first epoch's checkpoint and ends with the
    undisturbed run's losses and weights."""
    name, runs = "blip-2x1", dataset["runs"]
    monkeypatch.setattr(storage_retries, "_budget", [storage_retries.retry_budget()])  # fit() sets this process's
    s3_faults.add("503", method="PUT", contains=f"/{BUCKET}/runs/{name}/checkpoint_epoch_0002")
    argv = ["train", "--preset", "tiny", "--data", dataset["data"], "--storage", runs, "--name", name,
            "--set", "parallel.towers=2", "--set", "parallel.replicas=1", "--set", "run.storage_retry_s=2",
            "--set", "parallel.exchange_timeout_s=5"]
    started = time.monotonic()
    code, out, err = run_job(capsys, *argv)
    failed_after = time.monotonic() - started
    assert code != 0
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: training failed: storage: s3://{BUCKET}/runs/{name}/checkpoint_epoch_0002"
                        r"(/\S+)?: .*SLOW_DOWN.*\(retried for [\d.]+ s, the budget run\.storage_retry_s=2\)",
                        last), last
    assert storage.is_file(f"{runs}/{name}/checkpoint_epoch_0001/checkpoint.pt")
    assert not [i for i in storage.list_dir(f"{runs}/{name}/checkpoint_epoch_0002", recursive=True)
                if i.type.name == "File"]  # whole or absent: absent
    s3_faults.clear()
    started = time.monotonic()
    code, out, err = run_job(capsys, *argv)
    assert code == 0, err
    with capsys.disabled():
        print(f"\noutage: the job failed after {failed_after:.1f} s, the re-run took "
              f"{time.monotonic() - started:.1f} s")
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["checkpoint"] == f"{runs}/{name}/checkpoint_epoch_0002"
    assert load_checkpoint(summary["checkpoint"])["epoch"] == 2
    base = baselines[(2, 1)]
    _assert_same_weights(_weights(summary["checkpoint"]), _weights(base.checkpoint_uri))
    assert _losses(f"{runs}/{name}") == _losses(base.run_uri)


def test_a_prepare_outage_past_the_budget_leaves_no_partial_shard_and_the_rerun_finishes(dataset, s3_faults,
                                                                                         capsys, monkeypatch):
    out = f"s3://{BUCKET}/prepared-outage"
    monkeypatch.setattr(storage_retries, "_budget", [2.0])
    s3_faults.add("503", method="PUT", contains=f"/{BUCKET}/prepared-outage/val-")
    code, _, err = run_job(capsys, "prepare", dataset["src"], out, "--layout", "folder", "--size", "73",
                           "--shard-mb", "0.05", "--row-group-rows", "16")
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"prepare: storage: {out}/val-\S+: .*SLOW_DOWN.*\(retried for [\d.]+ s, the budget "
                        r"run\.storage_retry_s=2\)", last), last
    names = [i.base_name for i in storage.list_dir(out)]
    assert "manifest.json" not in names and not [n for n in names if n.startswith("val-")]
    s3_faults.clear()
    code, _, err = run_job(capsys, "prepare", dataset["src"], out, "--layout", "folder", "--size", "73",
                           "--shard-mb", "0.05", "--row-group-rows", "16")
    assert code == 0, err
    assert _objects(out) == _objects(dataset["data"])


# ---- what counts as transient -----------------------------------------------------------------------

# pyarrow's own texts, as seen from the faulty server above (and curl's for a refused connection)
PYARROW_ERRORS = [
    ("AWS Error SERVICE_UNAVAILABLE during GetObject operation: ", "503 SlowDown"),
    ("When uploading part for key 'y.bin' in bucket 'b': AWS Error SLOW_DOWN during UploadPart operation: "
     "Please reduce your request rate.", "503 SlowDown"),
    ("When getting information for key 'x' in bucket 'b': AWS Error UNKNOWN (HTTP status 503) during "
     "HeadObject operation: No response body.", "503 SlowDown"),
    ("AWS Error UNKNOWN (HTTP status 502) during GetObject operation: ", "a server error (5xx)"),
    ("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 18, Transferred a partial file",
     "a connection closed mid-body"),
    ("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 28, Timeout was reached",
     "a read timeout"),
    ("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7, Couldn't connect to server",
     "a connection refused"),
    ("AWS Error ACCESS_DENIED during GetObject operation: Access Denied", None),
    ("When getting information for key 'x' in bucket 'b': AWS Error UNKNOWN (HTTP status 403) during "
     "HeadObject operation: No response body.", None),
    ("Parquet magic bytes not found in footer", None),
]


@pytest.mark.parametrize("text,label", PYARROW_ERRORS, ids=[t[:40] for t, _ in PYARROW_ERRORS])
def test_which_errors_are_retried(text, label):
    assert storage_retries.transient(OSError(text)) == label
    assert storage_retries.transient(FileNotFoundError(text)) is None  # a 404 never is
