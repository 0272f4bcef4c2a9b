"""Decode image files into what a backbone expects: uint8 RGB, HxWx3.

Medical images arrive as 8- or 16-bit, gray or colour, with or without alpha, and now and
then truncated by an interrupted copy. Everything here turns one file into one well-defined
array, or raises :class:`BadImageError` naming the file and saying what to do, so that a bad
file stops a run before training rather than at epoch 7.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from medx.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# ANYDEPTH keeps 16-bit (and float) pixels instead of cutting them to 8 bits; ANYCOLOR keeps
# gray as one channel and colour as BGR. Unlike IMREAD_UNCHANGED, these flags let OpenCV apply
# the EXIF orientation (as every image viewer, and so every annotator, does) and drop the alpha
# channel in the decoder. Multi-page TIFFs give their first page.
_DECODE_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# How many bytes at the end of a file (after padding) may hold the end marker; a few bytes of
# trailer after it are tolerated, a file cut in the middle of its image data never matches.
_TAIL_BYTES = 32
_PADDING = b"\x00 \t\r\n"

_WHAT_TO_DO = "Delete or replace the file, or set data.skip_bad_images=true to skip bad images."


class BadImageError(DataError):
    """One image file cannot be decoded; the message names it and says what to do.

    The constructor takes the message alone (as ``Exception`` does), so that the error keeps
    its type when a PyTorch DataLoader worker re-raises it in the main process.
    """

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


def _bad(path: Path, problem: str) -> BadImageError:
    return BadImageError(f"Image {path} {problem}. {_WHAT_TO_DO}", path)


def _truncation(data: bytes) -> str | None:
    """Say how the file is truncated, or None.

    A JPEG or PNG cut short (interrupted download or copy) lacks its end marker. Some OpenCV
    builds decode such a JPEG with only a warning on stderr, giving an image whose lower part
    is gray; others fail with no reason given. Checking the marker is cheap and explicit.
    """
    # Only the last 64 KiB are looked at, so a large file is not copied; a file whose last
    # 64 KiB are all padding (a zero-filled, interrupted copy) has no marker and is truncated.
    tail = data[-65536:].rstrip(_PADDING)[-_TAIL_BYTES:]
    if data.startswith(_JPEG_SOI) and _JPEG_EOI not in tail:
        return "is truncated (a JPEG without its end-of-image marker FFD9)"
    if data.startswith(_PNG_SIGNATURE) and b"IEND" not in tail:
        return "is truncated (a PNG without its IEND chunk)"
    return None


def _to_uint8(img: np.ndarray, path: Path) -> np.ndarray:
    """Bring any pixel type to uint8.

    uint8 is kept as it is. Every other type (uint16, signed integers, float) is windowed to
    the image's own min..max into 0..255: 12-bit detector data in a 16-bit container uses only
    0..4095, so a fixed division by 257 would leave it near-black, and float images have no
    fixed range at all. A constant image maps to zeros. One outlier pixel compresses the
    rest; that is the price of a rule that needs no per-dataset calibration.
    """
    if img.dtype == np.uint8:
        return img
    if img.dtype.kind == "f" and not np.isfinite(img).all():
        raise _bad(path, "contains NaN or infinite pixel values")
    # NORM_MINMAX over all channels together keeps the colour balance; a constant image gets
    # scale 0 and so maps to 0. cv2 rounds and saturates, and releases the GIL while it works.
    return cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX, cv2.CV_8U)


def _decode(path: Path) -> np.ndarray:
    """Read and decode one file to a uint8 array: HxW (gray) or HxWxC (BGR, BGRA, ...)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror or exc})") from exc
    if not data:
        raise _bad(path, "is empty (0 bytes)")
    truncated = _truncation(data)
    if truncated:
        raise _bad(path, truncated)
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), _DECODE_FLAGS)
    except cv2.error as exc:
        raise _bad(path, f"cannot be decoded ({exc.err})") from exc
    if img is None or img.size == 0:
        raise _bad(
            path,
            "cannot be decoded: it is not a PNG, JPEG, BMP or TIFF image, or it is corrupt",
        )
    return _to_uint8(img, path)


def _channels(img: np.ndarray, path: Path) -> int:
    if img.ndim == 2:
        return 1
    if img.ndim == 3 and img.shape[2] in (1, 2, 3, 4):
        return img.shape[2]
    raise _bad(path, f"has pixel array shape {img.shape}; expected 1 to 4 channels")


def read_image(path: str | Path) -> np.ndarray:
    """Decode to uint8 RGB HxWx3. 8- or 16-bit; gray, gray+alpha, RGB/BGR or RGBA.

    Gray is repeated into three channels (backbones are pretrained on RGB); alpha is dropped,
    not blended, because it carries no anatomy. Raises BadImageError naming the file.
    """
    path = Path(path)
    img = _decode(path)
    channels = _channels(img, path)
    if channels == 1:
        return cv2.cvtColor(img.reshape(img.shape[:2]), cv2.COLOR_GRAY2RGB)
    if channels == 2:
        return cv2.cvtColor(np.ascontiguousarray(img[:, :, 0]), cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)


def read_gray(path: str | Path) -> np.ndarray:
    """Decode to uint8 gray HxW, by the same rules as read_image (masks, quality features).

    Colour is converted with the usual luma weights. An 8-bit mask keeps its values (0/1 stays
    0/1, 0/255 stays 0/255); a 16-bit one is windowed like any 16-bit image.
    """
    path = Path(path)
    img = _decode(path)
    channels = _channels(img, path)
    if channels in (1, 2):
        return np.ascontiguousarray(img.reshape(img.shape[0], img.shape[1], -1)[:, :, 0])
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    return cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a binary mask to uint8 HxW of 0/1; anything else is a BadImageError naming it.

    Accepted: one channel holding only {0, 255} or only {0, 1}. A colour mask, or one with
    grey levels (saved as JPEG, or resized with interpolation), is rejected rather than
    thresholded: a silently wrong mask trains and scores a wrong model.
    """
    path = Path(path)
    img = _decode(path)
    channels = _channels(img, path)
    if channels != 1:
        raise _bad(
            path,
            f"is a mask with {channels} channels; save it as a single-channel (grayscale) PNG "
            "of 0/255 or 0/1",
        )
    mask = img.reshape(img.shape[:2])
    values = np.unique(mask)
    if set(values.tolist()) <= {0, 255}:
        return (mask > 0).astype(np.uint8)
    if set(values.tolist()) <= {0, 1}:
        return mask.astype(np.uint8)
    shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
    raise _bad(
        path,
        f"is a mask with values {{{shown}}}; masks must hold only 0/255 or only 0/1 "
        "(binarise it, and save it as PNG, not JPEG)",
    )


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (not in subfolders), sorted by name.

    Suffixes are matched case-insensitively (``.JPG`` counts); hidden files such as macOS
    ``._x.jpg`` resource forks and ``.DS_Store`` are skipped, as they are not images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"Image folder {folder} does not exist or is not a folder; check the path.")
    return sorted(
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def _problem(path: Path) -> BadImageError | None:
    try:
        _decode(path)
    except BadImageError as exc:
        return exc
    return None


def verify_images(paths: Sequence[Path], skip_bad: bool) -> list[Path]:
    """Decode every file once so that a bad file fails before training, not at epoch 7.

    Runs in a thread pool: cv2 releases the GIL while decoding. ``skip_bad=False`` raises
    BadImageError for the first bad file in ``paths`` order; ``skip_bad=True`` logs a warning
    naming each bad file and returns the good ones, in their original order.
    """
    paths = [Path(p) for p in paths]
    start = time.perf_counter()
    good: list[Path] = []
    bad: list[Path] = []
    workers = min(32, (os.cpu_count() or 1) + 4)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medx-verify")
    try:
        for path, problem in zip(paths, pool.map(_problem, paths), strict=True):
            if problem is None:
                good.append(path)
            elif not skip_bad:
                raise problem
            else:
                log.warning("Skipping bad image: %s", problem)
                bad.append(path)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    elapsed = time.perf_counter() - start
    if bad:
        log.warning(
            "Skipped %d of %d images as bad (data.skip_bad_images=true)", len(bad), len(paths)
        )
    log.info(
        "Verified %d images in %.1f s: %d good, %d bad", len(paths), elapsed, len(good), len(bad)
    )
    return good
