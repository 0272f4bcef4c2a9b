"""Read a DICOM radiograph into the uint8 gray image every other medx reader gives.

What is read: single-frame grayscale images (PhotometricInterpretation MONOCHROME1 or
MONOCHROME2, one sample per pixel, 1 to 16 bits stored, signed or unsigned), uncompressed or
compressed in any transfer syntax that pydicom 3 with the pylibjpeg plugins decodes: JPEG
baseline, extended and lossless, JPEG-LS, JPEG 2000, HTJ2K, RLE, deflate. A DICOM file is a
``.dcm``/``.dicom`` file, or a file without extension (also a numeric one, as with files
named by their UID, ``1.2.840.113619.2.55.3.1``) that has the "DICM" marker at byte 128. The
file must be a DICOM Part 10 file (preamble and file meta information); ``DICOMDIR`` indexes
are never images.

The pixel pipeline follows the standard's order (PS3.3 C.11, PS3.4 N.2):

1. modality LUT: RescaleSlope/RescaleIntercept, or a Modality LUT Sequence (pydicom's
   ``apply_modality_lut``), giving modality values (HU, optical density, ...);
2. VOI: the first VOI LUT, else the first window (WindowCenter/WindowWidth with its
   VOILUTFunction: LINEAR, LINEAR_EXACT or SIGMOID; pydicom's ``apply_voi_lut``). The first
   one is the one the modality chose as the default view, the one a radiologist sees when
   the image opens; the window's bounds become black and white;
3. with neither, the range of values that the pixels' bit depth holds, taken through the
   modality LUT, becomes black..white. The bit depth is BitsStored, or fewer bits (at least
   8) when every stored value fits in fewer: writers often declare 16 bits for 12-bit
   detector data, and a signed image of -1024..1000 declared as 16 bits would otherwise use
   8 grey levels around mid-grey, a flat image. Unsigned values (and signed ones that are
   all >= 0) span 0..2**bits-1, signed ones with negative values -2**(bits-1)..2**(bits-1)-1:
   12-bit data span 0..4095, and the -1024..1000 image -1024..1023, black to white. The range
   depends on the content only through its bit depth, so one grey level means one detector
   value in every image of a series that uses the same depth (a per-image min..max stretch,
   as medx.data.io applies to 16-bit PNGs, would not). Radiographs from DX/CR modalities
   nearly always carry a window; this case is mostly converted and secondary-capture images;
4. MONOCHROME1 (minimum is white) is inverted, so that in the result dense tissue is bright
   as in a MONOCHROME2 image, a PNG or a JPEG;
5. the result, 0..1, is rounded to uint8 0..255.

``read_dicom`` returns uint8 HxW, the shape and type of a decoded 8-bit gray PNG, so that
medx.data.io treats a DICOM file like any other image (three equal channels for a backbone).
A file written from 8-bit pixels (MONOCHROME2, or MONOCHROME1 of inverted pixels, with or
without a rescale and a window that maps them back) reads back exactly those pixels.

Every failure is a ``BadImageError`` naming the file and the reason: no pixel data (not an
image: a structured report, a presentation state), colour, multi-frame, a transfer syntax
that no installed decoder reads (named), a file that is not DICOM after all, a corrupt or
truncated one (also a codestream that declares another size than the header), a blank one
(every pixel the same grey after these steps: nothing to classify), or, under a pixel limit,
one that declares more pixels (medx.data.limits, checked before decoding).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import UID

from medx.data.io import UnsupportedImageError, _bad
from medx.data.limits import check_dataset, check_file

DICOM_SUFFIXES = (".dcm", ".dicom")
_MAGIC_OFFSET = 128
_MAGIC = b"DICM"
_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
_SUPPORTED = (
    "medx reads single-frame grayscale DICOM images (MONOCHROME1 or MONOCHROME2, "
    "one sample per pixel)"
)
_MAX_TABLE = 2**17  # a lookup table for up to 17 bits of stored values
_HEADER_VALUES = 1 << 16  # header values larger than this stay on disk while sizes are read
_CONVERT = "convert it to an uncompressed transfer syntax (e.g. `gdcmconv --raw IN OUT`)"


def is_dicom_file(path: Path, data: bytes | None = None) -> bool:
    """A ``.dcm``/``.dicom`` file, or one with no (or a numeric) extension and the DICM marker.

    Only files whose name could be DICOM are opened (132 bytes), so listing a folder of PNGs
    costs nothing more; a numeric "extension" is the tail of a UID used as a file name.
    ``data``: the file's bytes, when they are in memory (then ``path`` is only its name).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if path.name.upper() == "DICOMDIR" or not (suffix == "" or suffix[1:].isdigit()):
        return False
    if data is not None:
        return data[_MAGIC_OFFSET : _MAGIC_OFFSET + len(_MAGIC)] == _MAGIC
    try:
        with path.open("rb") as handle:
            head = handle.read(_MAGIC_OFFSET + len(_MAGIC))
    except OSError:
        return False
    return head[_MAGIC_OFFSET:] == _MAGIC


def dicom_patient_id(path: Path) -> str | None:
    """PatientID from the header alone (pixels are not read), or None when absent or unreadable.

    An unreadable file gives None rather than an error: image verification, which runs first,
    is what reports it.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
        value = ds.get("PatientID")
    except Exception:  # pydicom raises many types on corrupt input; verification names them
        return None
    value = str(value).strip() if value is not None else ""
    return value or None


def read_dicom(path: Path, max_pixels: int | None = None, data: bytes | None = None) -> np.ndarray:
    """Decode one DICOM file to uint8 HxW by the module's pipeline; BadImageError naming it.

    Args:
        path: the file; with ``data``, only the name that errors give.
        max_pixels: refuse (TooManyPixels) a file whose header or codestream declares more
            pixels, before decoding; None: no limit. A codestream that contradicts the header
            is refused either way (medx.data.limits).
        data: the file's bytes, when they are in memory already.
    """
    path = Path(path)
    with _opened(path, data) as fp:
        check_file(fp, path, max_pixels)  # under a limit: every declared size, from headers
        ds = load_dataset(fp, path)
    check_dataset(ds, path)  # a codestream that contradicts the header is never decoded
    stored = _stored_pixels(ds, path)
    # Every step maps each stored value on its own, so the grey of each value that occurs is
    # computed once and looked up: one pass over the pixels instead of several in float64.
    low, high = min(0, int(stored.min())), int(stored.max())  # from 0: index without a shift
    values = np.arange(low, high + 1) if high - low < _MAX_TABLE else stored
    try:
        grey = np.rint(display_values(values, ds) * 255).astype(np.uint8)
    except (ValueError, TypeError, IndexError, KeyError, NotImplementedError) as exc:
        raise _bad(
            path,
            f"has grey-level attributes medx cannot apply (rescale, window or LUT: "
            f"{_reason(exc)}); it is corrupt or was written by a faulty tool",
        ) from exc
    if values is stored:
        image = grey
    elif stored.dtype == np.uint8:  # OpenCV's lookup is several times faster than numpy's
        image = cv2.LUT(stored, np.pad(grey, (0, 256 - grey.size)))
    else:
        image = np.take(grey, stored if low == 0 else stored.astype(np.int64) - low)
    darkest, brightest = cv2.minMaxLoc(image)[:2]
    if darkest == brightest:
        raise _bad(
            path,
            f"is blank: every pixel shows grey level {int(darkest)} after the DICOM grey-level "
            f"steps (stored values {stored.min()}..{stored.max()}), so there is no picture in it",
        )
    return image


def display_values(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored pixel values to display values in [0, 1] (float): steps 1 to 4 of the module doc.

    0 is black and 1 white in the MONOCHROME2 sense, whatever the file's photometry.
    """
    modality = apply_modality_lut(stored, ds)
    first, last = _modality_range(ds)
    if first == last:
        raise ValueError(f"every stored value maps to {first} (a RescaleSlope of 0?)")
    if _has_voi_lut(ds):
        if modality.dtype.kind == "f":  # a LUT is indexed by integers
            modality = np.rint(modality).astype(np.int64)
        unit = apply_voi_lut(modality, ds, index=0) / _voi_lut_max(ds)
    elif ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
        # pydicom maps the window onto the modality range of the stored values, first..last;
        # first may exceed last (a negative slope), which the division undoes.
        unit = (apply_voi_lut(modality, ds, index=0) - first) / (last - first)
    else:
        black, white = _plain_range(stored, ds)
        unit = (modality - black) / (white - black)
    unit = np.clip(unit, 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        unit = 1.0 - unit
    return unit


def _modality_range(ds: Dataset) -> tuple[float, float]:
    """Where the smallest and the largest stored value land after the modality LUT.

    This is also the output range pydicom's apply_windowing maps a window onto (PS3.3
    C.11.2.1.2: y_min..y_max), so one function serves the windowed and the plain case.
    """
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    if ds.get("PixelRepresentation", 0) == 0:
        low, high = 0, 2**bits - 1
    else:
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return _rescaled(ds, low, high)


def _rescaled(ds: Dataset, low: int, high: int) -> tuple[float, float]:
    """Where two stored values land through RescaleSlope/RescaleIntercept."""
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        return low * slope + intercept, high * slope + intercept
    return float(low), float(high)


def _plain_range(stored: np.ndarray, ds: Dataset) -> tuple[float, float]:
    """Black and white without a VOI (step 3): the range of the bit depth the stored values
    use, taken through the modality LUT; ``stored`` holds at least the extreme values."""
    if ds.get("ModalityLUTSequence"):
        return _modality_range(ds)
    declared = int(ds.BitsStored)
    low, high = int(stored.min()), int(stored.max())
    if low >= 0:  # also signed pixels without negative values
        bits = min(declared, max(8, high.bit_length()))
        first, last = 0, 2**bits - 1
    else:
        bits = min(declared, max(8, 1 + max((-low - 1).bit_length(), high.bit_length())))
        first, last = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    first, last = _rescaled(ds, first, last)
    return min(first, last), max(first, last)


def _has_voi_lut(ds: Dataset) -> bool:
    luts = ds.get("VOILUTSequence")
    return bool(luts) and "LUTDescriptor" in luts[0] and "LUTData" in luts[0]


def _voi_lut_max(ds: Dataset) -> float:
    """White for a VOI LUT: 2**bits - 1, bits from its descriptor.

    Many writers declare 16 bits for LUTs whose entries only reach 12; like DCMTK, trust the
    entries when they need fewer bits than declared.
    """
    count, first, declared = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor)
    entries = apply_voi_lut(np.arange(first, first + (count or 2**16)), ds, index=0)
    used = max(1, min(declared, int(entries.max()).bit_length()))
    return float(2**used - 1)


def load_dataset(fp: BinaryIO, path: Path, header_only: bool = False) -> Dataset:
    """The dataset in an open DICOM file (BadImageError naming ``path`` when it is not one).

    ``header_only``: stop before the pixel data, leaving ``fp`` at that element, with values
    over 64 KB left unread (medx.data.limits reads sizes so before anything is allocated).
    """
    fp.seek(0, io.SEEK_END)
    if fp.tell() == 0:
        raise _bad(path, "is empty (0 bytes)")
    fp.seek(0)
    try:
        if header_only:
            return pydicom.dcmread(fp, stop_before_pixels=True, defer_size=_HEADER_VALUES)
        return pydicom.dcmread(fp)
    except pydicom.errors.InvalidDicomError as exc:
        raise _bad(
            path,
            "is not a DICOM file: it lacks the 'DICM' marker at byte 128 of a DICOM Part 10 "
            "file (preamble and file meta information); it is corrupt, or it is another "
            "format with a DICOM name",
        ) from exc
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror or exc})") from exc
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise _bad(path, f"is a truncated or corrupt DICOM file ({_reason(exc)})") from exc


def _opened(path: Path, data: bytes | None) -> BinaryIO:
    if data is not None:
        return io.BytesIO(data)
    try:
        return path.open("rb")
    except FileNotFoundError as exc:
        raise _bad(path, "cannot be read (no such file)") from exc
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror or exc})") from exc


def _stored_pixels(ds: Dataset, path: Path) -> np.ndarray:
    """The stored values of the one frame, after checking that medx can use them."""
    sop = UID(str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or ""))
    if "PixelData" not in ds:
        if not sop:
            raise _bad(path, "is a truncated or corrupt DICOM file: it holds no data elements")
        if "Image" in sop.name:
            raise _bad(
                path,
                f"is a truncated or corrupt DICOM file: a {sop.name} whose pixel data is "
                "missing or cut off",
            )
        raise _bad(path, f"has no pixel data (PixelData): it is a {sop.name}, not an image")
    missing = [
        k
        for k in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PhotometricInterpretation")
        if k not in ds
    ]
    if missing:
        raise _bad(path, f"is a DICOM image without {', '.join(missing)}; it is corrupt")
    photometric = str(ds.PhotometricInterpretation).strip()
    samples = int(ds.get("SamplesPerPixel", 1))
    if photometric not in _GRAYSCALE or samples != 1:
        raise _bad(
            path,
            f"is a colour DICOM image (PhotometricInterpretation {photometric}, "
            f"{samples} samples per pixel); {_SUPPORTED}: send it as a grayscale image",
            UnsupportedImageError,
        )
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames != 1:
        raise _bad(
            path,
            f"is a multi-frame DICOM image ({frames} frames); {_SUPPORTED}; "
            "split it into one file per frame",
            UnsupportedImageError,
        )
    syntax = _transfer_syntax(ds, path)
    try:
        stored = ds.pixel_array
    except Exception as exc:  # decoders raise many types on corrupt data
        raise _bad(
            path,
            f"is a truncated or corrupt DICOM file: its {syntax.name} pixel data cannot be "
            f"decoded ({_reason(exc)})",
        ) from exc
    if stored.ndim != 2:
        raise _bad(
            path,
            f"decodes to pixel array shape {stored.shape}; {_SUPPORTED}",
            UnsupportedImageError,
        )
    return stored


def _transfer_syntax(ds: Dataset, path: Path) -> UID:
    """The file's transfer syntax, once sure an installed decoder reads it."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if not syntax:
        raise _bad(
            path,
            "is a truncated or corrupt DICOM file: its file meta information has no "
            "Transfer Syntax UID (0002,0010)",
        )
    syntax = UID(str(syntax))
    if not syntax.is_transfer_syntax:
        raise _bad(
            path,
            f"declares the transfer syntax {syntax}, which is not a DICOM transfer syntax "
            "UID; the file is corrupt or was written by a faulty tool",
        )
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise _bad(
            path,
            f"uses the transfer syntax {syntax.name} ({syntax}), for which pydicom has no "
            f"decoder; {_CONVERT}",
            UnsupportedImageError,
        ) from exc
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies)
        raise _bad(
            path,
            f"uses the transfer syntax {syntax.name} ({syntax}), and no decoder for it is "
            f"installed ({needs}); install the pylibjpeg plugins of requirements.lock, or "
            f"{_CONVERT}",
            UnsupportedImageError,
        )
    return syntax


def _reason(exc: Exception) -> str:
    """pydicom's message, first clause only: the rest lists guesses that do not help."""
    text = str(exc).split(" - ")[0].strip() or type(exc).__name__
    return text.splitlines()[0]
