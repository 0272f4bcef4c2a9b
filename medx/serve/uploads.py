"""From a multipart request to decoded pixels, by the inference core's reader.

The upload (form field `file`) is written to a temporary file named by the type its bytes
show (`upload.jpg`, `upload.png`, `upload.tif`, `upload.dcm`, ...), and read by
`medx.inference` as any file on disk: the declared pixel count is judged before anything is
decoded, then the file is decoded (DICOM's pixel pipeline included) with the model's
intensity step, so the service and `medx.predict` see the same pixels. Errors name the
upload, not a temporary path, and say what to send instead (413 for too many pixels, 422 for
an unreadable file, or for a valid image of a kind medx does not read, such as a multi-frame
or colour DICOM, whose message says what to send rather than asking for the same file again).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request

from medx.data.io import BadImageError
from medx.serve.limits import SNIFF_BYTES, Refused, sniff, unsupported_type

FIELD = "file"
SUFFIXES = {
    "jpeg": ".jpg",
    "png": ".png",
    "bmp": ".bmp",
    "tiff": ".tif",
    "webp": ".webp",
    "dicom": ".dcm",
}
_IN_LOOP = 1 << 20  # uploads up to this size are copied on the event loop (Starlette keeps
# them in memory); larger ones, spooled to disk, are copied in a worker thread
_SEND_ANOTHER = "Send the complete, uncorrupted file again, or another image."


@dataclass
class Upload:
    """One uploaded image on disk: the client's file name, the sniffed type, the temp path."""

    name: str
    kind: str
    path: Path


async def receive_upload(request: Request, folder: Path) -> Upload:
    """The form's `file` part, sniffed and written under `folder` (the body's size is
    limited by `limits.Guard` while the form is parsed)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise Refused(
            415,
            f"Send the image as multipart/form-data (got {content_type or 'no Content-Type'}), "
            f"in a field named {FIELD!r}: curl -F {FIELD}=@image.png {request.url.path}",
        )
    form = await request.form(max_files=1, max_fields=4)
    part = form.get(FIELD)
    if not isinstance(part, UploadFile):
        raise Refused(
            422,
            f"The form has no file in a field named {FIELD!r} (fields: "
            f"{', '.join(form.keys()) or 'none'}); send it as: curl -F {FIELD}=@image.png "
            f"{request.url.path}",
        )
    name = part.filename or "upload"
    head = await part.read(SNIFF_BYTES)
    if not head:
        raise Refused(422, f"Upload {name!r} is empty (0 bytes); send the image file.")
    kind = sniff(head)
    if kind is None:
        raise unsupported_type(name, head)
    await part.seek(0)
    path = folder / f"upload{SUFFIXES[kind]}"
    with path.open("wb") as out:  # a copy of the spooled upload: medx's readers take paths
        await _copy(part, out)
    return Upload(name, kind, path)


async def _copy(part: UploadFile, out: BinaryIO) -> None:
    if part.size is not None and part.size <= _IN_LOOP:  # small: no thread hop needed
        out.write(await part.read())
        return
    await run_in_threadpool(shutil.copyfileobj, part.file, out, 1 << 20)


@contextmanager
def refusals(upload: Upload) -> Iterator[None]:
    """The core's reading errors as the service's refusals, naming the upload: 413 for an
    image over --max-pixels (refused before decoding), 422 for one that cannot be read."""
    from medx.data.io import UnsupportedImageError
    from medx.inference import PixelLimitError

    try:
        yield
    except PixelLimitError as err:
        raise Refused(
            413,
            f"Image {upload.name!r} has {err.pixels / 1e6:.1f} megapixels, over the service's "
            f"--max-pixels {err.limit / 1e6:.1f} M: refused before decoding. Send it at a "
            "lower resolution, or ask the operator to raise --max-pixels.",
        ) from err
    except UnsupportedImageError as err:  # the message says what medx reads: send that
        raise Refused(422, str(err)) from err
    except BadImageError as err:
        raise Refused(422, f"{err} {_SEND_ANOTHER}") from err


def read_upload(upload: Upload, read: Callable[[Path, str], object]) -> object:
    """`read(path, name)` (a core reader) on the upload, its errors turned into refusals.
    Runs in a worker thread (decoding is CPU work)."""
    with refusals(upload):
        return read(upload.path, repr(upload.name))


def warm_up_decoding() -> None:
    """Decode one small PNG, so the readers' lazy imports (PIL, pydicom) happen at start-up."""
    import cv2

    from medx.inference import read

    with temporary_folder() as folder:
        path = Path(folder) / "upload.png"
        cv2.imwrite(str(path), np.zeros((32, 32), np.uint8))
        read(path, 32 * 32)


def temporary_folder() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="medx-serve-")
