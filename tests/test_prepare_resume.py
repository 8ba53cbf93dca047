"""The prepare job's shards: deterministic bytes, resumption after an interruption, whole or absent;
and the sources it refuses before any work."""

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_job
from PIL import Image

from alexnet_ray.benchmarks.measure import descendants
from alexnet_ray.data.prepare import prepare_dataset

pytestmark = pytest.mark.ray


def _source(root: Path, classes: int = 3, per_class: int = 12, val_per_class: int = 1, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (int(rng.integers(20, 40)), int(rng.integers(20, 40)), 3), np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    return root


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.parquet"))}


def _same_dataset(a, b) -> None:
    da, db = a.to_dict(), b.to_dict()
    for key in ("mean", "std"):
        np.testing.assert_allclose(da.pop(key), db.pop(key), atol=1e-6, rtol=0)
    pa_, pb = da.pop("pca"), db.pop("pca")
    np.testing.assert_allclose(pa_["eigval"], pb["eigval"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.abs(pa_["eigvec"]), np.abs(pb["eigvec"]), atol=1e-6, rtol=0)
    assert da == db  # classes, counts, shard names and row groups, skipped files


def test_shards_are_deterministic_and_an_interrupted_run_resumes(ray_cluster, tmp_path):
    src = _source(tmp_path / "src")
    (src / "train" / "class1" / "broken.jpg").write_bytes(b"not a picture")
    first = prepare_dataset(src, tmp_path / "a", size=16, shard_mb=0.001)
    stats: dict = {}
    second = prepare_dataset(src, tmp_path / "b", size=16, shard_mb=0.001, stats=stats)
    reference = _shard_bytes(tmp_path / "a")
    assert len(reference) == stats["shards"] > 4 and stats["reused_shards"] == 0
    assert _shard_bytes(tmp_path / "b") == reference
    _same_dataset(first, second)
    assert first.splits["train"]["images"] == 36 and [s["path"] for s in first.skipped] == [
        str(src / "train" / "class1" / "broken.jpg")]
    assert stats["driver_bytes_received"] < 2000 * stats["shards"]  # counts and sums, never images

    # An interruption: some shards never finished, one was being written (its temporary file is
    # all that exists), and the manifest, which comes last, was never written.
    out = tmp_path / "b"
    gone = sorted(reference)[1::3]
    for name in gone:
        (out / name).unlink()
    (out / f"{gone[0]}.tmp-0a1b2c3d").write_bytes(reference[gone[0]][:100])
    (out / "manifest.json").unlink()
    stats = {}
    resumed = prepare_dataset(src, out, size=16, shard_mb=0.001, stats=stats)
    assert stats["reused_shards"] == len(reference) - len(gone)
    assert _shard_bytes(out) == reference and sorted(os.listdir(out)) == sorted([*reference, "manifest.json"])
    _same_dataset(first, resumed)


@pytest.mark.slow
def test_a_killed_worker_still_gives_the_same_shards(ray_cluster, tmp_path):
    src = _source(tmp_path / "src", classes=4, per_class=40, val_per_class=0)
    reference = prepare_dataset(src, tmp_path / "a", size=16, shard_mb=0.002, progress=False)
    killed: list[int] = []

    def kill_one_shard_worker() -> None:
        """SIGKILL the first of this session's Ray workers (descendants of this process: the shared
        cluster was started here) seen running a shard task; never another process on the machine."""
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            for pid in descendants(os.getpid()):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as file:
                        if file.read().startswith(b"ray::write_shard"):
                            os.kill(int(pid), signal.SIGKILL)
                            killed.append(int(pid))
                            return
                except OSError:
                    continue
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one_shard_worker)
    killer.start()
    again = prepare_dataset(src, tmp_path / "b", size=16, shard_mb=0.002, progress=False)
    killer.join()
    assert killed, "no shard task was seen running"
    assert _shard_bytes(tmp_path / "b") == _shard_bytes(tmp_path / "a")
    for shard in (tmp_path / "b").glob("*.parquet"):
        assert pq.read_table(shard).num_rows > 0  # whole files only
    _same_dataset(reference, again)


@pytest.mark.parametrize("case, expected", [
    ("no_train", r"src: no train/ folder"),
    ("no_classes", r"src/train: no class folders"),
    ("no_images", r"src/train/a: class folder without training images \(and 1 more\)"),
    ("one_empty_class", r"src/train/b: class folder without training images$"),
])
def test_empty_sources_get_one_line_before_any_work(tmp_path, capsys, case, expected):
    src = tmp_path / "src"
    (src / "val" / "a").mkdir(parents=True)
    if case != "no_train":
        (src / "train").mkdir()
    if case in ("no_images", "one_empty_class"):
        for name in "ab":
            (src / "train" / name).mkdir()
    if case == "one_empty_class":
        Image.new("RGB", (20, 20)).save(src / "train" / "a" / "x.jpg")
    code, out, err = run_job(capsys, "prepare", str(src), str(tmp_path / "out"), "--layout", "folder")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("prepare: ") and __import__("re").search(expected, err.strip()), err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_class_without_validation_images_is_fine(ray_cluster, tmp_path):
    src = _source(tmp_path / "src", classes=2, per_class=2, val_per_class=1)
    for image in (src / "val" / "class1").iterdir():
        image.unlink()
    manifest = prepare_dataset(src, tmp_path / "out", size=16)
    assert manifest.splits["val"]["images"] == 1 and manifest.splits["train"]["images"] == 4


def test_uri_without_bucket_gets_one_line(tmp_path, capsys):
    src = _source(tmp_path / "src", classes=2, per_class=1, val_per_class=0)
    for out in ("s3:///imagenet-256", "gs://"):
        code, _, err = run_job(capsys, "prepare", str(src), out)
        assert code == 2 and err.strip() == f"prepare: {out}: no bucket in the URI (expected {out.split(':')[0]}://BUCKET/path)"
    code, _, err = run_job(capsys, "prepare", "s3:///raw", str(tmp_path / "out"))
    assert code == 2 and err.strip() == "prepare: s3:///raw: no bucket in the URI (expected s3://BUCKET/path)"
