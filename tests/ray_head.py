"""A private Ray head for job-submission tests: `ray start --head` with token auth, `ray job submit`,
and a stop that ends only this head's own processes (never `ray stop`, which ends every Ray on the machine).

Token auth (Ray >= 2.52; on by default for local clusters from 2.59): every Ray process and every
client reads RAY_AUTH_MODE=token and the token from RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN, or
~/.ray/auth_token). The head gets a fresh token file in its own temp dir, so ~/.ray is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"
PROBE_ENTRYPOINT = ["tests/fixtures/job_config_probe.py"]
# The job run by the submission test; switch to ["jobs/train.py", "--preset", "tiny"] once the Trainer exists.
JOB_ENTRYPOINT = ["jobs/train.py", "--preset", "tiny"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    process: subprocess.Popen
    temp_dir: Path
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]  # what a client (ray job submit, ray.init) needs to reach this head
    log: Path
    pids: dict[int, str] = field(default_factory=dict)  # pid -> command line, filled once the head is up


def client_env(token_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # Keep this checkout off the cluster's PYTHONPATH: jobs must import it from their uploaded working_dir.
    paths = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    # Jobs run `python ...`: make that the interpreter (and virtualenv) running these tests.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), RAY_USAGE_STATS_ENABLED="0")
    return env


def start_head(num_cpus: int = 4, timeout_s: float = 40.0, token_path: Path | None = None,
               root: Path | None = None) -> Head:
    """`ray start --head --block` on 127.0.0.1 with free ports and token auth, in its own temp dir;
    with a fresh token unless `token_path` names one (e.g. ~/.ray/auth_token, which every cluster a
    user starts on the machine shares)."""
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    # Short path: Ray's unix sockets live under the temp dir (108-byte limit). <root>/ray, as in
    # Ray's default /tmp/ray: a client with RAY_TMPDIR=<root> finds this head recorded there, as a
    # plain `ray.init()` finds the last `ray start` on a machine.
    temp_dir = (root or Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))) / "ray"
    temp_dir.mkdir(exist_ok=True)
    if token_path is None:
        token_path = temp_dir / "auth_token"
        token_path.write_text(generate_new_authentication_token())
        token_path.chmod(0o600)
    env = client_env(token_path)
    port, dashboard_port = free_port(), free_port()
    ports = {
        "--port": port,
        "--dashboard-port": dashboard_port,
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
        "--num-cpus", str(num_cpus), "--object-store-memory", str(300 << 20),
        "--disable-usage-stats", "--temp-dir", str(temp_dir),
    ]
    for flag, value in ports.items():
        cmd += [flag, str(value)]
    log = temp_dir / "ray_start.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(process, temp_dir, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}", env, log)
    _wait_for_dashboard(head, timeout_s)
    head.pids = session_pids(head)
    return head


def wait_recorded(head: Head, timeout_s: float = 60.0) -> str:
    """The address `ray start` records in its temp dir (ray_current_cluster), once it has: it
    writes it after the dashboard is up."""
    record = head.temp_dir / "ray_current_cluster"
    deadline = time.monotonic() + timeout_s
    while not record.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{record} not written after {timeout_s}s")
        time.sleep(0.2)
    return record.read_text().strip()


def _wait_for_dashboard(head: Head, timeout_s: float) -> None:
    import urllib.error
    import urllib.request

    token = Path(head.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(f"{head.dashboard_url}/api/version", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.process.returncode}:\n{head.log.read_text()[-3000:]}")
        try:  # the jobs API answers only once the dashboard's job module is up
            with urllib.request.urlopen(request, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    stop_head(head)
    raise TimeoutError(f"Ray head dashboard not up after {timeout_s}s:\n{head.log.read_text()[-3000:]}")


def ray_cli(head: Head, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", *args],
        env=head.env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
    )


def dashboard_get(head: Head, path: str, *, token: bool = True):
    """GET the dashboard's REST API; returns (HTTP status, parsed JSON or text)."""
    import urllib.error
    import urllib.request

    headers = {}
    if token:
        headers["Authorization"] = "Bearer " + Path(head.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(head.dashboard_url + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, body = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read().decode(errors="replace")
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def submit_and_wait(head: Head, entrypoint: list[str] | None = None, timeout_s: float = 60.0) -> dict:
    """`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python ...` (the CLI
    waits for the job to end), then the job's status and logs from the jobs REST API.
    Returns {"id", "returncode", "status", "logs", "submit_output"}."""
    job_id = f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # two jobs submitted at once get their own
    submit = ray_cli(
        head, "job", "submit", "--address", head.dashboard_url, "--submission-id", job_id,
        "--working-dir", ".", "--runtime-env", str(RUNTIME_ENV),
        "--", "python", *(entrypoint or JOB_ENTRYPOINT),
        timeout_s=timeout_s,
    )
    _, info = dashboard_get(head, f"/api/jobs/{job_id}")
    _, logs = dashboard_get(head, f"/api/jobs/{job_id}/logs")
    return {
        "id": job_id,
        "returncode": submit.returncode,
        "status": info.get("status") if isinstance(info, dict) else info,
        "logs": logs.get("logs", "") if isinstance(logs, dict) else logs,
        "submit_output": submit.stdout + submit.stderr,
    }


def last_json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise ValueError(f"no JSON line in:\n{text[-2000:]}")


# ----------------------------------------------------------------------------- stopping by pid

def _all_processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        table[int(entry.name)] = (ppid, cmdline)
    return table


def session_pids(head: Head) -> dict[int, str]:
    """pid -> command line of `ray start` and its descendants (GCS, raylet, dashboard, workers, job
    drivers), plus any process whose command line names this head's private temp dir."""
    table = _all_processes()
    pids = {head.process.pid}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in table.items() if ppid in pids}
        grew = not children <= pids
        pids |= children
    pids |= {pid for pid, (_, cmd) in table.items() if str(head.temp_dir) in cmd}
    return {pid: table[pid][1] for pid in pids if pid in table}


def _alive(pid: int, cmdline: str) -> bool:
    """Still running and still the same program (a recycled pid is someone else's process)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        now = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return False
    return state != "Z" and now == cmdline


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop_head(head: Head, timeout_s: float = 15.0) -> dict[int, str]:
    """SIGTERM this head's own processes (`ray start --block` then drains and stops its node),
    SIGKILL what is left after a grace period; return the ones still alive (empty when all gone)."""
    pids = {**head.pids, **session_pids(head)}
    for pid, cmd in sorted(pids.items()):
        if _alive(pid, cmd):
            _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p, c) for p, c in pids.items()):
        time.sleep(0.2)
    for pid, cmd in pids.items():
        if _alive(pid, cmd):
            _signal(pid, signal.SIGKILL)
    if head.process.poll() is None:
        head.process.wait(timeout=5)
    time.sleep(0.2)
    left = {**pids, **session_pids(head)}
    left = {pid: cmd for pid, cmd in left.items() if _alive(pid, cmd)}
    if not left:
        shutil.rmtree(head.temp_dir.parent, ignore_errors=True)
    return left
