"""Every encoding a host ships decodes as a viewer shows it (pipeline/images.py, the one decoding path)."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import CompetitionConfig
from pipeline.data import load_prepared
from pipeline.images import BACKGROUND, decode_image
from pipeline.prepare import prepare
from tests.conftest import write_competition


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_16_bit_greyscale_png_is_scaled_by_its_bit_depth_not_clipped():
    values = np.array([[0, 257, 1000, 4095], [20000, 32768, 50000, 65535]] * 2, dtype=np.uint16)
    data = _bytes(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    pixels, size = decode_image(data, 4, "squash")
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert pixels.shape == (4, 4, 3) and size == (4, 4)
    np.testing.assert_array_equal(pixels[..., 0], expected)  # clipping would make 1000 and up all 255
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_a_jpeg_with_exif_orientation_6_is_turned_upright():
    stored = np.zeros((8, 16, 3), np.uint8)  # 16 wide, 8 high: the top half bright, as the sensor stored it
    stored[:4] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = _bytes(Image.fromarray(stored), "JPEG", exif=exif, quality=95)
    pixels, original = decode_image(data, 16, "squash")
    assert original == (16, 8)  # as stored
    upright = np.rot90(stored, k=-1)  # what a viewer shows: 8 wide, 16 high, the bright half on the right
    assert upright[:, 4:].mean() == 255 and upright[:, :4].mean() == 0
    assert pixels[:, 10:].mean() > 200 and pixels[:, :6].mean() < 50  # unturned, both halves would be ~128


def test_transparency_is_composited_on_white():
    rgba = np.array([[[10, 20, 30, 0], [200, 0, 0, 255], [0, 0, 0, 128], [0, 100, 0, 255]]], np.uint8)
    rgba = np.repeat(rgba, 4, axis=0)  # 4 x 4
    pixels, _ = decode_image(_bytes(Image.fromarray(rgba, "RGBA"), "PNG"), 4, "squash")
    assert tuple(pixels[0, 0]) == BACKGROUND == (255, 255, 255)  # fully transparent: the background
    assert tuple(pixels[0, 1]) == (200, 0, 0) and tuple(pixels[0, 3]) == (0, 100, 0)  # opaque: as is
    assert np.abs(pixels[0, 2].astype(int) - 127).max() <= 1  # half transparent black over white
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    palette.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    data = _bytes(palette, "PNG", transparency=0)  # colour 0 (blue) is transparent
    pixels, _ = decode_image(data, 2, "squash")
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[0, 1]) == (255, 0, 0)


def test_cmyk_jpeg_webp_and_the_first_page_of_a_tiff():
    cyan = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    pixels, _ = decode_image(_bytes(cyan, "JPEG", quality=95), 8, "squash")
    assert np.abs(pixels.reshape(-1, 3).mean(0) - (0, 255, 255)).max() < 8
    rgb = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    pixels, _ = decode_image(_bytes(Image.fromarray(rgb), "WEBP", lossless=True), 8, "squash")
    np.testing.assert_array_equal(pixels, rgb)
    first, second = Image.new("RGB", (8, 8), (10, 200, 30)), Image.new("RGB", (8, 8), (250, 0, 0))
    data = _bytes(first, "TIFF", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    pixels, _ = decode_image(data, 8, "squash")
    assert (pixels.reshape(-1, 3) == (10, 200, 30)).all()


def test_float_tiff_in_0_1_is_scaled_by_255_and_other_floats_by_their_range():
    unit = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    pixels, _ = decode_image(_bytes(Image.fromarray(unit, "F"), "TIFF"), 2, "squash")
    np.testing.assert_array_equal(pixels[..., 0], np.rint(unit * 255).astype(np.uint8))
    hounsfield = np.array([[-1000.0, 0.0], [1000.0, 3000.0]], np.float32)
    pixels, _ = decode_image(_bytes(Image.fromarray(hounsfield, "F"), "TIFF"), 2, "squash")
    np.testing.assert_array_equal(pixels[..., 0], [[0, 64], [128, 255]])


@pytest.mark.parametrize("data, reason", [(b"", "empty file"), (b"not an image", "cannot decode")])
def test_undecodable_bytes_say_why(data, reason):
    with pytest.raises(ValueError, match=reason):
        decode_image(data, 4, "squash")


def test_prepare_decodes_through_it(tmp_path):
    comp = write_competition(tmp_path / "comp", n_per_class=4, ext=".png")
    Image.fromarray(np.full((12, 12), 1000, np.uint16)).save(comp / "train/tr0000.png")  # 16-bit: 1000 of 65535
    clear = np.zeros((12, 12, 4), np.uint8)  # fully transparent: white, not black
    Image.fromarray(clear, "RGBA").save(comp / "train/tr1000.png")
    prepare(CompetitionConfig(source=str(comp)), image_size=12, n_folds=2, seed=0, out_dir=tmp_path / "p", workers=1)
    data = load_prepared(tmp_path / "p")
    row = dict(zip(data.train["id"], range(len(data.train))))
    assert (data.train_images[row["tr0000"]] == round(1000 * 255 / 65535)).all()  # 4, where clipping gave 255
    assert (data.train_images[row["tr1000"]] == 255).all()
