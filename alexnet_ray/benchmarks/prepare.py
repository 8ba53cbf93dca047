"""Prepare benchmark: `prepare_dataset` vs a plain multiprocessing.Pool doing the same conversion.

    python jobs/benchmark.py prepare                 # 2000 generated ~500x375 photos
    python jobs/benchmark.py prepare --images 4000 --workdir /tmp/prep-bench   # keep the photos
    python jobs/benchmark.py prepare --source tars   # prepare reads them from ILSVRC2012_img_train.tar

On the same cores, images/s per core for
  (a) the pool: multiprocessing.Pool(cores), each process reading a file and, with plain PIL,
      decoding it, resizing the short side to 256, centre-cropping 256x256 and encoding a
      quality-90 JPEG, which it returns to the parent (chunks of 32 files per call);
  (b) prepare: jobs/prepare.py's library call on a Ray cluster of `cores` CPUs (with --source tars
      reading the same photos from a tar of per-class tars, as ILSVRC2012_img_train.tar is, by byte
      range, its index included in the time; the pool still reads the files): the same
      conversion (plus odd-mode handling and EXIF rotation), plus decoding the stored JPEG again
      for the mean/std/PCA statistics, plus writing Parquet shards to OUT from the workers.
Neither uses JPEG draft mode: prepare asks for it, but at 500x375 -> 256 libjpeg has no reduced
scale to offer (the next one, 1/2, is smaller than 256). Ray's start-up and the pool's are not
timed (one untimed warm-up run each). The two take turns, ROUNDS rounds, best of each. Ray runs its
workers at a lower priority (niceness 15 by default) than the processes that start them, which on
a shared machine loses them most of the CPU; the pool's processes get the same niceness.
"images_per_s_per_core" is wall-clock images/s divided by the cores; per CPU-second figures (the
contender's own processes) are beside it, since a shared machine gives contenders unequal slices.
`driver_bytes_received` is what the shard tasks returned to the driver (shards never pass it).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from alexnet_ray.benchmarks.data import CLASSES, natural_image
from alexnet_ray import ray_cluster
from alexnet_ray.benchmarks.measure import CpuTime, descendants, interleaved_best

ROUNDS = 3
CHUNK = 32


def _write_photo(args: tuple[str, int]) -> None:
    path, seed = args
    rng = np.random.default_rng(seed)
    w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
    Image.fromarray(natural_image(rng, w, h)).save(path, quality=90)


def write_photos(pool, root: Path, count: int) -> list[Path]:
    """`count` photo-like JPEGs under root/train/classNN/, generated in `pool` (kept if present)."""
    paths = [root / "train" / f"class{i % CLASSES:02d}" / f"img{i:06d}.JPEG" for i in range(count)]
    for folder in {p.parent for p in paths}:
        folder.mkdir(parents=True, exist_ok=True)
    todo = [(str(p), i) for i, p in enumerate(paths) if not p.exists()]
    pool.map(_write_photo, todo, chunksize=8)
    return paths


def _pool_convert(paths: list[str], size: int = 256) -> int:
    """The plain recipe: decode, resize the short side, centre crop, encode; returns bytes made."""
    made = 0
    for path in paths:
        with open(path, "rb") as file:
            data = file.read()
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            width, height = image.size
            short = min(width, height)
            left, top = (width - short) // 2, (height - short) // 2
            image = image.resize((size, size), Image.BILINEAR, box=(left, top, left + short, top + short))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        made += len(buffer.getvalue())
    return made


def _command(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read()
    except OSError:
        return b""


def _niceness(pids: list[int]) -> int:
    """The highest niceness among `pids`."""
    values = []
    for pid in pids:
        try:
            values.append(os.getpriority(os.PRIO_PROCESS, pid))
        except OSError:
            continue
    return max(values, default=os.getpriority(os.PRIO_PROCESS, 0))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="benchmark.py prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workdir", default=None, help="keep the generated photos here (reused)")
    parser.add_argument("--source", choices=["tree", "tars"], default="tree",
                        help="what prepare reads: the photos' folder tree, or the same in an ILSVRC2012-style tarball")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="alexnet-prepare-bench-"))
    try:
        return _run(work, args.images, cores, args.source)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "out", ignore_errors=True)


def write_tarball(tree: Path, root: Path) -> Path:
    """root/ILSVRC2012_img_train.tar: one tar per class folder of tree/train, inside one tar."""
    import tarfile

    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for folder in sorted((tree / "train").iterdir()):
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as inner:
                for photo in sorted(folder.iterdir()):
                    inner.add(photo, arcname=photo.name)
            info = tarfile.TarInfo(f"{folder.name}.tar")
            info.size = len(buffer.getvalue())
            outer.addfile(info, io.BytesIO(buffer.getvalue()))
    return root


def _run(work: Path, count: int, cores: int, source: str = "tree") -> int:
    import multiprocessing

    import ray

    from alexnet_ray.data.prepare import prepare_dataset

    me = os.getpid()
    pool = multiprocessing.get_context("spawn").Pool(cores)
    pool_processes = [p for p in descendants(me) if p != me]
    started = time.perf_counter()
    paths = [str(p) for p in write_photos(pool, work / "raw", count)]
    mean_kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
    print(f"{count} photos (~500x375, mean {mean_kb:.0f} kB) ready in {time.perf_counter() - started:.1f}s; "
          f"{cores} cores")
    chunks = [paths[i: i + CHUNK] for i in range(0, len(paths), CHUNK)]
    src = write_tarball(work / "raw", work / "tars") if source == "tars" else work / "raw"

    def pool_round() -> tuple[float, float, float]:
        with CpuTime(lambda: pool_processes) as cpu:
            pool.map(_pool_convert, chunks, chunksize=1)
        return count / cpu.wall / cores, count / cpu.seconds, 0.0

    # its own local cluster, sized to the cores measured: never a cluster recorded on the machine
    ray_cluster.connect(None, num_cpus=cores, include_dashboard=False,
                        configure_logging=False, log_to_driver=False)
    ray_processes = lambda: [p for p in descendants(me) if p not in pool_processes]  # noqa: E731
    rounds = iter(range(ROUNDS + 1))

    def prepare_round() -> tuple[float, float, float]:
        out = work / "out" / f"round{next(rounds)}"
        stats: dict = {}
        with CpuTime(ray_processes) as cpu:
            prepare_dataset(src, out, size=256, val_split="none", progress=False, stats=stats)
        shutil.rmtree(out, ignore_errors=True)
        return count / cpu.wall / cores, count / cpu.seconds, stats["driver_bytes_received"], stats["shards"]

    try:
        pool_round(), prepare_round()  # warm-up: workers started, modules imported
        workers = [p for p in ray_processes() if _command(p).startswith(b"ray::IDLE")]  # ran the warm-up's tasks
        niceness = _niceness(workers or [p for p in ray_processes() if _command(p).startswith(b"ray::")])
        for pid in pool_processes:
            os.setpriority(os.PRIO_PROCESS, pid, niceness)
        print(f"Ray's workers and the pool's processes run at niceness {niceness}")
        best = interleaved_best(ROUNDS, {"pool": pool_round, "prepare": prepare_round})
    finally:
        pool.terminate()
        ray.shutdown()
    pool_wall, pool_cpu, _ = best["pool"]
    ours_wall, ours_cpu, driver_bytes, shards = best["prepare"]
    print(f"(a) multiprocessing.Pool({cores}), plain PIL: {pool_wall:7.1f} images/s per core "
          f"({pool_cpu:.1f} per CPU-second)")
    print(f"(b) prepare ({shards} shard tasks):       {ours_wall:7.1f} images/s per core "
          f"({ours_cpu:.1f} per CPU-second); the driver received {driver_bytes:,} bytes")
    print(f"    best of {ROUNDS} rounds each, taking turns; ratio {ours_wall / pool_wall:.2f} (goal >= 0.7)")
    print(json.dumps({
        "images": count, "cores": cores, "shards": shards, "source": source,
        "images_per_s_per_core": round(ours_wall, 1),
        "pool_images_per_s_per_core": round(pool_wall, 1),
        "ratio_to_pool": round(ours_wall / pool_wall, 3),
        "images_per_cpu_s": round(ours_cpu, 1),
        "pool_images_per_cpu_s": round(pool_cpu, 1),
        "ratio_to_pool_per_cpu_s": round(ours_cpu / pool_cpu, 3),
        "driver_bytes_received": int(driver_bytes),
    }))
    return 0
