"""Reading an image for a model: a file, its bytes or an array, under the pixel limit, with the
model's per-image intensity step, into the model's input.

Every front door reads through here, so every one sees the same pixels: the declared size
is judged before anything is decoded (`check_size`, the one place that does), the file is
decoded by `medx.data.io.read_image` (DICOM's pixel pipeline included) with the card's
`input.intensity`, and `ModelInput` turns the pixels into what the network takes (a [0, 1]
tensor at its size, or the quality baseline's features). Errors name the input the way the
caller knows it (a path, an upload's name, a DataFrame row) and leave out the advice meant
for training data.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medx.data.intensity import standardise
from medx.data.io import BadImageError, find_images, read_image, with_hint
from medx.data.limits import TooManyPixels, check_declared_size, declared_sizes
from medx.data.transforms import ImageTransform
from medx.errors import DataError, MedxError

__all__ = [
    "MAX_PIXELS",
    "ModelInput",
    "PixelLimitError",
    "Source",
    "check_size",
    "declared_pixels",
    "find_inputs",
    "read",
]

MAX_PIXELS = 50_000_000  # larger images are refused before decoding (decompression bombs)
TYPES = "JPEG, PNG, BMP, TIFF, WebP or DICOM"

# What a model can be given: a file (path), its bytes, or decoded pixels (HxWx3 uint8 RGB).
Source = Union[str, Path, bytes, np.ndarray]  # noqa: UP007 (a runtime alias, for the docs)


# An image that declares more pixels than the limit, refused before any decoder allocates
# (raised by medx.data.limits, which reads every size a file declares: image headers, the
# DICOM header and its codestream's SIZ/SOF markers).
PixelLimitError = TooManyPixels


# --- inputs ---------------------------------------------------------------------------------


def find_inputs(path: str | Path, skipped: Counter[str] | None = None) -> list[Path]:
    """One image file, or every image file under a folder (recursively, hidden folders and
    `__MACOSX` left out), sorted. What a folder holds besides images (broken symlinks, other
    file types) is left out with a warning that counts it, as training does.

    Args:
        path: an image file or a folder.
        skipped: counts what was left out, by reason (`medx.data.io.SKIP_REASONS`).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"Input {path} does not exist; give an image file or a folder.")
    if path.is_file():
        return [path]
    found = find_images(path, skipped)
    if not found:
        raise DataError(f"{path} holds no images ({TYPES}), also in subfolders.")
    return found


# --- the size limit -------------------------------------------------------------------------


def declared_pixels(path: Path) -> int:
    """The most pixels any size the file declares adds up to (image headers, the DICOM header,
    a DICOM codestream), read without decoding (0: none declared)."""
    return max((size.pixels for size in declared_sizes(path)), default=0)


def check_size(path: Path, max_pixels: int) -> None:
    """Refuse a file that declares more than `max_pixels` pixels anywhere, before any decoder
    runs (PixelLimitError naming it, the size and where it is declared).

    Args:
        path: the file: its image header, or for DICOM its header and its codestream's own
            size (JPEG 2000 SIZ, JPEG SOF, JPEG-LS), are read without decoding.
        max_pixels: the limit (`--max-pixels`, default `MAX_PIXELS`, 50 M).
    """
    check_declared_size(path, max_pixels)


# --- reading --------------------------------------------------------------------------------


def read(
    source: Source, max_pixels: int = MAX_PIXELS, intensity: str = "none", name: str | None = None
) -> np.ndarray:
    """HxWx3 uint8 RGB pixels of one input, as the model's training data were decoded.

    Args:
        source: a file path, the bytes of a file (any type medx reads, told by its content),
            or decoded pixels (HxWx3 RGB or HxW gray, uint8).
        max_pixels: larger images are refused (PixelLimitError) before decoding.
        intensity: the model's per-image standardisation (its card's `input.intensity`).
        name: how errors name the input (default: its path; "image" for bytes and arrays).

    Raises:
        BadImageError: the input cannot be read; the message names it, one line.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels, intensity, name or "image")
    if isinstance(source, bytes | bytearray | memoryview):
        with _bytes_on_disk([bytes(source)]) as (path,):
            return _from_file(path, max_pixels, intensity, name or "image")
    return _from_file(Path(source), max_pixels, intensity, name)


def _from_file(path: Path | None, max_pixels: int, intensity: str, name: str | None) -> np.ndarray:
    if path is None:  # bytes with nothing in them
        raise BadImageError(f"{name}: no image bytes", None)
    try:
        return read_image(path, intensity, max_pixels=max_pixels)  # sizes checked first
    except BadImageError as err:
        raise _renamed(err, path, name) from err


def _renamed(err: BadImageError, path: Path, name: str | None) -> BadImageError:
    """The error without training advice, naming the input as the caller knows it."""
    message = with_hint(err, "")
    if name is not None:
        message = message.replace(str(path), name)
    shown = name if name is not None else str(path)
    message = message if shown in message else f"{shown}: {message}"
    if isinstance(err, PixelLimitError):
        return PixelLimitError(message, path, err.pixels, err.limit)
    return type(err)(message, path)  # an UnsupportedImageError stays one


def _from_array(image: np.ndarray, max_pixels: int, intensity: str, name: str) -> np.ndarray:
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    rgb_or_gray = image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
    if image.dtype != np.uint8 or not rgb_or_gray:
        raise BadImageError(
            f"{name}: an image array must be HxWx3 RGB or HxW gray uint8, not "
            f"{image.dtype} of shape {tuple(image.shape)}"
        )
    h, w = image.shape[:2]
    if h * w > max_pixels:
        raise PixelLimitError(
            f"{name} has {h * w / 1e6:.1f} megapixels, over --max-pixels {max_pixels / 1e6:.0f} M.",
            None,
            h * w,
            max_pixels,
        )
    rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image
    if intensity in (None, "none"):
        return np.ascontiguousarray(rgb)
    gray = standardise(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), intensity)  # as a decoded file
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)


@contextmanager
def _bytes_on_disk(blobs: Sequence[bytes]) -> Iterator[list[Path | None]]:
    """Each non-empty blob as a file without suffix (medx tells DICOM by its marker and the
    rest by content) in a temporary folder, removed afterwards; None for an empty one."""
    with tempfile.TemporaryDirectory(prefix="medx-bytes-") as folder:
        paths: list[Path | None] = []
        for i, blob in enumerate(blobs):
            if not blob:
                paths.append(None)
                continue
            path = Path(folder) / f"image{i}"
            path.write_bytes(blob)
            paths.append(path)
        yield paths


# --- the model's input ----------------------------------------------------------------------


class ModelInput:
    """Decoded pixels (HxWx3 uint8 RGB) → what the network takes (picklable for workers).

    Args:
        kind: "image" (a 3xSxS float tensor in [0, 1], `ImageTransform`) or "features" (the
            quality features of the gray image, `medx.quality.features`).
        size: the model's square input side (images only).
    """

    def __init__(self, kind: str = "image", size: int | None = None) -> None:
        if kind == "image" and not size:
            raise ValueError("an image model's input needs its size")
        self.kind, self.size = kind, size
        self.transform = ImageTransform(int(size)) if kind == "image" else None

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if self.transform is not None:
            return self.transform(image)
        from medx.quality.features import image_features

        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        return torch.as_tensor(image_features(gray), dtype=torch.float32)

    def blank(self) -> torch.Tensor:
        """A placeholder of the input's shape (the slot of an unreadable file in a batch)."""
        if self.transform is not None:
            return torch.zeros(3, int(self.size), int(self.size))
        from medx.quality.features import FEATURES

        return torch.zeros(len(FEATURES))


@dataclass
class Item:
    """One input on its way through a model: its name, where its pixels come from, the
    pixels decoded so far (by intensity method), and why it failed, if it did."""

    name: str
    path: Path | None = None
    array: np.ndarray | None = None
    error: str = ""
    size: tuple[int, int] | None = None  # (width, height) once decoded
    decoded: dict[str, np.ndarray] = field(default_factory=dict)

    def pixels(self, intensity: str, max_pixels: int) -> np.ndarray:
        """The pixels decoded with `intensity` (each way decoded once)."""
        if intensity not in self.decoded:
            source: Source | None = self.array if self.array is not None else self.path
            if source is None:
                raise BadImageError(f"{self.name}: no image bytes")
            name = None if self.array is None and self.name == str(self.path) else self.name
            self.decoded[intensity] = read(source, max_pixels, intensity, name)
        image = self.decoded[intensity]
        self.size = (int(image.shape[1]), int(image.shape[0]))
        return image


@contextmanager
def as_items(inputs: Sequence[Source], names: Sequence[str] | None = None) -> Iterator[list[Item]]:
    """One `Item` per input (bytes written to temporary files, removed afterwards).

    Args:
        inputs: paths, file bytes or pixel arrays.
        names: how results and errors name each input (default: its path, or "image N").
    """
    inputs = list(inputs)
    if names is None:
        names = [
            str(s) if isinstance(s, str | Path) else f"image {i}" for i, s in enumerate(inputs)
        ]
    if len(names) != len(inputs):
        raise ValueError(f"{len(names)} names for {len(inputs)} inputs")
    blobs = [bytes(s) if isinstance(s, bytes | bytearray | memoryview) else b"" for s in inputs]
    with _bytes_on_disk(blobs) as files:
        items = []
        for source, name, file in zip(inputs, names, files, strict=True):
            if isinstance(source, np.ndarray):
                items.append(Item(name, array=source))
            elif isinstance(source, bytes | bytearray | memoryview):
                items.append(Item(name, file, error="" if file else f"{name}: no image bytes"))
            else:
                items.append(Item(name, Path(source)))
        yield items


def describe(err: MedxError) -> str:
    """One line for a result's `error`: the message, without training advice."""
    return with_hint(err, "")


class _Files(Dataset):
    """Files → (model input, index, error message, height, width), in DataLoader workers."""

    def __init__(
        self, paths: Sequence[Path], model_input: ModelInput, max_pixels: int, intensity: str
    ) -> None:
        self.paths, self.model_input = list(paths), model_input
        self.max_pixels, self.intensity = max_pixels, intensity

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str, int, int]:
        try:
            image = read(self.paths[i], self.max_pixels, self.intensity)
            return self.model_input(image), i, "", image.shape[0], image.shape[1]
        except MedxError as err:  # the result says why; the other files are predicted
            return self.model_input.blank(), i, describe(err), 0, 0


def file_batches(
    paths: Sequence[Path],
    model_input: ModelInput,
    max_pixels: int,
    intensity: str,
    batch_size: int,
    workers: int,
) -> Iterator[tuple[torch.Tensor, list[Item]]]:
    """Batches of model inputs read by DataLoader workers, with one `Item` per file."""
    loader = DataLoader(
        _Files(paths, model_input, max_pixels, intensity),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
    )
    for x, index, errors, heights, widths in loader:
        items = []
        for i, error, h, w in zip(
            index.tolist(), errors, heights.tolist(), widths.tolist(), strict=True
        ):
            item = Item(str(paths[i]), paths[i], error=error)
            item.size = None if error else (int(w), int(h))
            items.append(item)
        yield x, items
