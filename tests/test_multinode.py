"""Two nodes on one machine (Ray's own ray.cluster_utils.Cluster): tower pairs share a node,
replicas land on different nodes, and the run trains."""

import json
from pathlib import Path

import pytest
import ray

from alexnet_ray.train.trainer import Trainer
from conftest import local_multinode_cluster, tiny_config

pytestmark = pytest.mark.ray


@pytest.fixture
def two_node_cluster():
    with local_multinode_cluster(2, 2, 2) as cluster:
        yield cluster


def test_tower_pairs_share_a_node_and_replicas_spread(prepared_demo, tmp_path, two_node_cluster):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    config = tiny_config(prepared_demo, tmp_path, "parallel.replicas=2", "parallel.cpus_per_worker=1",
                         "run.name=two-nodes")
    result = Trainer(config).fit()

    epochs = [json.loads(p.read_text()) for p in sorted((Path(result.path) / "metrics").glob("epoch_*.json"))]
    node_of = {w["world_rank"]: w["node_id"] for w in epochs[-1]["workers"]}  # reported by the workers
    assert sorted(node_of) == [0, 1, 2, 3]
    assert node_of[0] == node_of[1], "replica 0's towers are split across nodes"
    assert node_of[2] == node_of[3], "replica 1's towers are split across nodes"
    assert node_of[0] != node_of[2], "both replicas landed on one node"
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"] - 0.1
    assert result.metrics["val_top5_error"] < 0.35 and result.metrics["val_top1_error"] < 0.9  # chance: 0.5, 0.9
    assert result.metrics["val_images"] == 100


@pytest.mark.slow
def test_demo_dataset_is_made_where_it_is_read(tmp_path, two_node_cluster):
    from alexnet_ray.data.manifest import load_manifest
    from alexnet_ray.train.trainer import demo_dataset_on_every_node

    path = demo_dataset_on_every_node(64, cache=tmp_path / "cache")

    @ray.remote(num_cpus=0)
    def classes_here(folder):
        return ray.get_runtime_context().get_node_id(), load_manifest(folder).classes

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    seen = ray.get([classes_here.options(scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
        node, soft=False)).remote(str(path)) for node in nodes])
    assert sorted(node for node, _ in seen) == sorted(nodes) and len(nodes) == 3
    assert all(classes == load_manifest(path).classes and len(classes) == 10 for _, classes in seen)
