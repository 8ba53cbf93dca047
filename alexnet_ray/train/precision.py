"""run.precision: which autocast dtype a worker trains in, and dynamic loss scaling for fp16.

`resolve_precision(choice, device_type, capability)` is pure (the GPU's compute capability is
passed in), so the choice is tested without a GPU:

| choice | CUDA, capability >= 8.0 | CUDA, capability < 8.0 (V100, T4) | CPU |
| --- | --- | --- | --- |
| auto | bf16 | fp16 + loss scaling | fp32 |
| bf16 | bf16 | refused: no bf16 | bf16 |
| fp16 | fp16 + loss scaling | fp16 + loss scaling | fp16 + loss scaling (torch's CPU autocast supports it) |
| fp32 | fp32 | fp32 | fp32 |

fp16's 5-bit exponent flushes small gradients to zero, hence the scaled loss. The scale must be the
same on every rank — both towers' gradients meet in the exchanges' reduce-scatters and replicas'
gradients are averaged — so `LossScaler` decides "skip this step" over all ranks together and every
rank updates its scale identically (torch.amp.GradScaler decides per process, so it is not used).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from alexnet_ray.parallel.mappings import all_reduce_sum

CHOICES = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class PrecisionError(ValueError):
    pass


@dataclass(frozen=True)
class Precision:
    name: str  # bf16 | fp16 | fp32
    dtype: torch.dtype | None  # autocast dtype; None: no autocast
    scale_loss: bool  # fp16: dynamic loss scaling

    def autocast(self, device_type: str):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.dtype)


def resolve_precision(choice: str, device_type: str, capability: tuple[int, int] | None = None) -> Precision:
    """The precision a worker on `device_type` ("cuda" or "cpu") trains in for run.precision=`choice`;
    `capability` is the CUDA device's (major, minor) compute capability."""
    if choice not in CHOICES:
        raise PrecisionError(f"run.precision={choice!r}: expected one of {', '.join(CHOICES)}")
    if device_type == "cuda":
        if capability is None:
            raise PrecisionError("resolve_precision: a CUDA device needs its compute capability")
        has_bf16 = tuple(capability) >= (8, 0)
        if choice == "auto":
            choice = "bf16" if has_bf16 else "fp16"
        if choice == "bf16" and not has_bf16:
            raise PrecisionError(
                f"run.precision=bf16: this GPU (compute capability {capability[0]}.{capability[1]}) has no "
                "bf16 (it needs 8.0, Ampere or newer); use run.precision=fp16 or auto")
    elif device_type == "cpu":
        if choice == "auto":
            choice = "fp32"
        if choice != "fp32" and _DTYPES[choice] not in cpu_autocast_dtypes():
            raise PrecisionError(f"run.precision={choice}: this torch ({torch.__version__}) has no {choice} "
                                 "autocast on CPU; use run.precision=fp32 or auto")
    else:
        raise PrecisionError(f"run.precision: unknown device type {device_type!r}")
    return Precision(choice, _DTYPES[choice], choice == "fp16")


def cpu_autocast_dtypes() -> set[torch.dtype]:
    """The dtypes torch's CPU autocast accepts (it warns and disables itself for the others)."""
    supported = set()
    for dtype in (torch.bfloat16, torch.float16):
        try:
            with torch.autocast("cpu", dtype=dtype, enabled=True):
                if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype:
                    supported.add(dtype)
        except (RuntimeError, AttributeError):
            pass
    return supported


def device_capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


class LossScaler:
    """Dynamic loss scaling with torch.amp.GradScaler's defaults (start 2**16, halve on an inf/NaN
    gradient and skip that step, double after 2000 clean steps), decided over every rank.

    Per step: `forward_backward(..., loss_scale=scaler.scale)`, gradient sync, then
    `scaler.step(optimizer)` (unscale, agree on overflow over `groups`, waiting at most `timeout`
    seconds, step or skip, update). `state_dict()` goes into the checkpoint, so a resumed run keeps
    its scale."""

    def __init__(self, enabled: bool, groups=None, init_scale: float = 2.0**16, growth_interval: int = 2000,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5, timeout: float | None = None):
        self.enabled, self.groups, self.timeout = enabled, groups, timeout
        self.scale = init_scale if enabled else 1.0
        self.growth_interval, self.growth_factor, self.backoff_factor = growth_interval, growth_factor, backoff_factor
        self.clean_steps = 0
        self.skipped = 0

    @property
    def loss_scale(self) -> float | None:
        return self.scale if self.enabled else None

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale the gradients, step unless any rank saw an inf/NaN; True when it stepped."""
        if not self.enabled:
            optimizer.step()
            return True
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        # on the parameters' device: the overflow flag goes through NCCL, which sends device tensors only
        bad = torch.zeros(1, device=params[0].device if params else "cpu")
        if grads:  # one fused pass (GradScaler's kernel): multiply by 1/scale, flag any inf/NaN
            torch._amp_foreach_non_finite_check_and_unscale_(grads, bad, torch.full_like(bad, 1.0 / self.scale))
        if self.groups is not None:
            for name, group in (("towers", self.groups.pair_group), ("replicas", self.groups.dp_group)):
                bad = all_reduce_sum(bad, group, f"fp16 overflow check over {name}", self.timeout)
        if bad.item() > 0:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            self.skipped += 1
            return False
        optimizer.step()
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])
