"""Evaluation: 10-crop geometry and averaging on constructed cases, agreement of the Ray Data
evaluation with the towers' own evaluation during training and with an independent computation
using the exported model, and one clear error for each bad input."""

import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from alexnet_ray.checkpoint import load_checkpoint, save_checkpoint
from alexnet_ray.data.augment import augment_eval
from alexnet_ray.eval.scoring import class_probabilities, resolve_checkpoint
from alexnet_ray.export import exported_from_checkpoint
from alexnet_ray.model import AlexNet
from alexnet_ray.preprocess import average_crops

ROOT = Path(__file__).resolve().parents[1]


def load_job(name):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def varied_checkpoint(tiny_run, data_dir, directory) -> Path:
    """The tiny run's last checkpoint with weights whose predictions vary from image to image.

    Two epochs of the tiny run leave near-uniform outputs, and a randomly initialised net predicts
    one class for almost every image; either would make an agreement test weak. So: He-initialised
    weights, then fc8 rescaled so that each logit is standardised over the validation images
    (logit_c -> (logit_c - mean_c) / std_c), which spreads the argmax over the classes."""
    state = load_checkpoint(tiny_run.checkpoint.path)
    torch.manual_seed(1)
    model = AlexNet(**state["config"]["model"]).eval()
    for module in model.children():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight)
            torch.nn.init.zeros_(module.bias)
    p = state["preprocessing"]
    x = torch.cat([batch for batch, _ in val_batches(data_dir, p["image_size"], p["mean"], p["std"], False)])
    with torch.no_grad():
        logits = model(x)
        mean, std = logits.mean(dim=0), logits.std(dim=0).clamp_min(1e-6)
        model.fc8.weight.div_(std[:, None])
        model.fc8.bias.sub_(mean).div_(std)
    state["model"] = model.state_dict()
    save_checkpoint(directory, state)
    return Path(directory)


# --------------------------------------------------------------------------- 10-crop, constructed cases


def coordinate_image(size: int) -> bytes:
    """A PNG (lossless) whose pixel (y, x) is (3y, 3x, 7): every crop's origin can be read back."""
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([3 * y, 3 * x, np.full_like(y, 7)], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_ten_crop_geometry_corners_centre_and_mirrors():
    crops = augment_eval([coordinate_image(73)], image_size=64, ten_crop=True)[0]
    assert crops.shape == (10, 64, 64, 3)
    # corners at 0 and 73 - 64 = 9, centre at 9 // 2 = 4: (y, x) of each crop's top-left pixel
    expected = [(0, 0), (0, 9), (9, 0), (9, 9), (4, 4)]
    for k, (y, x) in enumerate(expected):
        assert (crops[k, 0, 0, 0] // 3, crops[k, 0, 0, 1] // 3) == (y, x)
        assert (crops[k, -1, -1, 0] // 3, crops[k, -1, -1, 1] // 3) == (y + 63, x + 63)
        # crop k + 5 is crop k mirrored left-right
        assert (crops[k + 5, 0, 0, 0] // 3, crops[k + 5, 0, 0, 1] // 3) == (y, x + 63)
        np.testing.assert_array_equal(crops[k + 5], crops[k][:, ::-1])
    centre = augment_eval([coordinate_image(73)], image_size=64, ten_crop=False)[0]
    np.testing.assert_array_equal(centre, crops[4])


def test_ten_crop_averages_softmax_not_logits():
    # crop probabilities given directly: logits = log(p), so softmax(logits) == p exactly
    agree = torch.tensor([0.6, 0.01, 0.39])  # 6 crops: class 0 at 0.6
    sure = torch.tensor([0.01, 0.98, 0.01])  # 4 crops: class 1 at 0.98
    probs = torch.stack([agree] * 6 + [sure] * 4)[None]
    averaged = average_crops(probs.log())
    expected = torch.tensor([[0.6 * 0.6 + 0.4 * 0.01, 0.6 * 0.01 + 0.4 * 0.98, 0.6 * 0.39 + 0.4 * 0.01]])
    torch.testing.assert_close(averaged, expected)  # [0.364, 0.398, 0.238]
    assert averaged.argmax().item() == 1  # most crops vote 0, the averaged softmax says 1
    # averaging logits (a geometric mean) would pick class 0: the two rules are distinguishable
    assert probs.log().mean(dim=1).argmax().item() == 0


class ColourMean(torch.nn.Module):
    """A real (parameter-free) model: logits = 20 x the crop's mean R, G, B."""

    def forward(self, x):
        return 20 * x.mean(dim=(2, 3))


def test_ten_crop_probabilities_on_a_split_colour_image():
    # left 30 columns red, the rest green, 73 x 73: the left corner crops (x 0..63) hold 30 red
    # columns, the right ones (x 9..72) 21, the centre (x 4..67) 26; mirrors see the same colours.
    pixels = np.zeros((73, 73, 3), np.uint8)
    pixels[:, :30, 0] = 255
    pixels[:, 30:, 1] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    crops = torch.as_tensor(augment_eval([buffer.getvalue()], image_size=64, ten_crop=True))
    preprocessing = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    got = class_probabilities(ColourMean(), crops, preprocessing, "cpu", ten_crop=True)[0]
    expected = torch.zeros(3)
    for red_columns, count in ((30, 4), (21, 4), (26, 2)):
        red = red_columns / 64
        expected += count / 10 * torch.softmax(20 * torch.tensor([red, 1 - red, 0.0]), dim=0)
    torch.testing.assert_close(got, expected)


# --------------------------------------------------------------------------- agreement


def val_batches(data_dir, image_size, mean, std, ten_crop):
    """Independent of the evaluation code (pyarrow + PIL + numpy), in row order: per image, its
    normalised crops (1 or 10, NCHW float) and its label."""
    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    for shard in manifest["splits"]["val"]["shards"]:
        table = pq.read_table(Path(data_dir) / shard["file"], columns=["jpeg", "label"])
        for jpeg, label in zip(table.column("jpeg").to_pylist(), table.column("label").to_pylist()):
            image = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32) / 255.0
            side, s = image.shape[0], image_size
            far, mid = side - s, (side - s) // 2
            origins = [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)] if ten_crop else [(mid, mid)]
            crops = [image[y:y + s, x:x + s] for y, x in origins]
            if ten_crop:
                crops += [c[:, ::-1] for c in crops]
            x = (torch.tensor(np.stack(crops)) - torch.tensor(mean)) / torch.tensor(std)
            yield x.permute(0, 3, 1, 2).contiguous(), label


def reference_predictions(model, data_dir, image_size, mean, std, ten_crop):
    """Labels and top-5 classes per image: the softmax averaged over the image's crops."""
    labels, top5 = [], []
    for x, label in val_batches(data_dir, image_size, mean, std, ten_crop):
        with torch.no_grad():
            probs = torch.softmax(model(x), dim=-1).mean(dim=0)
        labels.append(label)
        top5.append(probs.topk(5).indices.numpy())
    return np.array(labels), np.stack(top5)


@pytest.fixture(scope="module")
def varied(tiny_run, prepared_demo, tmp_path_factory):
    return varied_checkpoint(tiny_run, prepared_demo, tmp_path_factory.mktemp("varied") / "checkpoint")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("ten_crop", [False, True])
def test_evaluation_agrees_with_the_exported_model(ray_cluster, varied, prepared_demo, ten_crop):
    from alexnet_ray.eval.batch import evaluate

    checkpoint = varied
    result = evaluate(checkpoint, prepared_demo, ten_crop=ten_crop, batch_size=24, actors=2, progress=False,
                      keep_predictions=True)
    exported = exported_from_checkpoint(load_checkpoint(checkpoint), str(checkpoint))
    p = exported.preprocessing
    labels, top5 = reference_predictions(exported.build_model(), prepared_demo, p["image_size"], p["mean"], p["std"],
                                         ten_crop)
    assert len(np.unique(top5[:, 0])) >= 5, "degenerate test: the model predicts (almost) one class"
    assert result["images"] == len(labels) == 100
    np.testing.assert_array_equal(result["rows"], np.arange(100))  # every image exactly once
    np.testing.assert_array_equal(result["labels"], labels)
    np.testing.assert_array_equal(result["topk"][:, 0], top5[:, 0])
    np.testing.assert_array_equal(np.sort(result["topk"], axis=1), np.sort(top5, axis=1))
    assert result["top1_error"] == pytest.approx(1 - np.mean(top5[:, 0] == labels), abs=1e-12)
    assert result["top5_error"] == pytest.approx(1 - np.mean((top5 == labels[:, None]).any(axis=1)), abs=1e-12)
    assert result["ten_crop"] is ten_crop


# --------------------------------------------------------------------------- bad input


def run_job(capsys, name, *argv):
    code = load_job(name).main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_missing_checkpoint_is_one_clear_error(capsys, prepared_demo, tmp_path):
    code, out, err = run_job(capsys, "evaluate", str(tmp_path / "nowhere"), "--data", str(prepared_demo))
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("error: no checkpoint at")


def test_corrupt_checkpoint_is_one_clear_error(capsys, tiny_run, prepared_demo, tmp_path):
    copy = Path(shutil.copytree(tiny_run.checkpoint.path, tmp_path / "corrupt"))
    weights = copy / "checkpoint.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, out, err = run_job(capsys, "evaluate", str(copy), "--data", str(prepared_demo))
    assert code == 2
    assert err.strip().count("\n") == 0 and "is corrupt" in err and str(weights) in err


def test_dataset_with_other_classes_is_one_clear_error(capsys, tiny_run, prepared_demo, tmp_path):
    other = Path(shutil.copytree(prepared_demo, tmp_path / "other"))
    manifest = json.loads((other / "manifest.json").read_text())
    renamed = manifest["classes"][3]
    manifest["classes"][3] = "99_unicorn"
    (other / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = run_job(capsys, "evaluate", tiny_run.checkpoint.path, "--data", str(other))
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "do not match the checkpoint" in err and f"class 3 is '{renamed}'" in err and "99_unicorn" in err


def test_run_directory_resolves_to_its_latest_checkpoint(tiny_run):
    assert resolve_checkpoint(tiny_run.path).name == "checkpoint_epoch_0002"
    assert resolve_checkpoint(tiny_run.checkpoint.path) == Path(tiny_run.checkpoint.path)


@pytest.mark.ray
@pytest.mark.slow
def test_evaluate_job_equals_the_towers_evaluation_during_training(capsys, ray_cluster, tiny_run, prepared_demo):
    code, out, err = run_job(capsys, "evaluate", tiny_run.path, "--data", str(prepared_demo), "--batch-size", "32",
                             "--actors", "2")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])  # the last line is the JSON object
    trained = tiny_run.metrics  # the two-tower TowerParallel evaluation of the same weights, in training
    assert result["images"] == trained["val_images"] == 100
    assert result["top1_error"] == pytest.approx(trained["val_top1_error"], abs=1e-9)
    assert result["top5_error"] == pytest.approx(trained["val_top5_error"], abs=1e-9)
    assert result["loss"] == pytest.approx(trained["val_loss"], rel=1e-4)
    assert result["ten_crop"] is False and result["checkpoint"].endswith("checkpoint_epoch_0002")
    assert "100/100 images" in err  # the progress bar reached the end
