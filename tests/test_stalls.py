"""Issue 14: a partner that stalls (alive, not answering) in any wait of training or evaluation
makes the waiting rank fail within the run's timeout, with an error naming the op, the step and
the peer. Real gloo process groups in two spawned processes; the stalled one sleeps past the test.

The Trainer-level run that stalls and recovers to the uninterrupted weights is in
tests/test_reliability.py (it shares that file's faulted run).
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist

from alexnet_ray.parallel import Topology, init_parallel_groups
from alexnet_ray.parallel.mappings import (
    WaitLimit,
    all_reduce_sum,
    broadcast_from_tower0,
    gather_tower_state_dicts,
)
from alexnet_ray.train.batch_feed import training_batches

TIMEOUT_S = 2.0
SLACK_S = 3.0  # process scheduling on a loaded 2-core machine
STALL_S = 60.0  # far past the test: the stalled rank is terminated once the other has reported


def _batch_feed(rank, groups):
    def loader():  # tower 0's loader serves batch 0, then stalls before batch 1
        batch = {"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.zeros(2, np.int64),
                 "lighting": np.zeros((2, 3), np.float32)}
        yield batch
        time.sleep(STALL_S)
        yield batch

    # the training's data wait: the partner's reads may retry, then the exchange timeout (issue 28)
    limit = WaitLimit(TIMEOUT_S, "run.storage_retry_s=1.5 + parallel.exchange_timeout_s=0.5")
    feed = training_batches(loader() if rank == 0 else None, [2, 2], 4, groups, "cpu", timeout=limit,
                            label="epoch 3 training batch")
    return list(feed)


def _evaluation(rank, groups):
    if rank == 0:
        time.sleep(STALL_S)
    return broadcast_from_tower0([], groups, label="epoch 2 evaluation batch 7", timeout=TIMEOUT_S)


def _gather(rank, groups):
    if rank == 1:
        time.sleep(STALL_S)
    return gather_tower_state_dicts({"conv1.weight": torch.ones(3, 2)}, groups, "epoch 4 checkpoint weights",
                                    TIMEOUT_S)


def _all_reduce(rank, groups):
    if rank == 1:
        time.sleep(STALL_S)
    return all_reduce_sum(torch.ones(4, dtype=torch.float64), groups.dp_group, "epoch 5 training metrics", TIMEOUT_S)


SCENARIOS = {
    # name: (what the waiting rank runs, the topology, the waiting rank, what its error must say)
    "batch feed": (_batch_feed, Topology(towers=2, replicas=1), 1,
                   "epoch 3 training batch 1: broadcast from rank 0: not complete after 2s "
                   "(run.storage_retry_s=1.5 + parallel.exchange_timeout_s=0.5)"),
    "evaluation broadcast": (_evaluation, Topology(towers=2, replicas=1), 1,
                             "epoch 2 evaluation batch 7 count: broadcast from rank 0: not complete after 2s"),
    "checkpoint gather": (_gather, Topology(towers=2, replicas=1), 0,
                          "epoch 4 checkpoint weights layout: recv from rank 1: not complete after 2s"),
    "metric all-reduce": (_all_reduce, Topology(towers=1, replicas=2), 0,
                          "epoch 5 training metrics: all-reduce over ranks [0, 1]: not complete after 2s"),
}


def _worker(rank, name, store, results):
    torch.set_num_threads(1)
    run, topology, _, _ = SCENARIOS[name]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    groups = init_parallel_groups(topology, timeout=TIMEOUT_S)
    results.put((rank, "ready", time.time(), ""))
    started = time.time()
    try:
        run(rank, groups)
        results.put((rank, "returned", time.time() - started, ""))
    except BaseException as error:
        results.put((rank, type(error).__name__, time.time() - started, f"{error}\n{traceback.format_exc()}"))


@pytest.mark.slow  # two spawned processes importing torch: about 10 s each
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_stalled_partner_gives_a_labelled_error_within_the_timeout(tmp_path, name):
    _, _, waiting, expected = SCENARIOS[name]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(rank, name, str(tmp_path / "store"), results), daemon=True)
             for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        outcome = None
        deadline = time.time() + 120
        while outcome is None:
            rank, kind, seconds, message = results.get(timeout=max(1.0, deadline - time.time()))
            if kind != "ready":
                outcome = (rank, kind, seconds, message)
        assert procs[1 - waiting].is_alive(), "the stalled partner died: this tests a stall, not a loss"
    finally:
        for p in procs:
            p.kill()
            p.join(10)
    rank, kind, seconds, message = outcome
    assert (rank, kind) == (waiting, "ExchangeTimeoutError"), message
    assert expected in message.splitlines()[0], message
    assert TIMEOUT_S - 0.5 <= seconds <= TIMEOUT_S + SLACK_S, seconds
