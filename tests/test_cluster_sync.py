"""cluster/: what `ray up` copies to a node and which torch a node installs (issue 13).

File sync: run real rsync with the arguments Ray's launcher builds from each YAML's rsync_exclude /
rsync_filter (SSHCommandRunner._create_rsync_filter_args, source with a trailing "/" as
NodeUpdater.sync_file_mounts passes it), from a copy of the tracked files plus the untracked clutter
a checkout carries, and compare what arrives with `git ls-files`.

Torch build: cluster/install_torch.py decides by the node's own `nvidia-smi`; the tests give it a
driver version (or none) and check the pip command, not the download.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.command_runner import SSHCommandRunner

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_YAMLS = sorted(p for p in (REPO / "cluster").glob("*.yaml") if p.name != "runtime_env.yaml")
# Untracked files a working checkout typically holds; none of them may reach a node.
CLUTTER = [".venv/bin/python", "data/imagenet/manifest.json", "runs/demo-1/checkpoint.pt",
           "alexnet_ray/__pycache__/x.cpython-311.pyc", "alexnet_ray.egg-info/PKG-INFO",
           "build/lib/x.py", "dist/alexnet_ray-0.1.0.whl", ".pytest_cache/v/x"]


@pytest.fixture
def rsync():
    """rsync, installed as the SSH-node tests install their tools (as root, on Debian) when missing:
    a fresh CI machine lacks it until test_ray_up, which runs later, would have put it there."""
    if shutil.which("rsync") is None and os.geteuid() == 0:
        import ssh_node

        ssh_node.install_tools()
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (apt-get install rsync)")


needs_rsync = pytest.mark.usefixtures("rsync")


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f and (REPO / f).is_file()]


def ray_rsync_args(config: dict) -> list[str]:
    options = {"rsync_exclude": config.get("rsync_exclude"), "rsync_filter": config.get("rsync_filter")}
    return SSHCommandRunner._create_rsync_filter_args(None, options)


def synced(config: dict, source: Path, target: Path) -> set[str]:
    """Relative paths of the files that arrive in target, rsynced as Ray would."""
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["rsync", "-a", *ray_rsync_args(config), f"{source}/", f"{target}/"], check=True)
    return {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """The tracked files, a .git file, and the clutter: a checkout as a user would `ray up` it from."""
    root = tmp_path_factory.mktemp("checkout")
    for rel in tracked_files():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    for rel in CLUTTER:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    return root


@needs_rsync
@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_a_node_gets_exactly_the_tracked_files(path, checkout, tmp_path):
    config = yaml.safe_load(path.read_text())
    assert config["file_mounts"]["~/alexnet-ray"] == "."
    arrived = synced(config, checkout, tmp_path / "node")
    tracked = set(tracked_files())
    package = {f for f in tracked if f.startswith(("alexnet_ray/", "jobs/"))}
    assert any(f.startswith("alexnet_ray/data/") for f in package)
    assert package - arrived == set(), f"{path.name}: these never reach the node"
    assert arrived == tracked  # and nothing else: no .git, virtualenv, datasets, runs or build output


@needs_rsync
def test_the_sync_check_can_fail(checkout, tmp_path):
    """The excludes this issue replaced: unanchored "data" dropped the package's data layer."""
    old = {"rsync_exclude": [".git", ".venv", "runs", "data", "**/__pycache__"], "rsync_filter": [".gitignore"]}
    arrived = synced(old, checkout, tmp_path / "node")
    assert "alexnet_ray/data/pipeline.py" not in arrived and "alexnet_ray/model/network.py" in arrived


@needs_rsync
def test_the_real_checkout_syncs_its_package(tmp_path):
    """This checkout itself (what `ray up` run from here would send), if rsync is here."""
    config = yaml.safe_load((REPO / "cluster" / "onprem.yaml").read_text())
    arrived = synced(config, REPO, tmp_path / "node")
    package = {f for f in tracked_files() if f.startswith(("alexnet_ray/", "jobs/"))}
    assert package <= arrived
    assert not [f for f in arrived if f.startswith((".venv/", ".git/")) or "__pycache__" in f]


# ----------------------------------------------------------------------------- torch build per node

def load_installer():
    spec = importlib.util.spec_from_file_location("install_torch", REPO / "cluster" / "install_torch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("driver, variant", [
    (None, "cpu"),                 # no nvidia-smi: the CPU head
    ("580.95.05", "cu130"),        # H200 / recent images (CUDA 13.0 needs >= 580.65)
    ("580.65.06", "cu130"),
    ("575.57.08", "cu128"),
    ("570.26", "cu128"),
    ("565.57.01", "cu126"),
    ("560.28.03", "cu126"),
])
def test_each_node_picks_its_torch_build(driver, variant):
    installer = load_installer()
    command = installer.install_command(driver, python="python3")
    assert command == ["python3", "-m", "pip", "install", "-q", f"torch==2.13.0+{variant}",
                       "--index-url", f"https://download.pytorch.org/whl/{variant}"]


@pytest.mark.parametrize("driver", ["550.163.01", "470.256.02", "n/a"])
def test_a_driver_too_old_for_any_cuda_build_is_refused(driver):
    installer = load_installer()
    with pytest.raises(installer.DriverTooOld, match="driver"):
        installer.install_command(driver)


def _fake_nvidia_smi(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)


@pytest.mark.parametrize("smi, expected", [
    (None, "torch==2.13.0+cpu"),
    ('echo "580.95.05"', "torch==2.13.0+cu130"),  # what the driver query prints on an H200 node
    ('echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver" >&2; exit 9',
     "torch==2.13.0+cpu"),  # a GPU image on a CPU instance
])
def test_the_script_asks_the_nodes_own_nvidia_smi(smi, expected, tmp_path):
    """The script as the YAMLs run it, with the node's PATH deciding which nvidia-smi answers."""
    env = dict(os.environ)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if smi is not None:
        _fake_nvidia_smi(bin_dir, smi)
    # Only the fake (or nothing) and the basics: this machine's own nvidia-smi, if any, must not answer.
    env["PATH"] = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    out = subprocess.run([sys.executable, str(REPO / "cluster" / "install_torch.py"), "--dry-run"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f" -m pip install -q {expected} --index-url https://download.pytorch.org/whl/" in out.stdout


def test_setup_commands_install_torch_first_then_the_pinned_project():
    for path in LAUNCHER_YAMLS:
        setup = yaml.safe_load(path.read_text())["setup_commands"]
        installs = [c for c in setup if "install" in c]
        assert installs[0] == "python3 ~/alexnet-ray/cluster/install_torch.py", path.name
        assert installs[1].startswith("python3 -m pip install -q ~/alexnet-ray"), path.name
        assert not [c for c in setup if "torch==" in c or "ray[" in c], f"{path.name}: pins live in one place"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"ray[default,train,data]>=2.60,<2.61"' in pyproject
