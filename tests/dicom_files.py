"""Write real DICOM files from 8-bit gray pixels, as a modality or a PACS export would.

Each variant of ``write_dicom_variants`` stores the same pixels differently (photometry, a
rescale, a window, 12 bits, compression, no extension) such that medx must read back exactly
the pixels of the PNG written next to them: any step of the pixel pipeline done wrong shows
as a difference. Imported by the test modules (tests/ is on sys.path through conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

# The variants of write_dicom_variants and how each stores 8-bit pixels v (all decode to v).
VARIANTS = {
    "monochrome2": "MONOCHROME2, 8 bits stored: v",
    "monochrome1": "MONOCHROME1 (minimum is white), 8 bits: 255 - v",
    "rescale": "12 bits: 2 * (v + 1024), RescaleSlope 0.5, RescaleIntercept -1024, "
    "window 128/256 in the rescaled units",
    "window": "12 bits: 8 * v + 1000, WindowCenter 2020.5, WindowWidth 2041",
    "bits12": "12 bits in 16-bit words, no window: round(v * 4095 / 255)",
    "rle": "monochrome2, RLE Lossless",
    "jpeg2000": "bits12, JPEG 2000 Lossless",
    "extensionless": "monochrome2 saved as IM0001 (no extension; found by its DICM marker)",
}


def cxr_gray(medx_data: Path, index: int = 0, size: int | None = None) -> np.ndarray:
    """A real chest X-ray of $MEDX_DATA as uint8 gray (the files are R=G=B JPEGs)."""
    files = sorted((medx_data / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))
    gray = cv2.imread(str(files[index]), cv2.IMREAD_GRAYSCALE)
    assert gray is not None, files[index]
    return gray if size is None else cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)


def dicom_dataset(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 8,
    patient_id: str | None = "P0001",
) -> Dataset:
    """A Digital X-Ray (for presentation) dataset holding ``pixels``, uncompressed."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = uid.DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = uid.generate_uid()
    ds.Modality = "DX"
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.set_pixel_data(pixels, photometric, bits_stored)
    return ds


def save(ds: Dataset, path: Path, **encoding: bool) -> Path:
    """Save as a DICOM Part 10 file (preamble, DICM marker, file meta).

    encoding: ``implicit_vr``/``little_endian``, needed only for a made-up transfer syntax.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True, **encoding)
    return path


def twelve_bit(gray: np.ndarray) -> np.ndarray:
    """8-bit pixels spread over 12 bits so that a BitsStored scaling gives them back."""
    return np.rint(gray.astype(np.float64) * 4095 / 255).astype(np.uint16)


def variant_dataset(name: str, gray: np.ndarray, patient_id: str = "P0001") -> Dataset:
    """The dataset of one of VARIANTS for 8-bit gray pixels."""
    v = gray.astype(np.uint16)
    if name in ("monochrome2", "extensionless", "rle"):
        ds = dicom_dataset(gray, patient_id=patient_id)
        if name == "rle":
            ds.compress(uid.RLELossless)
        return ds
    if name == "monochrome1":
        return dicom_dataset(255 - gray, "MONOCHROME1", patient_id=patient_id)
    if name == "rescale":
        ds = dicom_dataset(2 * (v + 1024), bits_stored=12, patient_id=patient_id)
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 0.5, -1024, "US"
        ds.WindowCenter, ds.WindowWidth = 128, 256
        return ds
    if name == "window":
        ds = dicom_dataset(8 * v + 1000, bits_stored=12, patient_id=patient_id)
        ds.WindowCenter, ds.WindowWidth = 2020.5, 2041
        return ds
    if name in ("bits12", "jpeg2000"):
        ds = dicom_dataset(twelve_bit(gray), bits_stored=12, patient_id=patient_id)
        if name == "jpeg2000":
            ds.compress(uid.JPEG2000Lossless)
        return ds
    raise KeyError(f"unknown DICOM variant {name!r}; known: {', '.join(VARIANTS)}")


def j2k_zeros(side: int) -> bytes:
    """A real JPEG 2000 codestream of side x side zero pixels, by OpenJPEG: 8000 x 8000 takes
    252 bytes (and 2-5 s and 400 MB to encode); decoding it allocates over 300 MB."""
    from openjpeg.utils import encode_array

    return encode_array(np.zeros((side, side), np.uint8))


def size_lie(gray: np.ndarray, stream: bytes, syntax: str, path: Path) -> Path:
    """A DICOM file whose header declares the size of ``gray`` while its one fragment of
    pixel data is ``stream``, a codestream (JPEG 2000, JPEG, ...) that may declare another:
    what a check of the header alone lets through to the decoder."""
    ds = dicom_dataset(gray)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    return save(ds, path)


def variant_path(folder: Path, name: str) -> Path:
    return folder / ("IM0001" if name == "extensionless" else f"{name}.dcm")


def write_dicom_variants(
    gray: np.ndarray, folder: Path, patient_id: str = "P0001"
) -> dict[str, Path]:
    """Write ``reference.png`` and every DICOM variant of the same pixels into ``folder``.

    Returns {"png": the PNG, <variant>: its DICOM file, ...}; medx must read each DICOM file
    as exactly the PNG's pixels (and so predict the same probability for it).
    """
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / "reference.png"
    assert cv2.imwrite(str(png), gray), png
    written = {"png": png}
    for name in VARIANTS:
        written[name] = save(variant_dataset(name, gray, patient_id), variant_path(folder, name))
    return written
