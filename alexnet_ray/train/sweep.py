"""`Sweep(config, search=[...]).fit()`: Ray Tune over whole tower-parallel runs.

    from alexnet_ray.train.config import load_config
    from alexnet_ray.train.sweep import Sweep

    sweep = Sweep(load_config("tiny"), search=["optimizer.lr=loguniform:1e-3:1e-1"], samples=4)
    result = sweep.fit()
    print(result.table())
    result.best_config  # a Config that jobs/train.py --config takes (result.write_best_yaml(path))

Each trial is one whole run, launched the way Ray Train V2 documents for Tune: a function trainable
per trial (`trial_driver`) builds a `Trainer` (towers x replicas workers, its own checkpoints under
the sweep's storage) and fits it; a `TuneReportCallback` hands every epoch's rank-0 metrics to
Tune, where ASHA compares `val_top1_error` at each epoch rung and stops the bad trials.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import yaml

from alexnet_ray import storage
from alexnet_ray.train.config import Config, ConfigError, validate_config
from alexnet_ray.train.preflight import check_inputs
from alexnet_ray.train.search_space import Dimension, parse_search, to_tune, trial_config

METRIC, MODE = "val_top1_error", "min"
# The trial's driver process holds this much CPU; its Train workers hold their own.
DRIVER_CPUS = 0.25
RUNS_FOLDER = "runs"  # <storage>/<sweep>/runs/<trial>: each trial's Train run directory


def trial_driver(values: dict[str, Any], *, base: dict, runs_dir: str, pictures=None) -> None:
    """Ray Tune's function trainable: one trial = one whole Trainer run with the sampled values."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from alexnet_ray.train.trainer import Trainer

    config = trial_config(Config.from_dict(base), values)
    # The trial id names the run: a restarted trial resumes its own run (Ray's documented pattern).
    config.run.name = f"trial-{ray.tune.get_context().get_trial_id()}"
    config.run.storage = runs_dir
    Trainer(config, callbacks=[TuneReportCallback()], pictures=pictures).fit()


@dataclass
class TrialRow:
    """One line of the results table."""

    trial_id: str
    values: dict[str, Any]
    best_val_top1_error: float | None
    final_val_top1_error: float | None
    epochs_run: int
    stopped_early: bool
    error: str | None
    run_dir: str
    history: list[float] = field(default_factory=list)  # val_top1_error per epoch


@dataclass
class SweepResult:
    name: str
    dimensions: list[Dimension]
    rows: list[TrialRow]
    base: Config
    path: str  # the sweep's directory

    @property
    def best(self) -> TrialRow:
        """The trial with the lowest final val_top1_error among those that ran every epoch (else any)."""
        scored = [r for r in self.rows if r.final_val_top1_error is not None and r.error is None]
        if not scored:
            raise RuntimeError(f"sweep {self.name}: no trial reported {METRIC}")
        complete = [r for r in scored if not r.stopped_early] or scored
        return min(complete, key=lambda r: r.final_val_top1_error)

    @property
    def best_config(self) -> Config:
        """The best trial's config as a fresh run: a new name, the default storage, no resume."""
        config = trial_config(self.base, self.best.values)
        config.run.name = config.run.resume_from = config.run.tracking_group = None
        return config

    def write_best_yaml(self, path: str) -> str:
        """The best config as a YAML that `jobs/train.py --config` takes as it is (every field written)."""
        values = self.best_config.to_dict()
        del values["run"]["storage"]  # the machine's default ($ALEXNET_RAY_STORAGE), or --storage
        header = (f"# sweep {self.name}, trial {self.best.trial_id}: {METRIC} {self.best.final_val_top1_error} "
                  f"after {self.best.epochs_run} epochs\n")
        storage.write_bytes_atomic(path, (header + yaml.safe_dump(values, sort_keys=False)).encode())
        return path

    def panels(self) -> list[tuple[str, bool, list[tuple[float, float, bool]]]]:
        """For alexnet_ray.visualize.draw_sweep: per swept field, (name, log scale, [(value, final val
        error, stopped early)]); a non-numeric value is drawn at its index in the field's choices."""
        panels = []
        for d in self.dimensions:
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in d.args)
            points = [(float(r.values[d.name]) if numeric else float(d.args.index(r.values[d.name])),
                       r.final_val_top1_error, r.stopped_early)
                      for r in self.rows if r.final_val_top1_error is not None and d.name in r.values]
            label = d.name if numeric else f"{d.name} ({', '.join(f'{i}={v}' for i, v in enumerate(d.args))})"
            panels.append((label, d.log_scale, points))
        return panels

    def table(self) -> str:
        """A plain-text table: the swept values, best and final val error, epochs run, stopped early."""
        names = [d.name for d in self.dimensions]
        head = ["trial", *names, "best val top-1", "final val top-1", "epochs", "stopped early"]
        lines = []
        for r in sorted(self.rows, key=lambda r: (r.final_val_top1_error is None, r.final_val_top1_error or 0)):
            lines.append([r.trial_id, *(format_value(r.values.get(n)) for n in names),
                          format_value(r.best_val_top1_error), format_value(r.final_val_top1_error),
                          str(r.epochs_run), "error: " + r.error if r.error else ("yes" if r.stopped_early else "no")])
        widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *lines])


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Sweep:
    """Ray Tune over whole runs of `config`, each trial with values drawn from `search`."""

    def __init__(self, config: Config, search: Sequence[str], *, samples: int = 4, max_concurrent: int | None = None,
                 name: str | None = None, grace_period: int = 1, reduction_factor: float = 2.0,
                 address: str | None = None, pictures=None):
        validate_config(config, check_data=False)
        self.dimensions = parse_search(search, config)
        if samples < 1:
            raise ConfigError(f"--samples={samples}: must be >= 1")
        if max_concurrent is not None and max_concurrent < 1:
            raise ConfigError(f"--max-concurrent={max_concurrent}: must be >= 1")
        if not 1 <= grace_period <= config.run.epochs:
            raise ConfigError(f"grace_period={grace_period}: must be in [1, run.epochs={config.run.epochs}]")
        self.config, self.samples, self.max_concurrent = config, samples, max_concurrent
        self.name = name or time.strftime("sweep-%Y%m%d-%H%M%S")
        self.grace_period, self.reduction_factor, self.address = grace_period, reduction_factor, address
        self.pictures = pictures  # for tracked trials: see Trainer(pictures=...)

    def trial_needs(self, use_gpu: bool) -> dict[str, float]:
        """What one trial holds while it runs: its driver and its towers x replicas workers."""
        p = self.config.parallel
        workers = self.config.num_workers
        needs = {"CPU": DRIVER_CPUS + workers * float(p.cpus_per_worker)}
        if use_gpu:
            needs["GPU"] = workers * float(p.gpus_per_worker)
        return needs

    def concurrency(self, resources: dict[str, float], use_gpu: bool) -> int:
        """How many trials run at once: --max-concurrent, capped by what the cluster can place.
        ConfigError when it cannot place even one."""
        needs = self.trial_needs(use_gpu)
        fits = min(math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in needs.items())
        if fits < 1:
            have = ", ".join(f"{resources.get(k, 0):g} {k}" for k in needs)
            want = ", ".join(f"{v:g} {k}" for k, v in needs.items())
            p = self.config.parallel
            raise ConfigError(f"sweep {self.name}: one trial ({p.towers} towers x {p.replicas} replicas, "
                              f"parallel.cpus_per_worker={p.cpus_per_worker:g}, plus its driver) needs {want}; "
                              f"the Ray cluster has {have}: no trial can ever be placed")
        return min(fits, self.max_concurrent or fits)

    def local_cpus(self) -> int:
        """Logical CPUs of the local cluster the sweep starts: room for --max-concurrent trials (or 2)
        and their Ray Data tasks."""
        trials = self.max_concurrent or 2
        return max(os.cpu_count() or 1, math.ceil(trials * self.trial_needs(False)["CPU"]) + 2 * trials) + 2

    def fit(self) -> SweepResult:
        import ray
        import ray.tune
        from ray.tune.schedulers import ASHAScheduler

        from alexnet_ray.train.trainer import Trainer

        check_inputs(self.config)  # the dataset and any checkpoint, before Ray starts
        trainer = Trainer(self.config, address=self.address)
        trainer.connect(num_cpus=self.local_cpus())
        base = trainer.resolved_config()  # data.path of the demo dataset, storage made absolute
        base.run.tracking_group = base.run.tracking_group or self.name  # trials' tracker runs, grouped by sweep
        resources = ray.cluster_resources()
        validate_config(base, cluster_resources=resources, check_data=True)
        use_gpu = base.parallel.use_gpu == "true" or (base.parallel.use_gpu == "auto" and resources.get("GPU", 0) >= 1)
        concurrent = self.concurrency(resources, use_gpu)
        sweep_dir = storage.join(base.run.storage, self.name)
        runs_dir = storage.join(sweep_dir, RUNS_FOLDER)
        print(f"sweep directory: {sweep_dir} ({self.samples} samples, up to {concurrent} trials at once)", flush=True)
        trainable = ray.tune.with_resources(
            ray.tune.with_parameters(trial_driver, base=base.to_dict(), runs_dir=runs_dir, pictures=self.pictures),
            {"CPU": DRIVER_CPUS})
        scheduler = ASHAScheduler(time_attr="epoch", max_t=base.run.epochs, grace_period=self.grace_period,
                                  reduction_factor=self.reduction_factor)
        tuner = ray.tune.Tuner(
            trainable,
            param_space=to_tune(self.dimensions),
            tune_config=ray.tune.TuneConfig(metric=METRIC, mode=MODE, scheduler=scheduler, num_samples=self.samples,
                                            max_concurrent_trials=concurrent),
            run_config=ray.tune.RunConfig(name=self.name, storage_path=base.run.storage, verbose=1),
        )
        grid = tuner.fit()
        rows = [trial_row(result, base.run.epochs, runs_dir) for result in grid]
        return SweepResult(self.name, self.dimensions, rows, base, sweep_dir)


def trial_row(result, epochs: int, runs_dir: str) -> TrialRow:
    """A TrialRow from one ray.tune.Result: every epoch it reported, where its run lives."""
    frame = result.metrics_dataframe
    history = [float(v) for v in frame[METRIC]] if frame is not None and METRIC in frame else []
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id") or "?"  # Tune adds it to every result
    epochs_run = int(metrics.get("epoch") or 0)
    error = None if result.error is None else f"{type(result.error).__name__}: {str(result.error).splitlines()[0]}"
    return TrialRow(
        trial_id=trial_id, values=dict(result.config or {}),
        best_val_top1_error=min(history) if history else None,
        final_val_top1_error=history[-1] if history else None,
        epochs_run=epochs_run, stopped_early=error is None and epochs_run < epochs, error=error,
        run_dir=storage.join(runs_dir, f"trial-{trial_id}"), history=history)
