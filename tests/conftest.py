"""Shared fixtures. One local Ray cluster per test session, started on first use."""

import os

import pytest

# More logical CPUs than cores, so Ray Data tasks and training workers can run side by side.
RAY_TEST_CPUS = 8


def _start_ray():
    import ray

    if not ray.is_initialized():
        ray.init(
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
