"""Experiment trackers (`run.tracking: none | mlflow | wandb`), logged from rank 0 only.

What a tracked run logs: the whole config as parameters (flattened, `section.key`), every epoch's
metrics (step = epoch), at the end the pictures the caller draws (conv1 kernels, curves) as
artifacts and the final checkpoint's path. Credentials come from the trackers' own environment
variables (MLFLOW_TRACKING_URI/USERNAME/PASSWORD/TOKEN, WANDB_API_KEY, WANDB_MODE, ...), never from
configs; the driver forwards those it has to the workers. The tracker's run id is kept in the run
directory (`tracking.json`), so a resumed or restarted run continues the same tracker run.

`check_tracking(config)` runs on the driver before Ray starts: a tracker library that is not
installed, or a server that does not answer, is one ConfigError. Both libraries are optional
imports (extras [mlflow], [wandb]).
"""

from __future__ import annotations

import json
import os
import posixpath
import urllib.error
import urllib.request
from typing import Any

from alexnet_ray.train.config import Config, ConfigError

TRACKERS = ("none", "mlflow", "wandb")
DEFAULT_PROJECT = "alexnet-ray"
STATE_FILE = "tracking.json"
# Forwarded from the driver to the rank-0 worker (a cluster's workers do not inherit the driver's env).
ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
            "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_EXPERIMENT_NAME", "WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR",
            "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT")
EXTRAS = {"mlflow": "mlflow", "wandb": "wandb"}


def tracking_env() -> dict[str, str]:
    return {k: os.environ[k] for k in ENV_VARS if k in os.environ}


def mlflow_uri(config: Config) -> str | None:
    return config.run.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")


def check_tracking(config: Config, timeout_s: float = 5.0) -> None:
    """ConfigError naming run.tracking / run.tracking_uri when the tracker cannot work; None when it can."""
    kind = config.run.tracking
    if kind == "none":
        return
    try:
        __import__(EXTRAS[kind])
    except ImportError:
        raise ConfigError(f"run.tracking={kind}: the {kind} package is not installed "
                          f"(pip install 'alexnet-ray[{kind}]')") from None
    if kind == "mlflow":
        uri = mlflow_uri(config)
        if not uri:
            raise ConfigError("run.tracking=mlflow: no tracking server; set run.tracking_uri or MLFLOW_TRACKING_URI")
        if uri.startswith(("http://", "https://")):
            health = uri.rstrip("/") + "/health"
            try:
                with urllib.request.urlopen(health, timeout=timeout_s) as response:
                    response.read()
            except (urllib.error.URLError, OSError, ValueError) as error:
                reason = getattr(error, "reason", error)
                raise ConfigError(f"run.tracking_uri={uri}: the MLflow server does not answer ({reason})") from None
    if kind == "wandb":
        mode = os.environ.get("WANDB_MODE", "online")
        if mode not in ("offline", "disabled", "dryrun") and not os.environ.get("WANDB_API_KEY"):
            raise ConfigError("run.tracking=wandb: no WANDB_API_KEY in the environment "
                              "(or set WANDB_MODE=offline to log to the run folder only)")


def flat_params(config: Config) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config.to_dict().items() for key, value in values.items()}


def epoch_values(metrics: dict) -> dict[str, float]:
    """The numeric epoch metrics (booleans as 0/1; None and text left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and v is not None and k not in ("world_rank", "replica", "tower")}


class Tracker:
    """No tracking (rank != 0, or run.tracking=none): every call does nothing."""

    run_id: str | None = None

    def log_epoch(self, metrics: dict) -> None:
        pass

    def finish(self, checkpoint_path: str | None, pictures: list[str]) -> None:
        pass


class MlflowTracker(Tracker):
    def __init__(self, config: Config, run_name: str, run_id: str | None):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(mlflow_uri(config))
        experiment = config.run.tracking_project or DEFAULT_PROJECT
        mlflow.set_experiment(experiment)
        tags = {"alexnet_ray.run": run_name}
        if config.run.tracking_group:
            tags["alexnet_ray.sweep"] = config.run.tracking_group
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=None if run_id else tags)
        self.run_id = self.run.info.run_id
        if run_id is None:
            params = flat_params(config)
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                mlflow.log_params(dict(list(params.items())[i:i + 100]))

    def log_epoch(self, metrics: dict) -> None:
        self.mlflow.log_metrics(epoch_values(metrics), step=int(metrics["epoch"]))

    def finish(self, checkpoint_path, pictures) -> None:
        if checkpoint_path:
            self.mlflow.set_tag("final_checkpoint", checkpoint_path)
        for picture in pictures:
            self.mlflow.log_artifact(picture)
        self.mlflow.end_run()


class WandbTracker(Tracker):
    def __init__(self, config: Config, run_name: str, run_id: str | None, run_dir: str):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=config.run.tracking_project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                              name=run_name, id=run_id, resume="allow" if run_id else None,
                              group=config.run.tracking_group, config=flat_params(config),
                              dir=os.environ.get("WANDB_DIR") or (run_dir if not run_dir.count("://") else None))
        self.run_id = self.run.id

    def log_epoch(self, metrics: dict) -> None:
        self.run.log({**epoch_values(metrics), "epoch": int(metrics["epoch"])}, step=int(metrics["epoch"]))

    def finish(self, checkpoint_path, pictures) -> None:
        if checkpoint_path:
            self.run.summary["final_checkpoint"] = checkpoint_path
        for picture in pictures:
            name = posixpath.splitext(os.path.basename(picture))[0]
            self.run.log({name: self.wandb.Image(picture)}, step=self.run.step, commit=False)
            self.run.save(picture, base_path=os.path.dirname(picture), policy="now")
        self.run.finish()


def open_tracker(config: Config, rank: int, run_dir: str, fs, env: dict[str, str] | None = None) -> Tracker:
    """Rank 0's tracker for this run (continuing the run recorded in run_dir/tracking.json); a
    do-nothing Tracker elsewhere. `fs` is the run directory's pyarrow filesystem."""
    kind = config.run.tracking
    if rank != 0 or kind == "none":
        return Tracker()
    for key, value in (env or {}).items():
        os.environ.setdefault(key, value)
    state_path = posixpath.join(run_dir, STATE_FILE)
    state = {}
    try:
        with fs.open_input_stream(state_path) as f:
            state = json.loads(f.read().decode())
    except (FileNotFoundError, OSError, ValueError):
        state = {}
    run_id = state.get("run_id") if state.get("tracking") == kind else None
    run_name = posixpath.basename(run_dir.rstrip("/"))
    tracker = (MlflowTracker(config, run_name, run_id) if kind == "mlflow"
               else WandbTracker(config, run_name, run_id, run_dir))
    if run_id is None:
        fs.create_dir(run_dir, recursive=True)
        with fs.open_output_stream(state_path) as f:
            f.write(json.dumps({"tracking": kind, "run_id": tracker.run_id}).encode())
    return tracker
