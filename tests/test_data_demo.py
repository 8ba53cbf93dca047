"""The embedded demo dataset: deterministic, idempotent, varied, and learnable."""

import numpy as np
import pytest
from PIL import Image

from alexnet_ray.data.demo import write_demo_dataset
from alexnet_ray.data.images import convert_image


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_same_seed_same_files_and_rewrite_is_a_no_op(tmp_path):
    a = write_demo_dataset(tmp_path / "a", seed=1, num_classes=3, train_per_class=4, val_per_class=2)
    b = write_demo_dataset(tmp_path / "b", seed=1, num_classes=3, train_per_class=4, val_per_class=2)
    c = write_demo_dataset(tmp_path / "c", seed=2, num_classes=3, train_per_class=4, val_per_class=2)
    assert _files(a) == _files(b) and len(_files(a)) == 3 * 6
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in _files(a))
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in _files(a))
    stamp = (a / _files(a)[0]).stat().st_mtime_ns
    write_demo_dataset(tmp_path / "a", seed=1, num_classes=3, train_per_class=4, val_per_class=2)
    assert (a / _files(a)[0]).stat().st_mtime_ns == stamp
    write_demo_dataset(tmp_path / "a", seed=1, num_classes=2, train_per_class=3, val_per_class=1)
    assert len(_files(a)) == 2 * 4  # other arguments: rewritten, no stale files
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="not a demo dataset"):
        write_demo_dataset(tmp_path / "d")


def test_demo_is_varied_and_well_above_chance_for_a_simple_classifier(tmp_path):
    root = write_demo_dataset(tmp_path / "demo", seed=0)
    train = sorted((root / "train").iterdir())
    assert len(train) == 10 and all(len(list(d.iterdir())) == 40 for d in train)
    sizes = {Image.open(p).size for d in train for p in d.iterdir()}
    assert len(sizes) > 100 and len({round(w / h, 1) for w, h in sizes}) > 5

    def features(split):
        xs, ys = [], []
        for label, folder in enumerate(sorted((root / split).iterdir())):
            for path in folder.iterdir():
                pixels = convert_image(path.read_bytes(), 24).astype(np.float32) / 255
                xs.append(np.concatenate([pixels.reshape(-1, 3).mean(0), pixels.reshape(-1, 3).std(0)]))
                ys.append(label)
        return np.array(xs), np.array(ys)

    x_train, y_train = features("train")
    x_val, y_val = features("val")
    centroids = np.stack([x_train[y_train == k].mean(0) for k in range(10)])
    predicted = np.argmin(((x_val[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == y_val).mean() > 0.3  # chance is 0.1; the CNN also gets the shapes
