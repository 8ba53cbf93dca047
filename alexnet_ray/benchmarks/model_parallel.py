"""Reference AlexNet vs two towers vs two towers with micro-batches: one training step each.

    python jobs/benchmark.py model-parallel [--quick] [--batch 64] [--steps N] [--microbatches 4] [--no-compile]

Full-size AlexNet, forward + backward + SGD step (momentum 0.9, weight decay 5e-4), synthetic data:
the reference model in this process with 2 threads; 2 towers in 2 processes with 1 thread each over
gloo; the same with micro-batches.  Prints a table and, last, one JSON object with the figures.

The reference step itself in four versions, taking turns step by step (so that the machine's drift
moves them all alike): torch's LRN (F.local_response_norm per half), the fused LRN, no LRN (`lrn=False`, the floor), and the fused
LRN with each stage torch.compile'd (`run.compile`; its first step, compiling, is reported apart).

Memory: bytes of parameters + optimizer state + tensors saved for backward (counted once per
storage with torch.autograd.graph.saved_tensors_hooks) held by tower 0, against the reference.
On a shared CPU, other processes inflate step times unevenly; the min step times are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from alexnet_ray.model import AlexNet, Tower
from alexnet_ray.model.compiled import compile_stages
from alexnet_ray.model.layers import FUSED_LRN_DEFAULT, use_torch_lrn
from alexnet_ray.parallel import Topology, TowerParallel, init_parallel_groups

SGD = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)


@contextmanager
def count_saved_bytes(totals: dict):
    """Add the bytes of every distinct storage saved for backward to totals['saved']."""
    seen: set[int] = set()

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            totals["saved"] = totals.get("saved", 0) + storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _state_bytes(params, optimizer) -> dict[str, int]:
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    opt_bytes = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v))
    return {"params": param_bytes, "optimizer": opt_bytes}


def _batch(batch: int, image_size: int, num_classes: int):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 3, image_size, image_size, generator=gen),
            torch.randint(0, num_classes, (batch,), generator=gen))


CONTENDERS = ("torch_lrn", "fused_lrn", "no_lrn", "compiled")
# the model's default LRN: the reference the towers (which use the default) are compared with
REFERENCE = "fused_lrn" if FUSED_LRN_DEFAULT else "torch_lrn"


def _contender(name: str, args):
    torch.manual_seed(0)
    model = AlexNet(image_size=args.image_size, width=args.width, lrn=name != "no_lrn").train()
    use_torch_lrn(model, name == "torch_lrn")
    if name == "compiled":
        compile_stages(model)
    return model, torch.optim.SGD(model.parameters(), **SGD)


def run_reference(args) -> dict:
    """{contender: {"step_s", "min_step_s", "first_step_s"}}, plus "memory" of the reference."""
    torch.set_num_threads(2)
    images, labels = _batch(args.batch, args.image_size, 1000)
    names = [n for n in CONTENDERS if n != "compiled" or args.compile]
    runs = {name: _contender(name, args) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    first: dict[str, float] = {}
    memory: dict = {}
    for step in range(args.warmup + args.steps):
        for name in names[step % len(names):] + names[:step % len(names)]:
            model, opt = runs[name]
            start = time.perf_counter()
            opt.zero_grad(set_to_none=False)
            if step == 0 and name == REFERENCE:
                with count_saved_bytes(memory):
                    loss = F.cross_entropy(model(images), labels)
            else:
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            opt.step()
            elapsed = time.perf_counter() - start
            first.setdefault(name, elapsed)
            if step >= args.warmup:
                times[name].append(elapsed)
    model, opt = runs[REFERENCE]
    memory.update(_state_bytes(list(model.parameters()), opt))
    result = {name: {"step_s": statistics.median(t), "min_step_s": min(t), "first_step_s": first[name]}
              for name, t in times.items()}
    result["memory"] = memory
    return result


def _tower_worker(rank: int, world: int, store: str, args, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    groups = init_parallel_groups(Topology(towers=2, replicas=1))
    images, labels = _batch(args.batch, args.image_size, 1000)
    results = {}
    for microbatches in (1, args.microbatches):
        torch.manual_seed(0)
        tower = Tower(rank, 2, image_size=args.image_size, width=args.width).train()
        model = TowerParallel(tower, groups, microbatches=microbatches)
        opt = torch.optim.SGD(tower.parameters(), **SGD)
        times, exchange, sync, memory = [], [], [], {}
        for step in range(args.warmup + args.steps):
            dist.barrier(group=groups.pair_group)
            model.reset_stats()
            start = time.perf_counter()
            opt.zero_grad(set_to_none=False)
            if step == 0:
                with count_saved_bytes(memory):
                    model.forward_backward(images, labels)
            else:
                model.forward_backward(images, labels)
            model.sync_gradients()
            opt.step()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
                exchange.append(model.stats["exchange_s"])
                sync.append(model.stats["grad_sync_s"])
        memory.update(_state_bytes(list(tower.parameters()), opt))
        results[microbatches] = {"step_s": statistics.median(times), "min_step_s": min(times), "exchange_s": statistics.median(exchange),
                                 "exchange_share": sum(exchange) / sum(times), "memory": memory}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def run_towers(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "towers.json")
        mp.spawn(_tower_worker, args=(2, os.path.join(tmp, "store"), args, out), nprocs=2, join=True)
        with open(out) as f:
            return {int(k): v for k, v in json.load(f).items()}


def _total(memory: dict) -> int:
    return memory["params"] + memory["optimizer"] + memory["saved"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmark.py model-parallel", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed steps per layout")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per layout (default 10; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="leave out the compiled reference (compiling takes about a minute of CPU)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 10)
    args.warmup = max(1, args.warmup if args.warmup is not None else (1 if args.quick else 2))  # step 0 compiles
    Topology(2, 1).validate(batch_size=args.batch, microbatches=args.microbatches)

    versions = run_reference(args)
    reference = {**versions[REFERENCE], "memory": versions["memory"]}
    towers = run_towers(args)
    one, many = towers[1], towers[args.microbatches]
    ref_s = reference["step_s"]
    mib = 1 << 20
    print(f"AlexNet width={args.width} image={args.image_size} batch={args.batch}, fwd+bwd+SGD, "
          f"median of {args.steps} steps ({args.warmup} warm-up), CPU, gloo")
    print(f"{'reference step, by LRN':<40}{'step s':>9}{'x ref':>8}{'first s':>10}{'min s':>9}")
    labels = {"torch_lrn": "torch's LRN (F.local_response_norm)", "fused_lrn": "fused LRN",
              "no_lrn": "no LRN (lrn=False, the floor)", "compiled": "fused LRN + torch.compile"}
    for name in CONTENDERS:
        if name in versions:
            v = versions[name]
            print(f"{labels[name]:<40}{v['step_s']:>9.3f}{v['step_s'] / ref_s:>8.2f}{v['first_step_s']:>10.1f}"
                  f"{v['min_step_s']:>9.3f}")
    print(f"{'layout':<40}{'step s':>9}{'x ref':>8}{'exchange':>10}{'min s':>9}")
    print(f"{'reference, 1 process, 2 threads':<40}{ref_s:>9.3f}{1.0:>8.2f}{'-':>10}{reference['min_step_s']:>9.3f}")
    print(f"{'2 towers, 2 processes x 1 thread':<40}{one['step_s']:>9.3f}{one['step_s'] / ref_s:>8.2f}"
          f"{one['exchange_share']:>10.1%}{one['min_step_s']:>9.3f}")
    print(f"{f'2 towers, {args.microbatches} micro-batches':<40}{many['step_s']:>9.3f}"
          f"{many['step_s'] / ref_s:>8.2f}{many['exchange_share']:>10.1%}{many['min_step_s']:>9.3f}")
    print(f"{'memory (MiB)':<40}{'params':>9}{'optim':>8}{'saved':>10}{'total':>9}")
    for name, mem in (("reference", reference["memory"]), ("tower 0", one["memory"]),
                      (f"tower 0, {args.microbatches} micro-batches", many["memory"])):
        print(f"{name:<40}{mem['params'] / mib:>9.1f}{mem['optimizer'] / mib:>8.1f}{mem['saved'] / mib:>10.1f}"
              f"{_total(mem) / mib:>9.1f}")
    figures = {
        "reference_step_s": round(ref_s, 4),
        "towers_step_s": round(one["step_s"], 4),
        "towers_microbatch_step_s": round(many["step_s"], 4),
        "towers_ratio": round(one["step_s"] / ref_s, 3),
        "microbatch_ratio": round(many["step_s"] / ref_s, 3),
        "exchange_share": round(one["exchange_share"], 4),
        "reference_min_step_s": round(reference["min_step_s"], 4),
        "towers_min_step_s": round(one["min_step_s"], 4),
        "towers_microbatch_min_step_s": round(many["min_step_s"], 4),
        "microbatch_exchange_share": round(many["exchange_share"], 4),
        "tower_memory_ratio": round(_total(one["memory"]) / _total(reference["memory"]), 3),
        "reference_memory_bytes": _total(reference["memory"]),
        "tower_memory_bytes": _total(one["memory"]),
        "batch": args.batch, "microbatches": args.microbatches, "steps": args.steps, "quick": args.quick,
    }
    for name in CONTENDERS:
        if name in versions:
            figures[f"step_s_{name}"] = round(versions[name]["step_s"], 4)
            figures[f"min_step_s_{name}"] = round(versions[name]["min_step_s"], 4)
    figures["lrn_speedup"] = round(versions["torch_lrn"]["step_s"] / versions["fused_lrn"]["step_s"], 3)
    figures["lrn_speedup_min"] = round(versions["torch_lrn"]["min_step_s"] / versions["fused_lrn"]["min_step_s"], 3)
    if "compiled" in versions:
        figures["compile_first_step_s"] = round(versions["compiled"]["first_step_s"], 1)
    print(json.dumps(figures))
    return 0
