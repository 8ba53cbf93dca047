"""Install the torch build that fits this node: the CPU wheel where there is no NVIDIA GPU, else the
CUDA build that the node's driver can run. The cluster YAMLs run it first in setup_commands:

    python3 ~/alexnet-ray/cluster/install_torch.py             # decide, print the command, run it
    python3 ~/alexnet-ray/cluster/install_torch.py --dry-run   # only print the command

A bare `pip install torch` on Linux pulls PyPI's CUDA build (several GB) whatever the node has;
the PyTorch index of one variant (cpu, cu126, ...) pins the build instead. The GPU check is the
node's own `nvidia-smi` (absent or failing: no GPU). Standard library only: it runs before torch
or the project are installed.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

TORCH_VERSION = "2.13.0"
INDEX = "https://download.pytorch.org/whl/{variant}"
# CUDA builds published for torch 2.13 (newest first) and the oldest Linux driver each one runs on
# (NVIDIA's CUDA toolkit release notes, table 3: the GA driver of that toolkit).
CUDA_VARIANTS = (("cu130", (580, 65)), ("cu128", (570, 26)), ("cu126", (560, 28)))


class DriverTooOld(RuntimeError):
    pass


def gpu_driver_version(nvidia_smi: str = "nvidia-smi") -> str | None:
    """The NVIDIA driver version (e.g. "580.95.05"), or None when the node has no usable GPU."""
    try:
        out = subprocess.run(
            [nvidia_smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return lines[0] if out.returncode == 0 and lines else None


def torch_variant(driver: str | None) -> str:
    """"cpu" without a driver, else the newest CUDA build this driver runs."""
    if driver is None:
        return "cpu"
    try:
        have = tuple(int(part) for part in driver.split(".")[:2])
    except ValueError:
        raise DriverTooOld(f"nvidia-smi reported an unreadable driver version {driver!r}") from None
    for variant, oldest in CUDA_VARIANTS:
        if have >= oldest:
            return variant
    oldest = ".".join(map(str, CUDA_VARIANTS[-1][1]))
    raise DriverTooOld(
        f"NVIDIA driver {driver} is older than {oldest}, the oldest that torch {TORCH_VERSION}'s "
        f"CUDA builds ({', '.join(v for v, _ in CUDA_VARIANTS)}) run on: upgrade the node image's driver"
    )


def install_command(driver: str | None, python: str = sys.executable) -> list[str]:
    variant = torch_variant(driver)
    # The local label pins the build: a CPU torch already on a GPU node does not satisfy +cu130.
    return [python, "-m", "pip", "install", "-q", f"torch=={TORCH_VERSION}+{variant}",
            "--index-url", INDEX.format(variant=variant)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the pip command, do not run it")
    args = parser.parse_args(argv)
    driver = gpu_driver_version()
    try:
        command = install_command(driver)
    except DriverTooOld as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"GPU driver: {driver or 'none (CPU node)'}; installing: {shlex.join(command)}", flush=True)
    if args.dry_run:
        return 0
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
