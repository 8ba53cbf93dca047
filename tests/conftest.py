"""Shared fixtures. One local Ray cluster per test session, started on first use."""

import importlib.util
import os
from pathlib import Path

import pytest

# More logical CPUs than cores, so Ray Data tasks and training workers can run side by side.
RAY_TEST_CPUS = 8


def _start_ray():
    import ray

    if not ray.is_initialized():
        ray.init(
            # A new cluster of our own: without it ray.init() joins whatever `ray start` last wrote
            # into /tmp/ray/ray_current_cluster (another test session's head, seen here).
            address="local",
            num_cpus=RAY_TEST_CPUS,
            object_store_memory=1 << 30,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=os.environ.get("ALEXNET_RAY_TEST_LOGS") == "1",
        )
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    return ray


@pytest.fixture
def ray_cluster():
    """The session's local Ray cluster (started on first use; a test that shuts it down, such as
    a multi-node test using ray.cluster_utils.Cluster, leaves the next user to start it again)."""
    return _start_ray()


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def prepared_demo(tmp_path_factory):
    """The embedded demo dataset (10 classes), prepared once per session at 73 px for 64-px crops."""
    from alexnet_ray.data.demo import write_demo_dataset
    from alexnet_ray.data.prepare import prepare_dataset

    _start_ray()
    root = tmp_path_factory.mktemp("demo")
    raw = write_demo_dataset(root / "raw", seed=0)
    prepare_dataset(raw, root / "prepared", layout="folder", size=73)
    return root / "prepared"


def tiny_config(data_path, storage, *overrides: str):
    """The `tiny` preset on a prepared dataset, with runs under `storage`."""
    from alexnet_ray.train.config import load_config

    return load_config(
        "tiny", overrides=[f"data.path={data_path}", f"run.storage={storage}", *overrides]
    )


@pytest.fixture(scope="session")
def tiny_run(prepared_demo, tmp_path_factory):
    """One finished 2-tower tiny run (2 epochs): its ray.train.Result. Shared by the tests that only
    need a real checkpoint and metrics (evaluation, export, visualisation)."""
    from alexnet_ray.train.trainer import Trainer

    _start_ray()
    storage = tmp_path_factory.mktemp("runs")
    return Trainer(tiny_config(prepared_demo, storage, "run.name=shared-tiny")).fit()


ROOT = Path(__file__).resolve().parents[1]


def run_job(capsys, name, *argv):
    """Run jobs/<name>.py's main(argv) in this process: (exit code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
