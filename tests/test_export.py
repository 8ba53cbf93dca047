"""Export: a weights_only file that rebuilds the AlexNet, reproduces the two towers' logits, carries
classes and preprocessing; ONNX (optional extra) agrees with PyTorch; bad files give one clear error."""

import json

import pytest
import torch

from alexnet_ray import load_exported
from alexnet_ray.checkpoint import load_checkpoint
from alexnet_ray.export import EXPORT_FORMAT, ExportError, export_checkpoint, read_exported
from alexnet_ray.model import EXCHANGE_DIM, NUM_STAGES, AlexNet, Tower, split_state_dict
from conftest import run_job



@pytest.fixture(scope="module")
def exported_file(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny.pt"
    export_checkpoint(tiny_run.checkpoint.path, out)
    return out


def two_tower_logits(state_dict, model_kwargs, x):
    """The two towers of the checkpoint, run in lockstep in one process: after every stage each
    tower's output half is all-gathered along the channel dim, as the cross-connects do."""
    towers = [Tower(t, 2, **model_kwargs).eval() for t in range(2)]
    for tower, part in zip(towers, split_state_dict(state_dict, 2)):
        tower.load_state_dict(part)
    inputs = [x, x]
    with torch.no_grad():
        for stage in range(NUM_STAGES):
            halves = [tower.stage(stage, inp) for tower, inp in zip(towers, inputs)]
            gathered = torch.cat(halves, dim=EXCHANGE_DIM)
            inputs = [gathered, gathered]
    return inputs[0]


def test_export_is_weights_only_and_self_describing(tiny_run, exported_file):
    state = load_checkpoint(tiny_run.checkpoint.path)
    data = torch.load(exported_file, weights_only=True)
    assert data["format"] == EXPORT_FORMAT
    assert data["model_kwargs"] == state["config"]["model"]
    assert data["classes"] == state["classes"] and len(data["classes"]) == 10
    assert data["preprocessing"] == {"stored_size": 73, "image_size": 64, "mean": state["preprocessing"]["mean"],
                                     "std": state["preprocessing"]["std"]}
    assert data["source"]["epoch"] == 2
    model = load_exported(exported_file)
    assert isinstance(model, AlexNet) and not model.training
    assert model.classes == state["classes"] and model.preprocessing == data["preprocessing"]
    for name, tensor in state["model"].items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)


def test_exported_model_reproduces_the_towers_logits(tiny_run, exported_file):
    state = load_checkpoint(tiny_run.checkpoint.path)
    model = load_exported(exported_file)
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported_logits = model(x)
    towers = two_tower_logits(state["model"], state["config"]["model"], x)
    assert exported_logits.shape == (6, 10)
    torch.testing.assert_close(exported_logits, towers, rtol=1e-5, atol=1e-6)
    # and the towers are not trivially equal to anything: other weights give other logits
    other = AlexNet(**state["config"]["model"]).eval()
    with torch.no_grad():
        assert (other(x) - exported_logits).abs().max() > 1e-3


def test_onnx_agrees_with_pytorch(tiny_run, tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the [onnx] extra: onnx, onnxruntime, onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime", reason="checking ONNX needs onnxruntime ([onnx] extra)")
    pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript ([onnx] extra)")
    summary = export_checkpoint(tiny_run.checkpoint.path, tmp_path / "m.pt", onnx=True)
    assert summary["onnx"] == str(tmp_path / "m.onnx") and summary["onnx_max_abs_diff"] < 1e-4
    # a batch size other than the one exported with (the batch dimension is dynamic)
    model = load_exported(tmp_path / "m.pt")
    x = torch.randn(7, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    session = onnxruntime.InferenceSession(summary["onnx"], providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-5)


def test_export_job_writes_a_loadable_file(capsys, tiny_run, tmp_path):
    code, out, err = run_job(capsys, "export", tiny_run.path, str(tmp_path / "out" / "model.pt"))
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["out"] == str(tmp_path / "out" / "model.pt") and summary["onnx"] is None
    assert load_exported(summary["out"]).config.width == 0.125


def test_bad_files_are_one_clear_error(capsys, tmp_path, exported_file):
    with pytest.raises(ExportError, match="no exported model at"):
        load_exported(tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(exported_file.read_bytes()[:1000])
    with pytest.raises(ExportError, match="cannot read exported model"):
        read_exported(truncated)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ExportError, match="is not an alexnet-ray export"):
        read_exported(other)
    code, out, err = run_job(capsys, "export", str(tmp_path / "no-checkpoint"), str(tmp_path / "x.pt"))
    assert code == 2 and err.startswith("error: no checkpoint at") and err.strip().count("\n") == 0
    assert not (tmp_path / "x.pt").exists()
