"""Issue 24: sweeps with Ray Tune over whole tower-parallel runs (jobs/tune.py, alexnet_ray.train.sweep).

Bad input is refused in one line before Ray starts; a real sweep of 4 tiny trials on the demo data
runs under ASHA on the session's Ray cluster, and its best config, re-run through jobs/train.py,
gives the trial's validation error exactly (deterministic CPU run).
"""

from __future__ import annotations

import json
import math

import pytest
import yaml

from alexnet_ray.train.config import ConfigError, load_config
from alexnet_ray.train.search_space import parse_search, trial_config
from conftest import RAY_TEST_CPUS, run_job, start_ray


def run_tune(capsys, *argv) -> tuple[int, str, str]:
    try:
        return run_job(capsys, "tune", *argv)
    except SystemExit as exit:
        out, err = capsys.readouterr()
        return exit.code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_search_specs_parse_to_typed_dimensions():
    base = load_config("tiny", validate=False)
    dims = parse_search(["optimizer.lr=loguniform:1e-3:1e-1", "model.dropout=choice:0.3,0.5",
                         "data.prefetch_batches=randint:1:4", "schedule.kind=grid:step,cosine"], base)
    assert [(d.name, d.distribution, d.args) for d in dims] == [
        ("optimizer.lr", "loguniform", (1e-3, 1e-1)), ("model.dropout", "choice", (0.3, 0.5)),
        ("data.prefetch_batches", "randint", (1, 4)), ("schedule.kind", "grid", ("step", "cosine"))]
    config = trial_config(base, {"optimizer.lr": 0.02, "model.dropout": 0.3, "schedule.kind": "cosine"})
    assert (config.optimizer.lr, config.model.dropout, config.schedule.kind) == (0.02, 0.3, "cosine")
    assert base.optimizer.lr == 0.005  # the base is left as it was


def test_a_trial_holds_its_workers_share_of_the_gpus():
    from alexnet_ray.train.sweep import DRIVER_CPUS, Sweep

    whole = Sweep(load_config("tiny", overrides=["parallel.replicas=2"]), ["optimizer.lr=choice:0.01,0.02"])
    assert whole.trial_needs(use_gpu=True) == {"CPU": DRIVER_CPUS + 4 * 0.5, "GPU": 4.0}
    shared = Sweep(load_config("tiny", overrides=["parallel.gpus_per_worker=0.5"]), ["optimizer.lr=choice:0.01,0.02"])
    assert shared.trial_needs(use_gpu=True)["GPU"] == 1.0  # two towers on one GPU
    assert shared.concurrency({"CPU": 16.0, "GPU": 2.0}, use_gpu=True) == 2
    assert "GPU" not in shared.trial_needs(use_gpu=False)


@pytest.mark.parametrize("spec, message", [
    ("optimizer.lrr=loguniform:1e-3:1e-1", "unknown key optimizer.lrr (did you mean optimizer.lr?)"),
    ("optimiser.lr=loguniform:1e-3:1e-1", "unknown section 'optimiser' (did you mean optimizer?)"),
    ("optimizer.lr=logunifrom:1e-3:1e-1", "unknown distribution 'logunifrom' (did you mean loguniform?)"),
    ("optimizer.lr=loguniform:1e-3", "loguniform needs LOW:HIGH, 0 < LOW < HIGH, got '1e-3'"),
    ("optimizer.lr=loguniform:0:1", "loguniform needs LOW:HIGH, 0 < LOW < HIGH, got 0:1"),
    ("optimizer.lr=uniform:1e-1:1e-3", "uniform needs LOW:HIGH, LOW < HIGH, got 0.1:0.001"),
    ("optimizer.lr=loguniform:small:1", "optimizer.lr must be a number"),
    ("model.dropout=choice:0.3", "choice needs at least two values"),
    ("schedule.kind=uniform:0:1", "uniform samples float values but schedule.kind is str"),
    ("optimizer.lr", "expected section.key=DISTRIBUTION:ARGS"),
    ("run.name=choice:a,b", "run.name: set by the sweep for each trial"),
])
def test_bad_search_is_refused_in_one_line_before_ray_starts(spec, message, capsys, monkeypatch, tmp_path):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init was called for a bad --search")

    monkeypatch.setattr(ray, "init", no_ray)
    code, out, err = run_tune(capsys, "--preset", "tiny", "--storage", str(tmp_path / "runs"), "--search", spec)
    assert code == 2, (out, err)
    assert message in one_error_line(err)
    assert not (tmp_path / "runs").exists()


def test_a_bad_search_message_is_the_config_error():
    with pytest.raises(ConfigError, match=r"--search 'model.widht=choice:1,2': .*did you mean model.width"):
        parse_search(["model.widht=choice:1,2"], load_config("tiny", validate=False))


@pytest.mark.ray
def test_a_sweep_that_can_never_place_a_trial_is_refused(prepared_demo, tmp_path, capsys):
    """2 workers x 3.9 CPUs fit the 8-CPU cluster as a run, but not with the trial's driver beside them."""
    start_ray()
    code, out, err = run_tune(capsys, "--preset", "tiny", "--data", str(prepared_demo), "--storage", str(tmp_path),
                              "--set", "parallel.cpus_per_worker=3.9", "--search", "optimizer.lr=loguniform:1e-3:1e-1")
    assert code == 2, (out, err)
    line = one_error_line(err)
    assert f"needs 8.05 CPU; the Ray cluster has {RAY_TEST_CPUS} CPU: no trial can ever be placed" in line, line


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_with_asha_stops_bad_trials_and_its_best_config_reproduces(prepared_demo, tmp_path, capsys):
    """4 tiny trials over the learning rate (2 epochs each, 2 at a time): a grid, so that the trials
    are known — two learning rates that learn against two that barely move in epoch 1."""
    start_ray()
    storage = tmp_path / "runs"
    code, out, err = run_tune(capsys, "--preset", "tiny", "--data", str(prepared_demo), "--storage", str(storage),
                              "--sweep-name", "lr", "--search", "optimizer.lr=grid:0.02,0.005,1e-5,1e-6",
                              "--samples", "1", "--max-concurrent", "2")
    assert code == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    sweep_dir = storage / "lr"
    table = (sweep_dir / "results.txt").read_text().splitlines()
    assert table[0].split()[:2] == ["trial", "optimizer.lr"] and len(table) == 5  # every trial reported
    assert summary["trials"] == 4 and summary["stopped_early"] >= 1
    best_lr = summary["values"]["optimizer.lr"]
    assert best_lr in (0.02, 0.005), summary  # one of the two that learn, never one that barely moves
    # every trial is a whole run under the sweep's storage, with its own checkpoints and metrics
    runs = sorted((sweep_dir / "runs").iterdir())
    assert len(runs) == 4 and all(list(r.glob("checkpoint_epoch_*")) and list(r.glob("metrics/epoch_*.json"))
                                  for r in runs)
    epochs = sorted(len(list(r.glob("metrics/epoch_*.json"))) for r in runs)
    assert epochs[-1] == 2 and epochs[0] == 1, epochs  # the best ran both epochs, a stopped one only the first
    png = (sweep_dir / "sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG")

    best_yaml = sweep_dir / "best.yaml"
    values = yaml.safe_load(best_yaml.read_text())
    assert values["optimizer"]["lr"] == best_lr and values["run"]["name"] is None and "storage" not in values["run"]
    code, out, err = run_job(capsys, "train", "--config", str(best_yaml), "--storage", str(tmp_path / "rerun"))
    assert code == 0, err[-3000:]
    rerun = json.loads(out.strip().splitlines()[-1])
    assert rerun["epochs"] == summary["epochs"] == 2
    assert rerun["val_top1_error"] == summary["val_top1_error"], (rerun, summary)  # exactly
    assert not math.isnan(rerun["val_top1_error"]) and rerun["val_top1_error"] < 0.9  # it learned
