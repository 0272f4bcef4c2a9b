"""Every size a file declares is read from its headers and checked before a decoder allocates.

The hostile files are built as an attacker builds them: a real codestream, or a real image
whose header claims more than its bytes hold. Memory is measured in a subprocess (its peak
RSS, VmHWM, before and after each read), so a regression shows as the growth it causes.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from dicom_files import cxr_gray, dicom_dataset, j2k_zeros, save, size_lie, variant_dataset
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset

from medx.data.io import BadImageError, read_image, read_image_bytes
from medx.data.limits import (
    DeclaredSize,
    TooManyPixels,
    check_declared_size,
    check_file,
    declared_sizes,
)

LIMIT = 50_000_000  # the default --max-pixels of medx.predict and medx.serve
GROWTH_MB = 100  # what refusing one file may cost at most; decoding the bombs costs > 300

_MEASURE = """
import json, sys
from medx.data.io import BadImageError, read_image

def peak_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024

warm, reads = json.loads(sys.argv[1])
for path in warm:  # lazy imports and the decoders' first allocations happen here
    read_image(path)
results = []
for path, max_pixels in reads:
    before = peak_mb()
    try:  # without a limit, called as medx.train calls it
        read_image(path, **({} if max_pixels is None else {"max_pixels": max_pixels}))
        error = None
    except BadImageError as exc:
        error = [type(exc).__name__, str(exc)]
    results.append({"growth_mb": peak_mb() - before, "error": error})
print(json.dumps(results))
"""


def read_in_subprocess(warm: list[Path], reads: list[tuple[Path, int | None]]) -> list[dict]:
    """read_image on each (path, max_pixels) in a fresh process: each read's peak RSS growth
    in MB and the BadImageError it raised ([type, message], or None)."""
    argument = json.dumps([[str(p) for p in warm], [[str(p), n] for p, n in reads]])
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, argument], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def gray(medx_data: Path) -> np.ndarray:
    return cxr_gray(medx_data)  # 224 x 224


@pytest.fixture(scope="module")
def warm(gray: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A PNG, a JPEG and a JPEG 2000 DICOM that read fine: they load every decoder."""
    folder = tmp_path_factory.mktemp("warm")
    png, jpeg = folder / "ok.png", folder / "ok.jpg"
    assert cv2.imwrite(str(png), gray) and cv2.imwrite(str(jpeg), gray)
    return [png, jpeg, save(variant_dataset("jpeg2000", gray), folder / "ok.dcm")]


def png_declaring(width: int, height: int) -> bytes:
    """A gray PNG whose IHDR declares width x height, holding the first rows only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(bytes((width + 1) * 4))
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def jpeg_declaring(jpeg: bytes, width: int, height: int) -> bytes:
    """A real JPEG with its frame header (SOF0) changed to declare width x height."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[: sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9 :]


def deflate_bomb(gray: np.ndarray, path: Path, extra: int) -> Path:
    """A deflated DICOM of ``gray`` whose dataset ends with ``extra`` bytes of padding
    (DataSetTrailingPadding): about 1 MB on disk per 250 MB that pydicom inflates in memory."""
    ds = dicom_dataset(gray)
    ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    written = io.BytesIO()
    ds.save_as(written, enforce_file_format=True)
    data = written.getvalue()
    meta_end = 144 + struct.unpack("<I", data[140:144])[0]  # after (0002,0000)'s group length
    dataset = zlib.decompress(data[meta_end:], -zlib.MAX_WBITS)
    deflater = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    padding = b"\xfc\xff\xfc\xffOB\x00\x00" + struct.pack("<I", extra)
    parts = [deflater.compress(dataset + padding)]
    parts += [deflater.compress(bytes(1 << 24)) for _ in range(extra >> 24)]
    path.write_bytes(data[:meta_end] + b"".join([*parts, deflater.flush()]))
    return path


# --- the bombs: refused, with bounded memory --------------------------------------------------


def test_a_dicom_whose_codestream_declares_more_than_its_header_is_refused_before_decoding(
    gray: np.ndarray, warm: list[Path], tmp_path: Path
) -> None:
    # 252 bytes of JPEG 2000 declaring 8000 x 8000 behind a 224 x 224 header: a check of the
    # header alone passes it, and decoding it allocates over 300 MB.
    lie = size_lie(gray, j2k_zeros(8000), uid.JPEG2000Lossless, tmp_path / "lie.dcm")

    limited, unlimited = read_in_subprocess(warm, [(lie, LIMIT), (lie, None)])

    kind, message = limited["error"]
    assert kind == "TooManyPixels" and limited["growth_mb"] < GROWTH_MB, limited
    for words in (str(lie), "8000x8000 px", "JPEG 2000 codestream (SIZ marker)", "--max-pixels"):
        assert words in message, message
    kind, message = unlimited["error"]  # no limit (training): still never decoded
    assert kind == "BadImageError" and unlimited["growth_mb"] < GROWTH_MB, unlimited
    assert "is corrupt: its DICOM header declares 224x224 px but its JPEG 2000" in message


def test_png_and_jpeg_headers_claiming_20000_squared_are_refused_without_decoding(
    gray: np.ndarray, warm: list[Path], tmp_path: Path
) -> None:
    png = tmp_path / "bomb.png"
    png.write_bytes(png_declaring(20000, 20000))
    jpeg = tmp_path / "bomb.jpg"
    jpeg.write_bytes(jpeg_declaring(cv2.imencode(".jpg", gray)[1].tobytes(), 20000, 20000))

    results = read_in_subprocess(warm, [(png, LIMIT), (jpeg, LIMIT)])

    declarations = ("PNG header (IHDR)", "JPEG frame header (SOF0)")
    for path, what, result in zip((png, jpeg), declarations, results, strict=True):
        kind, message = result["error"]
        assert kind == "TooManyPixels" and result["growth_mb"] < GROWTH_MB, result
        assert f"Image {path} declares 20000x20000 px (400.0 megapixels) in its {what}" in message


def test_a_deflated_dicom_that_inflates_past_its_header_is_refused_with_bounded_memory(
    gray: np.ndarray, warm: list[Path], tmp_path: Path
) -> None:
    bomb = deflate_bomb(gray, tmp_path / "deflated.dcm", 300 << 20)
    assert bomb.stat().st_size < 2 << 20  # inflating to 300 MB

    (result,) = read_in_subprocess(warm, [(bomb, None)])

    kind, message = result["error"]
    assert kind == "BadImageError" and result["growth_mb"] < GROWTH_MB, result
    assert "inflate to more than its header declares (224x224 px)" in message


def test_a_deflated_dicom_within_its_header_reads_as_its_pixels(gray: np.ndarray, tmp_path: Path):
    ds = dicom_dataset(gray)
    ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    path = save(ds, tmp_path / "deflated.dcm")

    assert declared_sizes(path) == [DeclaredSize("DICOM header", 224, 224)]
    np.testing.assert_array_equal(read_image(path, max_pixels=LIMIT)[:, :, 0], gray)


# --- what each format declares ----------------------------------------------------------------


def _pil(image: np.ndarray, **options: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, **options)
    return out.getvalue()


def _cv2(suffix: str, *params: int):
    return lambda image: cv2.imencode(suffix, image, list(params))[1].tobytes()


WRITERS = {
    "PNG header (IHDR)": _cv2(".png"),
    "JPEG frame header (SOF0)": _cv2(".jpg"),
    "JPEG frame header (SOF2)": lambda image: _pil(image, format="JPEG", progressive=True),
    "BMP header": _cv2(".bmp"),
    "TIFF first directory (IFD)": _cv2(".tiff"),
    "WebP header (VP8)": _cv2(".webp", cv2.IMWRITE_WEBP_QUALITY, 80),
    "WebP header (VP8L)": _cv2(".webp", cv2.IMWRITE_WEBP_QUALITY, 101),
    "WebP header (VP8X canvas)": lambda image: _pil(image, format="WEBP", icc_profile=b"icc"),
}


@pytest.mark.parametrize("what", list(WRITERS))
def test_each_format_declares_its_size_in_its_header(gray: np.ndarray, what: str) -> None:
    image = np.ascontiguousarray(gray[:30, :40])
    data = WRITERS[what](image)

    assert declared_sizes(data) == [DeclaredSize(what, 40, 30)]
    check_declared_size(data, 1200)  # exactly at the limit: accepted
    with pytest.raises(TooManyPixels) as refused:
        check_declared_size(data, 1199, name="upload.bin")
    assert (refused.value.pixels, refused.value.limit) == (1200, 1199)
    message = str(refused.value)
    assert message.startswith(f"Image upload.bin declares 40x30 px (0.0 megapixels) in its {what}")


def test_a_gif_declares_its_screen_and_its_first_frame(gray: np.ndarray) -> None:
    data = _pil(np.ascontiguousarray(gray[:30, :40]), format="GIF")

    assert [tuple(s)[:3] for s in declared_sizes(data)] == [
        ("GIF logical screen", 40, 30),
        ("GIF image descriptor", 40, 30),
    ]


def test_an_exif_thumbnail_inside_a_jpeg_is_not_its_size(gray: np.ndarray) -> None:
    main = cv2.imencode(".jpg", gray)[1].tobytes()
    thumbnail = jpeg_declaring(cv2.imencode(".jpg", gray[:32, :32])[1].tobytes(), 60000, 60000)
    app1 = b"Exif\0\0" + thumbnail  # never decoded, so it may say what it likes
    data = main[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + main[2:]

    assert declared_sizes(data) == [DeclaredSize("JPEG frame header (SOF0)", 224, 224)]
    np.testing.assert_array_equal(
        read_image_bytes(data, "x.jpg", max_pixels=LIMIT), read_image_bytes(main, "x.jpg")
    )


def test_bytes_between_jpeg_segments_are_skipped_as_libjpeg_skips_them(gray: np.ndarray):
    data = cv2.imencode(".jpg", gray)[1].tobytes()
    app0_end = 4 + struct.unpack(">H", data[4:6])[0]
    damaged = data[:app0_end] + b"\x00\x17\xff\x00" + data[app0_end:]

    assert declared_sizes(damaged) == [DeclaredSize("JPEG frame header (SOF0)", 224, 224)]


def test_a_file_whose_size_cannot_be_read_is_refused_under_a_limit_only(
    gray: np.ndarray, tmp_path: Path
) -> None:
    pgm = tmp_path / "scan.png"  # a PGM with a PNG name: OpenCV decodes it by its content
    pgm.write_bytes(cv2.imencode(".pgm", gray)[1].tobytes())

    assert read_image(pgm).shape == (224, 224, 3)  # no limit: as before
    with pytest.raises(BadImageError, match="cannot be sized before decoding: it is not a DICOM"):
        read_image(pgm, max_pixels=LIMIT)


# --- DICOM: the header and the codestream ---------------------------------------------------


def test_a_dicom_without_an_image_is_still_named_for_what_it_is_under_a_limit(tmp_path: Path):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = uid.BasicTextSRStorage, uid.generate_uid()
    path = save(ds, tmp_path / "report.dcm")

    assert declared_sizes(path) == []
    with pytest.raises(
        BadImageError, match=r"has no pixel data .* Basic Text SR Storage, not an image"
    ):
        read_image(path, max_pixels=LIMIT)


def test_a_dicom_declares_its_header_and_its_codestream(gray: np.ndarray, tmp_path: Path):
    path = save(variant_dataset("jpeg2000", gray), tmp_path / "j2k.dcm")

    assert declared_sizes(path) == [
        DeclaredSize("DICOM header", 224, 224),
        DeclaredSize("JPEG 2000 codestream (SIZ marker)", 224, 224),
    ]


def test_a_multi_frame_dicom_declares_all_its_frames(gray: np.ndarray, tmp_path: Path):
    path = save(dicom_dataset(np.stack([gray, gray, gray])), tmp_path / "cine.dcm")

    (header,) = declared_sizes(path)
    assert (header.frames, header.pixels) == (3, 3 * 224 * 224)
    frames = r"declares 3 frames of 224x224 px \(0\.2 megapixels\)"
    with pytest.raises(TooManyPixels, match=frames):
        check_declared_size(path, 2 * 224 * 224)


def _j2k_256(gray: np.ndarray) -> bytes:
    return j2k_zeros(256)


def _jpeg_8000(gray: np.ndarray) -> bytes:
    return jpeg_declaring(cv2.imencode(".jpg", gray)[1].tobytes(), 8000, 8000)


def _jpeg_colour(gray: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", cv2.merge([gray] * 3))[1].tobytes()


@pytest.mark.parametrize(
    ("stream", "syntax", "reason"),
    [
        (_j2k_256, uid.JPEG2000Lossless, "its JPEG 2000 codestream (SIZ marker) 256x256 px"),
        (_jpeg_8000, uid.JPEGBaseline8Bit, "its JPEG frame header (SOF0) 8000x8000 px"),
        (_jpeg_colour, uid.JPEGBaseline8Bit, "its JPEG frame header (SOF0) 3 components"),
    ],
)
def test_a_codestream_that_contradicts_the_header_is_corrupt(
    gray: np.ndarray, tmp_path: Path, stream, syntax: str, reason: str
) -> None:
    path = size_lie(gray, stream(gray), syntax, tmp_path / "lie.dcm")

    with pytest.raises(BadImageError, match=r"is corrupt: its DICOM header declares") as info:
        read_image(path)
    assert reason in str(info.value) and type(info.value) is BadImageError


def test_a_jpeg_ls_stream_declaring_an_oversize_image_is_refused(gray: np.ndarray, tmp_path: Path):
    # SOF55 says 0 x 0; an LSE marker of ID 4 gives the real size in 3-byte fields (T.87 C.2.4.1.4)
    sof55 = b"\xff\xf7" + struct.pack(">HBHHB", 11, 8, 0, 0, 1) + b"\x01\x11\x00"
    lse = b"\xff\xf8" + struct.pack(">HBB", 10, 4, 3) + (70000).to_bytes(3, "big") * 2
    stream = b"\xff\xd8" + sof55 + lse + b"\xff\xda" + struct.pack(">H", 8) + bytes(6) + b"\xff\xd9"
    path = size_lie(gray, stream, uid.JPEGLSLossless, tmp_path / "ls.dcm")

    oversize = r"70000x70000 px .* in its JPEG-LS oversize dimensions \(LSE\)"
    with pytest.raises(TooManyPixels, match=oversize):
        read_image(path, max_pixels=LIMIT)


class CountedReads(io.BytesIO):
    """A file in memory that counts the bytes its reader asks for."""

    asked = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.asked += len(data)
        return data


def test_the_header_of_a_dicom_is_read_without_its_large_values(gray: np.ndarray, tmp_path: Path):
    ds = dicom_dataset(gray)
    ds.add_new(0x00091010, "OB", bytes(8 << 20))  # a private 8 MB value before the pixels
    path = save(ds, tmp_path / "private.dcm")
    file = CountedReads(path.read_bytes())

    sizes = check_file(file, path, LIMIT)

    assert sizes == [DeclaredSize("DICOM header", 224, 224)]
    assert file.asked < 100_000  # of 8.05 MB


def test_too_many_pixels_keeps_its_figures_through_pickling() -> None:
    error = TooManyPixels("Image x.png declares ...", Path("x.png"), 400_000_000, LIMIT)

    copy = pickle.loads(pickle.dumps(error))

    assert isinstance(copy, BadImageError) and str(copy) == str(error)
    assert (copy.path, copy.pixels, copy.limit) == (Path("x.png"), 400_000_000, LIMIT)
    assert TooManyPixels("message only").pixels == 0  # as a DataLoader worker rebuilds it
