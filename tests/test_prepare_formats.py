"""One small set of images in every format people download, written by the real writers (tarfile for
the ILSVRC2012 tarballs and devkit, scipy.io.savemat for meta.mat, the `datasets` library's Parquet,
webdataset's TarWriter), prepared locally and from the suite's S3 server: the same dataset each time."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_bucket, run_job
from PIL import Image

from alexnet_ray import storage
from alexnet_ray.data.prepare import prepare_dataset
from alexnet_ray.data.tars import RangeReader, index_tar

pytestmark = pytest.mark.ray

WNIDS = ["n01000001", "n02000002", "n03000003"]  # sorted: the classes of every format
# ILSVRC2012_IDs are not in wnid order (ID 1 is n02119789): give the leaves shuffled IDs, plus a parent.
IDS = {"n02000002": 1, "n03000003": 2, "n01000001": 3}
TRAIN_PER_CLASS, VAL_IMAGES, SIZE, SHARD_MB = 5, 6, 16, 0.002


def _jpeg(rng: np.random.Generator) -> bytes:
    pixels = rng.integers(0, 256, (int(rng.integers(18, 40)), int(rng.integers(18, 40)), 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def image_set(seed: int = 0) -> dict:
    """{"train": [(wnid, file name, bytes)], "val": [...]}: val named as ILSVRC2012's, in file order."""
    rng = np.random.default_rng(seed)
    train = [(w, f"{w}_{i}.JPEG", _jpeg(rng)) for w in WNIDS for i in range(TRAIN_PER_CLASS)]
    val = [(WNIDS[(5 * k) % 3], f"ILSVRC2012_val_{k + 1:08d}.JPEG", _jpeg(rng)) for k in range(VAL_IMAGES)]
    return {"train": train, "val": val}


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_tree(root: Path, images: dict, val_name: str = "val") -> Path:
    for split, folder in (("train", "train"), ("val", val_name)):
        for wnid, name, data in images[split]:
            (root / folder / wnid).mkdir(parents=True, exist_ok=True)
            (root / folder / wnid / name).write_bytes(data)
    return root


def write_devkit(path: Path, truth: list[int]) -> None:
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros((len(WNIDS) + 1, 1), dtype=[(f, "O") for f in fields])
    rows = [(IDS[w], w, f"class {w}", "a leaf", 0, np.zeros((1, 0)), 0, TRAIN_PER_CLASS) for w in WNIDS]
    rows.append((len(WNIDS) + 1, "n00000009", "a parent", "not a leaf", 2, np.array([[1, 2]]), 1, 0))
    for r, row in enumerate(sorted(rows, key=lambda row: row[0])):
        for f, value in zip(fields, row):
            synsets[r, 0][f] = value
    meta = io.BytesIO()
    savemat(meta, {"synsets": synsets})
    with tarfile.open(path, "w:gz") as archive:
        for name, data in (("ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue()),
                           ("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
                            "".join(f"{i}\n" for i in truth).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def write_tarballs(root: Path, images: dict, truth: list[int] | None = None) -> Path:
    """ILSVRC2012_img_train.tar (a tar of per-class tars), ILSVRC2012_img_val.tar, the devkit."""
    root.mkdir(parents=True, exist_ok=True)
    class_tars = [(f"{w}.tar", _tar_bytes([(n, d) for c, n, d in images["train"] if c == w])) for w in WNIDS]
    (root / "ILSVRC2012_img_train.tar").write_bytes(_tar_bytes(class_tars))
    (root / "ILSVRC2012_img_val.tar").write_bytes(_tar_bytes([(n, d) for _, n, d in images["val"]]))
    write_devkit(root / "ILSVRC2012_devkit_t12.tar.gz", truth or [IDS[w] for w, _, _ in images["val"]])
    return root


def write_parquet(root: Path, images: dict) -> Path:
    """The Hub's layout: data/<split>-0000N-of-0000M.parquet written by `datasets` itself."""
    import datasets

    datasets.disable_progress_bars()
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=WNIDS))
    (root / "data").mkdir(parents=True)
    train = images["train"]
    parts = {"train": [train[::2], train[1::2]], "validation": [images["val"]],
             "test": [[(None, n, d) for _, n, d in images["val"][:2]]]}  # the Hub's test split: label -1
    for split, chunks in parts.items():
        for i, chunk in enumerate(chunks):
            table = datasets.Dataset.from_dict(
                {"image": [{"bytes": d, "path": n} for _, n, d in chunk],
                 "label": [WNIDS.index(w) if w else -1 for w, _, _ in chunk]}, features=features)
            table.to_parquet(str(root / "data" / f"{split}-{i:05d}-of-{len(chunks):05d}.parquet"))
    return root


def write_webdataset(root: Path, images: dict) -> Path:
    import webdataset

    root.mkdir(parents=True)
    for split, chunks in (("train", [images["train"][:8], images["train"][8:]]), ("val", [images["val"]])):
        for i, chunk in enumerate(chunks):
            with webdataset.TarWriter(str(root / f"{split}-{i:06d}.tar")) as writer:
                for wnid, name, data in chunk:
                    stem, extension = name.rsplit(".", 1)
                    writer.write({"__key__": stem, extension: data, "cls": WNIDS.index(wnid)})
    (root / "classes.txt").write_text("".join(f"{w}\n" for w in WNIDS))
    return root


def shard_bytes(out) -> dict[str, bytes]:
    return {i.base_name: storage.read_bytes(storage.join(str(out), i.base_name))
            for i in storage.list_dir(str(out)) if i.base_name.endswith(".parquet")}


def rows(manifest, split: str) -> list[tuple]:
    found = []
    for path in manifest.shard_paths(split):
        with storage.open_input(path) as source:
            found += [(r["path"], r["label"], r["class_name"], r["jpeg"]) for r in pq.read_table(source).to_pylist()]
    return found


def same_dataset(a, b, same_bytes: bool = True) -> None:
    """The same classes, labels, counts, shard layout and statistics (exact: integer sums); with
    `same_bytes` also each shard's size and footer range (shards of another row order differ there)."""
    da, db = a.to_dict(), b.to_dict()
    for d in (da, db):
        d.pop("source"), d.pop("source_format")
        if not same_bytes:
            for split in d["splits"].values():
                for shard in split["shards"]:
                    shard.pop("bytes"), shard.pop("footer")
    assert da == db


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    images = image_set()
    return {"tree": write_tree(root / "tree", images), "tarballs": write_tarballs(root / "tarballs", images),
            "parquet": write_parquet(root / "parquet", images), "webdataset": write_webdataset(root / "wds", images)}


def prepare(source: str, out, **kwargs):
    return prepare_dataset(source, out, size=SIZE, shard_mb=SHARD_MB, progress=False, **kwargs)


def test_every_format_prepares_to_the_same_dataset(ray_cluster, sources, tmp_path):
    tree = prepare(sources["tree"], tmp_path / "tree")
    tars = prepare(sources["tarballs"], tmp_path / "tars")
    shards = prepare(sources["webdataset"], tmp_path / "wds", class_names=sources["webdataset"] / "classes.txt")
    hub = prepare(sources["parquet"], tmp_path / "parquet")
    assert [m.source_format for m in (tree, tars, shards, hub)] == ["tree", "ilsvrc-tars", "webdataset", "parquet"]
    assert tree.classes == WNIDS and tree.skipped == []
    assert tree.splits["train"]["images"] == 15 and tree.splits["val"]["images"] == VAL_IMAGES
    assert len(tree.splits["train"]["shards"]) > 1
    for other in (tars, shards):
        same_dataset(tree, other)
    same_dataset(tree, hub, same_bytes=False)
    # Byte-identical shards where the images are read one by one (files, tar members by range).
    reference = shard_bytes(tmp_path / "tree")
    assert shard_bytes(tmp_path / "tars") == reference == shard_bytes(tmp_path / "wds")
    # Parquet is read a row group at a time: the same rows, in an order of its row groups.
    for split in ("train", "val"):
        assert sorted(rows(hub, split)) == sorted(rows(tree, split))
    truth = {name: wnid for wnid, name, _ in image_set()["val"]}
    for path, label, class_name, _ in rows(tars, "val"):  # the devkit's IDs, through meta.mat
        assert class_name == WNIDS[label] == truth[path.split("/")[1]] == path.split("/")[0]
    # The webdataset with no names file: the ids are the names.
    ids = prepare(sources["webdataset"], tmp_path / "ids", use_ray=False)
    assert ids.classes == ["0", "1", "2"]
    assert [r[1] for r in rows(ids, "train")] == [r[1] for r in rows(tree, "train")]


def test_tarballs_resume_with_the_same_bytes(ray_cluster, sources, tmp_path):
    out = tmp_path / "out"
    first = prepare(sources["tarballs"], out)
    reference = shard_bytes(out)
    gone = sorted(reference)[::2]
    for name in gone:
        (out / name).unlink()
    (out / "manifest.json").unlink()
    stats: dict = {}
    again = prepare(sources["tarballs"], out, stats=stats)
    assert stats["reused_shards"] == len(reference) - len(gone) and shard_bytes(out) == reference
    assert stats["driver_bytes_received"] < 2000 * stats["shards"]  # counts and sums, never images
    same_dataset(first, again)


@pytest.mark.slow
def test_every_format_from_a_bucket(s3_endpoint, sources, tmp_path):
    bucket = make_bucket("downloads")
    for name, folder in sources.items():
        storage.upload_dir(folder, f"{bucket}/{name}")
    # The tarballs are read in place, by byte range: a class tar's member is a range of the outer tar.
    train = f"{bucket}/tarballs/ILSVRC2012_img_train.tar"
    [first_class] = [m for m in index_tar(train) if m.name == f"{WNIDS[0]}.tar"]
    members = index_tar(train, first_class.offset, first_class.size)
    with RangeReader() as reader:
        assert reader.read(train, members[0].offset, members[0].size) == image_set()["train"][0][2]
    assert sorted(i.base_name for i in storage.list_dir(f"{bucket}/tarballs")) == sorted(os.listdir(sources["tarballs"]))

    local = prepare(sources["tree"], tmp_path / "local")
    kwargs = {"webdataset": {"class_names": f"{bucket}/webdataset/classes.txt"}}
    for name in sources:
        remote = prepare(f"{bucket}/{name}", f"{bucket}/out-{name}", **kwargs.get(name, {}))
        same_dataset(local, remote, same_bytes=name != "parquet")
        if name != "parquet":
            assert shard_bytes(f"{bucket}/out-{name}") == shard_bytes(tmp_path / "local"), name


def test_split_names_and_their_choice(ray_cluster, tmp_path, capsys):
    images = image_set(seed=1)
    tested = write_tree(tmp_path / "train-test", images, val_name="test")
    manifest = prepare(tested, tmp_path / "out-test")
    assert manifest.splits["val"]["images"] == VAL_IMAGES  # test/ is the validation split

    both = write_tree(tmp_path / "both", images, val_name="validation")
    write_tree(tmp_path / "both", images, val_name="test")
    code, _, err = run_job(capsys, "prepare", str(both), str(tmp_path / "out-both"))
    assert code == 2 and err.strip() == (f"prepare: {both} has several validation splits (validation, test): "
                                         "choose one with --val-split NAME")
    code, _, err = run_job(capsys, "prepare", str(both), str(tmp_path / "out-both"), "--val-split", "validation",
                           "--size", "16")
    assert code == 0, err

    alone = tmp_path / "alone"
    for wnid, name, data in images["train"]:
        (alone / "train" / wnid).mkdir(parents=True, exist_ok=True)
        (alone / "train" / wnid / name).write_bytes(data)
    code, _, err = run_job(capsys, "prepare", str(alone), str(tmp_path / "out-alone"))
    assert code == 2 and err.strip() == (f"prepare: {alone}: no validation split: no labelled val, validation or "
                                         "test; pass --val-split none to prepare train alone")
    assert not (tmp_path / "out-alone").exists()  # refused before any work
    assert prepare(alone, tmp_path / "out-alone", val_split="none").splits.keys() == {"train"}


def _truncated(root: Path, sources) -> tuple[list[str], str]:
    root.mkdir()
    for name in ("ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"):
        (root / name).write_bytes((sources["tarballs"] / name).read_bytes())
    data = (sources["tarballs"] / "ILSVRC2012_img_train.tar").read_bytes()
    (root / "ILSVRC2012_img_train.tar").write_bytes(data[: len(data) // 2])
    return [str(root)], "ILSVRC2012_img_train.tar: truncated tar"


def _short_devkit(root: Path, sources) -> tuple[list[str], str]:
    images = image_set()
    write_tarballs(root, images, truth=[IDS[w] for w, _, _ in images["val"]][:-1])
    return [str(root)], f"ILSVRC2012_validation_ground_truth.txt has {VAL_IMAGES - 1} IDs for the {VAL_IMAGES} images"


def _unknown_id(root: Path, sources) -> tuple[list[str], str]:
    images = image_set()
    write_tarballs(root, images, truth=[4] + [IDS[w] for w, _, _ in images["val"]][1:])
    return [str(root)], "ground-truth ID 4 (for ILSVRC2012_val_00000001.JPEG) is not a leaf class"


def _no_label_column(root: Path, sources) -> tuple[list[str], str]:
    import datasets

    (root / "data").mkdir(parents=True)
    table = datasets.Dataset.from_dict({"image": [{"bytes": d, "path": n} for _, n, d in image_set()["train"]]},
                                       features=datasets.Features(image=datasets.Image()))
    table.to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return [str(root)], f"{root / 'data' / 'train-00000-of-00001.parquet'}: no label column"


def _no_class_names(root: Path, sources) -> tuple[list[str], str]:
    import pyarrow as pa

    (root / "data").mkdir(parents=True)
    train = image_set()["train"]
    image = pa.array([{"bytes": d, "path": n} for _, n, d in train])
    pq.write_table(pa.table({"image": image, "label": [WNIDS.index(w) for w, _, _ in train]}),
                   root / "data" / "train-00000-of-00001.parquet")
    return [str(root), "--val-split", "none"], (f"{root / 'data' / 'train-00000-of-00001.parquet'}: no class names: "
                                                "its Arrow schema metadata has no 'huggingface' key")


def _format_mismatch(root: Path, sources) -> tuple[list[str], str]:
    return [str(sources["tree"]), "--format", "parquet"], (
        f"{sources['tree']}: --format parquet expects Hugging Face Parquet files per split")


def _non_image_fail(root: Path, sources) -> tuple[list[str], str]:
    images = image_set()
    images["val"][2] = (images["val"][2][0], images["val"][2][1], b"these are notes, not a JPEG")
    write_tarballs(root, images)
    return [str(root), "--on-bad-image", "fail"], (f"{root}/ILSVRC2012_img_val.tar/ILSVRC2012_val_00000003.JPEG: "
                                                   "not an image (--on-bad-image fail)")


BAD = {"truncated tar": _truncated, "devkit IDs short of the val images": _short_devkit,
       "devkit ID not a leaf": _unknown_id, "parquet without a label column": _no_label_column,
       "parquet without class names": _no_class_names, "format mismatch": _format_mismatch,
       "non-image member, fail mode": _non_image_fail}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_per_format_is_one_line_and_writes_nothing(ray_cluster, sources, tmp_path, capsys, case):
    argv, expected = BAD[case](tmp_path / "src", sources)
    capsys.readouterr()  # what the writers printed
    out = tmp_path / "out"
    code, _, err = run_job(capsys, "prepare", argv[0], str(out), "--size", "16", *argv[1:])
    progress = ("images/s, ETA", ": listed ")  # the lines a run prints on its way
    lines = [line for line in err.splitlines() if line.strip() and not any(p in line for p in progress)]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert not out.exists()  # nothing half-written


def test_non_image_members_are_skipped_and_listed(ray_cluster, tmp_path):
    import webdataset

    images = image_set()
    images["val"][2] = (images["val"][2][0], images["val"][2][1], b"these are notes, not a JPEG")
    manifest = prepare(write_tarballs(tmp_path / "tarballs", images), tmp_path / "out")
    assert [(s["path"], s["reason"]) for s in manifest.skipped] == [
        (f"{tmp_path}/tarballs/ILSVRC2012_img_val.tar/ILSVRC2012_val_00000003.JPEG", "not an image")]
    assert manifest.splits["val"] == {**manifest.splits["val"], "images": VAL_IMAGES - 1, "found": VAL_IMAGES}

    (tmp_path / "wds").mkdir()
    with webdataset.TarWriter(str(tmp_path / "wds" / "train-000000.tar")) as writer:
        for i, (wnid, name, data) in enumerate(images["train"]):
            writer.write({"__key__": name.split(".")[0], "jpg": b"<html>404</html>" if i == 3 else data,
                          "cls": WNIDS.index(wnid)})
        writer.write({"__key__": "label_only", "cls": 0})
    manifest = prepare(tmp_path / "wds", tmp_path / "out-wds", val_split="none")
    reasons = {s["path"].rsplit("/", 1)[1]: s["reason"] for s in manifest.skipped}
    assert reasons == {f"{images['train'][3][1].split('.')[0]}.jpg": "not an image", "label_only": "no image member"}
    assert manifest.splits["train"]["images"] == len(images["train"]) - 1
    assert json.loads((tmp_path / "out-wds" / "manifest.json").read_text())["source_format"] == "webdataset"
