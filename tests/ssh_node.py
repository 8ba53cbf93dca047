"""This machine as a cluster node for `ray up`: a dedicated unprivileged user reached over SSH on
loopback, with its own home, Python environment and Ray temp dir.

Why a dedicated user: the launcher YAMLs' start commands run `ray stop`, which stops every Ray
process its user may signal; as this user it cannot touch root's (the test suite's) clusters.
Why its own TMPDIR/RAY_TMPDIR: `ray start` writes `<tmp>/ray/ray_current_cluster`, and a plain
`ray.init()` in any other process joins the cluster named there (and torch, Ray Train leave caches
and checkpoints in the temp dir: they go away with the user's).

Why its own network namespace (`unshare --net`, loopback only): the YAML's head binds fixed ports
(GCS 6379, object manager 8076, dashboard 8265, and the dashboard agent's 52365, which every
`ray.init()` cluster on the machine also tries to take): in the namespace they are always free, and
the suite's clusters never see the node's. sshd runs in it, listening on its 127.0.0.1; Ray's
launcher reaches it through `auth.ssh_proxy_command` (a small relay started with `nsenter`), and
job clients run under `nsenter` too (`Node.in_netns`). The node has no network: its pip installs
must be satisfiable locally (they are: torch, Ray and setuptools are seen through the .pth, and the
project is built without an isolated build environment). Needs root (useradd, sshd, unshare) and
openssh-server + rsync (installed with apt-get when missing).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
RELAY = '''import os, socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def up():
    while data := os.read(0, 65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    os.write(1, data)
'''


def missing_tools() -> list[str]:
    """Debian packages of the tools this needs that are not installed."""
    tools = (("openssh-server", SSHD), ("rsync", "rsync"), ("openssh-client", "ssh"), ("iproute2", "ip"),
             ("util-linux", "unshare"), ("util-linux", "nsenter"))
    return sorted({package for package, tool in tools if not (os.path.exists(tool) or shutil.which(tool))})


def install_tools() -> None:
    """apt-get install openssh-server and rsync when they are missing (Debian/Ubuntu, as root)."""
    packages = missing_tools()
    if not packages or shutil.which("apt-get") is None:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)


def _run(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=True, **kwargs)


def as_user(user: str, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", user, "--", "bash", "-c", command],
                          capture_output=True, text=True, timeout=timeout)


def _python_for(user: str) -> str:
    """An interpreter of this Python's version that `user` may run (the test's own may live under
    /root): the base of this virtualenv, else the system's."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
                  f"/usr/bin/{version}", f"/usr/local/bin/{version}"]
    for python in candidates:
        if os.path.exists(python) and as_user(user, f"{python} -c 'import sys'").returncode == 0:
            return python
    raise RuntimeError(f"no {version} that user {user} can run (tried {candidates})")


def _let_others_traverse(path: Path) -> list[tuple[Path, int]]:
    """o+x on every folder above `path` that lacks it (a clone under `mktemp -d` is 0700), so the
    node user reaches this run's packages; returns (folder, old mode) for `_restore_modes`."""
    changed = []
    for folder in reversed(path.parents):
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            changed.append((folder, stat.S_IMODE(mode)))
    return changed


def _restore_modes(changed: list[tuple[Path, int]]) -> None:
    for folder, mode in reversed(changed):
        try:
            folder.chmod(mode)
        except OSError:
            pass


@dataclass
class Node:
    user: str
    root: Path  # private temp dir: home, sshd files, keys, Ray temp dirs
    home: Path
    key: Path  # the launcher's private key
    ssh_port: int
    proxy_command: str
    ray_tmpdir: Path  # the node user's RAY_TMPDIR
    sshd: subprocess.Popen  # also the holder of the node's network namespace
    opened: list = field(default_factory=list)  # folders made traversable for the user (restored)

    def in_netns(self, command: list[str]) -> list[str]:
        """`command` run in the node's network namespace (its 127.0.0.1 is the node's)."""
        return ["nsenter", f"--net=/proc/{self.sshd.pid}/ns/net", *command]


def start_node() -> Node:
    """Create the user and its environment, start sshd; `stop_node` undoes all of it."""
    install_tools()
    if missing_tools():
        raise RuntimeError(f"missing {missing_tools()} and no apt-get to install them")
    # Short paths: Ray's unix sockets live under RAY_TMPDIR (108-byte limit).
    root = Path(tempfile.mkdtemp(prefix="rayup", dir="/tmp"))
    root.chmod(0o755)
    user = f"rayup{os.getpid()}"
    home = root / "home"
    _run("useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/bash", "--user-group", user)
    node, opened = None, []
    try:
        _run("usermod", "-p", "*", user)  # no password, not locked: sshd lets its key in
        uid, gid = pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid
        key = root / "id_ed25519"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        (ssh_dir / "authorized_keys").write_text((root / "id_ed25519.pub").read_text())
        ray_tmpdir = root / "t"
        ray_tmpdir.mkdir()
        shared = root / "shared"
        shared.mkdir()
        for path in (ssh_dir, ssh_dir / "authorized_keys", ray_tmpdir, shared):
            os.chown(path, uid, gid)
        (ssh_dir / "authorized_keys").chmod(0o600)

        # The user's Python: a venv that sees this test run's packages through a .pth line (torch and
        # Ray are then "already satisfied" for the YAML's pip installs; only the project is installed).
        python = _python_for(user)
        opened = _let_others_traverse(Path(sysconfig.get_paths()["purelib"]))
        done = as_user(user, f"{python} -m venv --without-pip ~/venv")
        if done.returncode != 0:
            raise RuntimeError(f"venv for {user}: {done.stderr}")
        site = as_user(user, "~/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])'")
        Path(site.stdout.strip(), "test-run-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        # The `ray` command pip would have written, had it installed Ray into this venv.
        ray_script = home / "venv" / "bin" / "ray"
        ray_script.write_text(f"#!{home}/venv/bin/python\nimport sys\nfrom ray.scripts.scripts import main\n"
                              "sys.exit(main())\n")
        ray_script.chmod(0o755)
        # The node's login environment, as a site's image would set it up.
        (home / ".bashrc").write_text(
            f'export PATH="$HOME/venv/bin:$PATH"\n'
            f"export TMPDIR={ray_tmpdir} RAY_TMPDIR={ray_tmpdir}\n"
            "export RAY_USAGE_STATS_ENABLED=0\n"
            # No network in the namespace: build the project with the setuptools the node has (as on
            # an offline site image) instead of fetching it into an isolated build environment.
            "export PIP_NO_BUILD_ISOLATION=0\n"
        )
        os.chown(home / ".bashrc", uid, gid)

        sshd_dir = root / "sshd"
        sshd_dir.mkdir()
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(sshd_dir / "host_key"))
        port = 22  # the namespace's own loopback: nothing else listens there
        (sshd_dir / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {sshd_dir / 'host_key'}\n"
            f"PidFile {sshd_dir / 'sshd.pid'}\nAllowUsers {user}\nAuthorizedKeysFile .ssh/authorized_keys\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nPermitRootLogin no\nX11Forwarding no\nMaxSessions 50\nMaxStartups 50\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        sshd = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c",
             f"ip link set lo up && exec {SSHD} -D -f {sshd_dir / 'sshd_config'} -E {sshd_dir / 'log'}"],
            start_new_session=True)
        (root / "relay.py").write_text(RELAY)
        proxy = f"nsenter --net=/proc/{sshd.pid}/ns/net {sys.executable} {root / 'relay.py'} {port}"
        node = Node(user, root, home, key, port, proxy, ray_tmpdir, sshd, opened)
        _wait_for_ssh(node)
        return node
    except BaseException:
        if node is not None:
            stop_node(node)
        else:
            subprocess.run(["userdel", "--remove", user], capture_output=True)
            shutil.rmtree(root, ignore_errors=True)
            _restore_modes(opened)
        raise


def ssh(node: Node, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", "-i", str(node.key), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
         "-o", f"UserKnownHostsFile={os.devnull}", "-o", "BatchMode=yes", "-o", f"ProxyCommand={node.proxy_command}",
         f"{node.user}@127.0.0.1", command],
        capture_output=True, text=True, timeout=timeout,
    )


def _wait_for_ssh(node: Node, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        out = ssh(node, "echo ok", timeout=20)
        if out.stdout.strip() == "ok":
            return
        if time.monotonic() > deadline or node.sshd.poll() is not None:
            log = (node.root / "sshd" / "log")
            raise RuntimeError(f"ssh to {node.user}@127.0.0.1:{node.ssh_port} failed: {out.stderr}\n"
                               f"{log.read_text() if log.exists() else ''}")
        time.sleep(0.5)


def user_processes(user: str) -> dict[int, str]:
    """pid -> command line of every process owned by `user`."""
    uid = pwd.getpwnam(user).pw_uid
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                pass
    return found


def stop_node(node: Node) -> dict[int, str]:
    """Kill what the node user left running (by pid; the user is this test's own), stop sshd, remove
    the user and the temp dir. Returns the user's processes that were still running."""
    left = user_processes(node.user)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node.sshd.terminate()
    try:
        node.sshd.wait(timeout=10)
    except subprocess.TimeoutExpired:
        node.sshd.kill()
    deadline = time.monotonic() + 10
    while user_processes(node.user) and time.monotonic() < deadline:
        time.sleep(0.2)
    subprocess.run(["userdel", "--remove", node.user], capture_output=True)
    shutil.rmtree(node.root, ignore_errors=True)
    _restore_modes(node.opened)
    return left
