"""Decode image files into what a backbone expects: uint8 RGB, HxWx3.

Medical images arrive as 8- or 16-bit, gray or colour, with or without alpha, and now and
then truncated by an interrupted copy or corrupted on the way. Everything here turns one file
into one well-defined array, or raises :class:`BadImageError` naming the file and saying what
to do, so that a bad file stops a run before training rather than at epoch 7.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np

from medx.data.decoder_warnings import map_watching_decoders
from medx.data.intensity import standardise
from medx.errors import DataError

log = logging.getLogger(__name__)

# .dcm/.dicom are DICOM (medx.data.dicom), as are extensionless files with the DICM marker.
IMAGE_SUFFIXES = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
    ".dcm",
    ".dicom",
)
# Smaller images carry no anatomy: a 1x1 or 8x8 file is an export or thumbnail gone wrong, and
# resizing it to the network's input would train on a smear. Quality features need only 3x3.
MIN_SIDE = 16
# Folders that are never data: macOS puts resource forks of every zipped file in __MACOSX/.
HIDDEN_FOLDERS = ("__MACOSX",)

# ANYDEPTH keeps 16-bit (and float) pixels instead of cutting them to 8 bits; ANYCOLOR keeps
# gray as one channel and colour as BGR. Unlike IMREAD_UNCHANGED, these flags let OpenCV apply
# the EXIF orientation (as every image viewer, and so every annotator, does) and drop the alpha
# channel in the decoder. Multi-page TIFFs and animated GIFs give their first page.
_DECODE_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_JPEG_SOS = 0xDA
_JPEG_BARE_MARKERS = frozenset({0x01, *range(0xD0, 0xDA)})  # TEM, RSTn, SOI, EOI: no length
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"  # the end chunk's type and its CRC, which never varies

_WHAT_TO_DO = "Delete or replace the file, or set data.skip_bad_images=true to skip bad images."


class BadImageError(DataError):
    """One image file cannot be decoded; the message names it and says what to do.

    The constructor takes the message alone (as ``Exception`` does), so that the error keeps
    its type when a PyTorch DataLoader worker re-raises it in the main process.
    """

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


class UnsupportedImageError(BadImageError):
    """A valid image of a kind medx does not read (a colour or multi-frame DICOM, a transfer
    syntax without a decoder): the message says what is not supported and what medx reads,
    so a service asks for another kind of image, not for the same file again."""


def with_hint(err: BaseException, hint: str) -> str:
    """The error's message with medx.train's "what to do" replaced by a command's own."""
    return str(err).replace(_WHAT_TO_DO, hint).strip()


def _bad(path: Path, problem: str, kind: type[BadImageError] = BadImageError) -> BadImageError:
    return kind(f"Image {path} {problem}. {_WHAT_TO_DO}", path)


def corrupt_image_error(path: Path, warning: str) -> BadImageError:
    """The error for a file whose decoder warned (medx.data.decoder_warnings) yet gave pixels."""
    return _bad(
        path, f'is corrupt: its decoder reported "{warning}", so part of its pixels are made up'
    )


def _truncation(data: bytes) -> str | None:
    """Say how a file that OpenCV refused is truncated, or None.

    A JPEG or PNG cut short (an interrupted download or copy) lacks its end: a JPEG has no
    end-of-image marker after its first scan, a PNG no IEND chunk. OpenCV 5 refuses such a
    file without saying why; this says why. (A build that decodes a cut JPEG makes libjpeg
    warn "Premature end of JPEG file", which the verification pass counts as an error.) Bytes
    after a complete image, a trailer some exporters append, are no truncation: OpenCV and
    every viewer ignore them.
    """
    if data.startswith(_JPEG_SOI):
        scan = _jpeg_first_scan(data)
        # Inside a scan every FF byte is stuffed (FF00), so no FFD9 but the real end marker can
        # follow the scan's start; an FFD9 before it ends an EXIF thumbnail, not the image.
        if scan is not None and data.rfind(_JPEG_EOI) < scan:
            return "is truncated (a JPEG without its end-of-image marker FFD9)"
    if data.startswith(_PNG_SIGNATURE) and data.rfind(_PNG_IEND) < 0:
        return "is truncated (a PNG without its IEND chunk)"
    return None


def _jpeg_first_scan(data: bytes) -> int | None:
    """Offset of the first start-of-scan marker, found by walking the segments before it (an
    EXIF segment may hold a whole thumbnail JPEG); the file's length when it ends before one,
    None when the segments do not parse (the decoder then says what is wrong)."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker == _JPEG_SOS:
            return pos
        elif marker in _JPEG_BARE_MARKERS:
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return len(data)


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


def _decode(
    path: Path, keep_depth: bool = False, max_pixels: int | None = None, data: bytes | None = None
) -> np.ndarray:
    """Read and decode one file to a uint8 array: HxW (gray) or HxWxC (BGR, BGRA, ...).

    ``max_pixels``: refuse a file that declares more pixels, before decoding (None: no
    limit); ``data``: the file's bytes when they are in memory (``path`` names it)."""
    from medx.data.dicom import is_dicom_file, read_dicom  # dicom.py imports this module
    from medx.data.limits import check_file

    if is_dicom_file(path, data):
        return read_dicom(path, max_pixels, data)  # uint8 HxW, by the DICOM pixel pipeline
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _bad(path, f"cannot be read ({exc.strerror or exc})") from exc
    if not data:
        raise _bad(path, "is empty (0 bytes)")
    if max_pixels is not None:
        check_file(BytesIO(data), path, max_pixels)
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), _DECODE_FLAGS)
    except cv2.error as exc:
        raise _bad(path, _truncation(data) or f"cannot be decoded ({exc.err})") from exc
    if img is None or img.size == 0:
        raise _bad(
            path,
            _truncation(data)
            or "cannot be decoded: it is not a PNG, JPEG, BMP, TIFF, WebP or GIF image, or it is "
            "corrupt",
        )
    return img if keep_depth else _to_uint8(img, path)


def _channels(img: np.ndarray, path: Path) -> int:
    if img.ndim == 2:
        return 1
    if img.ndim == 3 and img.shape[2] in (1, 2, 3, 4):
        return img.shape[2]
    raise _bad(path, f"has pixel array shape {img.shape}; expected 1 to 4 channels")


def _read(
    path: Path, keep_depth: bool = False, max_pixels: int | None = None, data: bytes | None = None
) -> tuple[np.ndarray, int]:
    """(decoded pixels, channels) of an image at least MIN_SIDE px on each side: uint8, or
    with `keep_depth` the decoder's own type (16-bit, float) for intensity standardisation."""
    img = _decode(path, keep_depth, max_pixels, data)
    channels = _channels(img, path)
    height, width = img.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise _bad(
            path,
            f"is too small ({width}x{height} px): medx reads images of at least "
            f"{MIN_SIDE}x{MIN_SIDE} px",
        )
    return img, channels


def _to_rgb(img: np.ndarray, channels: int) -> np.ndarray:
    if channels == 1:
        return cv2.cvtColor(img.reshape(img.shape[:2]), cv2.COLOR_GRAY2RGB)
    if channels == 2:
        return cv2.cvtColor(np.ascontiguousarray(img[:, :, 0]), cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)


def read_image(
    path: str | Path, intensity: str = "none", max_pixels: int | None = None
) -> np.ndarray:
    """Decode to uint8 RGB HxWx3. 8- or 16-bit; gray, gray+alpha, RGB/BGR or RGBA.

    Gray is repeated into three channels (backbones are pretrained on RGB); alpha is dropped,
    not blended, because it carries no anatomy. Raises BadImageError naming the file, also
    for an image under MIN_SIDE px on a side.

    Args:
        path: the image file (any format of IMAGE_SUFFIXES, or DICOM).
        intensity: a per-image standardisation (`medx.data.intensity`) applied to the pixels
            at their full depth, before the 8-bit conversion.
        max_pixels: refuse the file (medx.data.limits.TooManyPixels) when any size it
            declares (image header, DICOM header, DICOM codestream) exceeds this many
            pixels, before any decoder allocates; None, as for training data: no limit.
    """
    return _image(Path(path), intensity, max_pixels, None)


def read_image_bytes(
    data: bytes, name: str | Path, intensity: str = "none", max_pixels: int | None = None
) -> np.ndarray:
    """read_image for a file already in memory (an upload): ``name`` is how errors name it,
    and its suffix says whether it is DICOM as for a file (else the DICM marker does)."""
    return _image(Path(name), intensity, max_pixels, bytes(data))


def _image(path: Path, intensity: str, max_pixels: int | None, data: bytes | None) -> np.ndarray:
    if intensity in (None, "none"):
        return _to_rgb(*_read(path, False, max_pixels, data))
    img, channels = _read(path, True, max_pixels, data)
    if img.dtype.kind == "f" and not np.isfinite(img).all():
        raise _bad(path, "contains NaN or infinite pixel values")
    gray = standardise(img[..., 0] if channels == 2 else img, intensity)
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)


def read_gray(path: str | Path) -> np.ndarray:
    """Decode to uint8 gray HxW, by the same rules as read_image (masks, quality features).

    Colour is converted with the usual luma weights. An 8-bit mask keeps its values (0/1 stays
    0/1, 0/255 stays 0/255); a 16-bit one is windowed like any 16-bit image.
    """
    img, channels = _read(Path(path))
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
    img, channels = _read(path)
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


def list_images(folder: Path, skipped: Counter[str] | None = None) -> list[Path]:
    """Image files directly in ``folder`` (not in subfolders), sorted by name.

    Suffixes are matched case-insensitively (``.JPG`` counts); hidden files such as macOS
    ``._x.jpg`` resource forks and ``.DS_Store`` are skipped, as they are not images. DICOM
    files count, with or without extension (see is_image_file). Anything else that is passed
    over (a broken symlink, another file type, a subfolder) is logged with its reason, and
    counted by reason into ``skipped`` when given.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"Image folder {folder} does not exist or is not a folder; check the path.")
    return _images_among(folder.iterdir(), folder, skipped)


def find_images(folder: Path, skipped: Counter[str] | None = None) -> list[Path]:
    """Image files anywhere under ``folder``, sorted; hidden folders and ``__MACOSX/`` are not
    entered. What is passed over is logged and counted as by list_images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of images; check the path.")
    files = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_hidden(Path(d))]
        files += [Path(parent, name) for name in names]
    return _images_among(files, folder, skipped)


def is_hidden(path: Path) -> bool:
    """Dot files and folders (``.DS_Store``, ``._x.jpg``, ``.git``) and ``__MACOSX``: never
    data, never reported."""
    return path.name.startswith(".") or path.name in HIDDEN_FOLDERS


# Why a file in an image folder is not read; the keys are the MLflow param names.
SKIP_REASONS = {
    "broken_symlink": "broken symlink (its target does not exist)",
    "not_a_file": "not a regular file",
    "subfolder": "subfolder (images must sit directly in the class folder)",
    "other_type": "not an image type medx reads (" + ", ".join(IMAGE_SUFFIXES) + ")",
}


def _images_among(paths: Iterable[Path], folder: Path, skipped: Counter[str] | None) -> list[Path]:
    """The image files among ``paths`` (entries of ``folder``), sorted; the rest reported."""
    found: list[Path] = []
    passed_over: dict[str, list[Path]] = {}
    for path in paths:
        if is_image_file(path):
            found.append(path)
        elif not is_hidden(path):
            passed_over.setdefault(_skip_reason(path), []).append(path)
    _report_skipped(folder, passed_over, len(found), skipped)
    return sorted(found)


def _skip_reason(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return "broken_symlink"
    if path.is_dir():
        return "subfolder"
    if not path.is_file():
        return "not_a_file"
    return "other_type"


def _report_skipped(
    folder: Path, passed_over: dict[str, list[Path]], kept: int, skipped: Counter[str] | None
) -> None:
    """One warning per folder: what was passed over, why, how many, a few names."""
    if not passed_over:
        return
    total = sum(len(paths) for paths in passed_over.values())
    parts = []
    for reason, paths in sorted(passed_over.items()):
        names = ", ".join(sorted(p.name for p in paths)[:3]) + (", ..." if len(paths) > 3 else "")
        parts.append(f"{len(paths)} {SKIP_REASONS[reason]}: {names}")
        if skipped is not None:
            skipped[reason] += len(paths)
    log.warning("Skipped %d of %d entries in %s: %s", total, total + kept, folder, "; ".join(parts))


def is_image_file(path: Path) -> bool:
    """Whether medx reads ``path`` as an image: a file with an image suffix, or DICOM.

    DICOM also covers files without extension (or named by a UID) that carry the DICM
    marker; hidden files (``._x.jpg``, ``.DS_Store``) never count.
    """
    from medx.data.dicom import is_dicom_file  # dicom.py imports this module

    path = Path(path)
    if is_hidden(path) or not path.is_file():
        return False
    return path.suffix.lower() in IMAGE_SUFFIXES or is_dicom_file(path)


@dataclass
class CheckedImages:
    """What one verification pass found: the good files in their order, the digest of each
    one's pixels (for the duplicate check: no second decode), and the bad files' errors."""

    paths: list[Path] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)
    bad: list[BadImageError] = field(default_factory=list)


def pixel_digest(pixels: np.ndarray) -> bytes:
    """16 bytes that tell pixel arrays apart, for medx.data.duplicates: equal pixels give equal
    digests however the files were encoded.

    A CRC-32 of every byte, and a SHA-256 of the shape, the type and every 8th row. Two
    different arrays collide only if they agree on every sampled row and, by a chance of one in
    four billion, on the CRC. On real chest X-rays this adds 15-25% to the decode time, SHA-256
    of every pixel 25-35% (both release the GIL, so they run in parallel in the pass).
    """
    pixels = np.ascontiguousarray(pixels)
    sampled = hashlib.sha256(f"{pixels.shape}{pixels.dtype.str}".encode())
    sampled.update(np.ascontiguousarray(pixels[::8]).data)
    return sampled.digest()[:12] + zlib.crc32(pixels.data).to_bytes(4, "big")


def _inspect(path: Path) -> BadImageError | bytes:
    """The digest of a file's pixels as decoded (alpha dropped), or the reason it has none."""
    try:
        img, channels = _read(path)
    except BadImageError as exc:
        return exc
    if channels == 2:  # gray + alpha
        img = img[:, :, 0]
    elif channels == 4:
        img = img[:, :, :3]
    return pixel_digest(img)


def _itself(path: Path) -> tuple[Path]:
    return (path,)


def check_images(paths: Sequence[Path], skip_bad: bool) -> CheckedImages:
    """Decode every file once so that a bad file fails before training, not at epoch 7.

    Runs in a thread pool (cv2 releases the GIL while decoding) with decoder warnings watched:
    a JPEG that libjpeg calls corrupt is a bad image, though OpenCV returns pixels for it.
    ``skip_bad=False`` raises BadImageError for the first bad file in ``paths`` order;
    ``skip_bad=True`` logs a warning naming each bad file and keeps the good ones, in order.
    """
    paths = [Path(p) for p in paths]
    start = time.perf_counter()
    workers = min(32, (os.cpu_count() or 1) + 4)
    results, warned = map_watching_decoders(_inspect, paths, _itself, workers, "medx-verify")
    for i, (path, warning) in warned.items():
        results[i] = corrupt_image_error(path, warning)
    checked = CheckedImages()
    for path, result in zip(paths, results, strict=True):
        if isinstance(result, bytes):
            checked.paths.append(path)
            checked.digests.append(result)
        elif not skip_bad:
            raise result
        else:
            log.warning("Skipping bad image: %s", result)
            checked.bad.append(result)
    elapsed = time.perf_counter() - start
    if checked.bad:
        log.warning(
            "Skipped %d of %d images as bad (data.skip_bad_images=true)",
            len(checked.bad),
            len(paths),
        )
    log.info(
        "Verified %d images in %.1f s: %d good, %d bad",
        len(paths),
        elapsed,
        len(checked.paths),
        len(checked.bad),
    )
    return checked


def verify_images(paths: Sequence[Path], skip_bad: bool) -> list[Path]:
    """The good files of check_images, in their order."""
    return check_images(paths, skip_bad).paths
