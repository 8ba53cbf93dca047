"""Data benchmark: the common DataLoader recipe over raw JPEGs vs this project's Ray Data pipeline.

    python jobs/benchmark.py data            # 1000 generated photos (and a 4x set for memory)
    python jobs/benchmark.py data --quick    # 500
    python jobs/benchmark.py data --quick --replicas 1 4 16   # read amplification at 1, 4, 16 replicas

On the same CPU cores, images/s per core for
  (a) baseline: torch DataLoader over the raw ~500x375 JPEGs, PIL decode, resize 256, random 224
      crop, flip (pytorch/examples' ImageNet recipe, in PIL + numpy), num_workers = cores;
  (b) ours: TrainLoader over the prepared 256x256 shards (Ray Data, num_cpus = cores), 224 crop,
      flip, PCA lighting;
  (c) the limit: bare decode of the stored 256x256 JPEGs with the pipeline's decoder (libjpeg-turbo
      via simplejpeg, into a reused buffer), one process per core decoding at once, as the
      pipeline's workers do (a core decoding alone is faster: it has the caches and memory
      bandwidth to itself; that rate, and PIL's, are reported beside it).
The three take turns, ROUNDS rounds each, and each keeps its best round: a shared machine's speed
drifts over minutes, and taking turns gives every contender the same drift. "Per core" is images
per CPU-second used by the contender's own processes (the DataLoader's workers and this process;
or Ray's workers, raylet, driver and its other processes), because a shared machine gives the
contenders unequal slices of the cores; the wall-clock rates per core and the share of the cores
each got are reported too.
Peak memory (PSS of the driver and every Ray process it started) over an epoch of the set and of
a set four times larger: streaming should not grow with the data. The last line is one JSON object.

--replicas R...: for each R, every replica's TrainLoader iterates one epoch of the 4x set (no
training), and the bytes and row groups their tasks read (footers included) are printed over the
split's size and row groups: 1.0 is each row group read once an epoch, cluster-wide.
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
from PIL import Image, ImageDraw

from alexnet_ray import ray_cluster
from alexnet_ray.benchmarks.measure import CpuTime, PeakMemory, descendants, interleaved_best

CLASSES = 10


def _field(rng: np.random.Generator, w: int, h: int, levels) -> np.ndarray:
    out = np.zeros((h, w), np.float32)
    for level, amplitude in levels:
        small = rng.standard_normal((max(2, level * h // w), level), dtype=np.float32)
        out += amplitude * np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    return out


def natural_image(rng: np.random.Generator, w: int = 500, h: int = 375) -> np.ndarray:
    """Photo-like statistics: 1/f-ish luminance, smooth chroma, a few sharp objects, sensor noise."""
    lum = _field(rng, w, h, ((3, 1.0), (12, 0.5), (48, 0.3), (160, 0.2)))
    chroma = [_field(rng, w, h, ((3, 0.6), (10, 0.3))) for _ in range(2)]
    img = np.stack([lum + chroma[0], lum - 0.5 * chroma[0] + 0.5 * chroma[1], lum - chroma[1]], -1)
    img = (img - img.mean()) / (img.std() * 4) + 0.5
    picture = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    noisy = np.asarray(picture).astype(np.int16) + rng.integers(-20, 21, (h, w, 3), dtype=np.int16)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def write_photos(root: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        folder = root / "train" / f"class{i % CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
        path = folder / f"img{i:06d}.JPEG"
        Image.fromarray(natural_image(rng, w, h)).save(path, quality=90)
        paths.append(path)
    return paths


class RawJpegDataset:
    """The baseline recipe: decode, short side to 256, random 224 crop, flip; uint8 HWC."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        rng = np.random.default_rng(i)
        with Image.open(self.paths[i]) as image:
            image = image.convert("RGB")
            w, h = image.size
            scale = 256 / min(w, h)
            image = image.resize((max(256, round(w * scale)), max(256, round(h * scale))), Image.BILINEAR)
        pixels = np.asarray(image)
        y = int(rng.integers(0, pixels.shape[0] - 224 + 1))
        x = int(rng.integers(0, pixels.shape[1] - 224 + 1))
        crop = pixels[y:y + 224, x:x + 224]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        return np.ascontiguousarray(crop), i % CLASSES


def _timed(batches) -> tuple[float, int]:
    """Images/s over a whole epoch, from asking for the iterator to the last batch."""
    start, count = time.perf_counter(), 0
    for batch in batches:
        count += len(batch[1] if isinstance(batch, (list, tuple)) else batch["labels"])
    return count / max(time.perf_counter() - start, 1e-9), count


ROUNDS = 3  # rounds of every contender, interleaved; each keeps its best round


def epoch_round(epoch, pids=None) -> tuple[float, float, float]:
    """One epoch: (images per CPU-second, per wall second per core, share of the cores used),
    counting the CPU of the processes `pids()` names (CpuTime)."""
    cores = len(os.sched_getaffinity(0))
    with CpuTime(pids) as cpu:
        count = epoch()
    return count / cpu.seconds, count / cpu.wall / cores, cpu.seconds / cpu.wall / cores


def baseline_loader(paths: list[Path], cores: int, batch_size: int):
    """The DataLoader recipe, its workers started (as the Ray side is warmed up too)."""
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    loader = DataLoader(RawJpegDataset(paths), batch_size=batch_size, shuffle=True, num_workers=cores,
                        drop_last=False, prefetch_factor=4, persistent_workers=True)
    for _ in loader:
        pass
    return loader


def _decode_loop(jpegs: list[bytes], decoder: str, seconds: float) -> tuple[int, float, float]:
    """Decode `jpegs` over and over for `seconds`: (images, CPU-seconds, wall seconds)."""
    import simplejpeg

    largest = max(h * w for h, w, _, _ in map(simplejpeg.decode_jpeg_header, jpegs))
    buffer = np.empty(largest * 3, np.uint8)
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        for data in jpegs:
            if decoder == "pil":
                with Image.open(io.BytesIO(data)) as image:
                    np.asarray(image)
            else:  # libjpeg-turbo straight into one reused numpy buffer, as the pipeline decodes
                simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=buffer)
            count += 1
    return count, time.process_time() - cpu_start, time.perf_counter() - start


def decode_round(pool, jpegs: list[bytes], processes: int, decoder: str = "simplejpeg",
                 seconds: float = 1.5) -> tuple[float, float]:
    """Bare decode of stored JPEGs to numpy in `processes` processes of `pool` at once (one per
    core: cores that decode side by side share caches and memory bandwidth, as the pipeline's
    workers do): (images per CPU-second, per wall second per process)."""
    runs = pool.starmap(_decode_loop, [(jpegs, decoder, seconds)] * processes)
    count, cpu = sum(r[0] for r in runs), sum(r[1] for r in runs)
    return count / cpu, count / max(r[2] for r in runs) / processes


def decode_pool(processes: int):
    import multiprocessing

    return multiprocessing.get_context("spawn").Pool(processes)  # not fork: torch and Ray threads


def _repeat_dataset(prepared: Path, out: Path, times: int) -> Path:
    """A dataset `times` larger: the shards copied `times` over (decoding cost scales the same)."""
    from alexnet_ray.data.manifest import load_manifest

    manifest = load_manifest(prepared)
    out.mkdir(parents=True, exist_ok=True)
    train = manifest.splits["train"]
    shards = []
    for copy in range(times):
        for shard in train["shards"]:
            name = f"copy{copy}-{shard['file']}"
            shutil.copyfile(prepared / shard["file"], out / name)
            shards.append({**shard, "file": name})
    manifest.splits = {"train": {**train, "shards": shards, "images": train["images"] * times}}
    manifest.save(out)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="benchmark.py data", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 images instead of 1000")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workdir", default=None, help="keep the generated data here")
    parser.add_argument("--replicas", type=int, nargs="+", default=None,
                        help="also measure read amplification with this many replicas (e.g. 1 4 16)")
    args = parser.parse_args(argv)
    count = args.images or (500 if args.quick else 1000)
    cores = len(os.sched_getaffinity(0))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="alexnet-data-bench-"))
    try:
        return _run(work, count, cores, args.batch_size, args.replicas or [])
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def read_amplification(data_dir: Path, replicas: int, batch_size: int, epoch: int = 0) -> dict:
    """Every replica's loader for one epoch, one after another: what their tasks read, per epoch,
    over the split (bytes, footers included; row groups), and the images/s of the whole pass."""
    from alexnet_ray.data.pipeline import TrainLoader

    loader = TrainLoader(data_dir, global_batch_size=batch_size, replicas=replicas, image_size=224, seed=0)
    started, images = time.perf_counter(), 0
    for replica in range(replicas):
        images += sum(len(b["labels"]) for b in loader.iter_epoch(epoch, replica))
    seconds = time.perf_counter() - started
    read_bytes = sum(loader.reads[(epoch, r)].bytes for r in range(replicas))
    groups = sum(loader.reads[(epoch, r)].row_groups for r in range(replicas))
    return {"replicas": replicas, "bytes_over_split": round(read_bytes / loader.split_bytes, 3),
            "row_groups_over_split": round(groups / loader.index.num_units, 3), "images": images,
            "images_per_s": round(images / seconds, 1)}


def _run(work: Path, count: int, cores: int, batch_size: int, replica_counts: list[int]) -> int:
    import ray

    from alexnet_ray.data.manifest import load_manifest
    from alexnet_ray.data.pipeline import TrainLoader
    from alexnet_ray.data.prepare import prepare_dataset
    from alexnet_ray.data.shards import ShardIndex

    started = time.perf_counter()
    paths = write_photos(work / "raw", count)
    mean_kb = np.mean([p.stat().st_size for p in paths]) / 1024
    print(f"{count} photos (~500x375, mean {mean_kb:.0f} kB) written in {time.perf_counter() - started:.1f}s; "
          f"{cores} cores")

    # Every contender stays up for the whole run so that they can take turns; each is charged the
    # CPU of its own processes only (the baseline's DataLoader workers, or the driver and Ray's).
    me = os.getpid()
    baseline = baseline_loader(paths, cores, batch_size)
    baseline_processes = list(descendants(me))  # this process and the DataLoader's workers
    pool = decode_pool(cores)
    not_ray = frozenset(descendants(me)) - {me}  # the DataLoader's and the decode pool's processes
    # its own local cluster, sized to the cores measured: never a cluster recorded on the machine
    ray_cluster.connect(None, num_cpus=cores, include_dashboard=False,
                        configure_logging=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    try:
        started = time.perf_counter()
        prepare_dataset(work / "raw", work / "prepared", size=256, val_split="none")
        prepare_s = time.perf_counter() - started
        print(f"    prepare (one-off): {count / prepare_s:8.1f} images/s incl. Ray start-up")
        index = ShardIndex.from_manifest(load_manifest(work / "prepared"), "train")
        jpegs = [bytes(j) for j in index.read(np.arange(min(index.num_rows, 200)))[0]]

        loader = TrainLoader(work / "prepared", global_batch_size=batch_size, replicas=1, image_size=224, seed=0)
        for _ in loader.iter_epoch(0, 0):  # warm the Ray workers
            pass
        bigger = _repeat_dataset(work / "prepared", work / "prepared4x", 4)
        big_loader = TrainLoader(bigger, global_batch_size=batch_size, replicas=1, image_size=224, seed=0)
        # Speed on the 4x set (more batches, less start-up share); memory sampling apart, since
        # reading /proc/*/smaps_rollup costs CPU of its own.
        epochs = iter(range(1, ROUNDS + 1))
        ray_processes = lambda: [p for p in descendants(me) if p not in not_ray]  # noqa: E731
        best = interleaved_best(ROUNDS, {
            "baseline": lambda: epoch_round(lambda: _timed(baseline)[1], lambda: baseline_processes),
            "ray": lambda: epoch_round(lambda: _timed(big_loader.iter_epoch(next(epochs), 0))[1], ray_processes),
            "limit": lambda: decode_round(pool, jpegs, cores),
        })
        (baseline_cpu, baseline_wall, baseline_share), (ours, ours_wall, ours_share) = best["baseline"], best["ray"]
        limit, limit_wall = best["limit"]
        with decode_pool(1) as alone:
            limit_alone = max(decode_round(alone, jpegs, 1)[0] for _ in range(ROUNDS))
        limit_pil = max(decode_round(pool, jpegs, cores, decoder="pil")[0] for _ in range(ROUNDS))
        print(f"(a) DataLoader baseline: {baseline_cpu:7.1f} images per CPU-second; {baseline_wall:7.1f}/s per core "
              f"wall-clock (got {baseline_share:.0%} of the cores)")
        print(f"(b) Ray Data pipeline:   {ours:7.1f} images per CPU-second; {ours_wall:7.1f}/s per core "
              f"wall-clock (got {ours_share:.0%} of the cores)")
        print(f"(c) bare 256x256 decode: {limit:7.1f} images per CPU-second on {cores} cores at once "
              f"({limit_alone:.1f} in one process alone; PIL: {limit_pil:.1f}); {limit_wall:7.1f}/s per core "
              "wall-clock")
        print(f"    best of {ROUNDS} rounds each, the contenders taking turns")
        with PeakMemory(pids=ray_processes) as memory:
            _timed(loader.iter_epoch(ROUNDS + 1, 0))
        with PeakMemory(pids=ray_processes) as memory4:
            _timed(big_loader.iter_epoch(ROUNDS + 1, 0))
        print(f"    peak PSS of driver + Ray processes: {memory.peak:.0f} MB over the set, "
              f"{memory4.peak:.0f} MB over the 4x set")
        reads = [read_amplification(bigger, r, batch_size) for r in replica_counts]
        for r in reads:
            print(f"    {r['replicas']:3d} replicas: read {r['bytes_over_split']:.3f} x the train shards' bytes and "
                  f"{r['row_groups_over_split']:.3f} x their row groups per epoch ({r['images_per_s']:.0f} images/s)")
    finally:
        pool.terminate()
        ray.shutdown()

    result = {
        "images": count,
        "cores": cores,
        "baseline_per_core": round(baseline_cpu, 1),
        "ray_per_core": round(ours, 1),
        "decode_limit_per_core": round(limit, 1),
        "decode_limit_one_process": round(limit_alone, 1),
        "decode_limit_pil_per_core": round(limit_pil, 1),
        "speedup": round(ours / baseline_cpu, 2),
        "fraction_of_limit": round(ours / limit, 3),
        "baseline_wall_per_core": round(baseline_wall, 1),
        "ray_wall_per_core": round(ours_wall, 1),
        "decode_limit_wall": round(limit_wall, 1),
        "speedup_wall": round(ours_wall / baseline_wall, 2),
        "fraction_of_limit_wall": round(ours_wall / limit_wall, 3),
        "core_share_baseline": round(baseline_share, 3),
        "core_share_ray": round(ours_share, 3),
        "peak_rss_mb": round(memory.peak, 1),
        "peak_rss_mb_4x": round(memory4.peak, 1),
        "rss_growth_4x": round(memory4.peak / max(memory.peak, 1e-9), 3),
        "prepare_images_per_s": round(count / prepare_s, 1),
        "reads": reads,
    }
    print(f"speedup {result['speedup']}x (goal >= 5), {result['fraction_of_limit']:.0%} of the decode limit "
          f"(goal >= 70%), memory 4x/1x {result['rss_growth_4x']} (goal <= 1.2)")
    print(json.dumps(result))
    return 0
