"""The prepare job on real trees (real JPEGs, local Ray cluster): layouts, labels, manifest, shards."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from alexnet_ray.data.layouts import read_val_labels
from alexnet_ray.data.manifest import load_manifest
from alexnet_ray.data.prepare import prepare_dataset

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


def _save(path: Path, rng: np.random.Generator, size=(30, 20), fmt="JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def _rows(out: Path, manifest, split: str) -> list[dict]:
    rows = []
    for path in manifest.shard_paths(split):
        rows += pq.read_table(path).to_pylist()
    return rows


def _imagenet_tree(root: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    wnids = ["n02000002", "n01000001", "n03000003"]  # unsorted on purpose
    for k, wnid in enumerate(wnids):
        for i in range(3):
            _save(root / "train" / wnid / f"{wnid}_{i}.JPEG", rng, size=(30 + i, 20 + k))
    truth = {}
    for i in range(6):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        _save(root / "val" / f"{name}.JPEG", rng)
        truth[name] = wnids[i % 3]
    return truth


def test_imagenet_layout_with_both_val_label_formats(ray_cluster, tmp_path):
    truth = _imagenet_tree(tmp_path / "src")
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"{name},{wnid} 1 2 10 12 {wnid} 3 3 8 8\n" for name, wnid in reversed(truth.items())))
    txt = tmp_path / "val.txt"
    txt.write_text("".join(f"{name}.JPEG {wnid}\n" for name, wnid in truth.items()))
    assert read_val_labels(csv) == read_val_labels(txt) == truth

    manifests = []
    for labels, out in ((csv, "csv"), (txt, "txt")):
        manifest = prepare_dataset(tmp_path / "src", tmp_path / out, val_labels=labels, size=16)
        manifests.append(manifest)
        assert manifest.classes == ["n01000001", "n02000002", "n03000003"]
        assert manifest.splits["train"]["images"] == 9 and manifest.splits["val"]["images"] == 6
        assert manifest.skipped == []
        for row in _rows(tmp_path / out, manifest, "val"):
            assert manifest.classes[row["label"]] == row["class_name"] == truth[Path(row["path"]).stem]
        for row in _rows(tmp_path / out, manifest, "train"):
            assert row["class_name"] == Path(row["path"]).parent.name == manifest.classes[row["label"]]
            assert Image.open(io.BytesIO(row["jpeg"])).size == (16, 16)
    assert manifests[0].mean == manifests[1].mean
    with pytest.raises(ValueError, match="--val-labels"):
        prepare_dataset(tmp_path / "src", tmp_path / "none", size=16)


def test_folder_layout_manifest_statistics_match_numpy(ray_cluster, tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    for name, fmt, ext in (("cat", "PNG", "png"), ("ant", "JPEG", "jpg"), ("bee", "BMP", "bmp"),
                           ("dog", "WEBP", "webp")):
        for i in range(4):
            _save(src / "train" / name / f"{i}.{ext}", rng, size=(24 + 3 * i, 40 - 2 * i), fmt=fmt)
        _save(src / "val" / name / f"v.{ext}", rng, fmt=fmt)
    manifest = prepare_dataset(src, tmp_path / "out", layout="folder", size=20, shard_mb=0.002)
    assert manifest.classes == ["ant", "bee", "cat", "dog"]
    assert manifest.splits["train"]["images"] == 16 and manifest.splits["val"]["images"] == 4
    assert len(manifest.splits["train"]["shards"]) > 1  # shard_mb honoured
    assert load_manifest(tmp_path / "out").to_dict() == manifest.to_dict()
    for shard in manifest.splits["train"]["shards"]:  # JPEG bytes stored plain: read without a copy
        jpeg = pq.ParquetFile(tmp_path / "out" / shard["file"]).metadata.row_group(0).column(0)
        assert jpeg.path_in_schema == "jpeg" and jpeg.compression == "UNCOMPRESSED"
        assert not any("DICTIONARY" in encoding for encoding in jpeg.encodings), jpeg.encodings

    rows = _rows(tmp_path / "out", manifest, "train")
    assert sorted(Path(r["path"]).name for r in rows) == sorted(f"{i}.{e}" for i in range(4)
                                                             for e in ("png", "jpg", "bmp", "webp"))
    pixels = np.concatenate([np.asarray(Image.open(io.BytesIO(r["jpeg"])).convert("RGB")).reshape(-1, 3)
                             for r in rows]).astype(np.float64) / 255
    np.testing.assert_allclose(manifest.mean, pixels.mean(0), atol=1e-9)
    np.testing.assert_allclose(manifest.std, pixels.std(0), atol=1e-9)
    covariance = np.cov(pixels.T, bias=True)
    eigval, eigvec = np.array(manifest.pca["eigval"]), np.array(manifest.pca["eigvec"])
    assert eigval[0] >= eigval[1] >= eigval[2] > 0
    np.testing.assert_allclose(eigvec @ np.diag(eigval) @ eigvec.T, covariance, atol=1e-9)
    np.testing.assert_allclose(eigval, np.linalg.eigvalsh(covariance)[::-1], atol=1e-9)


def test_existing_output_refused_unless_overwrite_and_cli(ray_cluster, tmp_path):
    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        for i in range(2):
            _save(tmp_path / "src" / "train" / name / f"{i}.jpg", rng)
    first = prepare_dataset(tmp_path / "src", tmp_path / "out", size=12, val_split="none")
    with pytest.raises(ValueError, match="--overwrite"):
        prepare_dataset(tmp_path / "src", tmp_path / "out", size=12, val_split="none")
    again = prepare_dataset(tmp_path / "src", tmp_path / "out", size=12, val_split="none", overwrite=True)
    assert again.to_dict() == first.to_dict()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("not a dataset")
    with pytest.raises(ValueError, match="not a prepared dataset"):
        prepare_dataset(tmp_path / "src", tmp_path / "other", size=12, val_split="none", overwrite=True)
    assert (tmp_path / "other" / "keep.txt").exists()
    with pytest.raises(ValueError, match="not a prepared dataset"):
        load_manifest(tmp_path / "other")
    # The command line refuses the existing OUT with a message (no Ray start needed to get there).
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "prepare.py"), str(tmp_path / "src"),
                             str(tmp_path / "out"), "--size", "12", "--val-split", "none"], capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 2 and "--overwrite" in result.stderr
