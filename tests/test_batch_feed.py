"""The replica's batch feed: tower 0's loader batches arrive identical on its partner, one step
ahead, interleaved with the towers' own exchanges; the next epoch's loader starts early."""

import threading
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alexnet_ray.parallel import Topology, gather_from_tower_pair, init_parallel_groups
from alexnet_ray.train.batch_feed import EarlyStart, training_batches

SIZES = [3, 3, 2]
IMAGE = 4


def _loader_batches():
    rng = np.random.default_rng(0)
    for rows in SIZES:
        images = rng.integers(0, 256, (rows, IMAGE, IMAGE, 3), dtype=np.uint8)
        images.flags.writeable = False  # as Ray's object store hands them out
        yield {"images": images, "labels": rng.integers(0, 10, rows), "lighting": rng.random((rows, 3), np.float32)}


def _feed_worker(rank, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    groups = init_parallel_groups(Topology(towers=2, replicas=1))
    source = _loader_batches() if rank == 0 else None
    expected = list(_loader_batches())
    got = 0
    for step, (images, labels, lighting) in enumerate(training_batches(source, SIZES, IMAGE, groups, "cpu")):
        want = expected[step]
        assert torch.equal(images, torch.from_numpy(want["images"])), f"rank {rank} step {step} images"
        assert torch.equal(labels, torch.from_numpy(want["labels"])), f"rank {rank} step {step} labels"
        assert torch.equal(lighting, torch.from_numpy(want["lighting"])), f"rank {rank} step {step} lighting"
        # the towers' own exchange runs while the next batch's broadcast is in flight
        mixed = gather_from_tower_pair(torch.full((2, 1), float(rank + step)), groups.pair_group, dim=1)
        assert torch.equal(mixed, torch.tensor([[step, step + 1.0]] * 2))
        got += 1
    assert got == len(SIZES)
    dist.barrier()
    dist.destroy_process_group()


def test_partner_gets_every_batch_identical_with_exchanges_in_between(tmp_path):
    mp.spawn(_feed_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)


def test_a_loader_that_disagrees_with_the_plan_is_an_error(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        groups = init_parallel_groups(Topology(towers=1, replicas=1))
        assert len(list(training_batches(_loader_batches(), SIZES, IMAGE, groups, "cpu"))) == 3
        with pytest.raises(RuntimeError, match="ended after 3 batches; its plan has 4"):
            list(training_batches(_loader_batches(), SIZES + [1], IMAGE, groups, "cpu"))
        with pytest.raises(RuntimeError, match="more than the 2 planned"):
            list(training_batches(_loader_batches(), SIZES[:2], IMAGE, groups, "cpu"))
        with pytest.raises(RuntimeError, match=r"batch 0 has images \(3, 4, 4, 3\); the plan says \(3, 5, 5, 3\)"):
            list(training_batches(_loader_batches(), SIZES, 5, groups, "cpu"))
    finally:
        dist.destroy_process_group()


def test_early_start_fetches_the_first_item_in_the_background():
    fetched = threading.Event()

    def slow():
        time.sleep(0.2)
        fetched.set()
        yield from range(3)

    early = EarlyStart(slow())
    assert fetched.wait(5), "the first item was not fetched until asked for"
    assert list(early) == [0, 1, 2]
    assert list(EarlyStart(iter([]))) == []


def test_early_start_reraises_the_loader_error_where_it_is_consumed():
    def broken():
        raise ValueError("shard 3 is unreadable")
        yield

    early = EarlyStart(broken())
    with pytest.raises(ValueError, match="shard 3 is unreadable"):
        list(early)
