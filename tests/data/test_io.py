"""Decoding real image files of every common flavour into uint8 RGB."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from medx.data.io import BadImageError, list_images, read_gray, read_image, verify_images

RED_BGR = (0, 0, 255)  # cv2.imwrite takes BGR


def write(path: Path, array: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), array), path
    return path


def gradient(height: int = 8, width: int = 16) -> np.ndarray:
    """A uint8 gray ramp 0..240, so any channel mix-up or rescaling shows."""
    return np.tile(np.arange(width, dtype=np.uint8) * 16, (height, 1))


def test_8bit_gray_png_becomes_three_equal_channels(tmp_path: Path) -> None:
    img = read_image(write(tmp_path / "gray.png", gradient()))

    assert img.shape == (8, 16, 3) and img.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(img[:, :, channel], gradient())


def test_16bit_gray_png_is_windowed_to_the_full_8bit_range(tmp_path: Path) -> None:
    # 12-bit detector data in a 16-bit container: 0..4095, which /257 would make near-black.
    ramp = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (4, 1))
    img = read_image(write(tmp_path / "xray16.png", ramp))

    assert img.shape == (4, 64, 3) and img.dtype == np.uint8
    assert img.min() == 0 and img.max() == 255
    assert np.all(np.diff(img[0, :, 0].astype(int)) >= 0)  # order kept
    np.testing.assert_array_equal(img[0, :, 0], np.round(ramp[0] / 4095 * 255))


def test_constant_16bit_image_maps_to_zeros(tmp_path: Path) -> None:
    img = read_image(write(tmp_path / "flat16.png", np.full((5, 5), 1000, np.uint16)))

    assert img.dtype == np.uint8 and not img.any()


def test_float_tiff_is_windowed_like_16bit(tmp_path: Path) -> None:
    values = np.linspace(-1000.0, 3000.0, 20, dtype=np.float32).reshape(4, 5)  # e.g. CT in HU
    img = read_image(write(tmp_path / "ct.tiff", values))

    assert img.dtype == np.uint8 and img.min() == 0 and img.max() == 255


def test_rgb_jpeg_comes_back_in_rgb_order(tmp_path: Path) -> None:
    red = np.zeros((16, 16, 3), np.uint8)
    red[:] = RED_BGR
    img = read_image(write(tmp_path / "red.jpg", red))

    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    r, g, b = (img[:, :, c].astype(int) for c in range(3))
    assert r.min() > 240 and g.max() < 15 and b.max() < 15  # JPEG is lossy, red stays red


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_lossless_formats_round_trip_exactly(tmp_path: Path, suffix: str) -> None:
    bgr = np.dstack([gradient(), gradient()[::-1], np.full((8, 16), 7, np.uint8)])
    img = read_image(write(tmp_path / f"colour{suffix}", bgr))

    np.testing.assert_array_equal(img, bgr[:, :, ::-1])


def test_rgba_png_drops_alpha_without_blending(tmp_path: Path) -> None:
    bgra = np.zeros((6, 6, 4), np.uint8)
    bgra[:, :, :3] = RED_BGR
    bgra[:, :, 3] = 7  # nearly transparent: must not darken the pixels
    img = read_image(write(tmp_path / "rgba.png", bgra))

    assert img.shape == (6, 6, 3)
    np.testing.assert_array_equal(img[0, 0], [255, 0, 0])


def test_gray_plus_alpha_png_becomes_gray_rgb(tmp_path: Path) -> None:
    path = tmp_path / "gray_alpha.png"
    Image.fromarray(np.dstack([gradient(), np.full((8, 16), 30, np.uint8)])).save(path)  # "LA"
    img = read_image(path)

    assert img.shape == (8, 16, 3)
    for channel in range(3):
        np.testing.assert_array_equal(img[:, :, channel], gradient())


def test_read_gray_gives_hxw_uint8(tmp_path: Path) -> None:
    mask = np.zeros((10, 12), np.uint8)
    mask[2:8, 3:9] = 255
    np.testing.assert_array_equal(read_gray(write(tmp_path / "mask.png", mask)), mask)

    colour = np.zeros((4, 4, 3), np.uint8)
    colour[:] = (255, 255, 255)
    gray = read_gray(write(tmp_path / "white.png", colour))
    assert gray.shape == (4, 4) and gray.dtype == np.uint8 and np.all(gray == 255)

    ramp16 = np.array([[0, 4095]], np.uint16)
    np.testing.assert_array_equal(read_gray(write(tmp_path / "ramp16.png", ramp16)), [[0, 255]])


def test_truncated_jpeg_is_a_bad_image_named_in_the_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    whole = write(tmp_path / "whole.jpg", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = whole.read_bytes()
    cut = tmp_path / "cut_in_half.jpg"
    cut.write_bytes(data[: len(data) // 2])

    with pytest.raises(BadImageError, match=r"cut_in_half\.jpg.*truncated") as err:
        read_image(cut)
    assert "skip_bad_images" in str(err.value)
    assert err.value.path == cut


def test_jpeg_with_zero_padding_after_its_end_marker_is_fine(tmp_path: Path) -> None:
    path = write(tmp_path / "padded.jpg", np.full((8, 8, 3), 128, np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00" * 100)

    assert read_image(path).shape == (8, 8, 3)


def test_text_file_named_png_is_a_bad_image(tmp_path: Path) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image\n")

    with pytest.raises(BadImageError, match=r"notes\.png"):
        read_image(fake)


def test_empty_file_is_a_bad_image(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpeg"
    empty.touch()

    with pytest.raises(BadImageError, match=r"empty\.jpeg.*empty"):
        read_gray(empty)


def test_list_images_is_sorted_flat_case_insensitive_and_skips_hidden(tmp_path: Path) -> None:
    for name in ["b.PNG", "a.jpeg", "c.Tif", ".hidden.png", "._a.jpeg", "notes.txt", "d.gif"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deeper.png").write_bytes(b"x")

    assert [p.name for p in list_images(tmp_path)] == ["a.jpeg", "b.PNG", "c.Tif"]


def test_verify_images_skips_and_logs_bad_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = [write(tmp_path / f"good{i}.png", gradient()) for i in range(3)]
    bad = tmp_path / "broken.png"
    bad.write_text("not a png")
    paths = [good[0], bad, good[1], good[2]]

    with caplog.at_level(logging.WARNING, logger="medx.data.io"):
        kept = verify_images(paths, skip_bad=True)

    assert kept == good
    assert "broken.png" in caplog.text
    assert "good0.png" not in caplog.text


def test_verify_images_raises_for_the_first_bad_file(tmp_path: Path) -> None:
    good = write(tmp_path / "good.png", gradient())
    first, second = tmp_path / "first_bad.jpg", tmp_path / "second_bad.jpg"
    first.write_text("junk")
    second.write_text("junk")

    with pytest.raises(BadImageError, match=r"first_bad\.jpg"):
        verify_images([good, first, second], skip_bad=False)


def test_real_chest_xrays_decode_to_224x224x3(medx_data: Path) -> None:
    folder = medx_data / "chest_xray" / "train" / "NORMAL"
    paths = list_images(folder)[:20]

    assert len(paths) == 20, f"expected chest X-rays in {folder}"
    for path in paths:
        img = read_image(path)
        assert img.shape == (224, 224, 3) and img.dtype == np.uint8, path
        assert img.std() > 10, f"{path} decoded to a nearly flat image"


def test_all_real_training_images_verify(medx_data: Path) -> None:
    train = medx_data / "chest_xray" / "train"
    paths = list_images(train / "NORMAL") + list_images(train / "PNEUMONIA")

    assert len(verify_images(paths, skip_bad=False)) == len(paths) == 5216
