"""A corpus of odd and broken files through the prepare job: convert what is an image, list the rest."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from alexnet_ray.data.images import BadImageError, convert_image
from alexnet_ray.data.prepare import prepare_dataset

pytestmark = pytest.mark.ray


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels in a few dozen bytes: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def _upright() -> np.ndarray:
    """48 wide x 32 high: top half red, bottom half blue."""
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:16, :, 0] = 255
    pixels[16:, :, 2] = 255
    return pixels


def _exif_rotated() -> bytes:
    # Store the picture turned 90 degrees counter-clockwise; orientation 6 says "rotate 90 CW to view".
    stored = Image.fromarray(_upright()).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def _corpus() -> tuple[dict[str, bytes], dict[str, str]]:
    """(valid but odd files, broken files -> expected reason prefix)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    good_jpeg = _encode(rgb, "JPEG")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    grey16 = Image.fromarray((np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    valid = {
        "cmyk.JPEG": _encode(rgb.convert("CMYK"), "JPEG"),
        "grayscale.JPEG": _encode(rgb.convert("L"), "JPEG"),
        "palette_transparent.png": _encode(palette, "PNG", transparency=0),
        "rgba.png": _encode(rgba, "PNG"),
        "grey_alpha.png": _encode(rgb.convert("LA"), "PNG"),
        "grey16.png": _encode(grey16, "PNG"),
        "bilevel.png": _encode(rgb.convert("1"), "PNG"),
        "exif_rotated.JPEG": _exif_rotated(),
        "png_named.JPEG": _encode(rgb, "PNG"),
        "animated.gif.JPEG": _encode(rgb.convert("P"), "GIF", save_all=True,
                                     append_images=[rgb.convert("P").rotate(90)]),
        "tiny_3x2.bmp": _encode(rgb.resize((3, 2)), "BMP"),
        "very_wide.webp": _encode(rgb.resize((400, 5)), "WEBP"),
    }
    broken = {
        "empty.JPEG": (b"", "empty file"),
        "truncated.JPEG": (good_jpeg[: len(good_jpeg) // 2], "truncated"),
        "random_bytes.JPEG": (rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not an image"),
        "notes.txt": (b"this is not a picture\n", "not an image"),
        "page.jpg": (b"<html><body>404 Not Found</body></html>", "not an image"),
        "bomb.png": (_png_header_only(60000, 60000), "decompression bomb"),
        "past_limit.png": (_png_header_only(9000, 8000), "decompression bomb"),
        "jpeg_header_garbage.JPEG": (b"\xff\xd8\xff\xe0" + bytes(200), "not an image"),
        "truncated.png": (valid["rgba.png"][:100], "truncated"),
    }
    return valid, {name: reason for name, (data, reason) in broken.items()}, \
        {name: data for name, (data, _) in broken.items()}


def test_corpus_through_prepare_converts_or_lists_every_file(ray_cluster, tmp_path):
    valid, reasons, broken = _corpus()
    src = tmp_path / "src"
    for folder, files in (("odd", valid), ("broken", broken)):
        (src / "train" / folder).mkdir(parents=True)
        for name, data in files.items():
            (src / "train" / folder / name).write_bytes(data)
    (src / "train" / "broken" / "good.jpg").write_bytes(_encode(Image.fromarray(_upright()), "JPEG"))

    manifest = prepare_dataset(src, tmp_path / "out", size=32, val_split="none")
    stored = pq.read_table(manifest.shard_paths("train")[0]).to_pylist()
    stored_names = sorted(Path(r["path"]).name for r in stored)
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest.skipped}
    found = len(valid) + len(broken) + 1
    assert manifest.splits["train"]["found"] == found
    assert manifest.splits["train"]["images"] + len(manifest.skipped) == found
    assert stored_names == sorted([*valid, "good.jpg"])
    assert sorted(skipped) == sorted(broken)
    for name, reason in reasons.items():
        assert skipped[name].startswith(reason), (name, skipped[name])
    by_name = {Path(r["path"]).name: np.asarray(Image.open(io.BytesIO(r["jpeg"]))) for r in stored}
    for name, pixels in by_name.items():
        assert pixels.shape == (32, 32, 3), name
    upright = by_name["exif_rotated.JPEG"].astype(int)
    assert upright[:8, :, 0].mean() > 200 and upright[:8, :, 2].mean() < 50  # red on top
    assert upright[-8:, :, 2].mean() > 200 and upright[-8:, :, 0].mean() < 50  # blue below
    grey16 = by_name["grey16.png"].astype(int)
    assert grey16.max() > 100 and (grey16[..., 0] == grey16[..., 1]).all()  # scaled, not clipped to 255


def test_fail_mode_names_the_file(ray_cluster, tmp_path):
    src = tmp_path / "src"
    (src / "train" / "a").mkdir(parents=True)
    (src / "train" / "a" / "fine.jpg").write_bytes(_encode(Image.fromarray(_upright()), "JPEG"))
    (src / "train" / "a" / "cut.JPEG").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(ValueError, match=r"cut\.JPEG.*--on-bad-image fail"):
        prepare_dataset(src, tmp_path / "out", size=16, on_bad_image="fail", val_split="none")
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_convert_image_rejects_with_reasons_without_ray():
    with pytest.raises(BadImageError, match="empty file"):
        convert_image(b"", 16)
    with pytest.raises(BadImageError, match="decompression bomb"):
        convert_image(_png_header_only(3000, 3000), 16, max_pixels=1_000_000)
    pixels = convert_image(_encode(Image.fromarray(_upright()), "PNG"), 16)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
