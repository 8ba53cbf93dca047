"""`ray up` of the project's own cluster/onprem.yaml, for real (issue 13): the launcher syncs the
checkout over SSH, runs the YAML's setup commands (torch for this node, then the project) and its
start commands, then `ray job submit` runs jobs/train.py --preset tiny with the package the node
installed, and `ray down` stops it.

The node is this machine, as a dedicated unprivileged user reached over SSH on loopback
(tests/ssh_node.py), in its own network namespace. Only what names a site is overridden:
cluster_name, the provider's IPs, auth, and the shared-storage path; file sync, setup and start
commands are the ones users get. The suite's own Ray runs beside it all along and must survive the
node's `ray stop`s.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ray_head import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates a user and runs sshd"),
]

def site_config(node, shared: Path) -> dict:
    """cluster/onprem.yaml with this machine's site details; everything else as shipped."""
    config = yaml.safe_load((REPO / "cluster" / "onprem.yaml").read_text())
    config["cluster_name"] = f"alexnet-ray-test-{os.getpid()}"
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": node.user, "ssh_private_key": str(node.key),
                      "ssh_proxy_command": node.proxy_command}
    setup = config["setup_commands"]
    assert sum("/mnt/shared" in c for c in setup) == 1, "the shared path is named in one setup command"
    config["setup_commands"] = [c.replace("/mnt/shared", str(shared)) for c in setup]
    return config


def _launcher_env(home: Path, ray_tmpdir: Path) -> dict:
    """The `ray` CLI's environment: a private HOME (the token file ~/.ray/auth_token that file_mounts
    copies to the node) and Ray temp dir (the local provider's node state), token auth for the jobs API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.pop("PYTHONPATH", None)
    env.update(HOME=str(home), RAY_TMPDIR=str(ray_tmpdir), RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(home / ".ray" / "auth_token"), RAY_USAGE_STATS_ENABLED="0",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    return env


def ray_cli(env, *args, timeout_s=600, node=None) -> subprocess.CompletedProcess:
    """The `ray` CLI here; with `node`, inside the node's network namespace (the jobs API on its 127.0.0.1)."""
    command = [sys.executable, "-m", "ray.scripts.scripts", *args]
    return subprocess.run(node.in_netns(command) if node else command, env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout_s)


def _submit_when_the_agent_is_up(env, node, job_id: str, entrypoint: str, timeout_s: float = 90):
    """`ray job submit` (it waits for the job's end). Right after `ray start` returns, the head's
    dashboard agent may not have registered yet ("No available agent to submit job, please try again
    later"): retry that answer only."""
    deadline = time.monotonic() + timeout_s
    while True:
        submit = ray_cli(env, "job", "submit", "--address", "http://127.0.0.1:8265", "--submission-id", job_id,
                         "--", "bash", "-c", entrypoint, timeout_s=600, node=node)
        if "No available agent" not in submit.stderr + submit.stdout or time.monotonic() > deadline:
            return submit
        time.sleep(2)


def _node_logs(node, lines: int = 30) -> str:
    logs = node.ray_tmpdir / "ray" / "session_latest" / "logs"
    out = []
    for name in ("dashboard_agent.log", "dashboard.log", "raylet.out"):
        path = logs / name
        if path.is_file():
            out.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(out)


@pytest.fixture
def node():
    import ssh_node

    started = ssh_node.start_node()
    yield started
    ssh_node.stop_node(started)


def test_ray_up_job_submit_ray_down(node, tmp_path, ray_cluster):
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    from alexnet_ray.checkpoint import load_checkpoint, verify_checkpoint
    from ssh_node import ssh, user_processes

    suite_node = ray_cluster.get_runtime_context().get_node_id()
    started = time.monotonic()
    shared = node.root / "shared"
    launcher_home = tmp_path / "launcher-home"
    (launcher_home / ".ray").mkdir(parents=True)
    token = launcher_home / ".ray" / "auth_token"
    token.write_text(generate_new_authentication_token())
    token.chmod(0o600)
    launcher_tmp = tmp_path / "launcher-tmp"
    launcher_tmp.mkdir()
    env = _launcher_env(launcher_home, launcher_tmp)
    config_path = tmp_path / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(site_config(node, shared)))

    up = ray_cli(env, "up", "-y", "--no-config-cache", str(config_path))
    timings = {"ray up": time.monotonic() - started}
    try:
        assert up.returncode == 0, f"ray up failed:\n{up.stdout[-6000:]}\n{up.stderr[-6000:]}"
        # The node user's Ray wrote its address into its own temp dir, not /tmp/ray.
        assert (node.ray_tmpdir / "ray" / "ray_current_cluster").is_file()
        synced = ssh(node, "cd ~/alexnet-ray && find alexnet_ray jobs -name '*.py' | sort").stdout.split()
        assert "alexnet_ray/data/pipeline.py" in synced and "jobs/train.py" in synced

        # The job imports the package the setup commands installed on the node (no --working-dir).
        storage = shared / "runs"
        entrypoint = (
            "python -c 'import alexnet_ray.data.pipeline as p; print(\"package:\", p.__file__)' && "
            f"python ~/alexnet-ray/jobs/train.py --preset tiny --storage {storage} --name rayup"
        )
        job_id = f"rayup-{os.getpid()}"
        t0 = time.monotonic()
        submit = _submit_when_the_agent_is_up(env, node, job_id, entrypoint)
        timings["job"] = time.monotonic() - t0
        address = ("--address", "http://127.0.0.1:8265")
        info = ray_cli(env, "job", "status", *address, job_id, timeout_s=60, node=node).stdout
        logs = ray_cli(env, "job", "logs", *address, job_id, timeout_s=60, node=node).stdout
        match = re.search(rf"Job '{job_id}' (\w+)", info)  # "Job 'rayup-1' succeeded" (or failed, stopped)
        status = match.group(1) if match else None
        assert status == "succeeded", (f"job status {status}: {info[-2000:]}\nsubmit:\n{submit.stdout[-4000:]}\n"
                                       f"{submit.stderr[-4000:]}\nlogs:\n{logs[-4000:]}\n{_node_logs(node)}")
        package = re.search(r"package: (\S+)", logs).group(1)
        assert package.startswith(str(node.home / "venv")), package  # pip-installed from the synced copy
        checkpoint = storage / "rayup" / "checkpoint_epoch_0002"
        verify_checkpoint(checkpoint)
        assert load_checkpoint(checkpoint)["epoch"] == 2
    finally:
        t0 = time.monotonic()
        down = ray_cli(env, "down", "-y", str(config_path), timeout_s=300)
        timings["ray down"] = time.monotonic() - t0
        timings["total"] = time.monotonic() - started
        print("ray up test timings (s):", {k: round(v, 1) for k, v in timings.items()})
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    deadline = time.monotonic() + 30
    while [c for c in user_processes(node.user).values() if "ray" in c] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [c for c in user_processes(node.user).values() if "ray" in c], "ray down left the node's Ray running"
    # The suite's cluster survived the node's `ray stop`s (start commands and ray down).
    assert ray_cluster.is_initialized() and ray_cluster.get_runtime_context().get_node_id() == suite_node
    assert ray_cluster.get(ray_cluster.remote(lambda: 42).remote()) == 42
    assert suite_node in {n["NodeID"] for n in ray_cluster.nodes() if n["Alive"]}
