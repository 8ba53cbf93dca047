"""The CUDA path, on a machine with a GPU (CI has none, so pytest does not collect this file):

    python tests/gpu_check.py            # prints PASS/FAIL lines, then one JSON object
    python tests/gpu_check.py --cpu      # the same code on the CPU with gloo: a dry run of the script
    python tests/gpu_check.py --trainer  # then Trainer.fit() on the GPU through Ray (1 tower x 1 replica)
    python tests/gpu_check.py --lrn      # only the LRN figures (section 5): a few minutes on an H200

What a Ray Train worker does on a GPU, without Ray: an NCCL process group, a Tower moved to the
device in channels_last, bf16 autocast for forward/backward (TowerParallel), the uint8 batch fed
through training_batches and to_model_input on the device, checkpoint gathers and metric
all-reduces on device tensors. Checked against the fp32 reference model on the CPU (bf16
tolerances), then a few SGD steps must lower the loss; then bf16 throughput of the paper's model;
last, its images/s with torch's LRN, the fused LRN and fused + torch.compile, at batch 128 and 256
(the dry run times a quarter-width model at 64 px, batch 8 and 16).
Two towers need two GPUs (NCCL refuses two ranks on one device); with one GPU this runs one tower.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alexnet_ray.model import AlexNet, Tower, merge_state_dicts, split_state_dict  # noqa: E402
from alexnet_ray.model.compiled import compile_stages  # noqa: E402
from alexnet_ray.model.layers import use_torch_lrn  # noqa: E402
from alexnet_ray.parallel import (  # noqa: E402
    Topology, TowerParallel, all_reduce_sum, gather_tower_state_dicts, init_parallel_groups,
)
from alexnet_ray.preprocess import to_model_input  # noqa: E402
from alexnet_ray.train.batch_feed import training_batches  # noqa: E402

FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def main() -> int:
    dry_run = "--cpu" in sys.argv
    if dry_run:
        device, backend, name = torch.device("cpu"), "gloo", "cpu (dry run)"
    else:
        assert torch.cuda.is_available(), "no CUDA device"
        device, backend, name = torch.device("cuda", 0), "nccl", torch.cuda.get_device_name(0)
        print(f"torch {torch.__version__}, {name}, NCCL {torch.cuda.nccl.version()}")
    store = tempfile.mktemp(prefix="alexnet-gpu-store-")
    if "--lrn" in sys.argv:
        figures = {"device": name, "torch": torch.__version__, **lrn_throughput(device, dry_run)}
        print(json.dumps(figures))
        return 0
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1,
                            timeout=timedelta(seconds=120), **({} if dry_run else {"device_id": device}))
    groups = init_parallel_groups(Topology(towers=1, replicas=1))
    figures: dict = {"device": name, "torch": torch.__version__}
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    on_device = (lambda t: t.device.type == device.type)

    # 1. bf16 + channels_last on the GPU vs the fp32 reference on the CPU, one step, paper geometry
    kwargs = dict(num_classes=1000, width=1.0, image_size=224, dropout=0.0)
    torch.manual_seed(0)
    reference = AlexNet(**kwargs)
    tower = Tower(0, 1, **kwargs)
    tower.load_state_dict(split_state_dict(reference.state_dict(), 1)[0])
    tower.to(device).to(memory_format=torch.channels_last)
    model = TowerParallel(tower, groups, microbatches=1, exchange_timeout=60.0)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 224, 224, 3), dtype=np.uint8)
    pixels.flags.writeable = False  # as Ray's object store hands batches out
    labels = torch.from_numpy(rng.integers(0, 1000, 32))
    lighting = torch.from_numpy(rng.normal(0, 0.01, (32, 3)).astype(np.float32))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

    fed = list(training_batches(iter([{"images": pixels, "labels": labels.numpy(), "lighting": lighting.numpy()}]),
                                [32], 224, groups, device))
    images_d, labels_d, lighting_d = fed[0]
    check("batch feed puts the batch on the device", all(on_device(t) for t in (images_d, labels_d, lighting_d)))
    x_gpu = to_model_input(images_d, lighting_d, mean, std, device, channels_last=True)
    x_cpu = to_model_input(pixels, lighting, mean, std, "cpu")
    check("to_model_input on the GPU equals the CPU", torch.allclose(x_gpu.cpu(), x_cpu, atol=1e-6),
          f"max diff {float((x_gpu.cpu() - x_cpu).abs().max()):.2e}")
    check("input is channels_last", x_gpu.is_contiguous(memory_format=torch.channels_last))

    with autocast():
        loss, logits = model.forward_backward(x_gpu, labels_d)
    model.sync_gradients()
    ref_logits = reference(x_cpu)
    ref_loss = F.cross_entropy(ref_logits, labels)
    ref_loss.backward()
    logit_cos = cosine(logits.float().cpu(), ref_logits.detach())
    check("bf16 logits follow the fp32 reference", logit_cos > 0.99, f"cosine {logit_cos:.5f}")
    check("bf16 loss near the fp32 loss", abs(float(loss) - float(ref_loss.detach())) < 0.05 * float(ref_loss),
          f"{float(loss):.4f} vs {float(ref_loss.detach()):.4f}")
    grads = {n: p.grad for n, p in tower.named_parameters()}
    ref_grads = split_state_dict({n: p.grad for n, p in reference.named_parameters()}, 1)[0]
    cosines = {n: round(cosine(grads[n].float().cpu(), ref_grads[n]), 4) for n in grads}
    figures["gradient_cosines"] = cosines
    # conv1/conv2 are only reported: with the paper's N(0, 0.01) weights and random pixels their
    # true gradients are tiny sums of large cancelling terms, which bf16 inputs blur (the same on
    # the CPU's bf16 autocast); every later layer must follow the fp32 gradient closely.
    later = [n for n in cosines if n.endswith("weight") and not n.startswith(("conv1", "conv2"))]
    worst = min(later, key=cosines.get)
    check("bf16 weight gradients of conv3..fc8 follow fp32", cosines[worst] > 0.98,
          f"worst cosine {cosines[worst]} ({worst}); conv1 {cosines['conv1.weight']}, conv2 {cosines['conv2.weight']}")
    check("parameters stay fp32 under autocast", all(p.dtype == torch.float32 for p in tower.parameters()))

    # 2. checkpoint gather and metric all-reduce on device tensors (NCCL sends only CUDA tensors)
    gathered = gather_tower_state_dicts({k: v for k, v in tower.state_dict().items()}, groups)
    merged = merge_state_dicts(gathered)
    check("checkpoint gather merges to the reference's names and shapes",
          {k: tuple(v.shape) for k, v in merged.items()} == {k: tuple(v.shape) for k, v in reference.state_dict().items()})
    total = all_reduce_sum(torch.tensor([1.0, 2.0], device=device), dist.group.WORLD)
    check("metric all-reduce on the device", on_device(total) and total.tolist() == [1.0, 2.0])

    # 3. training on the device (bf16, channels_last, 2 micro-batches) follows fp32 on the CPU
    small = dict(num_classes=10, width=0.25, image_size=64, dropout=0.0, init="kaiming")
    generator = torch.Generator().manual_seed(0)
    ys = torch.arange(64) % 10
    patterns = torch.randn(10, 3, 64, 64, generator=generator)  # a learnable task: a pattern per class
    xs = torch.randn(64, 3, 64, 64, generator=generator) + patterns[ys]

    def train(where: torch.device, mixed: bool) -> list[float]:
        torch.manual_seed(1)
        t = Tower(0, 1, **small).to(where)
        x, y = xs.to(where), ys.to(where)
        if mixed:
            t.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        tp = TowerParallel(t, groups, microbatches=2, exchange_timeout=60.0)
        opt = torch.optim.SGD(t.parameters(), lr=0.005, momentum=0.9, weight_decay=5e-4)
        losses = []
        for _ in range(40):
            with torch.autocast(where.type, dtype=torch.bfloat16, enabled=mixed):
                step_loss, _ = tp.forward_backward(x, y)
            tp.sync_gradients()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(step_loss.detach()))
        return losses

    mixed_losses, fp32_losses = train(device, True), train(torch.device("cpu"), False)
    figures["train_losses_device_bf16"] = [round(v, 4) for v in mixed_losses[::10] + mixed_losses[-1:]]
    figures["train_losses_cpu_fp32"] = [round(v, 4) for v in fp32_losses[::10] + fp32_losses[-1:]]
    check("40 bf16 SGD steps on the device learn the task", mixed_losses[-1] < 0.1 * mixed_losses[0],
          f"{mixed_losses[0]:.3f} -> {mixed_losses[-1]:.4f} (CPU fp32: {fp32_losses[0]:.3f} -> {fp32_losses[-1]:.4f})")

    # 4. throughput: the paper's model, batch 128, bf16 + channels_last, forward+backward+SGD
    sync = torch.cuda.synchronize if not dry_run else (lambda: None)
    for name, towers in (("reference (both halves on one GPU)", 1), ("one tower of two (a GPU's share)", 2)):
        net = (AlexNet(**kwargs) if towers == 1 else Tower(0, 2, **kwargs)).to(device).to(memory_format=torch.channels_last)
        sgd = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        batch = torch.randn(128, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 1000, (128,), device=device)

        def step():
            with autocast():
                # a tower of two gets its own half back in place of the partner's: the same shapes, no exchange
                out = net(batch) if towers == 1 else net(batch, lambda point, h: torch.cat([h, h], dim=1))
                loss_ = F.cross_entropy(out.float(), target)
            loss_.backward()
            sgd.step()
            sgd.zero_grad(set_to_none=True)

        warm, timed = (1, 1) if dry_run else (5, 20)
        for _ in range(warm):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(timed):
            step()
        sync()
        rate = timed * 128 / (time.perf_counter() - start)
        figures[f"images_per_s {name}"] = round(rate, 1)
        print(f"     {name}: {rate:,.0f} images/s", flush=True)
    if not dry_run:
        figures["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    dist.destroy_process_group()
    figures.update(lrn_throughput(device, dry_run))
    if "--trainer" in sys.argv:
        figures.update(check_trainer(dry_run))
    figures["failures"] = FAILURES
    print(json.dumps(figures))
    return 1 if FAILURES else 0


def lrn_throughput(device: torch.device, dry_run: bool) -> dict:
    """5. Images/s of the paper's model (bf16 autocast, channels-last, forward+backward+SGD step) with
    torch's LRN, the fused LRN, and the fused LRN with each stage torch.compile'd; batch 128 and 256."""
    model_kwargs = dict(num_classes=1000, width=1.0, image_size=224, dropout=0.5)
    batches, warm, timed = (128, 256), 3, 20
    if dry_run:
        model_kwargs.update(width=0.25, image_size=64)
        batches, warm, timed = (8, 16), 1, 2
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    size = model_kwargs["image_size"]
    figures = {}
    for batch_size in batches:
        for version in ("torch_lrn", "fused_lrn", "compiled"):
            torch.manual_seed(0)
            net = AlexNet(**model_kwargs).to(device).to(memory_format=torch.channels_last)
            use_torch_lrn(net, version == "torch_lrn")
            if version == "compiled":
                compile_stages(net)  # a fresh compile per batch size
            sgd = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            batch = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
            target = torch.randint(0, 1000, (batch_size,), device=device)

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss_ = F.cross_entropy(net(batch).float(), target)
                loss_.backward()
                sgd.step()
                sgd.zero_grad(set_to_none=True)

            start = time.perf_counter()
            for _ in range(warm):
                step()
            sync()
            warm_s = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(timed):
                step()
            sync()
            rate = timed * batch_size / (time.perf_counter() - start)
            figures[f"images_per_s paper model {version} batch {batch_size}"] = round(rate, 1)
            if version == "compiled":
                figures[f"compile_warmup_s batch {batch_size}"] = round(warm_s, 1)
            print(f"     {version}, batch {batch_size}: {rate:,.0f} images/s (warm-up {warm_s:.1f} s)", flush=True)
            del net, sgd
    for batch_size in batches:
        fused = figures[f"images_per_s paper model fused_lrn batch {batch_size}"]
        figures[f"lrn_speedup batch {batch_size}"] = round(fused / figures[f"images_per_s paper model torch_lrn batch {batch_size}"], 3)
    return figures


def check_trainer(dry_run: bool) -> dict:
    """Trainer.fit() through Ray Train on the GPU: NCCL group, bf16, channels_last, Ray Data feed,
    checkpoints from device tensors; the checkpoint must load into AlexNet on the CPU."""
    from alexnet_ray.checkpoint import load_checkpoint
    from alexnet_ray.train.config import load_config
    from alexnet_ray.train.trainer import Trainer

    storage = tempfile.mkdtemp(prefix="alexnet-gpu-runs-")
    overrides = [f"run.storage={storage}", "run.epochs=3", "run.deterministic=false", "parallel.towers=1",
                 f"parallel.use_gpu={'false' if dry_run else 'true'}", "run.progress_interval_s=5"]
    start = time.perf_counter()
    result = Trainer(load_config("tiny", overrides=overrides)).fit()
    wall = time.perf_counter() - start
    m = result.metrics
    print(f"     Trainer.fit() on {'CPU' if dry_run else 'GPU'}: {m}", flush=True)
    check("Trainer.fit() on the device trains", m["train_loss"] < 2.2 and m["val_top1_error"] < 0.9,
          f"train loss {m['train_loss']:.3f}, val top-1 error {m['val_top1_error']:.3f}")
    state = load_checkpoint(result.checkpoint.path)
    model = AlexNet(**state["config"]["model"]).eval()
    keys = model.load_state_dict(state["model"])
    size = state["config"]["model"]["image_size"]
    with torch.no_grad():
        logits = model(torch.randn(2, 3, size, size))
    check("its checkpoint loads into AlexNet on the CPU and predicts",
          not keys.missing_keys and not keys.unexpected_keys and bool(torch.isfinite(logits).all())
          and logits.shape == (2, state["config"]["model"]["num_classes"]), result.checkpoint.path)
    return {"trainer_wall_s": round(wall, 1), "trainer_metrics": {k: m[k] for k in
            ("train_loss", "val_top1_error", "images_per_s", "share_data", "share_compute") if k in m}}


if __name__ == "__main__":
    sys.exit(main())
