"""torch.compile of a Tower's stages, one compiled graph per stage, so that the exchanges between
stages (the parallel layer's collectives) stay outside every graph.

Each stage gets its own code object: dynamo keeps its cache of compiled variants per code object,
with a limit of 8, and one closure shared by five stages would share one cache and one limit
(each stage compiles a few variants: train and eval, with and without grad, a new batch size).
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch
from torch import nn

from alexnet_ray.model.network import NUM_STAGES

# torch.compile's modes: "reduce-overhead" adds CUDA graphs (on GPUs), "max-autotune" kernel
# autotuning and CUDA graphs, "max-autotune-no-cudagraphs" the tuning alone
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _stage_function(eager: Callable, index: int) -> Callable:
    def stage(x, *args, **kwargs):
        return eager(index, x, *args, **kwargs)

    code = stage.__code__.replace(co_name=f"stage_{index}", co_qualname=f"stage_{index}")
    return types.FunctionType(code, stage.__globals__, f"stage_{index}", None, stage.__closure__)


def compile_stages(model: nn.Module, **options: Any) -> nn.Module:
    """Make `model.stage(index, x, *args, **kwargs)` run a torch.compile'd graph per stage index
    (compiled on first use; `options` go to torch.compile). Returns `model`; a second call does
    nothing. `model.stage_eager` is the uncompiled stage."""
    if "stage" in model.__dict__:
        return model
    eager = model.stage
    compiled = [torch.compile(_stage_function(eager, index), **options) for index in range(NUM_STAGES)]

    def stage(index: int, x, *args, **kwargs):
        if not isinstance(index, int) or not 0 <= index < NUM_STAGES:
            return eager(index, x, *args, **kwargs)  # raises the eager stage's error
        return compiled[index](x, *args, **kwargs)

    model.stage_eager = eager
    model.stage = stage
    model.compile_options = dict(options)
    return model


def begin_step(model: nn.Module) -> None:
    """Before each training step of a model compiled with CUDA graphs: tells torch that the last
    step's graph outputs are no longer needed, so the next replay may reuse their memory."""
    if model.__dict__.get("compile_options", {}).get("mode") in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()


def is_compiled(model: nn.Module) -> bool:
    return "stage" in model.__dict__
