"""The export format: one file a plain PyTorch user can load without Ray or this project's training code.

An export is a `torch.save` of a dict of tensors and plain data (loadable with weights_only=True):

    format         "alexnet-ray-export/1"
    model_kwargs   AlexNet constructor arguments (num_classes, width, image_size, dropout, init,
                   activation, lrn, pool)
    state_dict     the reference AlexNet's weights (both towers merged)
    classes        class names, index = output index
    preprocessing  {"stored_size": int, "image_size": int, "mean": [r, g, b], "std": [r, g, b]}:
                   resize the short side to stored_size, centre-crop stored_size, centre-crop
                   image_size, scale to [0, 1], subtract mean, divide by std (RGB, NCHW)
    source         {"checkpoint": str, "epoch": int, "metrics": {name: number}}

    model = alexnet_ray.load_exported("alexnet.pt")     # AlexNet in eval mode
    model.classes, model.preprocessing                  # attached from the file
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from alexnet_ray import storage
from alexnet_ray.checkpoint import first_line
from alexnet_ray.model import AlexNet

EXPORT_FORMAT = "alexnet-ray-export/1"
PREPROCESSING_KEYS = ("stored_size", "image_size", "mean", "std")


class ExportError(ValueError):
    """A file that is missing, corrupt, or not an alexnet-ray export."""


@dataclasses.dataclass
class Exported:
    """The contents of an export file."""

    model_kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    classes: list[str]
    preprocessing: dict[str, Any]
    source: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"format": EXPORT_FORMAT, **dataclasses.asdict(self)}

    def build_model(self) -> AlexNet:
        """The AlexNet with these weights, in eval mode, with `.classes` and `.preprocessing`."""
        model = AlexNet(**self.model_kwargs)
        model.load_state_dict(self.state_dict)
        model.eval()
        model.classes = list(self.classes)
        model.preprocessing = dict(self.preprocessing)
        return model


def exported_from_checkpoint(state: dict[str, Any], source: str = "") -> Exported:
    """An Exported from a loaded training checkpoint (alexnet_ray.checkpoint.load_checkpoint)."""
    model_kwargs = dict(state["config"]["model"])
    classes = state.get("classes")
    preprocessing = state.get("preprocessing")
    if not classes or not preprocessing:
        raise ExportError(f"checkpoint {source} has no class names or preprocessing; it cannot be exported")
    if len(classes) != model_kwargs["num_classes"]:
        raise ExportError(f"checkpoint {source}: {len(classes)} class names for num_classes={model_kwargs['num_classes']}")
    metrics = {k: v for k, v in (state.get("metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return Exported(
        model_kwargs=model_kwargs,
        state_dict={k: v.detach().cpu().clone() for k, v in state["model"].items()},
        classes=[str(c) for c in classes],
        preprocessing={k: preprocessing[k] for k in PREPROCESSING_KEYS},
        source={"checkpoint": source, "epoch": int(state.get("epoch", 0)), "metrics": metrics},
    )


def save_exported(exported: Exported, out: str | os.PathLike) -> Path | str:
    """Write the export file whole (local path or URI); returns where (a Path when local)."""
    buffer = io.BytesIO()
    torch.save(exported.to_dict(), buffer)
    storage.write_bytes_atomic(out, buffer.getvalue())
    return str(out) if storage.is_uri(out) else Path(out)


def read_exported(path: str | os.PathLike) -> Exported:
    """Read an export file (local or URI; weights_only=True); ExportError naming the file if it is not one."""
    try:
        is_file = storage.is_file(path)
    except OSError as e:
        raise ExportError(f"cannot read exported model {path}: {str(e).splitlines()[0]}") from None
    if not is_file:
        raise ExportError(f"no exported model at {path}")
    try:
        data = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, refused globals, not a torch file
        raise ExportError(f"cannot read exported model {path}: {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path} is not an alexnet-ray export (format {EXPORT_FORMAT!r} expected)")
    missing = [f.name for f in dataclasses.fields(Exported) if f.name not in data]
    if missing:
        raise ExportError(f"exported model {path} lacks {missing}")
    return Exported(**{f.name: data[f.name] for f in dataclasses.fields(Exported)})


def load_exported(path: str | os.PathLike) -> AlexNet:
    """The exported AlexNet in eval mode, with `.classes` and `.preprocessing` attributes."""
    return read_exported(path).build_model()


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, onnx: bool = False,
                      onnx_batch: int = 4) -> dict[str, Any]:
    """Write the export file for a training checkpoint (and OUT with .onnx suffix if `onnx`).

    Returns {"out", "classes", "model_kwargs", "onnx", "onnx_max_abs_diff"}."""
    from alexnet_ray.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    exported = exported_from_checkpoint(state, str(checkpoint))
    out = save_exported(exported, out)
    summary: dict[str, Any] = {"out": str(out), "classes": len(exported.classes),
                               "model_kwargs": exported.model_kwargs, "onnx": None, "onnx_max_abs_diff": None}
    if onnx:
        onnx_out = str(out)[: -len(Path(str(out)).suffix) or None] + ".onnx"
        with tempfile.TemporaryDirectory(prefix="alexnet-onnx-") as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            export_onnx(exported.build_model(), onnx_path)
            summary["onnx_max_abs_diff"] = check_onnx(exported.build_model(), onnx_path, batch=onnx_batch)
            storage.write_bytes_atomic(onnx_out, onnx_path.read_bytes())
        summary["onnx"] = onnx_out
    return summary


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"ONNX export needs the [onnx] extra (pip install onnx onnxruntime onnxscript): {e}") from None


def export_onnx(model: AlexNet, out: str | os.PathLike) -> Path:
    """Write `model` as ONNX with a dynamic batch dimension (input "images", output "logits")."""
    _require_onnx()
    out = Path(out)
    size = model.config.image_size
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(out))
    return out


def check_onnx(model: AlexNet, path: str | os.PathLike, *, batch: int = 4, seed: int = 0) -> float:
    """Run the ONNX file with onnxruntime and PyTorch on one random batch; return the max |difference|
    of the logits, raising ValueError when it exceeds fp32 tolerance."""
    _require_onnx()
    import onnxruntime

    size = model.config.image_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model(x).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    diff = float(abs(got - expected).max())
    scale = float(abs(expected).max()) or 1.0
    if diff > 1e-4 * max(1.0, scale):
        raise ValueError(f"ONNX model {path} disagrees with PyTorch: max |logit difference| {diff:.3g}")
    return diff
