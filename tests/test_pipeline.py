"""TrainLoader / EvalLoader on the local Ray cluster over a small prepared demo dataset."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from alexnet_ray.data.augment import augment_eval, augment_train
from alexnet_ray.data.demo import write_demo_dataset
from alexnet_ray.data.pipeline import EvalLoader, TrainLoader, replica_batch_sizes
from alexnet_ray.data.prepare import prepare_dataset

IMAGE_SIZE = 16
_PREPARED = {}


@pytest.fixture
def prepared(ray_cluster, tmp_path_factory):
    """52 train and 20 val images of 20x20 px in several shards; built once per session."""
    if "dir" not in _PREPARED:
        root = tmp_path_factory.mktemp("pipeline")
        write_demo_dataset(root / "src", seed=3, num_classes=4, train_per_class=13, val_per_class=5)
        manifest = prepare_dataset(root / "src", root / "out", size=20, shard_mb=0.008)
        assert len(manifest.splits["train"]["shards"]) >= 4
        _PREPARED["dir"] = root / "out"
    return _PREPARED["dir"]


def _stored(data_dir, split):
    from alexnet_ray.data.manifest import load_manifest

    manifest = load_manifest(data_dir)
    rows = []
    for path in manifest.shard_paths(split):
        rows += pq.read_table(path, columns=["jpeg", "label"]).to_pylist()
    return manifest, rows


def test_batch_plan_is_equal_across_replicas_and_complete():
    for rows in range(5, 80):
        for replicas in (1, 2, 3, 4):
            for batch in (2, 3, 8):
                plan = replica_batch_sizes(rows, batch, replicas)
                assert len({len(p) for p in plan}) == 1
                assert sum(map(sum, plan)) == rows
                assert all(1 <= s <= batch for p in plan for s in p)
    assert replica_batch_sizes(10, 4, 2) == [[4, 1], [4, 1]]
    assert replica_batch_sizes(9, 4, 2) == [[4, 1], [2, 2]]
    with pytest.raises(ValueError, match="batch_size=1"):
        replica_batch_sizes(5, 1, 2)
    with pytest.raises(ValueError, match="replicas=3"):
        replica_batch_sizes(2, 4, 3)


@pytest.mark.ray
def test_every_training_image_once_per_epoch_across_replicas(prepared):
    manifest, rows = _stored(prepared, "train")
    labels = np.array([r["label"] for r in rows])
    for replicas in (1, 2, 3):
        loader = TrainLoader(prepared, batch_size=8, replicas=replicas, image_size=IMAGE_SIZE, seed=11)
        seen = []
        for replica in range(replicas):
            planned = loader.replica_rows(0, replica)
            batches = list(loader.iter_epoch(0, replica))
            assert len(batches) == loader.batches_per_epoch
            got = np.concatenate([b["labels"] for b in batches])
            np.testing.assert_array_equal(got, labels[planned])
            seen.append(planned)
            if replicas == 2:  # the images are the planned rows' augmentations, exactly
                images, lighting = augment_train([rows[i]["jpeg"] for i in planned], planned, seed=11, epoch=0,
                                                 image_size=IMAGE_SIZE, eigval=manifest.eigval(),
                                                 eigvec=manifest.eigvec())
                np.testing.assert_array_equal(np.concatenate([b["images"] for b in batches]), images)
                np.testing.assert_array_equal(np.concatenate([b["lighting"] for b in batches]), lighting)
                assert batches[0]["images"].dtype == np.uint8 and batches[0]["lighting"].dtype == np.float32
                assert batches[0]["images"].shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3)
        everything = np.concatenate(seen)
        assert sorted(everything) == list(range(len(rows)))  # no loss, no duplicates
        if replicas == 3:  # 18, 17, 17 rows in batches [8, 8, 2], [8, 8, 1], [8, 8, 1]
            assert loader.step_rows(0) == ([0, 0, 0], [24, 24, 4])
            assert loader.step_rows(2) == ([16, 16, 3], [24, 24, 4])


@pytest.mark.ray
def test_order_changes_across_epochs_and_is_reproducible(prepared):
    loader = TrainLoader(prepared, batch_size=8, replicas=2, image_size=IMAGE_SIZE, seed=5)
    first = list(loader.iter_epoch(1, 1))
    again = list(TrainLoader(prepared, batch_size=8, replicas=2, image_size=IMAGE_SIZE, seed=5).iter_epoch(1, 1))
    assert len(first) == len(again)
    for a, b in zip(first, again):
        for key in ("images", "labels", "lighting"):
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(loader.replica_rows(1, 1), loader.replica_rows(2, 1))
    other_epoch = np.concatenate([b["labels"] for b in loader.iter_epoch(2, 1)])
    assert not np.array_equal(np.concatenate([b["labels"] for b in first]), other_epoch)
    other_seed = TrainLoader(prepared, batch_size=8, replicas=2, image_size=IMAGE_SIZE, seed=6)
    assert not np.array_equal(other_seed.replica_rows(1, 1), loader.replica_rows(1, 1))


@pytest.mark.ray
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_eval_sees_every_image_exactly_once(prepared, replicas):
    _, rows = _stored(prepared, "val")
    loader = EvalLoader(prepared, batch_size=3, replicas=replicas, image_size=IMAGE_SIZE)
    labels, images = [], []
    for replica in range(replicas):
        batches = list(loader.iter(replica))
        assert len(batches) == loader.num_batches(replica)
        labels += [b["labels"] for b in batches]
        images += [b["images"] for b in batches]
    np.testing.assert_array_equal(np.concatenate(labels), [r["label"] for r in rows])
    np.testing.assert_array_equal(np.concatenate(images),
                                  augment_eval([r["jpeg"] for r in rows], image_size=IMAGE_SIZE))


@pytest.mark.ray
def test_eval_ten_crop_batches(prepared):
    _, rows = _stored(prepared, "val")
    loader = EvalLoader(prepared, batch_size=7, replicas=2, image_size=IMAGE_SIZE, ten_crop=True)
    batches = [b for replica in range(2) for b in loader.iter(replica)]
    crops = np.concatenate([b["images"] for b in batches])
    assert crops.shape == (len(rows), 10, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_array_equal(crops, augment_eval([r["jpeg"] for r in rows], image_size=IMAGE_SIZE,
                                                      ten_crop=True))
    with pytest.raises(ValueError, match="image_size=24"):
        EvalLoader(prepared, batch_size=7, replicas=2, image_size=24)


def test_tasks_hold_whole_batches_within_the_limits():
    from alexnet_ray.data.pipeline import TASK_BYTES, TASK_ROWS, batch_tasks

    sizes = [128] * 9 + [17]
    tasks = batch_tasks(sizes, 224 * 224 * 3)
    # one batch first (the epoch's first step waits for few decodes), then doubling up to the limit
    assert tasks[:3] == [(0, 1), (1, 3), (3, 7)] and tasks[-1][1] == len(sizes)
    assert [a for a, _ in tasks[1:]] == [b for _, b in tasks[:-1]]  # contiguous, nothing skipped
    for a, b in tasks:
        assert sum(sizes[a:b]) * 224 * 224 * 3 <= TASK_BYTES or b - a == 1
    small = [8] * 200
    rows = [sum(small[a:b]) for a, b in batch_tasks(small, 64 * 64 * 3)]
    assert rows[:7] == [8, 16, 32, 64, 128, 256, 512] and set(rows[7:-1]) == {TASK_ROWS}
    assert batch_tasks([128, 128], 10 * 224 * 224 * 3) == [(0, 1), (1, 2)]  # ten crops: one batch a task
