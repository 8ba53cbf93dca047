"""Trainer.fit() on the local Ray cluster (gloo): layouts learn, two towers equal one, resume works."""

import json
from pathlib import Path

import pytest
import torch

from alexnet_ray.train.checkpoint import load_checkpoint
from alexnet_ray.train.config import ConfigError
from alexnet_ray.train.trainer import Trainer
from conftest import _start_ray, tiny_config

pytestmark = pytest.mark.ray
CHANCE_TOP1_ERROR = 0.9  # 10 classes


def fit(prepared_demo, storage, *overrides):
    _start_ray()
    return Trainer(tiny_config(prepared_demo, storage, *overrides)).fit()


def epoch_metrics(result) -> list[dict]:
    files = sorted((Path(result.path) / "metrics").glob("epoch_*.json"))
    return [json.loads(f.read_text()) for f in files]


def final_weights(result) -> dict:
    return load_checkpoint(result.checkpoint.path)["model"]


def assert_weights_close(a: dict, b: dict, rtol: float):
    assert a.keys() == b.keys()
    for name in a:
        scale = b[name].abs().max().clamp_min(1e-12)
        err = (a[name] - b[name]).abs().max() / scale
        assert err <= rtol, f"{name}: relative difference {err:.2e} > {rtol:.0e}"


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("trainer-runs")


@pytest.fixture(scope="module")
def one_tower_run(prepared_demo, storage):
    return fit(prepared_demo, storage, "parallel.towers=1", "run.name=one-tower")


@pytest.fixture(scope="module")
def two_replica_run(prepared_demo, storage):
    return fit(prepared_demo, storage, "parallel.replicas=2", "optimizer.lr_scaling=linear", "run.name=two-replicas")


@pytest.mark.parametrize("layout", ["1x1", "2x1", "2x2"])
def test_layout_learns(layout, tiny_run, one_tower_run, two_replica_run):
    result = {"1x1": one_tower_run, "2x1": tiny_run, "2x2": two_replica_run}[layout]
    epochs = epoch_metrics(result)
    assert [m["epoch"] for m in epochs] == [1, 2]
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"] - 0.1
    assert result.metrics["val_top1_error"] < CHANCE_TOP1_ERROR - 0.2
    for key in ("train_top1_error", "train_top5_error", "val_top5_error", "images_per_s", "lr",
                "share_data", "share_compute", "share_exchange", "share_grad_sync"):
        assert key in result.metrics, key
    assert result.metrics["val_images"] == 100  # every validation image, counted once
    towers, replicas = (int(x) for x in layout.split("x"))
    workers = epochs[-1]["workers"]
    assert sorted(w["world_rank"] for w in workers) == list(range(towers * replicas))
    for w in workers:
        assert w["world_rank"] == w["replica"] * towers + w["tower"]


def test_two_towers_equal_one_tower(tiny_run, one_tower_run):
    """Same seed, deterministic mode, dropout off: the split network trains exactly like one model."""
    assert_weights_close(final_weights(tiny_run), final_weights(one_tower_run), rtol=1e-5)
    assert tiny_run.metrics["train_loss"] == pytest.approx(one_tower_run.metrics["train_loss"], rel=1e-5)


def test_deterministic_runs_are_bit_identical(prepared_demo, storage, tiny_run):
    again = fit(prepared_demo, storage, "run.name=again", "run.epochs=1")
    first_epoch = load_checkpoint(Path(tiny_run.path) / "checkpoint_epoch_0001")["model"]
    for name, tensor in final_weights(again).items():
        assert torch.equal(tensor, first_epoch[name]), name


def test_checkpoint_is_portable(tiny_run):
    from alexnet_ray.model import AlexNet

    state = load_checkpoint(tiny_run.checkpoint.path)
    model = AlexNet(**state["config"]["model"])
    model.load_state_dict(state["model"])  # no Ray, no towers
    assert state["epoch"] == 2 and len(state["classes"]) == 10
    assert state["optimizer"]["momentum_buffer"].keys() == state["model"].keys()
    assert state["data_state"] == {"seed": 0, "epoch": 2}


def test_rerun_of_same_name_resumes_at_next_epoch(prepared_demo, storage, tiny_run):
    first = fit(prepared_demo, storage, "run.name=resumable", "run.epochs=1")
    epoch1_file = Path(first.path) / "metrics" / "epoch_0001.json"
    written = epoch1_file.stat().st_mtime_ns
    second = fit(prepared_demo, storage, "run.name=resumable", "run.epochs=2")
    assert second.metrics["epoch"] == 2
    assert epoch1_file.stat().st_mtime_ns == written  # epoch 1 was not trained again
    assert_weights_close(final_weights(second), final_weights(tiny_run), rtol=1e-6)


def test_resume_onto_another_layout(prepared_demo, storage, tiny_run):
    """A 2-tower checkpoint continues on 1 tower exactly as the 2-tower run continued."""
    epoch1 = Path(tiny_run.path) / "checkpoint_epoch_0001"
    resumed = fit(prepared_demo, storage, "parallel.towers=1", "run.name=relayout", f"run.resume_from={epoch1}")
    assert [m["epoch"] for m in epoch_metrics(resumed)] == [2]
    assert_weights_close(final_weights(resumed), final_weights(tiny_run), rtol=1e-5)


def test_gpu_request_on_cpu_cluster_fails_before_workers(prepared_demo, storage, ray_cluster):
    trainer = Trainer(tiny_config(prepared_demo, storage, "parallel.use_gpu=true", "run.name=gpu"))
    with pytest.raises(ConfigError, match="no GPU"):
        trainer.fit()
    assert not (Path(storage) / "gpu").exists()
