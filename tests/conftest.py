"""Shared fixtures. One local Ray cluster per test session, started on first use."""

import contextlib
import importlib.util
import os
from pathlib import Path

import pytest

# More logical CPUs than cores, so Ray Data tasks and training workers can run side by side.
RAY_TEST_CPUS = 8


def start_ray():
    import ray

    from alexnet_ray import ray_cluster

    if not ray.is_initialized():
        # never a cluster a `ray start` elsewhere left in /tmp/ray (RAY_ADDRESS is ignored here), and
        # with a State API of its own, which Ray Train's placement-group cleaner polls
        saved = os.environ.pop("RAY_ADDRESS", None)
        try:
            ray_cluster.connect(None, num_cpus=RAY_TEST_CPUS, say=lambda line: None, object_store_memory=1 << 30,
                                configure_logging=False,
                                log_to_driver=os.environ.get("ALEXNET_RAY_TEST_LOGS") == "1")
        finally:
            if saved is not None:
                os.environ["RAY_ADDRESS"] = saved
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    return ray


@pytest.fixture
def ray_cluster():
    """The session's local Ray cluster (started on first use; a test that shuts it down, such as
    a multi-node test using ray.cluster_utils.Cluster, leaves the next user to start it again)."""
    return start_ray()


@contextlib.contextmanager
def local_multinode_cluster(head_cpus: int, *node_cpus: int, system_config: dict | None = None):
    """A ray.cluster_utils.Cluster on this machine (Ray's own test utility), the driver connected to
    it in place of the session's single-node cluster (the next test that needs that restarts it)."""
    import ray
    from ray.cluster_utils import Cluster

    from ray_head import free_port

    ray.shutdown()
    # Its own State API, which every node's processes are told of (as ray_cluster.connect does for a
    # local cluster): Ray Train's placement-group cleaner must not ask another cluster on the machine.
    port = free_port()
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
        **({"_system_config": system_config} if system_config else {})})
    try:
        for cpus in node_cpus:
            cluster.add_node(num_cpus=cpus)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


@pytest.fixture(autouse=True)
def no_stray_ray_cluster():
    """After each test, a Ray cluster this process started that is not the session's (a job run
    in-process after a multi-node test shut the session's down starts one sized to the machine) is
    shut down, so the next start_ray() gives the session's RAY_TEST_CPUS again; trials and layouts
    sized for 8 CPUs starve of Ray Data tasks on a 2-CPU cluster."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and ray.cluster_resources().get("CPU") != RAY_TEST_CPUS:
        ray.shutdown()


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

    start_ray()
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

    start_ray()
    storage = tmp_path_factory.mktemp("runs")
    return Trainer(tiny_config(prepared_demo, storage, "run.name=shared-tiny")).fit()


class GetBytes:
    """A WSGI wrapper counting the body bytes of every GET response, per request path
    (/bucket/key): what an object store bills as read, counted by the server itself."""

    def __init__(self, app):
        import collections
        import threading

        self.app, self.by_path, self._lock = app, collections.Counter(), threading.Lock()

    def __call__(self, environ, start_response):
        body = self.app(environ, start_response)
        if environ.get("REQUEST_METHOD") != "GET":
            return body
        return self._counted(environ.get("PATH_INFO", ""), body)

    def _counted(self, path, body):
        count = 0
        try:
            for chunk in body:
                count += len(chunk)
                yield chunk
        finally:
            with self._lock:
                self.by_path[path] += count
            if hasattr(body, "close"):
                body.close()

    def total(self, contains: str) -> int:
        with self._lock:
            return sum(n for path, n in self.by_path.items() if contains in path)

    def reset(self) -> None:
        with self._lock:
            self.by_path.clear()


S3_GETS: list = []  # the session's S3 server's GetBytes, once s3_endpoint has started it
S3_FAULTS: list = []  # and its faulty_s3.Faults (no rules: the server is moto's)


@pytest.fixture
def s3_get_bytes(s3_endpoint):
    """The GET body bytes the session's S3 server has sent, per path (GetBytes), reset for the test."""
    S3_GETS[0].reset()
    return S3_GETS[0]


@pytest.fixture
def s3_faults(s3_endpoint):
    """The session's S3 server's faulty_s3.Faults, without rules before and after the test."""
    S3_FAULTS[0].clear()
    yield S3_FAULTS[0]
    S3_FAULTS[0].clear()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 server on loopback (moto's server mode) for the session: AWS_ENDPOINT_URL and dummy
    credentials in the environment. Ray's workers inherit the environment the cluster started
    with, so a shared cluster started before this fixture is restarted (whatever the test order)."""
    import ray
    from moto.moto_server import threaded_moto_server
    from moto.server import ThreadedMotoServer

    class CountingMotoServer(ThreadedMotoServer):
        def _server_entry(self) -> None:  # ThreadedMotoServer's, with the app wrapped
            from faulty_s3 import Faults

            faults = Faults(threaded_moto_server.DomainDispatcherApplication(threaded_moto_server.create_backend_app))
            app = GetBytes(faults)
            S3_GETS[:], S3_FAULTS[:] = [app], [faults]
            self._server = threaded_moto_server.make_server(self._ip_address, self._port, app, True,
                                                           request_handler=threaded_moto_server.MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    server = CountingMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test-key",
           "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    if ray.is_initialized():
        ray.shutdown()
    start_ray()
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def make_bucket(name: str) -> str:
    """A new bucket on the session's S3 server (s3_endpoint); returns s3://name."""
    import pyarrow.fs as pafs

    from alexnet_ray import storage

    filesystem = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"].split("://")[1],
                                   scheme="http", region="us-east-1", allow_bucket_creation=True)
    filesystem.create_dir(name)
    assert storage.is_dir(f"s3://{name}")
    return f"s3://{name}"


ROOT = Path(__file__).resolve().parents[1]


def run_job(capsys, name, *argv):
    """Run jobs/<name>.py's main(argv) in this process: (exit code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
