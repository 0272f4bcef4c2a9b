"""DICOM files written from real chest X-rays read back as the PNG of the same pixels.

Every variant (photometry, rescale, window, 12 bits, RLE, JPEG 2000, no extension) is built so
that exactly the PNG's pixels come back: a pipeline step skipped or done in the wrong order
shows as a difference. Encoders: pydicom 3 writes RLE natively and JPEG 2000 through
pylibjpeg-openjpeg; it has no JPEG (baseline or lossless) or JPEG-LS encoder, so the JPEG
baseline file is an OpenCV JPEG wrapped in DICOM, and no JPEG-LS file is written.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from dicom_files import (
    VARIANTS,
    cxr_gray,
    dicom_dataset,
    save,
    twelve_bit,
    variant_dataset,
    write_dicom_variants,
)
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

from medx.data.dicom import is_dicom_file, read_dicom
from medx.data.folders import ImageFolderDataModule
from medx.data.io import (
    BadImageError,
    list_images,
    read_gray,
    read_image,
    read_image_bytes,
    verify_images,
)
from medx.data.limits import TooManyPixels
from medx.data.splits import patient_ids


@pytest.fixture(scope="module")
def gray(medx_data: Path) -> np.ndarray:
    return cxr_gray(medx_data)


@pytest.fixture(scope="module")
def variants(gray: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_dicom_variants(gray, tmp_path_factory.mktemp("variants"))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_reads_as_exactly_the_png_of_the_same_pixels(
    variants: dict[str, Path], name: str
) -> None:
    png = read_image(variants["png"])
    img = read_image(variants[name])

    assert img.dtype == np.uint8 and img.shape == png.shape  # HxWx3, like any image
    np.testing.assert_array_equal(img, png)  # exact: every LUT here maps back without rounding
    np.testing.assert_array_equal(read_gray(variants[name]), read_gray(variants["png"]))


def test_the_window_decides_black_and_white_not_the_stored_range(
    gray: np.ndarray, tmp_path: Path
) -> None:
    stored = twelve_bit(gray)
    ds = dicom_dataset(stored, bits_stored=12)
    center, width = 1800.0, 1201.0  # narrower than the data: both ends clip
    ds.WindowCenter, ds.WindowWidth = center, width
    img = read_dicom(save(ds, tmp_path / "narrow.dcm"))

    # PS3.3 C.11.2.1.2.1, LINEAR, written out independently of pydicom
    x = stored.astype(np.float64)
    unit = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    expected = np.rint(unit * 255)
    assert np.abs(img.astype(int) - expected).max() <= 1  # float rounding at .5 only
    assert (img == 0).mean() > 0.01 and (img == 255).mean() > 0.01
    plain = np.rint(x / 4095 * 255)  # what ignoring the window would give
    assert np.abs(img.astype(int) - plain).mean() > 20


def test_a_voi_lut_sequence_is_applied_and_its_real_bit_depth_is_white(
    gray: np.ndarray, tmp_path: Path
) -> None:
    ds = dicom_dataset(twelve_bit(gray), bits_stored=12)
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]  # declares 16 bits; the entries only reach 4095
    inverting = (4095 - np.arange(4096)).astype("<u2").tobytes()
    lut.add_new("LUTData", "OW", inverting)  # OW words, as most writers store LUTs
    ds.VOILUTSequence = Sequence([lut])
    ds.WindowCenter, ds.WindowWidth = 100, 10  # the LUT wins, as in pydicom and DCMTK

    img = read_dicom(save(ds, tmp_path / "lut.dcm"))

    np.testing.assert_array_equal(img, 255 - gray)


def test_monochrome1_with_a_window_is_inverted_after_the_window(
    gray: np.ndarray, tmp_path: Path
) -> None:
    ds = dicom_dataset(8 * (255 - gray.astype(np.uint16)) + 1000, "MONOCHROME1", 12)
    ds.WindowCenter, ds.WindowWidth = 2020.5, 2041
    np.testing.assert_array_equal(read_dicom(save(ds, tmp_path / "m1w.dcm")), gray)


def test_signed_pixels_with_a_window_read_back(gray: np.ndarray, tmp_path: Path) -> None:
    signed = (8 * gray.astype(np.int16) - 1024).astype(np.int16)  # PixelRepresentation 1
    ds = dicom_dataset(signed, bits_stored=16)
    ds.WindowCenter, ds.WindowWidth = -3.5, 2041  # -1024 is black, 1016 white
    assert ds.PixelRepresentation == 1
    np.testing.assert_array_equal(read_dicom(save(ds, tmp_path / "signed.dcm")), gray)


def test_signed_pixels_without_a_window_span_black_to_white(
    gray: np.ndarray, tmp_path: Path
) -> None:
    signed = (8 * gray.astype(np.int16) - 1024).astype(np.int16)  # -1024..1000, 16 bits stored
    ds = dicom_dataset(signed, bits_stored=16)
    assert ds.PixelRepresentation == 1 and "WindowCenter" not in ds

    img = read_dicom(save(ds, tmp_path / "signed.dcm"))

    # The values use 11 bits, -1024..1023: that range is black..white (module doc, step 3).
    expected = np.rint((signed.astype(np.float64) + 1024) / 2047 * 255)
    np.testing.assert_array_equal(img, expected)
    assert img.std() > 0.9 * gray.std()  # the 16-bit range would leave 8 grey levels


def test_twelve_bit_values_declared_as_sixteen_bits_read_as_twelve_bits(
    gray: np.ndarray, tmp_path: Path
) -> None:
    ds = dicom_dataset(twelve_bit(gray), bits_stored=16)  # as many writers store 12-bit data

    np.testing.assert_array_equal(read_dicom(save(ds, tmp_path / "b16.dcm")), gray)


@pytest.mark.parametrize("value", [0, 1000])
def test_a_blank_dicom_is_refused_not_classified(tmp_path: Path, value: int) -> None:
    ds = dicom_dataset(np.full((64, 64), value, np.uint16), bits_stored=12)
    _raises(save(ds, tmp_path / "blank.dcm"), "is blank: every pixel shows grey level")


def test_jpeg_baseline_decodes_like_opencv_decodes_the_same_jpeg(
    gray: np.ndarray, tmp_path: Path
) -> None:
    ok, jpeg = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    ds = dicom_dataset(gray)
    ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg.tobytes()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"

    img = read_dicom(save(ds, tmp_path / "baseline.dcm"))

    opencv = cv2.imdecode(jpeg, cv2.IMREAD_GRAYSCALE)
    assert np.abs(img.astype(int) - opencv).max() <= 1  # two IDCTs may round differently


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_reads_the_same_from_bytes_and_under_a_pixel_limit(
    variants: dict[str, Path], name: str
) -> None:
    data = variants[name].read_bytes()
    expected = read_image(variants[name])

    np.testing.assert_array_equal(read_image_bytes(data, variants[name].name), expected)
    np.testing.assert_array_equal(read_image(variants[name], max_pixels=224 * 224), expected)
    with pytest.raises(TooManyPixels, match=f"Image upload/{variants[name].name} declares 224x224"):
        read_image_bytes(data, f"upload/{variants[name].name}", max_pixels=224 * 224 - 1)


def test_dicom_files_are_listed_with_or_without_extension(
    variants: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    data = variants["monochrome2"].read_bytes()
    for name in ("IM0001", "1.2.826.0.1.3680043.8.498.17", "SCAN.DCM", "x.dicom", "DICOMDIR"):
        (folder / name).write_bytes(data)
    (folder / "README").write_text("not an image")
    (folder / "notes.txt").write_bytes(data)  # DICOM inside, but a name that says otherwise
    (folder / "._IM0002").write_bytes(data)  # a macOS resource fork

    listed = [p.name for p in list_images(folder)]

    assert listed == ["1.2.826.0.1.3680043.8.498.17", "IM0001", "SCAN.DCM", "x.dicom"]
    for name in listed:
        np.testing.assert_array_equal(read_image(folder / name), read_image(variants["png"]))
    assert not is_dicom_file(folder / "README")


def test_the_dicom_variants_fixture_writes_a_folder_that_lists_whole(
    dicom_variants: dict[str, Path],
) -> None:
    folder = dicom_variants["png"].parent
    assert list_images(folder) == sorted(dicom_variants.values())
    assert set(dicom_variants) == {"png", *VARIANTS}


def test_patient_ids_come_from_patient_id_and_else_from_the_name(
    gray: np.ndarray, tmp_path: Path
) -> None:
    with_id = save(dicom_dataset(gray, patient_id="ANON-7"), tmp_path / "person3_virus_1.dcm")
    without = save(dicom_dataset(gray, patient_id=None), tmp_path / "person4_virus_1.dcm")
    blank = save(dicom_dataset(gray, patient_id="  "), tmp_path / "person5_virus_1.dcm")

    ids = patient_ids([with_id, without, blank], r"person(\d+)_")

    assert ids == ["ANON-7", "4", "5"]


def test_a_folder_data_module_over_a_dicom_tree_groups_by_patient_id(
    medx_data: Path, tmp_path: Path
) -> None:
    root = tmp_path / "dicom_tree"
    written: dict[Path, str] = {}
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        for patient in range(6):
            for image in range(2):
                index = 24 * label + 2 * patient + image  # distinct real images
                patient_id = f"{cls[:3]}-{patient:03d}"
                ds = variant_dataset(
                    ("bits12", "rle")[image], cxr_gray(medx_data, index, 64), patient_id
                )
                path = save(ds, root / cls / f"img{index:03d}.dcm")  # the name tells nothing
                written[path] = patient_id
    dm = ImageFolderDataModule(
        root,
        image_size=64,
        batch_size=4,
        num_workers=0,
        val_from_train=0.25,
        test_from_train=0.25,
        patient_pattern=r"img(\d+)",
        seed=0,
    )

    dm.setup()

    seen: dict[str, str] = {}
    for split, samples in dm.splits.items():
        assert samples.paths, split
        for path, patient in zip(samples.paths, samples.patients, strict=True):
            assert patient == written[path]
            assert seen.setdefault(patient, split) == split  # no patient in two splits
    assert len(seen) == 12
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape[1:] == (3, 64, 64) and images.dtype.is_floating_point


# --- errors: each a BadImageError naming the file and the reason -----------------------------


def _raises(path: Path, *reason: str) -> str:
    with pytest.raises(BadImageError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message and info.value.path == path
    for words in reason:
        assert words in message, message
    assert "\n" not in message
    return message


def test_a_dicom_without_pixel_data_is_not_an_image(tmp_path: Path) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = uid.BasicTextSRStorage, uid.generate_uid()
    ds.PatientID = "P1"
    _raises(save(ds, tmp_path / "report.dcm"), "no pixel data", "Basic Text SR", "not an image")


def test_colour_dicom_is_refused_saying_what_medx_reads(gray: np.ndarray, tmp_path: Path) -> None:
    rgb = np.dstack([gray, gray, 255 - gray])
    ds = dicom_dataset(rgb, "RGB")
    _raises(save(ds, tmp_path / "rgb.dcm"), "colour", "RGB", "MONOCHROME1 or MONOCHROME2")


def test_multi_frame_dicom_is_refused(gray: np.ndarray, tmp_path: Path) -> None:
    ds = dicom_dataset(np.stack([gray, 255 - gray]))
    _raises(save(ds, tmp_path / "cine.dcm"), "multi-frame", "2 frames", "single-frame")


@pytest.mark.parametrize(
    ("syntax", "reason"),
    [
        (
            uid.JPEG2000MCLossless,  # a real transfer syntax no pydicom decoder reads
            "JPEG 2000 Part 2 Multi-component Image Compression (Lossless Only) "
            "(1.2.840.10008.1.2.4.92), for which pydicom has no decoder",
        ),
        (uid.MPEG2MPML, "MPEG2 Main Profile / Main Level"),
        ("1.2.3.4.5.6.7", "1.2.3.4.5.6.7, which is not a DICOM transfer syntax"),
        # a decoder exists (pylibjpeg-libjpeg) but the data is not JPEG-LS
        (uid.JPEGLSLossless, "JPEG-LS Lossless Image Compression pixel data cannot be decoded"),
    ],
)
def test_a_transfer_syntax_that_cannot_be_decoded_is_named(
    gray: np.ndarray, tmp_path: Path, syntax: str, reason: str
) -> None:
    ds = dicom_dataset(gray)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([gray.tobytes()])  # claims to be compressed; it is not
    ds["PixelData"].VR = "OB"
    path = save(ds, tmp_path / "odd.dcm", implicit_vr=False, little_endian=True)
    _raises(path, reason)


def test_an_impossible_window_is_refused_not_guessed(gray: np.ndarray, tmp_path: Path) -> None:
    ds = dicom_dataset(gray)
    ds.WindowCenter, ds.WindowWidth = 128, 0  # LINEAR needs a width of at least 1
    _raises(save(ds, tmp_path / "w0.dcm"), "grey-level attributes", "Window Width")


@pytest.mark.parametrize("variant", ["monochrome2", "rle", "jpeg2000"])
@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_a_truncated_dicom_is_corrupt(
    variants: dict[str, Path], tmp_path: Path, variant: str, keep: float
) -> None:
    data = variants[variant].read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: int(len(data) * keep)])
    _raises(path, "truncated or corrupt")


@pytest.mark.parametrize("cut", [150, 400])
def test_a_dicom_cut_inside_its_header_is_corrupt(
    variants: dict[str, Path], tmp_path: Path, cut: int
) -> None:
    path = tmp_path / "IM0009"  # extensionless: found by its marker, then refused
    path.write_bytes(variants["bits12"].read_bytes()[:cut])
    _raises(path, "truncated or corrupt")


def test_a_dcm_that_is_not_dicom_and_an_empty_one(variants: dict[str, Path], tmp_path: Path):
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(variants["png"].read_bytes())
    _raises(fake, "is not a DICOM file", "'DICM' marker")
    empty = tmp_path / "empty.dcm"
    empty.touch()
    _raises(empty, "is empty (0 bytes)")


def test_verification_names_the_bad_dicom_or_skips_it(
    variants: dict[str, Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(variants["rle"].read_bytes()[:-200])
    good = [variants["monochrome2"], variants["extensionless"]]

    with pytest.raises(BadImageError, match=r"bad\.dcm"):
        verify_images([*good, bad], skip_bad=False)
    assert verify_images([good[0], bad, good[1]], skip_bad=True) == good
