"""Issue 14: bad input to any job is refused with one line naming the culprit, a non-zero exit code,
no traceback and nothing half-written; training's inputs are refused on the driver before any
worker (and, where the check needs no cluster, before Ray) starts.

Each job runs in-process (`run_job`). The inputs are small real files: a checkpoint of the tiny
model written with the project's own `save_checkpoint`, and a dataset whose manifest is real but
whose shards are empty files (every check here stops before a shard is read).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from alexnet_ray.checkpoint import WEIGHTS_FILE, save_checkpoint
from alexnet_ray.data.manifest import Manifest
from alexnet_ray.model import AlexNet
from alexnet_ray.train.config import load_config
from conftest import RAY_TEST_CPUS, run_job

CLASSES = [f"class{i}" for i in range(10)]


def write_checkpoint(path: Path, *overrides: str, classes=CLASSES) -> Path:
    config = load_config("tiny", overrides=list(overrides), validate=False)
    torch.manual_seed(0)
    state = {"model": AlexNet(config.model).state_dict(),
             "optimizer": {"momentum_buffer": {}, "lr": 0.005}, "epoch": 1, "config": config.to_dict(),
             "metrics": {}, "classes": classes,
             "preprocessing": {"stored_size": 73, "image_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3}}
    save_checkpoint(path, state)
    return path


def write_dataset(path: Path, classes=CLASSES, splits=("train", "val"), missing_shard: bool = False) -> Path:
    path.mkdir(parents=True)
    entries = {}
    for split in splits:
        shard = f"{split}-00000.parquet"
        if not missing_shard:
            (path / shard).touch()
        entries[split] = {"images": 4, "found": 4, "shards": [{"file": shard, "rows": 4, "row_groups": [4]}]}
    Manifest(classes=list(classes), splits=entries, size=73, mean=[0.5] * 3, std=[0.25] * 3,
             pca={"eigval": [0.0] * 3, "eigvec": torch.eye(3).tolist()}).save(path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    files = {"ckpt": write_checkpoint(root / "ckpt"),
             "wide": write_checkpoint(root / "wide", "model.width=0.25"),
             "unlabelled": root / "unlabelled",
             "data": write_dataset(root / "data"),
             "no_val": write_dataset(root / "no-val", splits=("train",)),
             "missing_shard": write_dataset(root / "missing-shard", missing_shard=True),
             "five_classes": write_dataset(root / "five-classes", classes=CLASSES[:5]),
             "no_manifest": root / "no-manifest", "bad_manifest": root / "bad-manifest",
             "empty_dir": root / "empty-dir", "not_image": root / "notes.jpg", "image": root / "photo.png",
             "not_torch": root / "model.pt", "list_yaml": root / "list.yaml", "typed_yaml": root / "typed.yaml",
             "src": root / "src", "src_no_train": root / "src-no-train", "nonempty_out": root / "nonempty-out"}
    shutil.copytree(files["ckpt"], root / "corrupt")
    weights = root / "corrupt" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    files["corrupt"] = root / "corrupt"
    state = torch.load(files["ckpt"] / WEIGHTS_FILE, weights_only=True)
    state.pop("classes")
    state.pop("format")
    save_checkpoint(files["unlabelled"], state)
    (root / "no-manifest").mkdir()
    (root / "bad-manifest").mkdir()
    (root / "bad-manifest" / "manifest.json").write_text("{not json")
    (root / "empty-dir").mkdir()
    files["not_image"].write_bytes(b"these are notes, not a JPEG")
    buffer = io.BytesIO()
    Image.new("RGB", (80, 90), (200, 30, 30)).save(buffer, format="PNG")
    files["image"].write_bytes(buffer.getvalue())
    files["not_torch"].write_bytes(b"\x00\x01 not a torch file")
    files["list_yaml"].write_text("- model\n- data\n")
    files["typed_yaml"].write_text("preset: tiny\nmodel:\n  width: wide\n")
    for split in ("train", "val"):
        (root / "src" / split / "cats").mkdir(parents=True)
        (root / "src" / split / "cats" / "a.png").write_bytes(buffer.getvalue())
    (root / "src-no-train" / "val").mkdir(parents=True)
    (root / "nonempty-out").mkdir()
    (root / "nonempty-out" / "keep.txt").write_text("someone's file")
    return files


def train(*args):
    return ("train", ["--preset", "tiny", *args])


# id: (job and argv, expected exit code, text the error line must hold). {name} in both stands for
# the input of that name; {out} is a path that must not exist afterwards.
CASES = {
    "train unknown key": (train("--data", "{data}", "--set", "model.widht=1"), 2,
                          "unknown key model.widht (did you mean model.width?)"),
    "train wrong type": (train("--data", "{data}", "--set", "data.global_batch_size=big"), 2,
                         "data.global_batch_size must be an integer"),
    "train missing config file": (train("--config", "{out}"), 2, "config file {out} does not exist"),
    "train config not a mapping": (train("--config", "{list_yaml}"), 2, "{list_yaml}: expected a mapping of sections"),
    "train config wrong type": (("train", ["--config", "{typed_yaml}", "--data", "{data}"]), 2,
                                "{typed_yaml}: model.width must be a number, got 'wide'"),
    "train impossible towers": (train("--data", "{data}", "--set", "parallel.towers=3"), 2,
                                "parallel.towers=3: must be 1 or 2"),
    "train impossible micro-batches": (train("--data", "{data}", "--set", "parallel.microbatches=0"), 2,
                                       "parallel.microbatches=0: must be >= 1"),
    "train data missing": (train("--data", "{out}"), 2, "data.path={out}: directory does not exist"),
    "train data not prepared": (train("--data", "{no_manifest}"), 2,
                                "data.path={no_manifest}: not a prepared dataset (no manifest.json)"),
    "train manifest unreadable": (train("--data", "{bad_manifest}"), 2, "{bad_manifest}/manifest.json: unreadable manifest"),
    "train split missing": (train("--data", "{no_val}"), 2, "data.path={no_val}: the manifest has no 'val' split"),
    "train shard missing": (train("--data", "{missing_shard}"), 2,
                            "data.path={missing_shard}: 1 'train' shard(s) listed in the manifest are missing"),
    "train classes differ": (train("--data", "{five_classes}"), 2,
                             "model.num_classes=10 does not match the 5 classes in {five_classes}/manifest.json"),
    "train resume from missing": (train("--data", "{data}", "--resume-from", "{out}"), 2,
                                  "run.resume_from={out}: no such checkpoint"),
    "train resume from corrupt": (train("--data", "{data}", "--resume-from", "{corrupt}"), 2,
                                  "run.resume_from={corrupt}: checkpoint {corrupt}/checkpoint.pt is corrupt: sha256"),
    "train resume from other model": (train("--data", "{data}", "--resume-from", "{wide}"), 2,
                                      "run.resume_from={wide}: conv1.weight is (24, 3, 11, 11) in the checkpoint but "
                                      "(12, 3, 11, 11) for this config's model (model.width=0.25 there, 0.125 here)"),
    "train resume from not a checkpoint": (train("--data", "{data}", "--resume-from", "{empty_dir}"), 2,
                                           "run.resume_from={empty_dir}: no checkpoint at {empty_dir}"),
    "train epochs not a number": (train("--epochs", "many"), 2, "argument --epochs: invalid int value: 'many'"),
    "evaluate checkpoint missing": (("evaluate", ["{out}", "--data", "{data}"]), 2, "no checkpoint at {out}"),
    "evaluate checkpoint corrupt": (("evaluate", ["{corrupt}", "--data", "{data}"]), 2,
                                    "checkpoint {corrupt}/checkpoint.pt is corrupt: sha256"),
    "evaluate data not prepared": (("evaluate", ["{ckpt}", "--data", "{no_manifest}"]), 2,
                                   "{no_manifest} is not a prepared dataset"),
    "evaluate classes differ": (("evaluate", ["{ckpt}", "--data", "{five_classes}"]), 2,
                                "classes of dataset {five_classes} do not match the checkpoint's: the model has 10 "
                                "classes, the dataset 5"),
    "evaluate split missing": (("evaluate", ["{ckpt}", "--data", "{data}", "--split", "test"]), 2,
                               "dataset {data} has no split 'test'"),
    "evaluate batch size zero": (("evaluate", ["{ckpt}", "--data", "{data}", "--batch-size", "0"]), 2,
                                 "batch_size=0 must be at least 1"),
    "export checkpoint missing": (("export", ["{empty_dir}", "{out}"]), 2, "no checkpoint at {empty_dir}"),
    "export checkpoint corrupt": (("export", ["{corrupt}", "{out}"]), 2,
                                  "checkpoint {corrupt}/checkpoint.pt is corrupt: sha256"),
    "export not a checkpoint": (("export", ["{not_torch}", "{out}"]), 2,
                                "checkpoint {not_torch} has no checkpoint.sha256"),
    "export checkpoint without classes": (("export", ["{unlabelled}", "{out}"]), 2,
                                          "checkpoint {unlabelled} has no class names"),
    "predict model missing": (("predict", ["{out}", "{image}"]), 2, "no model at {out}"),
    "predict model not torch": (("predict", ["{not_torch}", "{image}"]), 2, "cannot read exported model {not_torch}"),
    "predict image not an image": (("predict", ["{ckpt}", "{image}", "{not_image}"]), 1,
                                   "cannot read image {not_image}"),
    "predict image missing": (("predict", ["{ckpt}", "{image}", "{out}"]), 1,
                              "cannot read image {out}: No such file or directory"),
    "prepare source missing": (("prepare", ["{out}", "{out}-2"]), 2, "{out} is not a folder"),
    "prepare source without train": (("prepare", ["{src_no_train}", "{out}"]), 2,
                                     "{src_no_train}: no train/ folder"),
    "prepare size too small": (("prepare", ["{src}", "{out}", "--size", "4"]), 2, "size=4: must be at least 8"),
    "prepare output not empty": (("prepare", ["{src}", "{nonempty_out}"]), 2,
                                 "{nonempty_out} is not a prepared dataset (no manifest.json, holds keep.txt)"),
    "prepare val labels missing": (("prepare", ["{src}", "{out}", "--layout", "imagenet", "--val-labels", "{out}.csv"]),
                                   2, "--val-labels {out}.csv does not exist"),
    "prepare layout unknown": (("prepare", ["{src}", "{out}", "--layout", "flat"]), 2,
                               "argument --layout: invalid choice: 'flat'"),
}


def run(capsys, job: str, argv: list[str]) -> tuple[int, str, str]:
    try:
        return run_job(capsys, job, *argv)
    except SystemExit as exit:  # argparse
        out, err = capsys.readouterr()
        return exit.code, out, err


def check_refused(code, out, err, expected_code, expected):
    assert "Traceback" not in out + err, err
    assert code == expected_code, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith(("usage:", " "))]  # argparse prints its usage first
    assert len(errors) == 1, f"expected one error line, got: {err}"
    assert expected in errors[0], errors[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_in_one_line(case, inputs, tmp_path, capsys):
    (job, argv), expected_code, expected = CASES[case]
    out_path = tmp_path / "out"
    names = {name: str(path) for name, path in inputs.items()} | {"out": str(out_path)}
    argv = [arg.format(**names) for arg in argv]
    before = sorted(p.name for p in inputs["nonempty_out"].iterdir())
    code, out, err = run(capsys, job, argv)
    check_refused(code, out, err, expected_code, expected.format(**names))
    assert not any(tmp_path.iterdir()), f"left behind: {list(tmp_path.iterdir())}"  # nothing half-written
    assert sorted(p.name for p in inputs["nonempty_out"].iterdir()) == before
    if job == "predict" and expected_code == 1:  # the good image was still predicted
        assert "class" in out


@pytest.mark.ray
def test_more_workers_than_the_cluster_holds_is_refused_once_connected(inputs, tmp_path, ray_cluster, capsys):
    storage = tmp_path / "runs"
    code, out, err = run(capsys, "train", ["--preset", "tiny", "--data", str(inputs["data"]), "--storage", str(storage),
                                           "--set", "parallel.replicas=20", "--set", "data.global_batch_size=40"])
    check_refused(code, out, err, 2, f"= 40 workers x parallel.cpus_per_worker=0.5 need 20 CPUs; the Ray cluster "
                                     f"has {RAY_TEST_CPUS}")
    assert not storage.exists()


@pytest.mark.ray
def test_prepare_that_fails_on_a_bad_image_leaves_no_output(inputs, tmp_path, ray_cluster, capsys):
    src = tmp_path / "src"
    shutil.copytree(inputs["src"], src)
    shutil.copy(inputs["not_image"], src / "train" / "cats" / "b.jpg")
    out = tmp_path / "prepared"
    code, _, err = run(capsys, "prepare", [str(src), str(out), "--on-bad-image", "fail"])
    check_refused(code, "", err.splitlines()[-1], 2, f"{src / 'train' / 'cats' / 'b.jpg'}: ")
    assert err.splitlines()[-1].endswith("(--on-bad-image fail)")
    assert not out.exists(), list(out.iterdir())
