"""Decoding real image files of every common flavour into uint8 RGB."""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from medx.data.io import (
    MIN_SIDE,
    BadImageError,
    check_images,
    find_images,
    list_images,
    pixel_digest,
    read_gray,
    read_image,
    verify_images,
)

RED_BGR = (0, 0, 255)  # cv2.imwrite takes BGR


def write(path: Path, array: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), array), path
    return path


def gradient(height: int = 16, width: int = 16) -> np.ndarray:
    """A uint8 gray ramp 0..240, so any channel mix-up or rescaling shows."""
    return np.tile(np.arange(width, dtype=np.uint8) * 16, (height, 1))


def test_8bit_gray_png_becomes_three_equal_channels(tmp_path: Path) -> None:
    img = read_image(write(tmp_path / "gray.png", gradient()))

    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(img[:, :, channel], gradient())


def test_16bit_gray_png_is_windowed_to_the_full_8bit_range(tmp_path: Path) -> None:
    # 12-bit detector data in a 16-bit container: 0..4095, which /257 would make near-black.
    ramp = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (16, 1))
    img = read_image(write(tmp_path / "xray16.png", ramp))

    assert img.shape == (16, 64, 3) and img.dtype == np.uint8
    assert img.min() == 0 and img.max() == 255
    assert np.all(np.diff(img[0, :, 0].astype(int)) >= 0)  # order kept
    np.testing.assert_array_equal(img[0, :, 0], np.round(ramp[0] / 4095 * 255))


def test_constant_16bit_image_maps_to_zeros(tmp_path: Path) -> None:
    img = read_image(write(tmp_path / "flat16.png", np.full((16, 16), 1000, np.uint16)))

    assert img.dtype == np.uint8 and not img.any()


def test_float_tiff_is_windowed_like_16bit(tmp_path: Path) -> None:
    values = np.linspace(-1000.0, 3000.0, 320, dtype=np.float32).reshape(16, 20)  # CT in HU
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
    bgr = np.dstack([gradient(), gradient()[::-1], np.full((16, 16), 7, np.uint8)])
    img = read_image(write(tmp_path / f"colour{suffix}", bgr))

    np.testing.assert_array_equal(img, bgr[:, :, ::-1])


def test_rgba_png_drops_alpha_without_blending(tmp_path: Path) -> None:
    bgra = np.zeros((16, 16, 4), np.uint8)
    bgra[:, :, :3] = RED_BGR
    bgra[:, :, 3] = 7  # nearly transparent: must not darken the pixels
    img = read_image(write(tmp_path / "rgba.png", bgra))

    assert img.shape == (16, 16, 3)
    np.testing.assert_array_equal(img[0, 0], [255, 0, 0])


def test_gray_plus_alpha_png_becomes_gray_rgb(tmp_path: Path) -> None:
    path = tmp_path / "gray_alpha.png"
    Image.fromarray(np.dstack([gradient(), np.full((16, 16), 30, np.uint8)])).save(path)  # LA
    img = read_image(path)

    assert img.shape == (16, 16, 3)
    for channel in range(3):
        np.testing.assert_array_equal(img[:, :, channel], gradient())


def test_read_gray_gives_hxw_uint8(tmp_path: Path) -> None:
    mask = np.zeros((20, 24), np.uint8)
    mask[4:16, 6:18] = 255
    np.testing.assert_array_equal(read_gray(write(tmp_path / "mask.png", mask)), mask)

    colour = np.zeros((16, 16, 3), np.uint8)
    colour[:] = (255, 255, 255)
    gray = read_gray(write(tmp_path / "white.png", colour))
    assert gray.shape == (16, 16) and gray.dtype == np.uint8 and np.all(gray == 255)

    ramp16 = np.tile(np.array([0, 4095], np.uint16), (16, 8))
    expected = np.tile(np.array([0, 255], np.uint8), (16, 8))
    np.testing.assert_array_equal(read_gray(write(tmp_path / "ramp16.png", ramp16)), expected)


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
    path = write(tmp_path / "padded.jpg", np.full((16, 16, 3), 128, np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00" * 100)

    assert read_image(path).shape == (16, 16, 3)


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


def test_list_images_is_sorted_flat_case_insensitive_and_skips_hidden(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    names = ["b.PNG", "a.jpeg", "c.Tif", ".hidden.png", "._a.jpeg", "notes.txt", "d.gif", "e.WebP"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deeper.png").write_bytes(b"x")
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / "gone.png").symlink_to(tmp_path / "deleted.png")
    skipped: Counter[str] = Counter()

    with caplog.at_level(logging.WARNING, logger="medx.data.io"):
        found = list_images(tmp_path, skipped)

    assert [p.name for p in found] == ["a.jpeg", "b.PNG", "c.Tif", "d.gif", "e.WebP"]
    assert skipped == {"broken_symlink": 1, "other_type": 1, "subfolder": 1}
    # one line: what was skipped, why, how many, which (hidden files and __MACOSX unmentioned)
    (record,) = caplog.records
    assert "Skipped 3 of 8 entries" in record.getMessage()
    for said in ("1 broken symlink", "gone.png", "notes.txt", "1 subfolder", "sub"):
        assert said in record.getMessage()
    assert "__MACOSX" not in record.getMessage() and ".hidden" not in record.getMessage()


def test_find_images_does_not_enter_hidden_or_macosx_folders(tmp_path: Path) -> None:
    for rel in ["a/x.png", "a/b/y.jpg", "__MACOSX/a/._x.png", "__MACOSX/a/x.png", ".git/z.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")

    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == [
        "a/b/y.jpg",
        "a/x.png",
    ]


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


def test_image_under_the_minimum_size_is_refused_with_the_minimum(tmp_path: Path) -> None:
    one = write(tmp_path / "one_pixel.png", np.full((1, 1), 200, np.uint8))
    thin = write(tmp_path / "thin.png", np.full((15, 400), 200, np.uint8))
    write(tmp_path / "smallest.png", np.full((MIN_SIDE, MIN_SIDE), 200, np.uint8))

    with pytest.raises(BadImageError, match=r"one_pixel\.png is too small \(1x1 px\).*16x16"):
        read_image(one)
    with pytest.raises(BadImageError, match=r"thin\.png is too small \(400x15 px\)"):
        read_gray(thin)
    assert read_image(tmp_path / "smallest.png").shape == (16, 16, 3)


def test_webp_and_gif_are_read(tmp_path: Path) -> None:
    bgr = np.dstack([gradient(32, 32), gradient(32, 32).T, np.full((32, 32), 90, np.uint8)])
    webp = tmp_path / "lossless.webp"
    assert cv2.imwrite(str(webp), bgr, [cv2.IMWRITE_WEBP_QUALITY, 101])  # 101: lossless
    gif = tmp_path / "animated.gif"
    frames = [Image.fromarray(gradient(32, 32)), Image.fromarray(255 - gradient(32, 32))]
    frames[0].save(gif, save_all=True, append_images=frames[1:])

    np.testing.assert_array_equal(read_image(webp), bgr[:, :, ::-1])
    np.testing.assert_array_equal(read_gray(gif), gradient(32, 32))  # the first frame


# Real JPEGs broken the ways files break: $MEDX_DATA chest X-rays, 224x224, about 7 KB each.


def _real_jpegs(medx_data: Path, n: int) -> list[Path]:
    paths = list_images(medx_data / "chest_xray" / "train" / "NORMAL")[:n]
    assert len(paths) == n, "expected Kermany chest X-rays in $MEDX_DATA"
    return paths


def _zeroed_mid_scan(source: Path, target: Path, count: int = 2000) -> Path:
    """``count`` bytes zeroed in the middle of the file: in the scan, end marker intact."""
    data = bytearray(source.read_bytes())
    mid = len(data) // 2
    data[mid - count // 2 : mid + count // 2] = bytes(count)
    assert data.endswith(b"\xff\xd9")
    target.write_bytes(data)
    return target


def test_real_jpeg_with_bytes_zeroed_mid_scan_is_refused(medx_data: Path, tmp_path: Path) -> None:
    source = _real_jpegs(medx_data, 1)[0]
    corrupt = _zeroed_mid_scan(source, tmp_path / "zeroed.jpeg")
    # OpenCV alone gives pixels for it (only libjpeg's stderr says why they are wrong) ...
    pixels = cv2.imdecode(np.frombuffer(corrupt.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert pixels is not None and np.abs(pixels.astype(int) - cv2.imread(str(source))).mean() > 5

    # ... the verification pass refuses it, naming the file and the decoder's words
    with pytest.raises(BadImageError, match=r"zeroed\.jpeg is corrupt.*Corrupt JPEG data") as err:
        verify_images([source, corrupt], skip_bad=False)
    assert err.value.path == corrupt
    assert verify_images([source, corrupt, source], skip_bad=True) == [source, source]


def test_real_jpeg_with_bytes_after_its_end_marker_is_accepted(
    medx_data: Path, tmp_path: Path
) -> None:
    source = _real_jpegs(medx_data, 1)[0]
    trailer = tmp_path / "exported.jpeg"
    trailer.write_bytes(source.read_bytes() + np.random.default_rng(0).bytes(700))

    checked = check_images([source, trailer], skip_bad=False)
    assert checked.paths == [source, trailer]
    assert checked.digests[0] == checked.digests[1]  # the same pixels
    np.testing.assert_array_equal(read_image(trailer), read_image(source))


@pytest.mark.parametrize("kept", [0.99, 0.6, 0.05])
def test_real_jpeg_cut_short_is_refused_as_truncated(
    medx_data: Path, tmp_path: Path, kept: float
) -> None:
    data = _real_jpegs(medx_data, 1)[0].read_bytes()
    cut = tmp_path / "cut.jpeg"
    cut.write_bytes(data[: int(len(data) * kept)])

    with pytest.raises(BadImageError, match=r"cut\.jpeg is truncated"):
        verify_images([cut], skip_bad=False)


def test_corrupt_jpegs_are_found_among_many_while_other_threads_use_stderr(
    medx_data: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Decoder warnings are found per file though all threads share one stderr: other output
    passes through, and another thread's decoder warnings blame no file of the pass."""
    good = _real_jpegs(medx_data, 60)
    corrupt = [_zeroed_mid_scan(good[i], tmp_path / f"bad{i}.jpeg") for i in (5, 31, 57)]
    paths = list(good)
    for i, path in zip((5, 31, 57), corrupt, strict=True):
        paths.insert(i, path)
    elsewhere = _zeroed_mid_scan(good[0], tmp_path / "elsewhere.jpeg").read_bytes()
    stop = threading.Event()

    def other_thread() -> None:  # decodes a corrupt JPEG outside the pass, and talks
        while not stop.is_set():
            cv2.imdecode(np.frombuffer(elsewhere, np.uint8), cv2.IMREAD_COLOR)
            os.write(2, b"a line from another thread\n")

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        kept = verify_images(paths, skip_bad=True)
        kept_clean = verify_images(good, skip_bad=True)
    finally:
        stop.set()
        thread.join()

    assert kept == good and kept_clean == good
    assert "a line from another thread" in capfd.readouterr().err


def test_pixel_digest_sees_every_pixel_and_not_the_encoding(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)
    changed = image.copy()
    changed[13, 7, 1] ^= 1  # one bit, on a row the sampled SHA-256 does not read
    files = [write(tmp_path / f"same{s}", image) for s in (".png", ".bmp", ".tiff")]
    files.append(write(tmp_path / "changed.png", changed))

    digests = check_images(files, skip_bad=False).digests
    assert digests[0] == digests[1] == digests[2] == pixel_digest(image)
    assert digests[3] != digests[0]
    assert pixel_digest(image[:, :, 0]) != pixel_digest(image[:, :, 0].T.copy())
