"""TrainLoader / EvalLoader on the local Ray cluster over a small prepared demo dataset."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from alexnet_ray.data.augment import augment_eval, augment_train
from alexnet_ray.data.demo import write_demo_dataset
from alexnet_ray.data.pipeline import EvalLoader, TrainLoader
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


def test_global_batches_and_shares():
    from alexnet_ray.data.pipeline import global_batch_sizes, replica_offsets

    assert global_batch_sizes(10, 4) == [4, 4, 2] and global_batch_sizes(8, 4) == [4, 4]
    assert replica_offsets(7, 3).tolist() == [0, 3, 5, 7]
    assert replica_offsets(2, 3).tolist() == [0, 1, 2, 2]  # a short last batch: replica 2 has none
    with pytest.raises(ValueError, match="global_batch_size=0"):
        global_batch_sizes(5, 0)


@pytest.fixture(scope="module")
def many_groups(tmp_path_factory):
    """1,206 train images of 12 px in row groups of 4 (302 groups, the last of 2): 18 windows of
    16 groups at a global batch of 64, and a short tail. Prepared in-process, no Ray."""
    root = tmp_path_factory.mktemp("many-groups")
    write_demo_dataset(root / "src", seed=5, num_classes=3, train_per_class=401, val_per_class=1)
    prepare_dataset(root / "src", root / "out", size=12, row_group_rows=4, use_ray=False, progress=False)
    return root / "out"


def _plan(data_dir, replicas, global_batch=64, epoch=0, seed=7):
    loader = TrainLoader(data_dir, global_batch_size=global_batch, replicas=replicas, image_size=8, seed=seed)
    shares = [loader._replica_steps(loader.epoch_order(epoch), r) for r in range(replicas)]
    for r in range(replicas):
        loader._items(epoch, r)  # the tasks and what they read
    return loader, shares


@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 16])
def test_reads_once_and_global_batches_do_not_depend_on_replicas(many_groups, replicas):
    """Every row once an epoch; step k's global batch row for row the 1-replica run's; micro-batches
    (near-equal slices of a share, as TowerParallel cuts them) keep it; row groups read per epoch
    over row groups within 1.1 where `replicas` divides WINDOW_GROUPS, else 1 + R/W."""
    import torch

    from alexnet_ray.data.pipeline import WINDOW_GROUPS
    from alexnet_ray.parallel.tower_parallel import split_microbatches

    reference, (alone,) = _plan(many_groups, 1)
    loader, shares = _plan(many_groups, replicas)
    for k, step in enumerate(alone):
        together = np.concatenate([shares[r][k] for r in range(replicas)])
        np.testing.assert_array_equal(together, step)
        for microbatches in (1, 4):
            pieces = [mb.labels.numpy() for r in range(replicas) if len(shares[r][k])
                      for mb in split_microbatches(torch.zeros(len(shares[r][k])), torch.from_numpy(shares[r][k]),
                                                   microbatches, 0)]
            np.testing.assert_array_equal(np.concatenate(pieces), step)
    every = np.concatenate([np.concatenate(s) for s in shares])
    assert sorted(every.tolist()) == list(range(loader.num_images))
    groups = sum(loader.reads[(0, r)].row_groups for r in range(replicas)) / loader.index.num_units
    bound = 1.1 if WINDOW_GROUPS % replicas == 0 else 1 + replicas / WINDOW_GROUPS
    assert groups <= bound, f"{groups:.3f} row groups read per row group at {replicas} replicas"
    read = sum(loader.reads[(0, r)].bytes for r in range(replicas)) / loader.split_bytes
    assert read <= bound + 0.05, f"{read:.3f} bytes read per byte (footers included)"


def test_shuffle_differs_across_epochs_and_mixes_classes(many_groups):
    """Two epochs' orders differ (and not by a rotation of row groups: most global batches share
    few rows); each global batch's label mix stays within 0.2 of the split's 1/3 per class (a batch
    of 64 takes 4 rows from each of 16 row groups; the rows were stored in a random order)."""
    loader, _ = _plan(many_groups, 1)
    first, second = loader.epoch_order(0), loader.epoch_order(1)
    assert not np.array_equal(first, second)
    steps = [set(first[i:i + 64].tolist()) for i in range(0, len(first), 64)]
    overlap = max(len(a & set(second[j:j + 64].tolist())) for a in steps[:5] for j in range(0, len(second), 64))
    assert overlap <= 16
    _, rows = _stored(many_groups, "train")
    labels = np.array([r["label"] for r in rows])
    worst = 0.0
    for i in range(0, len(first) - 63, 64):
        mix = np.bincount(labels[first[i:i + 64]], minlength=3) / 64
        worst = max(worst, float(np.abs(mix - 1 / 3).max()))
    assert worst <= 0.2, worst


@pytest.mark.ray
def test_every_training_image_once_per_epoch_across_replicas(prepared):
    manifest, rows = _stored(prepared, "train")
    labels = np.array([r["label"] for r in rows])
    reference = TrainLoader(prepared, global_batch_size=8, replicas=1, image_size=IMAGE_SIZE, seed=11)
    order = reference.epoch_order(0)
    for replicas in (1, 2, 3):
        loader = TrainLoader(prepared, global_batch_size=8, replicas=replicas, image_size=IMAGE_SIZE, seed=11)
        per_replica = [list(loader.iter_epoch(0, r)) for r in range(replicas)]
        for r, batches in enumerate(per_replica):
            assert len(batches) == loader.batches_per_epoch
            assert [len(b["labels"]) for b in batches] == loader.batch_sizes(r)
            planned = loader.replica_rows(0, r)
            np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches]), labels[planned])
            if replicas == 2:  # the images are the planned rows' augmentations, exactly
                images, lighting = augment_train([rows[i]["jpeg"] for i in planned], planned, seed=11, epoch=0,
                                                 image_size=IMAGE_SIZE, eigval=manifest.eigval(),
                                                 eigvec=manifest.eigvec())
                np.testing.assert_array_equal(np.concatenate([b["images"] for b in batches]), images)
                np.testing.assert_array_equal(np.concatenate([b["lighting"] for b in batches]), lighting)
                assert batches[0]["images"].dtype == np.uint8 and batches[0]["lighting"].dtype == np.float32
                assert batches[0]["images"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
        # step k's global batch: the replicas' batches in replica order, the 1-replica run's rows
        steps = [np.concatenate([per_replica[r][k]["labels"] for r in range(replicas)])
                 for k in range(loader.batches_per_epoch)]
        np.testing.assert_array_equal(np.concatenate(steps), labels[order])
        if replicas == 3:  # 52 rows: 6 steps of 8 and one of 4, sliced 3/3/2 and 2/1/1
            assert loader.share(0) == ([0] * 7, [3] * 6 + [2]) and loader.share(2) == ([6] * 6 + [3], [2] * 6 + [1])
    short = TrainLoader(prepared, global_batch_size=8, replicas=8, image_size=IMAGE_SIZE, seed=11)
    last = [list(short.iter_epoch(0, r))[-1]["labels"] for r in range(8)]
    assert [len(x) for x in last] == [1, 1, 1, 1, 0, 0, 0, 0]  # past the short last batch: empty
    with pytest.raises(ValueError, match="smaller than replicas=9"):
        TrainLoader(prepared, global_batch_size=8, replicas=9, image_size=IMAGE_SIZE)


@pytest.mark.ray
def test_order_changes_across_epochs_and_is_reproducible(prepared):
    loader = TrainLoader(prepared, global_batch_size=8, replicas=2, image_size=IMAGE_SIZE, seed=5)
    first = list(loader.iter_epoch(1, 1))
    again = list(TrainLoader(prepared, global_batch_size=8, replicas=2, image_size=IMAGE_SIZE, seed=5).iter_epoch(1, 1))
    assert len(first) == len(again)
    for a, b in zip(first, again):
        for key in ("images", "labels", "lighting"):
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(loader.replica_rows(1, 1), loader.replica_rows(2, 1))
    other_epoch = np.concatenate([b["labels"] for b in loader.iter_epoch(2, 1)])
    assert not np.array_equal(np.concatenate([b["labels"] for b in first]), other_epoch)
    other_seed = TrainLoader(prepared, global_batch_size=8, replicas=2, image_size=IMAGE_SIZE, seed=6)
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

    sizes = [128] * 9 + [17]  # evaluation tasks
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
