"""predict: the same preprocessing as evaluation (a raw photo gets exactly the probabilities its
prepared row gets), the table and --json output, and one clear error per unreadable image."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from alexnet_ray.data.augment import augment_eval
from alexnet_ray.eval.predict import load_inference_model, predict_files
from alexnet_ray.eval.scoring import class_probabilities
from alexnet_ray.export import ExportError, export_checkpoint
from conftest import run_job



@pytest.fixture(scope="module")
def model_file(tiny_run, prepared_demo, tmp_path_factory):
    """An export whose predictions vary per image (see test_evaluate.varied_checkpoint)."""
    from test_evaluate import varied_checkpoint

    folder = tmp_path_factory.mktemp("predict")
    checkpoint = varied_checkpoint(tiny_run, prepared_demo, folder / "varied")
    export_checkpoint(checkpoint, folder / "varied.pt")
    return folder / "varied.pt"


def val_rows(prepared_demo, count):
    """(source file, stored JPEG) of the first `count` prepared validation rows. A row stores its
    image's name, class/file (the same whichever format held it); the demo tree keeps it under val/."""
    manifest = json.loads((prepared_demo / "manifest.json").read_text())
    table = pq.read_table(prepared_demo / manifest["splits"]["val"]["shards"][0]["file"], columns=["path", "jpeg"])
    paths = [f"{manifest['source']}/val/{path}" for path in table.column("path").to_pylist()]
    return list(zip(paths, table.column("jpeg").to_pylist()))[:count]


@pytest.mark.parametrize("ten_crop", [False, True])
def test_a_photo_gets_the_probabilities_of_its_prepared_row(model_file, prepared_demo, ten_crop):
    model = load_inference_model(model_file)
    rows = val_rows(prepared_demo, 3)
    results = predict_files(model, [path for path, _ in rows], ten_crop=ten_crop)
    crops = torch.as_tensor(augment_eval([jpeg for _, jpeg in rows], image_size=64, ten_crop=ten_crop))
    expected = class_probabilities(model, crops, model.preprocessing, "cpu", ten_crop)
    assert (expected[0] - expected[1]).abs().max() > 0.05  # the images really are told apart
    for result, probs in zip(results, expected):
        names = [name for name, _ in result["top5"]]
        assert names == [model.classes[int(i)] for i in probs.topk(5).indices]
        np.testing.assert_allclose([p for _, p in result["top5"]], probs.topk(5).values.numpy(), rtol=1e-5, atol=1e-7)


def test_checkpoint_directory_works_as_model(model_file, prepared_demo):
    path = val_rows(prepared_demo, 1)[0][0]
    from_checkpoint = predict_files(load_inference_model(model_file.parent / "varied"), [path])
    from_export = predict_files(load_inference_model(model_file), [path])
    assert from_checkpoint == from_export
    from_file = predict_files(load_inference_model(model_file.parent / "varied" / "checkpoint.pt"), [path])
    assert from_file == from_export


def test_json_lines_and_table(capsys, model_file, prepared_demo):
    paths = [path for path, _ in val_rows(prepared_demo, 2)]
    code, out, err = run_job(capsys, "predict", str(model_file), *paths, "--json")
    assert code == 0, err
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert [line["image"] for line in lines] == paths
    for line in lines:
        assert len(line["top5"]) == 5 and set(line) == {"image", "top5"}
        probs = [p for _, p in line["top5"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(isinstance(name, str) for name, _ in line["top5"])
    code, out, err = run_job(capsys, "predict", str(model_file), paths[0])
    assert code == 0
    table = out.strip().splitlines()
    assert table[0] == paths[0] and len(table) == 6
    assert table[1].strip().startswith("1.") and lines[0]["top5"][0][0] in table[1]


def test_unreadable_images_are_one_clear_error_each(capsys, model_file, prepared_demo, tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a JPEG")
    truncated = tmp_path / "truncated.jpg"
    buffer = io.BytesIO()
    Image.new("RGB", (80, 80), (200, 10, 10)).save(buffer, format="JPEG")
    truncated.write_bytes(buffer.getvalue()[:40])
    good = val_rows(prepared_demo, 1)[0][0]
    missing = tmp_path / "missing.jpg"
    code, out, err = run_job(capsys, "predict", str(model_file), str(garbage), good, str(truncated), str(missing), "--json")
    assert code == 1
    errors = err.strip().splitlines()
    assert len(errors) == 3
    assert errors[0] == f"error: cannot read image {garbage}: not an image"
    assert errors[1].startswith(f"error: cannot read image {truncated}: ")
    assert errors[2] == f"error: cannot read image {missing}: No such file or directory"
    assert [json.loads(line)["image"] for line in out.strip().splitlines()] == [good]


def test_missing_or_wrong_model_is_one_clear_error(capsys, tmp_path, prepared_demo):
    path = val_rows(prepared_demo, 1)[0][0]
    code, out, err = run_job(capsys, "predict", str(tmp_path / "nope.pt"), path)
    assert code == 2 and err.startswith("error: no model at") and err.strip().count("\n") == 0
    other = tmp_path / "other.pt"
    torch.save({"something": 1}, other)
    with pytest.raises(ExportError, match="is neither an exported model .* nor an alexnet-ray checkpoint"):
        load_inference_model(other)
    with pytest.raises(ExportError):
        load_inference_model(tmp_path / "nope.pt")
