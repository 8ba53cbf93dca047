"""Augmentation in numpy (no Ray): crops, flips, lighting, ten crops, determinism; device batch."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_ray.data.augment import (
    LIGHTING_STD, augment_eval, augment_train, lighting_offsets, row_uniforms, ten_crop_offsets, train_params,
)
from alexnet_ray.preprocess import to_model_input

EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
EIGVEC = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]],
                  np.float32)


def _png_bytes(pixels: np.ndarray) -> bytes:
    # Lossless stand-in for the stored JPEG so pixel positions can be checked exactly.
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _coordinate_image(size: int) -> np.ndarray:
    """Red channel = column, green = row: every crop reveals where it came from."""
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([x, y, np.full_like(x, 7)], axis=-1).astype(np.uint8)


def test_train_crops_stay_inside_and_flip_about_half():
    ids = np.arange(2000)
    ys, xs, flips, alphas = train_params(seed=3, epoch=1, row_ids=ids, stored_size=256, image_size=224)
    assert ys.min() == 0 and xs.min() == 0 and ys.max() == 32 and xs.max() == 32
    assert 0.45 < flips.mean() < 0.55
    assert abs(alphas.std() - LIGHTING_STD) < 0.01 and abs(alphas.mean()) < 0.01


@pytest.mark.parametrize("size", [32, 31])  # mirrored rows as 8-byte words, and byte by byte
def test_train_crop_and_flip_pixels(size):
    stored = _coordinate_image(40)
    jpegs = [_png_bytes(stored)] * 64
    ids = np.arange(64)
    images, lighting = augment_train(jpegs, ids, seed=1, epoch=0, image_size=size, eigval=EIGVAL, eigvec=EIGVEC)
    ys, xs, flips, _ = train_params(1, 0, ids, 40, size)
    assert images.shape == (64, size, size, 3) and images.dtype == np.uint8 and lighting.shape == (64, 3)
    for i in range(64):
        rows = images[i, :, 0, 1]
        assert list(rows) == list(range(ys[i], ys[i] + size))
        columns = list(images[i, 0, :, 0])
        expected = list(range(xs[i], xs[i] + size))
        assert columns == (expected[::-1] if flips[i] else expected)
        assert (images[i, :, :, 2] == 7).all()
    assert 0 < flips.sum() < 64


def test_stored_jpegs_decode_to_the_same_pixels_as_pil():
    """The loaders decode JPEGs with libjpeg-turbo straight into numpy; the pixels must be PIL's."""
    rng = np.random.default_rng(5)
    stored = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(16)]
    jpegs = []
    for pixels in stored:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        jpegs.append(memoryview(buffer.getvalue()))  # ShardIndex.read hands out memoryviews
    ids = np.arange(16)
    pil = []
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as image:
            pil.append(np.asarray(image.convert("RGB")))
    # Mirrored crops move rows as 8-, 4-, 2- or 1-byte words, whichever divides 3 * size.
    for size in (40, 44, 38, 41):
        images, _ = augment_train(jpegs, ids, seed=2, epoch=3, image_size=size, eigval=EIGVAL, eigvec=EIGVEC)
        ys, xs, flips, _ = train_params(2, 3, ids, 48, size)
        for i in range(16):
            crop = pil[i][ys[i]:ys[i] + size, xs[i]:xs[i] + size]
            np.testing.assert_array_equal(images[i], crop[:, ::-1] if flips[i] else crop)
        assert 0 < flips.sum() < 16
    centre = augment_eval(jpegs[:2], image_size=40)
    np.testing.assert_array_equal(centre[1], pil[1][4:44, 4:44])
    ten = augment_eval(jpegs[:2], image_size=44, ten_crop=True)
    for k, (y, x) in enumerate(ten_crop_offsets(48, 44)):
        np.testing.assert_array_equal(ten[1, k], pil[1][y:y + 44, x:x + 44])
        np.testing.assert_array_equal(ten[1, k + 5], pil[1][y:y + 44, x:x + 44][:, ::-1])


def test_same_seed_epoch_row_gives_same_augmentation_in_any_batch():
    stored = np.random.default_rng(0).integers(0, 256, (36, 36, 3), dtype=np.uint8)
    jpegs = [_png_bytes(stored)] * 10
    ids = np.arange(100, 110)
    whole, light = augment_train(jpegs, ids, seed=5, epoch=2, image_size=28, eigval=EIGVAL, eigvec=EIGVEC)
    part, part_light = augment_train(jpegs[3:7], ids[3:7], seed=5, epoch=2, image_size=28,
                                     eigval=EIGVAL, eigvec=EIGVEC)
    np.testing.assert_array_equal(whole[3:7], part)
    np.testing.assert_array_equal(light[3:7], part_light)
    other_epoch, _ = augment_train(jpegs, ids, seed=5, epoch=3, image_size=28, eigval=EIGVAL, eigvec=EIGVEC)
    other_seed = row_uniforms(6, 2, ids, 3)
    assert not np.array_equal(whole, other_epoch)
    assert not np.array_equal(row_uniforms(5, 2, ids, 3), other_seed)


def test_lighting_offsets_follow_the_pca_statistics():
    _, _, _, alphas = train_params(0, 0, np.arange(20000), 256, 224)
    offsets = lighting_offsets(alphas, EIGVAL, EIGVEC).astype(np.float64)
    # offset = eigvec @ (alpha * eigval): covariance eigvec diag((0.1 * eigval)^2) eigvec^T
    expected = EIGVEC @ np.diag((LIGHTING_STD * EIGVAL) ** 2) @ EIGVEC.T
    np.testing.assert_allclose(np.cov(offsets.T), expected, atol=2e-5)
    np.testing.assert_allclose(offsets.mean(0), 0, atol=1e-3)
    _, lighting = augment_train([_png_bytes(_coordinate_image(8))] * 2, np.arange(2), seed=0, epoch=0,
                                image_size=8, eigval=EIGVAL, eigvec=EIGVEC, pca_lighting=False)
    assert not lighting.any()


def test_ten_crop_geometry():
    stored = _coordinate_image(40)
    crops = augment_eval([_png_bytes(stored)], image_size=32, ten_crop=True)
    assert crops.shape == (1, 10, 32, 32, 3)
    assert ten_crop_offsets(40, 32) == [(0, 0), (0, 8), (8, 0), (8, 8), (4, 4)]
    for k, (y, x) in enumerate(ten_crop_offsets(40, 32)):
        np.testing.assert_array_equal(crops[0, k], stored[y:y + 32, x:x + 32])
        np.testing.assert_array_equal(crops[0, k + 5], stored[y:y + 32, x:x + 32][:, ::-1])
    centre = augment_eval([_png_bytes(stored)], image_size=32)
    np.testing.assert_array_equal(centre[0], crops[0, 4])


def test_to_model_input_normalises_and_applies_lighting():
    images = torch.tensor([[[[0, 128, 255]]], [[[255, 255, 255]]]], dtype=torch.uint8)  # (2,1,1,3)
    lighting = torch.tensor([[0.1, 0.0, -0.1], [0.0, 0.0, 0.0]])
    x = to_model_input(images, lighting, mean=[0.5, 0.5, 0.5], std=[0.25, 0.5, 1.0], device="cpu")
    assert x.shape == (2, 3, 1, 1) and x.dtype == torch.float32
    expected = (torch.tensor([0.0, 128 / 255, 1.0]) + torch.tensor([0.1, 0.0, -0.1]) - 0.5) / torch.tensor(
        [0.25, 0.5, 1.0])
    torch.testing.assert_close(x[0, :, 0, 0], expected)
    torch.testing.assert_close(x[1, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
    read_only = images.numpy().copy()
    read_only.flags.writeable = False  # as the loaders hand batches out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = to_model_input(read_only, lighting.numpy(), [0.5, 0.5, 0.5], [0.25, 0.5, 1.0], "cpu")
    torch.testing.assert_close(same, x)
    ten = torch.zeros((2, 10, 4, 4, 3), dtype=torch.uint8)
    assert to_model_input(ten, None, [0, 0, 0], [1, 1, 1], "cpu").shape == (20, 3, 4, 4)
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(images.float(), None, [0, 0, 0], [1, 1, 1], "cpu")


def test_decoder_buffer_grows_and_bad_jpegs_raise():
    rng = np.random.default_rng(9)
    small, large = (rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for s in (40, 56))
    jpegs = []
    for pixels in (small, large):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        jpegs.append(buffer.getvalue())
    centre = augment_eval(jpegs, image_size=32)  # the second image needs a larger buffer
    for i, data in enumerate(jpegs):
        with Image.open(io.BytesIO(data)) as image:
            pil = np.asarray(image)
        m = (pil.shape[0] - 32) // 2
        np.testing.assert_array_equal(centre[i], pil[m:m + 32, m:m + 32])
    with pytest.raises(OSError):  # a truncated JPEG: simplejpeg refuses it, PIL names the problem
        augment_eval([jpegs[0][:200]], image_size=32)
