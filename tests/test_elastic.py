"""Issue 21 item 3: elastic replicas (parallel.replicas=min-max) on Ray Train V2's elastic worker
group. The range and its checks without Ray; then, on two-node ray.cluster_utils.Clusters (each
node one tower group's worth of CPUs), a run that loses a node mid-epoch and finishes on one replica,
and a run that starts short of nodes and grows when one is added: both end with the weights of the
uninterrupted run (`tiny_run`: the same tiny config on 2 towers x 1 replica)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from alexnet_ray.checkpoint import load_checkpoint
from alexnet_ray.train import fault_injection
from alexnet_ray.train.config import ConfigError, load_config, validate_config
from alexnet_ray.train.elastic import attempt_layout, resize_line
from alexnet_ray.train.trainer import Trainer, worker_bounds
from conftest import local_multinode_cluster, tiny_config
from test_reliability import Killer, run_with_plan
from test_trainer import LAYOUT_RTOL, assert_weights_close, epoch_metrics, final_weights

# Each node holds one tower group: 2 workers of 1.5 CPUs in 3 CPUs. The head's 1 CPU holds no
# worker (Ray Train counts whole workers per node) and runs the loaders' Ray Data tasks.
NODE_CPUS, HEAD_CPUS, WORKER_CPUS = 3, 1, "parallel.cpus_per_worker=1.5"
EXCHANGE_TIMEOUT_S = 8.0
# A killed node is marked dead after a few missed health checks (Ray's default: about 15 s). Until
# then Ray Train may try to restart the group on it, and waits for the workers up to its start
# timeout (60 s by default) before it tries again on what is left; both shortened here.
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                   "health_check_failure_threshold": 3}
START_TIMEOUT_S = "15"


@pytest.fixture
def short_start_timeout(monkeypatch):
    """Ray Train's worker-group start timeout, for the clusters started after it (their processes
    inherit the environment)."""
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", START_TIMEOUT_S)


# ------------------------------------------------------------------------------- the range

@pytest.mark.parametrize("written, parsed", [("1-2", [1, 2]), ("2", 2), ("2-2", 2), (" 1 - 4 ", [1, 4])])
def test_replicas_take_a_range_in_set_syntax(written, parsed):
    config = load_config("tiny", overrides=[f"parallel.replicas={written}"], check_data=False)
    assert config.parallel.replicas == parsed


@pytest.mark.parametrize("written, parsed", [("[1, 2]", [1, 2]), ("'1-2'", [1, 2]), ("3", 3), ("[2, 2]", 2)])
def test_replicas_take_a_range_in_yaml(tmp_path, written, parsed):
    path = tmp_path / "run.yaml"
    path.write_text(f"preset: tiny\nparallel:\n  replicas: {written}\n")
    assert load_config(path=path, check_data=False).parallel.replicas == parsed


@pytest.mark.parametrize("written, message", [
    ("2-1", "parallel.replicas=2-1: the minimum is above the maximum"),
    ("one", r"parallel.replicas must be an integer or a range min-max \(e.g. 1-2 or \[1, 2\]\), got 'one'"),
    ("1-2-3", "parallel.replicas must be an integer or a range"),
    ("0-2", "parallel.replicas=0: must be >= 1"),
    ("1-32", "data.global_batch_size=16 is smaller than parallel.replicas=1-32 at its maximum"),
])
def test_bad_ranges_are_refused_naming_the_field(written, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides=[f"parallel.replicas={written}"], check_data=False)


def test_yaml_range_of_three_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nparallel:\n  replicas: [1, 2, 3]\n")
    with pytest.raises(ConfigError, match=r"run.yaml: parallel.replicas must be an integer or a range"):
        load_config(path=path, check_data=False)


def test_a_minimum_the_cluster_cannot_hold_is_refused_before_any_worker():
    config = load_config("tiny", overrides=["parallel.replicas=2-4", "parallel.cpus_per_worker=1"], check_data=False)
    validate_config(config, cluster_resources={"CPU": 4}, check_data=False)  # the minimum fits; it grows later
    with pytest.raises(ConfigError, match=r"parallel.replicas=2-4: its minimum, 2 towers x 2 = 4 workers, "
                                          r"x parallel.cpus_per_worker=1 need 4 CPUs; the Ray cluster has 3"):
        validate_config(config, cluster_resources={"CPU": 3}, check_data=False)
    config.parallel.use_gpu = "auto"
    with pytest.raises(ConfigError, match=r"its minimum, 2 towers x 2 = 4 workers, need 4 GPUs; the Ray cluster has 2"):
        validate_config(config, cluster_resources={"CPU": 64, "GPU": 2}, check_data=False)


def test_bounds_are_whole_tower_groups_and_the_microbatch_bound_comes_from_the_most_replicas():
    elastic = load_config("tiny", overrides=["parallel.replicas=1-4", "data.global_batch_size=64"], check_data=False)
    assert worker_bounds(elastic) == (2, 8) and elastic.num_workers == 8
    assert elastic.microbatch_rows == 16  # 64 / 4 replicas: on 1 replica the share of 64 runs 4 micro-batches
    fixed = load_config("tiny", overrides=["parallel.replicas=3", "data.global_batch_size=60"], check_data=False)
    assert worker_bounds(fixed) == 6 and fixed.microbatch_rows == 20


def test_each_attempt_trains_on_the_whole_tower_groups_it_got():
    config = load_config("tiny", overrides=["parallel.replicas=1-3"], check_data=False)
    for world, replicas, spare in [(2, 1, 0), (3, 1, 1), (4, 2, 0), (5, 2, 1), (6, 3, 0)]:
        attempt, idle = attempt_layout(config, world)
        assert (attempt.parallel.replicas, idle) == (replicas, spare), world
        assert attempt.parallel.microbatch_rows == 6  # ceil(16 / 3), whatever the attempt's count
    assert config.parallel.replicas == [1, 3]  # the run's config is untouched
    with pytest.raises(ValueError, match="world size 1 makes 0 tower groups of 2, outside parallel.replicas=1-3"):
        attempt_layout(config, 1)
    fixed = load_config("tiny", overrides=["parallel.replicas=2"], check_data=False)
    with pytest.raises(ValueError, match=r"world size 3 != towers x replicas = 2 x 2"):
        attempt_layout(fixed, 3)


def test_resize_line():
    assert resize_line(2, 1, 2) == "replicas 2 → 1 at epoch 3, step 0"
    assert resize_line(None, 1, 0) is None and resize_line(2, 2, 4) is None


# ------------------------------------------------------------------------------- on two nodes

def elastic_config(prepared_demo, storage, name, *overrides):
    return tiny_config(prepared_demo, storage, "parallel.replicas=1-2", WORKER_CPUS, f"run.name={name}",
                       f"parallel.exchange_timeout_s={EXCHANGE_TIMEOUT_S}", "run.max_failures=4", *overrides)


def node_of(events: list[dict], pid: int) -> str:
    return next(e["node"] for e in events if e["event"] == "start" and e["pid"] == pid)


def assert_same_run(result, tiny_run):
    assert result.error is None and result.metrics["epoch"] == 2
    epochs = epoch_metrics(result)
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"] - 0.1
    assert [m["val_images"] for m in epochs] == [100, 100]
    assert_weights_close(final_weights(result), final_weights(tiny_run), rtol=LAYOUT_RTOL)
    for ours, theirs in zip(epochs, epoch_metrics(tiny_run)):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-6)
    return epochs


def pairs_on_one_node(workers: list[dict]) -> None:
    node = {w["world_rank"]: w["node_id"] for w in workers}
    for w in workers:
        if w["replica"] is None:  # a spare worker
            continue
        assert node[w["world_rank"]] == node[w["replica"] * 2], f"replica {w['replica']}'s towers are split"


def max_relative_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)


@pytest.mark.ray
def test_a_lost_node_shrinks_the_group_and_the_run_stays_the_same(prepared_demo, tmp_path, tiny_run,
                                                                  short_start_timeout):
    """2 replicas, one per node; in epoch 2 the node of replica 1 goes (its tower 0 parked before
    step 5, then the node removed); the group restarts from the epoch-1 checkpoint on 1 replica."""
    with local_multinode_cluster(HEAD_CPUS, NODE_CPUS, NODE_CPUS, system_config=FAST_NODE_DEATH) as cluster:
        nodes = {n.node_id: n for n in cluster.worker_nodes}
        holder = {}

        def remove_node(pid):
            holder["node"] = node_of(fault_injection.read_events(tmp_path / "faults" / "plan.json"), pid)
            cluster.remove_node(nodes[holder["node"]], allow_graceful=False)

        config = elastic_config(prepared_demo, tmp_path, "shrink")
        result, events, killer, wall = run_with_plan(
            config, tmp_path / "faults" / "plan.json",
            [{"point": "step", "action": "hold", "rank": 2, "epoch": 1, "step": 5}],
            lambda plan: Killer(plan, kill=remove_node))
    epochs = assert_same_run(result, tiny_run)
    assert [m["replicas"] for m in epochs] == [2, 1]
    assert epochs[1]["resize"] == "replicas 2 → 1 at epoch 2, step 0" and epochs[1]["replicas_before"] == 2
    assert "resize" not in epochs[0]
    survivors = {w["node_id"] for w in epochs[1]["workers"]}
    assert sorted(w["world_rank"] for w in epochs[1]["workers"]) == [0, 1] and holder["node"] not in survivors
    pairs_on_one_node(epochs[0]["workers"])
    pairs_on_one_node(epochs[1]["workers"])
    removed = killer.killed[0]["killed_at"]
    first = min((e for e in events if e["event"] == "first_step" and e["time"] > removed), key=lambda e: e["time"])
    assert (first["epoch"], first["step"]) == (1, 0)  # epoch 2 replayed from its start on 1 replica
    diff = max_relative_diff(final_weights(result), final_weights(tiny_run))
    print(f"\nelastic shrink: {wall:.1f}s wall, node removed -> first step on 1 replica "
          f"{first['time'] - removed:.1f}s, weights within {diff:.1e} relative of the uninterrupted run")


def fit_in_thread(config) -> tuple[threading.Thread, dict]:
    """fit() on a thread (ray.cluster_utils adds nodes from the main thread only): (thread, outcome)."""
    outcome = {}

    def fit():
        try:
            outcome["result"] = Trainer(config).fit()
        except BaseException as error:  # re-raised on the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    return thread, outcome


def test_a_run_short_of_nodes_grows_when_one_comes(prepared_demo, tmp_path, tiny_run, short_start_timeout):
    """One node: 1 replica. In epoch 2 both towers park before step 2 (up to 60 s, so no exchange
    times out); a second node comes; at the next resize check (2 s) the group restarts from the
    epoch-1 checkpoint on 2 replicas."""
    import os

    plan = fault_injection.write_plan(tmp_path / "faults" / "plan.json", [
        {"point": "step", "action": "pause", "rank": rank, "epoch": 1, "step": 2, "seconds": 60} for rank in (0, 1)])
    os.environ[fault_injection.PLAN_ENV_VAR] = str(plan)
    try:
        with local_multinode_cluster(HEAD_CPUS, NODE_CPUS) as cluster:
            started = time.time()
            thread, outcome = fit_in_thread(elastic_config(prepared_demo, tmp_path, "grow", "parallel.resize_interval_s=2"))
            while thread.is_alive() and not plan.with_name("fired-0").exists():
                time.sleep(0.1)
            cluster.add_node(num_cpus=NODE_CPUS)
            added_at = time.time()
            thread.join(timeout=300)
            wall = time.time() - started
    finally:
        del os.environ[fault_injection.PLAN_ENV_VAR]
    assert not thread.is_alive(), "the run did not finish within 300 s"
    if "error" in outcome:
        raise outcome["error"]
    result, events = outcome["result"], fault_injection.read_events(plan)
    epochs = assert_same_run(result, tiny_run)
    assert [m["replicas"] for m in epochs] == [1, 2]
    assert epochs[1]["resize"] == "replicas 1 → 2 at epoch 2, step 0"
    assert sorted(w["world_rank"] for w in epochs[1]["workers"]) == [0, 1, 2, 3]
    assert len({w["node_id"] for w in epochs[1]["workers"]}) == 2
    pairs_on_one_node(epochs[1]["workers"])
    first = min((e for e in events if e["event"] == "first_step" and e["time"] > added_at and e["rank"] == 2),
                key=lambda e: e["time"])
    assert (first["epoch"], first["step"]) == (1, 0)
    errors = [e for e in events if e["event"] == "error"]
    assert not errors, errors  # a resize, not a failure: nothing timed out
    diff = max_relative_diff(final_weights(result), final_weights(tiny_run))
    print(f"\nelastic grow: {wall:.1f}s wall, node added -> first step on 2 replicas "
          f"{first['time'] - added_at:.1f}s, weights within {diff:.1e} relative of the uninterrupted run")


@pytest.mark.ray
def test_workers_beyond_whole_tower_groups_are_spare_for_the_attempt(prepared_demo, tmp_path, tiny_run,
                                                                    short_start_timeout):
    """A node with room for 3 workers of 2 towers (4 CPUs, 1.25 a worker; the head's 1 CPU for the
    loaders): Ray Train starts 3 (it counts workers, not tower groups); the run trains on 1 replica
    with rank 2 spare, and ends epoch 1 where the uninterrupted run did."""
    with local_multinode_cluster(HEAD_CPUS, 4):
        result = Trainer(elastic_config(prepared_demo, tmp_path, "spare", "run.epochs=1",
                                        "parallel.cpus_per_worker=1.25")).fit()
    (epoch,) = epoch_metrics(result)
    assert epoch["replicas"] == 1 and "resize" not in epoch
    workers = sorted(epoch["workers"], key=lambda w: w["world_rank"])
    assert [(w["world_rank"], w["replica"], w["tower"]) for w in workers] == [(0, 0, 0), (1, 0, 1), (2, None, None)]
    reference = load_checkpoint(Path(tiny_run.path) / "checkpoint_epoch_0001")
    assert_weights_close(final_weights(result), reference["model"], rtol=LAYOUT_RTOL)
    assert epoch["train_loss"] == pytest.approx(reference["metrics"]["train_loss"], rel=1e-6)
