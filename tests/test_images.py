"""load_rgb / probe_image on tiny images of every PIL mode and on broken files."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from bloodcell_lib.data.images import ImageLoadError, clamp_box, load_rgb, probe_image

WHITE = (255, 255, 255)


def save(path, image, fmt=None, **params):
    image.save(path, fmt, **params)
    return path


def jpeg_bytes(size=(32, 24)):
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def rgba_left_opaque_red(mode):
    """Left column opaque red, right column fully transparent, in ``mode`` (RGBA or LA)."""
    image = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    return image if mode == "RGBA" else image.convert("LA")


@pytest.mark.parametrize("mode, fmt, value, expected", [
    ("RGB", "PNG", (10, 20, 30), (10, 20, 30)),
    ("L", "PNG", 100, (100, 100, 100)),
    ("1", "PNG", 1, WHITE),
    ("CMYK", "TIFF", (0, 0, 0, 0), WHITE),
    ("CMYK", "JPEG", (0, 0, 0, 255), (0, 0, 0)),
    ("I;16", "PNG", 65535, WHITE),
    ("I;16", "PNG", 32896, (128, 128, 128)),  # 128 * 257: scaled, not clipped to 255
    ("I", "TIFF", 65535, WHITE),  # 32-bit container holding 16-bit data
    ("I", "TIFF", 200, (200, 200, 200)),  # 32-bit container holding 8-bit data
])
def test_modes_convert_to_rgb_with_correct_values(tmp_path, mode, fmt, value, expected):
    path = save(tmp_path / f"image.{fmt.lower()}", Image.new(mode, (4, 3), value), fmt)
    with Image.open(path) as raw:
        assert raw.mode == mode  # the file really holds the mode under test
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (4, 3)
    assert max(abs(a - b) for a, b in zip(image.getpixel((0, 0)), expected)) <= 2


def test_16bit_gradient_keeps_its_range(tmp_path):
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(16, 16)
    path = save(tmp_path / "ramp.png", Image.fromarray(ramp))
    values = np.asarray(load_rgb(path))[..., 0]
    assert values.min() == 0 and values.max() == 255
    assert len(np.unique(values)) > 200  # clipping would leave almost everything at 255


def test_float_image_is_stretched(tmp_path):
    path = save(tmp_path / "float.tiff", Image.fromarray(np.array([[-1.0, 0.0, 1.0]], dtype=np.float32)))
    assert [pixel[0] for pixel in np.asarray(load_rgb(path))[0]] == [0, 128, 255]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(tmp_path, mode):
    path = save(tmp_path / "alpha.png", rgba_left_opaque_red(mode))
    image = load_rgb(path)
    assert image.getpixel((1, 0)) == WHITE
    assert image.getpixel((0, 0)) == ((255, 0, 0) if mode == "RGBA" else (76, 76, 76))


def test_half_transparent_pixel_blends_with_white(tmp_path):
    path = save(tmp_path / "half.png", Image.new("RGBA", (1, 1), (0, 0, 0, 128)))
    assert load_rgb(path).getpixel((0, 0)) == (127, 127, 127)


def test_palette_with_transparent_index(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    path = save(tmp_path / "palette.png", image, transparency=1)
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    loaded = load_rgb(path)
    assert loaded.getpixel((0, 0)) == (0, 0, 255)
    assert loaded.getpixel((1, 0)) == WHITE


def test_palette_without_transparency(tmp_path):
    image = Image.new("P", (1, 1))
    image.putpalette([200, 10, 10] + [0] * 765)
    assert load_rgb(save(tmp_path / "palette.gif", image)).getpixel((0, 0)) == (200, 10, 10)


def test_box_crop_and_clamp(tmp_path):
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[2:5, 3:9] = 255
    path = save(tmp_path / "boxes.png", Image.fromarray(pixels))
    crop = load_rgb(path, box=(3, 2, 9, 5))
    assert crop.size == (6, 3) and np.asarray(crop).min() == 255
    assert load_rgb(path, box=(-5, -5, 4.2, 3)).size == (5, 3)  # clamped at 0, rounded outwards
    assert load_rgb(path, box=(15, 8, 99, 99)).size == (5, 2)


def test_box_outside_image_raises(tmp_path):
    path = save(tmp_path / "small.png", Image.new("RGB", (8, 8)))
    with pytest.raises(ImageLoadError, match="small.png.*outside"):
        load_rgb(path, box=(10, 10, 20, 20))


def test_clamp_box():
    assert clamp_box((1.5, -2, 7.2, 5), (6, 4)) == (1, 0, 6, 4)
    assert clamp_box((7, 0, 9, 4), (6, 4)) is None


def test_truncated_jpeg_raises_and_global_flag_untouched(tmp_path):
    data = jpeg_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.jpg: truncated"):
        load_rgb(path)
    size, reason = probe_image(path, full=False)  # cheap check still catches it
    assert size is None and "truncated" in reason
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_is_caught_by_cheap_probe(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40), dtype=np.uint8)).save(buffer, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[:-200])
    assert probe_image(path, full=False)[0] is None


@pytest.mark.parametrize("content, reason", [
    (b"just some text\n", "not an image: unknown format"),
    (b"\x00\x00\x00\x01Bud1\x00\x00\x10\x00", ".DS_Store"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "Git LFS pointer"),
    (b"", "empty file"),
])
def test_non_images_raise_with_file_and_reason(tmp_path, content, reason):
    path = tmp_path / "fake.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError) as caught:
        load_rgb(path)
    assert str(path) in str(caught.value) and reason in str(caught.value)
    assert isinstance(caught.value, ValueError) and caught.value.path == str(path)
    assert probe_image(path) == (None, caught.value.reason)


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="nothere.png: no such file"):
        load_rgb(tmp_path / "nothere.png")


def test_probe_reports_size(tmp_path):
    path = tmp_path / "ok.jpg"
    path.write_bytes(jpeg_bytes((32, 24)))
    assert probe_image(path) == ((32, 24), None)
    assert probe_image(path, full=False) == ((32, 24), None)


def test_loaded_image_is_independent_of_file(tmp_path):
    path = save(tmp_path / "rgb.png", Image.new("RGB", (3, 3), (1, 2, 3)))
    image = load_rgb(path)
    path.unlink()
    assert image.getpixel((2, 2)) == (1, 2, 3)
