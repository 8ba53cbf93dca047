"""`Trainer(config).fit()`: the training service's Python entry point, on Ray Train V2.

    from alexnet_ray import Trainer
    from alexnet_ray.train.config import load_config

    result = Trainer(load_config("demo")).fit()
    print(result.metrics["val_top1_error"], result.checkpoint_uri)  # a path or s3://..., as given
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer

from alexnet_ray import ray_cluster, storage, storage_retries
from alexnet_ray.train import failures, fault_injection, tensorboard, tracking
from alexnet_ray.train.config import Config, copy_config, validate_config
from alexnet_ray.train.metrics import epoch_record, mean_images_per_s, read_metrics_files, write_metrics_file
from alexnet_ray.train.preflight import check_inputs
from alexnet_ray.train.worker import train_worker

DEMO_CACHE = Path(os.environ.get("ALEXNET_RAY_CACHE", "~/.cache/alexnet-ray")).expanduser()


class MetricsFiles(UserCallback):
    """On the controller: one metrics/epoch_NNNN.json per epoch in the run directory."""

    def __init__(self, run_dir: str):
        self.run_dir, self.retry_s = run_dir, storage_retries.retry_budget()  # the driver's, to the controller

    def after_report(self, run_context, metrics, checkpoint):
        storage_retries.set_retry_budget(self.retry_s)
        if metrics and "epoch" in metrics[0]:
            record = epoch_record(metrics)
            write_metrics_file(self.run_dir, int(metrics[0]["epoch"]), record)
            tensorboard.log_epoch(self.run_dir, record)


def demo_dataset_dir(image_size: int, cache: Path = DEMO_CACHE, seed: int = 0) -> Path:
    """The embedded demo dataset, generated and prepared once into the cache, stored at the size
    that random `image_size` crops come from (the paper's 224-from-256 ratio). Prepared in this
    process (it is small), so a task can make it on its own node."""
    from alexnet_ray.data.demo import write_demo_dataset
    from alexnet_ray.data.manifest import load_manifest
    from alexnet_ray.data.prepare import prepare_dataset

    stored = round(image_size * 256 / 224)
    prepared = cache / f"demo-seed{seed}-{stored}px"
    try:
        load_manifest(prepared)
        return prepared
    except ValueError:
        pass
    raw = write_demo_dataset(cache / f"demo-seed{seed}-raw", seed=seed)
    prepare_dataset(raw, prepared, layout="folder", size=stored, overwrite=True, use_ray=False, progress=False)
    return prepared


def demo_dataset_on_every_node(image_size: int, cache: Path = DEMO_CACHE) -> Path:
    """The demo dataset at the same path on every node of the cluster: the workers and the loaders'
    tasks read it where they run, and a driver's home directory is not shared between nodes. The
    generator is deterministic, so every node holds the same bytes."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    prepared = demo_dataset_dir(image_size, cache)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        make = ray.remote(num_cpus=0)(demo_dataset_dir)
        ray.get([make.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                 .remote(image_size, cache) for node in nodes])
    return prepared


@dataclasses.dataclass
class RunResult(ray.train.Result):
    """Ray Train's Result, plus where the run and its newest checkpoint are as the next command
    takes them: `result.path` and `result.checkpoint.path` are paths inside the storage's
    filesystem ("bucket/runs/x"), which drop a URI's scheme."""

    run_uri: str = ""
    checkpoint_uri: str | None = None
    wall_s: float = 0.0  # this fit() call, start-up included
    images_per_s: float | None = None  # training images over training seconds, every epoch of the run

    @classmethod
    def of(cls, result: ray.train.Result, run_dir: str, wall_s: float) -> "RunResult":
        fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.init}
        checkpoint = storage.join(run_dir, storage.base_name(result.checkpoint.path)) if result.checkpoint else None
        return cls(**fields, run_uri=run_dir, checkpoint_uri=checkpoint, wall_s=wall_s,
                   images_per_s=mean_images_per_s(read_metrics_files(run_dir)))


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def local_cluster_cpus(config: Config, cores: int | None = None) -> int:
    """Logical CPUs of the local cluster Trainer starts: the workers' share plus room for Ray Data
    tasks, and never fewer than the cores (plus 2). Ray takes whole numbers only."""
    p = config.parallel
    needed = math.ceil(config.num_workers * float(p.cpus_per_worker)) + 2
    return max(cores or os.cpu_count() or 1, needed) + 2


def worker_bounds(config: Config) -> int | tuple[int, int]:
    """ScalingConfig.num_workers in whole tower groups: towers x replicas, or (min, max) of an
    elastic run, whose worker group Ray Train V2 restarts on what the cluster holds after a loss
    and grows at its next resize check (the worker sees the count it got, worker.attempt_layout)."""
    p = config.parallel
    if not p.elastic:
        return p.towers * p.replicas
    return p.towers * p.min_replicas, p.towers * p.max_replicas


class Trainer:
    """Trains the configured AlexNet with one Ray Train worker per tower per replica."""

    def __init__(self, config: Config, *, address: str | None = None, callbacks: list[UserCallback] | None = None,
                 pictures=None):
        self.config = config
        # pictures(checkpoint, run_dir, out_dir, metrics) -> paths: drawn on rank 0 at the end for the
        # tracker (jobs pass alexnet_ray.visualize.run_pictures; train/ may not import the pictures)
        self.pictures = pictures
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.callbacks = list(callbacks or [])  # more Ray Train callbacks (a sweep's TuneReportCallback)
        validate_config(config, check_data=False)  # fail before any Ray work

    def connect(self, num_cpus: int | None = None) -> None:
        """Join the configured cluster, or start this run's local one (`num_cpus` logical CPUs, by
        default room for this run); nothing when Ray is up."""
        # A local cluster gets logical CPUs beyond the cores, so Ray Data tasks run beside the
        # workers; its processes die with this driver (Ray's fate-sharing), so a restarted driver
        # starts clean.
        if not self.address and not ray.is_initialized():
            # Nothing preempts a cluster on this machine, and Ray Train's preemption watcher logs a
            # core_worker error on every start; the driver's setting reaches the controller.
            os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
        ray_cluster.connect(self.address, num_cpus=num_cpus or local_cluster_cpus(self.config))

    @property
    def cpus_per_worker(self) -> float:
        return float(self.config.parallel.cpus_per_worker)

    def _use_gpu(self) -> bool:
        choice = self.config.parallel.use_gpu
        if choice == "auto":
            return ray.cluster_resources().get("GPU", 0) > 0
        return choice == "true"

    def resolved_config(self) -> Config:
        """The config with data.path set: the given dataset, or the embedded demo prepared once."""
        config = copy_config(self.config)
        if config.data.path is None:
            config.data.path = str(demo_dataset_on_every_node(config.model.image_size))
        else:
            config.data.path = storage.absolute(config.data.path)
        config.run.storage = self.storage_path()
        return config

    def run_name(self) -> str:
        return self.config.run.name or time.strftime("alexnet-%Y%m%d-%H%M%S")

    def storage_path(self) -> str:
        """run.storage as every node sees it: a URI, or a local path expanded on the driver."""
        return storage.absolute(self.config.run.storage)

    def fit(self) -> ray.train.Result:
        """Train; ConfigError (before Ray starts, or once connected for the cluster's resources) for
        bad input, RunCannotRecoverError when a restart could not help, ray.train errors otherwise."""
        with storage_retries.budget(self.config.run.storage_retry_s):  # this process's storage calls too
            return self._fit()

    def _fit(self) -> ray.train.Result:
        check_inputs(self.config)  # the dataset and the checkpoint to start from, before Ray starts
        self.connect()
        config = self.resolved_config()
        validate_config(config, cluster_resources=ray.cluster_resources(), check_data=True)
        p, run = config.parallel, config.run
        use_gpu = self._use_gpu()
        name, storage_dir = self.run_name(), self.storage_path()
        run_dir = storage.join(storage_dir, name)
        print(f"run directory: {run_dir}", flush=True)
        if "runtime_resources" in storage_dir:  # e.g. a relative --storage under `ray job submit --working-dir`
            print(f"warning: {storage_dir} is inside Ray's temporary copy of the working directory; it is "
                  "removed with the cluster (give --storage an absolute path or a bucket URI)", flush=True)
        loop_config = {"config": config.to_dict(), "base_lr": config.effective_lr(), "run_dir": run_dir,
                       "tracking_env": tracking.tracking_env() if run.tracking != "none" else {},
                       "pictures": self.pictures}
        loop = train_worker
        fault_plan = fault_injection.plan_from_environment()  # tests only; None in normal runs
        if fault_plan:
            loop_config[fault_injection.LOOP_CONFIG_KEY] = fault_plan
            loop = fault_injection.train_worker_with_faults(train_worker)
        trainer = TorchTrainer(
            loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=worker_bounds(config),
                elastic_resize_monitor_interval_s=p.resize_interval_s,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": self.cpus_per_worker, **({"GPU": p.gpus_per_worker} if use_gpu else {})},
                placement_strategy="PACK",  # tower pairs (adjacent ranks) share a node
            ),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=math.ceil(config.data_wait_s)),
            run_config=RunConfig(
                name=name,
                # a bucket: the same retrying filesystem as ours (Ray's checkpoint uploads and reads)
                storage_path=storage.resolve(storage_dir)[1] if storage.is_uri(storage_dir) else storage_dir,
                storage_filesystem=storage.resolve(storage_dir)[0] if storage.is_uri(storage_dir) else None,
                failure_config=FailureConfig(max_failures=run.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=run.checkpoint_keep),
                callbacks=[MetricsFiles(run_dir), failures.StopUnrecoverable(), *self.callbacks],
                logging_config=LoggingConfig(log_level="WARNING"),  # progress lines, not Ray's per-report INFO
            ),
        )
        started = time.perf_counter()
        try:
            return RunResult.of(trainer.fit(), run_dir, time.perf_counter() - started)
        except ray.train.ControllerError as error:
            cause = failures.unwrap(error)
            if cause is error:
                raise
            raise cause from None
