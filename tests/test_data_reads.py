"""Reads proportional to rows: a real training on the S3 endpoint on loopback reads each training
row group about once an epoch, footers included, as counted by the server (tests/conftest.py's
GetBytes around moto's app), at 1 and 2 replicas."""

import json
from pathlib import Path

import pytest

from alexnet_ray.data.demo import write_demo_dataset
from alexnet_ray.data.manifest import load_manifest
from alexnet_ray.data.prepare import prepare_dataset
from alexnet_ray.train.trainer import Trainer
from conftest import make_bucket, start_ray, tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def dataset_on_s3(s3_endpoint, tmp_path_factory):
    """The demo set (400 train images, 73 px) in row groups of 4: at the tiny preset's global batch
    of 16, windows of 16 groups (64 rows), 6 of them and a last one of 4 groups."""
    raw = write_demo_dataset(tmp_path_factory.mktemp("reads") / "raw", seed=0)
    uri = make_bucket("reads") + "/demo"
    prepare_dataset(raw, uri, layout="folder", size=73, row_group_rows=4, use_ray=False, progress=False)
    return uri


@pytest.mark.parametrize("replicas", [1, 2])
def test_training_reads_each_row_group_once_an_epoch(dataset_on_s3, s3_get_bytes, tmp_path, replicas):
    shards = load_manifest(dataset_on_s3).splits["train"]["shards"]
    split_bytes = sum(s["bytes"] for s in shards)
    start_ray()
    result = Trainer(tiny_config(dataset_on_s3, tmp_path, "parallel.towers=1", f"parallel.replicas={replicas}",
                                 "run.epochs=1", f"run.name=reads-{replicas}")).fit()
    served = s3_get_bytes.total("/train-")
    print(f"{replicas} replica(s): the server sent {served / split_bytes:.3f} x the train shards")
    assert served / split_bytes <= 1.15, f"{served / split_bytes:.3f} x the train shards read in one epoch"
    assert served / split_bytes >= 0.9  # the count sees the reads at all
    metrics = json.loads((Path(result.path) / "metrics" / "epoch_0001.json").read_text())
    assert metrics["read_row_groups"] == metrics["train_row_groups"] == sum(len(s["row_groups"]) for s in shards)
    assert metrics["read_amplification"] == pytest.approx(served / split_bytes, rel=0.1)  # what the loaders planned
