"""Builds .whl/: the wheels a lent GPU machine lacks for tests/gpu_check.py (pytest does not collect this).

That machine has no network and Python 3.12 with torch, numpy, pandas, pyarrow, aiohttp, grpcio,
prometheus-client and friends already installed, but no Ray. Files reach it only inside the working
tree, 64 MiB at most, and Ray's own wheel is 79 MB, so this downloads the exact versions below and
slims Ray's wheel: no Java jars, RLlib, Serve, Ray LLM, or source maps of the dashboard's web UI (the
dashboard itself, whose State API Ray Train polls, stays). It prints the total and refuses over 60 MiB.

    python tests/gpu_kit.py                         # .whl/ for the GPU image's Python 3.12
    python tests/gpu_kit.py --python-version 3.11   # for a local venv that mimics the image

On the device, with carry [".whl"] (the second line prints what the check ran against):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; python3 tests/gpu_kit.py --versions; PYTHONUNBUFFERED=1 python3 tests/gpu_check.py

(jobs/*.py import the package from the repo, hence $PWD.) Checked locally with --python-version 3.11,
a venv of torch and the image's packages, and `gpu_check.py --cpu`.

What is carried and why: Ray needs jsonschema (and its referencing, rpds-py, specifications);
Ray Train needs pydantic (pydantic-core, annotated-types, typing-inspection, and a typing-extensions
new enough for them) and tensorboardX; the dashboard, which our local clusters start
(alexnet_ray/ray_cluster.py), needs aiohttp-cors, opencensus, OpenTelemetry and google.rpc
(googleapis-common-protos, whose generated code needs protobuf >= 6.33.5, so protobuf comes too);
colorful and smart-open are Ray's CLI and runtime-env imports; simplejpeg is our loaders'. Left out:
virtualenv (only pip/uv runtime envs use it) and py-spy (the dashboard's stack dumps).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MIB = 60

RAY = "ray==2.60.0"
WHEELS = [
    RAY,
    "simplejpeg==1.9.0",
    "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1", "referencing==0.37.0", "rpds-py==2026.9.1",
    "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",
    "tensorboardX==2.6.5",
    "aiohttp-cors==0.8.1", "colorful==0.5.8", "smart-open==9.0.4",
    "opencensus==0.11.4", "opencensus-context==0.1.3", "googleapis-common-protos==1.76.0", "protobuf==7.36.2",
    "opentelemetry-api==1.45.2", "opentelemetry-sdk==1.45.2", "opentelemetry-semantic-conventions==0.66b2",
    "opentelemetry-exporter-prometheus==0.66b2", "opentelemetry-proto==1.45.2",
]
# The image's own packages whose versions the check depends on: printed by --versions on the device.
IMAGE = ["torch", "numpy", "pandas", "pyarrow", "aiohttp", "grpcio", "prometheus-client", "packaging", "attrs",
         "fsspec", "pillow", "pyyaml", "msgpack", "click", "filelock", "requests", "wrapt"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
# Parts of Ray's wheel that a local cluster, Ray Data, Ray Train and Ray Tune never load. The dashboard
# refuses to start without client/build/static, so the web UI's page and bundle stay (about 0.4 MiB):
# only its source maps and the flame-graph viewer go.
DROP = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/cpp/", "ray/dashboard/client/build/speedscope")
DROP_SUFFIXES = (".js.map", ".css.map")


def download(dest: Path, python_version: str) -> None:
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]  # pure-Python wheels (none-any) match too
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(dest),
                    *WHEELS], check=True)


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim(wheel: Path) -> None:
    """Rewrites the wheel without DROP, its RECORD to match, at the strongest deflate."""
    out = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for info in src.infolist():
            dropped = info.filename.startswith(DROP) or info.filename.endswith(DROP_SUFFIXES)
            if dropped or info.filename == record_name or info.is_dir():
                continue
            data = src.read(info)
            entry = zipfile.ZipInfo(info.filename, info.date_time)
            entry.external_attr = info.external_attr  # keeps raylet's and gcs_server's exec bits
            entry.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(entry, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            lines.append(record_line(info.filename, data))
        lines.append(f"{record_name},,")
        dst.writestr(zipfile.ZipInfo(record_name, (2020, 1, 1, 0, 0, 0)), "\n".join(lines) + "\n",
                     compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    out.replace(wheel)


def print_versions() -> None:
    from importlib import metadata

    for name in [w.split("==")[0] for w in WHEELS] + IMAGE:
        try:
            dist = metadata.distribution(name)
            print(f"{name} {dist.version} {dist.locate_file('')}")
        except metadata.PackageNotFoundError:
            print(f"{name} MISSING")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl")
    parser.add_argument("--versions", action="store_true", help="print the installed versions (on the device)")
    args = parser.parse_args()
    if args.versions:
        print_versions()
        return 0
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):  # two versions of one package stop the whole install
        old.unlink()
    download(args.dest, args.python_version)
    (ray_wheel,) = args.dest.glob("ray-*.whl")
    before = ray_wheel.stat().st_size
    slim(ray_wheel)
    print(f"{ray_wheel.name}: {before / 2**20:.1f} MiB -> {ray_wheel.stat().st_size / 2**20:.1f} MiB")
    wheels = sorted(args.dest.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.dest} (Python {args.python_version})")
    if total > LIMIT_MIB * 2**20:
        print(f"over {LIMIT_MIB} MiB: the working tree that travels is capped at 64 MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
