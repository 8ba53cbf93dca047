"""Datasets, runs and exports in a bucket: a real S3 server on loopback (moto's server mode), reached
by pyarrow and Ray's workers through AWS_ENDPOINT_URL. Nothing of pyarrow or Ray is mocked."""

import json

import pyarrow.parquet as pq
import pytest
from conftest import make_bucket, run_job, tiny_config

from alexnet_ray import storage
from alexnet_ray.data.manifest import load_manifest
from alexnet_ray.data.prepare import prepare_dataset

pytestmark = pytest.mark.ray


def test_storage_operations_on_s3(s3_endpoint, tmp_path):
    bucket = make_bucket("ops")
    target = storage.join(bucket, "a", "b.bin")
    assert target == "s3://ops/a/b.bin" and storage.parent(target) == "s3://ops/a"
    assert not storage.exists(target)
    storage.write_bytes_atomic(target, b"\x00payload")
    assert storage.read_bytes(target) == b"\x00payload" and storage.is_file(target) and storage.is_dir("s3://ops/a")
    assert [i.base_name for i in storage.list_dir("s3://ops/a")] == ["b.bin"]
    with storage.LocalCopy("s3://ops/a") as local:
        assert (local / "b.bin").read_bytes() == b"\x00payload"
    assert not local.exists()  # the download is gone after the block
    storage.delete_file(target)
    assert not storage.exists(target)
    for bad in ("s3:///data", "s3://", "gs:///x"):
        with pytest.raises(ValueError, match=r"no bucket in the URI \(expected (s3|gs)://BUCKET/path\)$"):
            storage.resolve(bad)


@pytest.mark.slow
def test_prepare_train_resume_evaluate_export_from_s3(s3_endpoint, tmp_path, capsys):
    from alexnet_ray.checkpoint import load_checkpoint
    from alexnet_ray.data.demo import write_demo_dataset
    from alexnet_ray.eval.batch import evaluate
    from alexnet_ray.eval.predict import load_inference_model, predict_files
    from alexnet_ray.train.trainer import Trainer

    bucket = make_bucket("flow")
    raw = write_demo_dataset(tmp_path / "raw", seed=3, train_per_class=6, val_per_class=2)
    storage.upload_dir(raw, f"{bucket}/src")  # SRC is a bucket too

    code, out, err = run_job(capsys, "prepare", f"{bucket}/src", f"{bucket}/data", "--layout", "folder",
                             "--size", "73", "--shard-mb", "0.05")
    assert code == 0, err
    manifest = load_manifest(f"{bucket}/data")
    assert manifest.root == f"{bucket}/data"
    assert manifest.splits["train"]["images"] == 60 and manifest.splits["val"]["images"] == 20
    assert len(manifest.splits["train"]["shards"]) > 1
    # The same SRC prepared to a local folder: the same bytes, whichever store the workers wrote to.
    local = prepare_dataset(f"{bucket}/src", tmp_path / "local", layout="folder", size=73, shard_mb=0.05)
    assert local.to_dict() == manifest.to_dict()
    for split in ("train", "val"):
        for remote_file, local_file in zip(manifest.shard_paths(split), local.shard_paths(split)):
            assert storage.read_bytes(remote_file) == storage.read_bytes(local_file)
    rows = pq.read_table(storage.open_input(manifest.shard_paths("train")[0])).to_pylist()
    assert rows[0]["path"] == f"{rows[0]['class_name']}/{rows[0]['path'].split('/')[-1]}"  # class/file, not where

    # Train with the data and the run in the bucket, then resume a new run from its checkpoint. Every
    # location printed or returned keeps its scheme, so it pastes into the next command.
    code, out, err = run_job(capsys, "train", "--preset", "tiny", "--data", f"{bucket}/data", "--storage",
                             f"{bucket}/runs", "--name", "first", "--epochs", "1")
    assert code == 0, err
    checkpoint = f"{bucket}/runs/first/checkpoint_epoch_0001"
    assert json.loads(out.strip().splitlines()[-1])["checkpoint"] == checkpoint
    assert out.strip().splitlines()[-2].endswith(f"run dir {bucket}/runs/first")
    code, out, err = run_job(capsys, "evaluate", checkpoint, "--data", f"{bucket}/data", "--actors", "1", "--no-progress")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["checkpoint"] == checkpoint
    assert storage.is_file(storage.join(checkpoint, "checkpoint.pt"))
    assert storage.is_file(f"{bucket}/runs/first/metrics/epoch_0001.json")
    assert load_checkpoint(checkpoint)["epoch"] == 1
    resumed = Trainer(tiny_config(f"{bucket}/data", f"{bucket}/runs", "run.name=resumed", "run.epochs=2",
                                  f"run.resume_from={checkpoint}")).fit()
    assert resumed.error is None and resumed.metrics["epoch"] == 2
    assert resumed.run_uri == f"{bucket}/runs/resumed"
    assert resumed.checkpoint_uri == f"{bucket}/runs/resumed/checkpoint_epoch_0002"
    assert load_checkpoint(resumed.checkpoint_uri)["epoch"] == 2
    epochs = [json.loads(storage.read_text(f"{bucket}/runs/resumed/metrics/{i.base_name}"))["epoch"]
              for i in storage.list_dir(f"{bucket}/runs/resumed/metrics")]
    assert epochs == [2]  # it went on from the first run's epoch 1; it did not start over

    # Evaluate, export, predict and draw from the bucket.
    result = evaluate(f"{bucket}/runs/resumed", f"{bucket}/data", split="val", actors=1, progress=False)
    assert result["images"] == 20 and result["checkpoint"] == f"{bucket}/runs/resumed/checkpoint_epoch_0002"
    code, out, err = run_job(capsys, "export", f"{bucket}/runs/resumed", f"{bucket}/exports/model.pt")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["out"] == f"{bucket}/exports/model.pt"
    model = load_inference_model(f"{bucket}/exports/model.pt")
    assert model.classes == manifest.classes
    image = f"{bucket}/src/val/{manifest.classes[0]}/0000.jpg"
    (prediction,) = predict_files(model, [image], k=3)
    assert prediction["image"] == image and len(prediction["top5"]) == 3
    code, out, err = run_job(capsys, "visualize", f"{bucket}/runs/resumed", "--out", f"{bucket}/pictures")
    assert code == 0, err
    assert storage.read_bytes(f"{bucket}/pictures/curves.png")[:4] == b"\x89PNG"
    assert storage.read_bytes(f"{bucket}/pictures/conv1_kernels.png")[:4] == b"\x89PNG"
