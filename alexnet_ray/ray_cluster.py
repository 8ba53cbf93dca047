"""Which Ray cluster a job uses, decided once for every job and entry point.

The rule: an address given (`--address`, or $RAY_ADDRESS) joins that cluster; otherwise the job
starts a local cluster of its own, never one that happens to be recorded on the machine.

Either way, every process of the cluster is told where its own cluster's State API is
($RAY_API_SERVER_ADDRESS). Ray Train V2's PlacementGroupCleaner polls `ray.util.state.get_actor`
with no address to see whether its run's controller lives; without that variable Ray resolves the
address from the machine (the newest `ray start` recorded in /tmp/ray, or any gcs_server process
it finds), so a neighbouring cluster's "no such actor" made the cleaner remove a healthy run's
placement group, and a cluster without a dashboard made it log "Failed to query" every second.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Callable

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
ADDRESS_ENV = "RAY_ADDRESS"
PORT_ATTEMPTS = 5


def say_on_stderr(line: str) -> None:
    """For jobs whose stdout carries their result."""
    print(line, file=sys.stderr, flush=True)


def recorded_cluster() -> str | None:
    """The cluster a plain `ray.init()` here would join: the last `ray start`'s, recorded in Ray's
    default temp dir ($RAY_TMPDIR, else $TMPDIR, else /tmp, then ray/ray_current_cluster)."""
    temp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    try:
        return (Path(temp) / "ray" / "ray_current_cluster").read_text().strip() or None
    except OSError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api_server_of(address: str) -> str | None:
    """The dashboard (State API) URL of the cluster at a bootstrap address, read from its GCS."""
    if address.startswith(("http://", "https://")):
        return address
    try:
        from ray.dashboard.utils import ray_address_to_api_server_url

        return ray_address_to_api_server_url(address)
    except Exception:  # no dashboard on that cluster: Ray Train's cleaner cannot poll it either way
        return None


def connect(address: str | None = None, *, num_cpus: int | None = None, say: Callable[[str], None] = print,
            **init_kwargs) -> str:
    """Join `address` (else $RAY_ADDRESS), or start this process's own local cluster; returns a
    line saying which. Nothing happens when Ray is already initialised in this process."""
    import ray

    if ray.is_initialized():
        return "ray: already connected"
    address = address or os.environ.get(ADDRESS_ENV) or None
    if address:
        line = _join(ray, address, init_kwargs)
    else:
        line = _start_local(ray, num_cpus, init_kwargs)
    say(line)
    return line


def _join(ray, address: str, init_kwargs: dict) -> str:
    api = os.environ.get(API_SERVER_ENV) or _api_server_of(address)
    if api and API_SERVER_ENV not in os.environ:
        os.environ[API_SERVER_ENV] = api  # this driver's own State API calls
        env = dict(init_kwargs.pop("runtime_env", None) or {})
        env["env_vars"] = {**env.get("env_vars", {}), API_SERVER_ENV: api}  # the job's actors
        init_kwargs["runtime_env"] = env
    ray.init(address=address, **init_kwargs)
    return f"ray: joined the cluster at {address}" + (f" (dashboard {api})" if api else "")


def _start_local(ray, num_cpus: int | None, init_kwargs: dict) -> str:
    if not init_kwargs.setdefault("include_dashboard", True):  # only for jobs that run no Ray Train
        ray.init(address="local", num_cpus=num_cpus, **init_kwargs)
        return _local_line(ray, "no dashboard")
    last_error = None
    for _ in range(PORT_ATTEMPTS):  # a port found free can be taken before the dashboard binds it
        port = _free_port()
        api = f"http://127.0.0.1:{port}"
        previous = os.environ.get(API_SERVER_ENV)
        os.environ[API_SERVER_ENV] = api  # the raylet, and so every worker, inherits it
        try:
            ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1",
                               dashboard_port=port, **init_kwargs)
        except Exception as e:
            if "dashboard" not in str(e).lower() and "port" not in str(e).lower():
                raise
            last_error = e
            ray.shutdown()
            if previous is None:
                os.environ.pop(API_SERVER_ENV, None)
            else:
                os.environ[API_SERVER_ENV] = previous
            continue
        return _local_line(ray, f"dashboard {api}")
    raise RuntimeError(f"could not start a local Ray cluster: no free dashboard port in {PORT_ATTEMPTS} tries "
                       f"({last_error})")


def _local_line(ray, dashboard: str) -> str:
    cpus = int(ray.cluster_resources().get("CPU", 0))
    line = f"ray: started a local cluster of this job's own ({cpus} CPUs, {dashboard})"
    recorded = recorded_cluster()
    if recorded:
        line += f"; not joining the cluster recorded at {recorded} (pass --address to use it)"
    return line
