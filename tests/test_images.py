"""Image files: every damaged, huge or unusual file ends in one ImageError (one `error:` line from the
CLI), 16-bit grayscale is scaled instead of clipped, and a huge image is refused before decoding."""

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from conftest import needs_torch
from PIL import Image

from molmoact_edge.runtime.engine.images import MAX_IMAGE_PIXELS, ImageError, load_image
from molmoact_edge.runtime.engine.preprocess import as_rgb_uint8, preprocess_image


def _png_header_only(path, width, height):
    """A PNG that declares ``width`` x ``height`` 8-bit RGB pixels but holds almost no data: what a
    decompression bomb or a huge photo looks like before it is decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def gray16(tmp_path):
    """A 16-bit grayscale PNG; its expected 8-bit values are round(v * 255 / 65535), by definition
    of the PNG sample scale (not taken from our code)."""
    values = np.array([[0, 257, 32768, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    expected = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    return path, expected


def test_sixteen_bit_png_is_scaled_not_clipped(gray16):
    path, expected = gray16
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # the decoder really gives 16-bit samples
        image = as_rgb_uint8(im)
    assert image.shape == (2, 4, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, np.repeat(expected[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(load_image(path), image)


def test_eight_bit_files_load_as_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgb.png"), rgb)
    np.testing.assert_array_equal(load_image(tmp_path / "gray.png"), np.repeat(rgb[:, :, :1], 3, axis=2))


def test_truncated_jpeg_is_refused(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8)).save(buf, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="cut.jpg could not be decoded .*truncated or corrupt"):
        load_image(path)


def test_image_above_the_pixel_limit_is_refused_before_decoding(tmp_path):
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    path = _png_header_only(tmp_path / "huge.png", side, side)
    with pytest.raises(ImageError, match="megapixels, above the limit of 40 megapixels"):
        load_image(path)


def test_decompression_bomb_is_refused(tmp_path):
    path = _png_header_only(tmp_path / "bomb.png", 30000, 30000)  # 900 MP: PIL's own bomb check fires
    with pytest.raises(ImageError, match="bomb.png"):
        load_image(path)


def test_huge_array_is_refused_before_preprocessing(checkpoint_a):
    from molmoact_edge.runtime.engine.config import ImageProcessorConfig

    huge = np.broadcast_to(np.zeros((1, 1, 3), dtype=np.uint8), (12000, 12000, 3))  # no memory behind it
    with pytest.raises(ImageError, match="12000 x 12000 = 144.0 megapixels"):
        preprocess_image(huge, ImageProcessorConfig.load(checkpoint_a), max_crops=8)


def test_out_of_memory_while_decoding_is_one_error(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "ok.png")

    def no_memory(self):
        raise MemoryError
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_memory)
    with pytest.raises(ImageError, match="not enough memory to decode image"):
        load_image(tmp_path / "ok.png")


def test_not_an_image_and_missing_file(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(ImageError, match="not an image file"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "absent.png")


@needs_torch
@pytest.mark.parametrize("kind", ["truncated", "bomb", "huge"])
def test_generate_reports_a_bad_image_in_one_line(kind, tmp_path, checkpoint_a):
    if kind == "truncated":
        buf = io.BytesIO()
        Image.fromarray(np.full((64, 64, 3), 9, dtype=np.uint8)).save(buf, format="JPEG")
        path = tmp_path / "x.jpg"
        path.write_bytes(buf.getvalue()[:300])
    else:
        side = 30000 if kind == "bomb" else 7000
        path = _png_header_only(tmp_path / "x.png", side, side)
    proc = subprocess.run([sys.executable, "-m", "molmoact_edge", "generate", "--checkpoint", str(checkpoint_a),
                           "--image", str(path), "--instruction", "close the box"],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], proc.stderr


def test_out_of_memory_while_preprocessing_is_one_error(checkpoint_a, monkeypatch):
    from molmoact_edge.runtime.engine import preprocess
    from molmoact_edge.runtime.engine.config import ImageProcessorConfig

    def no_memory(*args):
        raise MemoryError
    monkeypatch.setattr(preprocess, "resize_bilinear_uint8", no_memory)
    with pytest.raises(ImageError, match=r"not enough memory to preprocess images of sizes \[\(480, 640, 3\)\]"):
        preprocess.preprocess_images([np.zeros((480, 640, 3), dtype=np.uint8)],
                                     ImageProcessorConfig.load(checkpoint_a), multi=False)
