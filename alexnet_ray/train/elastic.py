"""Elastic replicas (`parallel.replicas=min-max`): what one attempt of Ray Train's elastic worker
group trains on, its spare workers, and the resize line each attempt prints and records.

Ray Train V2 restarts the group after a lost node on the workers the cluster still holds, and grows
it at its next resize check (`parallel.resize_interval_s`). The replica count follows the world
size of each attempt; the run's math does not, as the global batch defines the run.
"""

from __future__ import annotations

import json
import posixpath
import sys

import ray
import ray.train

from alexnet_ray.train.config import Config

LAYOUT_FILE = "replicas.json"  # in the run directory: the replica count of the latest attempt


def attempt_layout(config: Config, world_size: int) -> tuple[Config, int]:
    """(this attempt's config, with the replica count that whole tower groups of `world_size` make,
    and the number of spare workers). Ray counts workers per node, not per tower group, so an
    elastic group may hold a partial group: its workers idle for the attempt (`idle_worker`)."""
    p = config.parallel
    replicas, spare = divmod(world_size, p.towers)
    if not p.elastic:
        if world_size != p.towers * p.replicas:
            raise ValueError(f"world size {world_size} != towers x replicas = {p.towers} x {p.replicas}")
        return config, 0
    if not p.min_replicas <= replicas <= p.max_replicas:
        raise ValueError(f"world size {world_size} makes {replicas} tower groups of {p.towers}, outside "
                         f"parallel.replicas={p.min_replicas}-{p.max_replicas}")
    return config.at_replicas(replicas), spare


def resize_line(previous: int | None, replicas: int, epoch: int) -> str | None:
    """'replicas 2 → 1 at epoch 3, step 0' (1-based epoch; an attempt starts at an epoch's start, the
    newest checkpoint's), or None when the replica count did not change."""
    if previous is None or previous == replicas:
        return None
    return f"replicas {previous} → {replicas} at epoch {epoch + 1}, step 0"


def note_attempt(replicas: int, start_epoch: int) -> dict:
    """Rank 0 at each attempt's start: compare with the previous attempt's replica count (kept in the
    run directory), print the resize, and return it for that epoch's metrics ({} when none)."""
    storage = ray.train.get_context().get_storage()
    fs, path = storage.storage_filesystem, posixpath.join(storage.experiment_fs_path, LAYOUT_FILE)
    previous = None
    try:
        with fs.open_input_stream(path) as f:
            previous = int(json.loads(f.read())["replicas"])
    except (FileNotFoundError, OSError, ValueError, KeyError):
        pass
    with fs.open_output_stream(path) as f:
        f.write(json.dumps({"replicas": replicas}).encode())
    line = resize_line(previous, replicas, start_epoch)
    if line is None:
        return {}
    sys.stdout.write(line + "\n")  # not print: Ray Train's patched print echoes every line twice
    sys.stdout.flush()
    return {"resize": line, "replicas_before": previous}


def idle_worker(config: Config, start_epoch: int) -> None:
    """A spare worker: no tower, no data; it reports with the group once an epoch (Ray Train's
    report is a barrier of every worker) until the run's last epoch, then ends."""
    node = ray.get_runtime_context().get_node_id()
    rank = ray.train.get_context().get_world_rank()
    for _ in range(start_epoch, config.run.epochs):
        ray.train.report({"idle": True, "world_rank": rank, "node_id": node, "replica": None, "tower": None},
                         checkpoint=None)
