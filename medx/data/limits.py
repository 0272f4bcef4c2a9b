"""What sizes an image file declares, read from its headers alone, checked before decoding.

A decoder allocates what a file declares, not what it holds: 252 bytes of JPEG 2000 declare
8000 x 8000 pixels, a PNG of a few hundred bytes 20000 x 20000. A pixel limit therefore
holds only if it is checked against every size the file declares, read without decoding:

- PNG: the IHDR chunk; JPEG: every frame header (SOFn, and DHP) before the first scan; GIF:
  the logical screen and the first image descriptor; BMP, WebP (VP8, VP8L, VP8X): their
  headers; TIFF: its first directory (OpenCV decodes the first page only); a bare JPEG 2000
  codestream or JP2 file: its SIZ marker;
- DICOM: the header's Rows x Columns (x NumberOfFrames), and for compressed pixel data also
  the header of the codestream in the first frame (JPEG 2000 and HTJ2K SIZ, JPEG SOFn, JPEG-LS
  SOF55 and its oversize LSE), which is what the decoder follows. A codestream whose size or
  component count differs from the header's is corrupt and refused, with or without a limit.

Reading is bounded: a DICOM header is read up to its pixel data with large values left on
disk, only the first 64 KB of the first frame, and a deflated DICOM is inflated in chunks and
refused when it holds more than its header declares. Under a limit, a file whose format is
none of these (so whose size cannot be known before decoding) is refused. Only the first
frame's codestream is read: medx.data.dicom refuses multi-frame files before decoding.
Encapsulated data that start with no codestream known here (RLE, or data that are not what
their transfer syntax says) are left to pydicom's decoders, which allocate the header's size
or cannot parse them either.

Readers (medx.data.io.read_image, medx.data.dicom.read_dicom) call check_file before reading
a file in full and check_dataset on a DICOM dataset they read, so no caller bypasses them.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, NamedTuple

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from medx.data.io import BadImageError, _bad

__all__ = [
    "DeclaredSize",
    "TooManyPixels",
    "check_dataset",
    "check_declared_size",
    "check_file",
    "declared_sizes",
]

_DICOM_MAGIC_AT = 128
_HEAD = 1 << 16  # bytes of a codestream read for its header: every real one fits in far less
_INFLATED_HEADER = 1 << 22  # a deflated DICOM's header must fit in its first 4 MB inflated
_TRAILING = 1 << 20  # what may follow a deflated DICOM's pixels (padding, signatures)
_FORMATS = "DICOM, PNG, JPEG, BMP, TIFF, WebP or GIF"
_RESIZE = "Reduce its resolution, or raise --max-pixels if it is a real image of that size."

# JPEG markers that declare a frame's size: SOF0-3, 5-7, 9-11, 13-15; SOF55 (JPEG-LS); DHP.
_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)})
_SOF55, _LSE, _DHP, _SOS, _EOI = 0xF7, 0xF8, 0xDE, 0xDA, 0xD9
_BARE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI: markers without a length
_J2K = b"\xff\x4f\xff\x51"  # SOC, then SIZ: a codestream's first two markers, always
_JP2 = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


class DeclaredSize(NamedTuple):
    """One size a file declares: ``what`` declares it, e.g. "PNG header (IHDR)"."""

    what: str
    width: int
    height: int
    frames: int = 1
    samples: int = 1  # components per pixel, where the declaration says

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.frames

    def __str__(self) -> str:
        size = f"{self.width}x{self.height} px"
        return f"{self.frames} frames of {size}" if self.frames > 1 else size


class TooManyPixels(BadImageError):
    """A file declares more pixels than the limit; refused before any decoder allocates.

    ``pixels`` and ``limit`` are set when medx raises it (0 when rebuilt from the message
    alone, as a DataLoader worker does).
    """

    def __init__(
        self, message: str, path: Path | None = None, pixels: int = 0, limit: int = 0
    ) -> None:
        super().__init__(message, path)
        self.pixels, self.limit = pixels, limit

    def __reduce__(self):
        return type(self), (str(self), self.path, self.pixels, self.limit)


def declared_sizes(
    source: str | Path | bytes, name: str | Path | None = None
) -> list[DeclaredSize]:
    """Every size the file declares, from its headers alone (no pixel is decoded).

    Args:
        source: the file, or its bytes.
        name: how errors name a file given as bytes (default: "image").

    Returns:
        The declarations in file order; empty for a format this module does not know.

    Raises:
        BadImageError: the file cannot be read, or its headers are cut off or corrupt.
    """
    with _opened(source, name) as (fp, path):
        return _sizes(fp, path)


def check_declared_size(
    source: str | Path | bytes, max_pixels: int | None, name: str | Path | None = None
) -> list[DeclaredSize]:
    """Refuse a file that declares more than ``max_pixels`` anywhere, before decoding it.

    Also refuses a DICOM file whose codestream contradicts its header (a corrupt file, or
    one crafted to pass a check of the header alone), with or without a limit.

    Args:
        source: the file, or its bytes.
        max_pixels: the most pixels (width x height x frames) any declaration may hold; None
            for no limit, which checks DICOM files for consistency only.
        name: how errors name a file given as bytes.

    Returns:
        The declared sizes.

    Raises:
        TooManyPixels: a declaration is over the limit; the message names the file, the
            size, the declaration and what to do.
        BadImageError: the headers are corrupt or contradict each other, or under a limit
            the file is none of the formats whose size can be read before decoding.
    """
    with _opened(source, name) as (fp, path):
        return _checked(fp, path, max_pixels)


def check_file(fp: BinaryIO, path: Path, max_pixels: int | None) -> list[DeclaredSize]:
    """What a reader checks before it reads ``fp`` (an open file, named ``path``) in full.

    Under a limit, as check_declared_size. Without one, only what reading the whole file
    would otherwise allocate without bound: a deflated DICOM is inflated in chunks first.
    The reader then checks the DICOM dataset it read with check_dataset, at no extra parse.
    """
    if max_pixels is not None:
        return _checked(fp, path, max_pixels)
    if _is_dicom(fp) and _syntax(fp) == DeflatedExplicitVRLittleEndian:
        _inflated_header(fp, path)
    fp.seek(0)
    return []


def check_dataset(ds: Dataset, path: Path) -> None:
    """Refuse a DICOM dataset, read in full, whose first frame's codestream declares another
    size or number of components than its header: a decoder would allocate the former."""
    if "PixelData" not in ds or not ds["PixelData"].is_undefined_length:
        return
    element = ds["PixelData"]
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    _check_consistent(_declared(ds, syntax, _frame_head(io.BytesIO(element.value)), path), path)


def _checked(fp: BinaryIO, path: Path, max_pixels: int | None) -> list[DeclaredSize]:
    sizes = _sizes(fp, path)
    if max_pixels is not None:
        if not sizes and not _is_dicom(fp):  # DICOM without Rows is never decoded
            raise _bad(
                path,
                f"cannot be sized before decoding: it is not a {_FORMATS} file, or it is corrupt",
            )
        for size in sizes:
            if size.pixels > max_pixels:
                raise TooManyPixels(
                    f"Image {path} declares {size} ({size.pixels / 1e6:.1f} megapixels) in "
                    f"its {size.what}, over the limit of {max_pixels / 1e6:.1f} megapixels "
                    f"(--max-pixels): refused before decoding. {_RESIZE}",
                    path,
                    size.pixels,
                    max_pixels,
                )
    _check_consistent(sizes, path)
    return sizes


@contextmanager
def _opened(source: str | Path | bytes, name: str | Path | None) -> Iterator[tuple[BinaryIO, Path]]:
    if isinstance(source, bytes | bytearray | memoryview):
        yield io.BytesIO(source), Path(name or "image")
        return
    path = Path(source)
    try:
        fp = path.open("rb")
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror or exc})") from exc
    with fp:
        yield fp, path


def _sizes(fp: BinaryIO, path: Path) -> list[DeclaredSize]:
    fp.seek(0)
    head = fp.read(_DICOM_MAGIC_AT + 4)
    if not head:
        raise _bad(path, "is empty (0 bytes)")
    fp.seek(0)
    if _is_dicom(fp):
        return _dicom_sizes(fp, path)
    try:
        return _image_sizes(head, fp)
    except Exception as exc:  # struct, and PIL's TIFF reader, raise many types on bad input
        raise _bad(path, f"is corrupt: its header cannot be read ({exc})") from exc


def _is_dicom(fp: BinaryIO) -> bool:
    fp.seek(_DICOM_MAGIC_AT)
    magic = fp.read(4)
    fp.seek(0)
    return magic == b"DICM"


# --- image files ------------------------------------------------------------------------------


def _image_sizes(head: bytes, fp: BinaryIO) -> list[DeclaredSize]:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        if head[12:16] != b"IHDR":
            raise ValueError("no IHDR chunk first")
        return [DeclaredSize("PNG header (IHDR)", *struct.unpack(">II", head[16:24]))]
    if head.startswith(b"\xff\xd8"):
        fp.seek(2)
        return _jpeg_sizes(fp, "JPEG")
    if head.startswith(_J2K) or head.startswith(_JP2):
        return _j2k_sizes(head + fp.read(_HEAD))
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return _gif_sizes(head[6:10], fp)
    if head.startswith(b"BM"):
        if int.from_bytes(head[14:18], "little") == 12:  # OS/2 BITMAPCOREHEADER
            width, height = struct.unpack("<HH", head[18:22])
        else:
            width, height = struct.unpack("<ii", head[18:26])  # height < 0: top-down rows
        return [DeclaredSize("BMP header", abs(width), abs(height))]
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return [_webp_size(head)]
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        from PIL import TiffImagePlugin  # the class, not Image.open: no bomb check to trip

        fp.seek(0)
        width, height = TiffImagePlugin.TiffImageFile(fp).size
        return [DeclaredSize("TIFF first directory (IFD)", width, height)]
    return []


def _jpeg_sizes(fp: BinaryIO, kind: str) -> list[DeclaredSize]:
    """Every frame size a JPEG or JPEG-LS stream declares before its first scan; ``fp`` is
    just after SOI. A JPEG-LS size of 0 is given by an LSE marker of ID 4 (oversize)."""
    sizes: list[DeclaredSize] = []
    while (marker := _next_marker(fp)) not in (None, _SOS, _EOI):
        if marker in _BARE:
            continue
        length = struct.unpack(">H", _read_exactly(fp, 2))[0]
        if marker not in _SOF and marker not in (_SOF55, _DHP, _LSE):
            fp.seek(length - 2, io.SEEK_CUR)
            continue
        body = _read_exactly(fp, length - 2)
        if marker != _LSE:
            height, width, components = struct.unpack(">xHHB", body[:6])
            what = f"{kind} frame header ({_MARKER_NAMES.get(marker, f'SOF{marker - 0xC0}')})"
            sizes.append(DeclaredSize(what, width, height, 1, components))
        elif body[:1] == b"\x04" and sizes:  # ID 4, oversize image dimension
            wide = body[1]  # Y, then X, `wide` bytes each
            height, width = (int.from_bytes(body[at : at + wide], "big") for at in (2, 2 + wide))
            what = f"{kind} oversize dimensions (LSE)"
            sizes[-1] = sizes[-1]._replace(what=what, width=width, height=height)
    return sizes


_MARKER_NAMES = {_SOF55: "SOF55", _DHP: "DHP"}


def _next_marker(fp: BinaryIO) -> int | None:
    """The next marker code, None at the end of the data. Bytes before it are skipped, as
    libjpeg skips them (with a warning), so that no frame header libjpeg sees is missed."""
    while True:
        while (byte := fp.read(1)) and byte != b"\xff":
            pass
        while byte == b"\xff":  # fill bytes
            byte = fp.read(1)
        if not byte:
            return None
        if byte != b"\x00":  # FF00 is a stuffed data byte, not a marker
            return byte[0]


def _read_exactly(fp: BinaryIO, count: int) -> bytes:
    data = fp.read(count)
    if len(data) != count:
        raise ValueError("the header is cut off")
    return data


def _j2k_sizes(data: bytes) -> list[DeclaredSize]:
    """The SIZ marker of a JPEG 2000 (or HTJ2K) codestream, bare or in a JP2 file's jp2c box."""
    if data.startswith(_JP2):
        data = _jp2_codestream(data)
    if not data.startswith(_J2K):
        raise ValueError("no SIZ marker after the start of the codestream")
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", data[8:24])
    components = struct.unpack(">H", data[40:42])[0]
    if xsiz <= xosiz or ysiz <= yosiz:
        raise ValueError(f"SIZ declares an empty image ({xsiz}-{xosiz} x {ysiz}-{yosiz})")
    return [
        DeclaredSize("JPEG 2000 codestream (SIZ marker)", xsiz - xosiz, ysiz - yosiz, 1, components)
    ]


def _jp2_codestream(data: bytes) -> bytes:
    pos = 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if length == 1:  # a 64-bit length follows
            length, header = struct.unpack(">Q", data[pos + 8 : pos + 16])[0], 16
        if kind == b"jp2c":
            return data[pos + header :]
        if length < header:  # 0: the box runs to the end of the file; no codestream box first
            break
        pos += length
    raise ValueError(f"no codestream box (jp2c) in the first {len(data)} bytes")


def _gif_sizes(screen: bytes, fp: BinaryIO) -> list[DeclaredSize]:
    """The logical screen and the first image descriptor (a frame may exceed the screen)."""
    sizes = [DeclaredSize("GIF logical screen", *struct.unpack("<HH", screen))]
    fp.seek(10)
    flags = _read_exactly(fp, 3)[0]
    if flags & 0x80:  # global colour table
        fp.seek(3 << ((flags & 7) + 1), io.SEEK_CUR)
    while (block := fp.read(1)) == b"!":  # extensions: a label, then sub-blocks
        fp.seek(1, io.SEEK_CUR)
        while size := _read_exactly(fp, 1)[0]:
            fp.seek(size, io.SEEK_CUR)
    if block == b",":
        width, height = struct.unpack("<4xHH", _read_exactly(fp, 8))
        sizes.append(DeclaredSize("GIF image descriptor", width, height))
    return sizes


def _webp_size(head: bytes) -> DeclaredSize:
    chunk = head[12:16]
    if chunk == b"VP8 ":
        if head[23:26] != b"\x9d\x01\x2a":
            raise ValueError("no VP8 start code")
        width, height = struct.unpack("<HH", head[26:30])
        return DeclaredSize("WebP header (VP8)", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L":
        bits = int.from_bytes(head[21:25], "little")
        return DeclaredSize("WebP header (VP8L)", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        width, height = (int.from_bytes(head[at : at + 3], "little") + 1 for at in (24, 27))
        return DeclaredSize("WebP header (VP8X canvas)", width, height)
    raise ValueError(f"unknown WebP chunk {chunk!r}")


# --- DICOM ------------------------------------------------------------------------------------


def _dicom_sizes(fp: BinaryIO, path: Path) -> list[DeclaredSize]:
    from medx.data.dicom import load_dataset  # dicom.py imports this module

    if _syntax(fp) == DeflatedExplicitVRLittleEndian:  # native pixels: the header's size
        return _declared(_inflated_header(fp, path), DeflatedExplicitVRLittleEndian, b"", path)
    fp.seek(0)
    ds = load_dataset(fp, path, header_only=True)  # stops at the pixel data element
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    element = fp.read(12)  # where pydicom stopped: encapsulated data have undefined length
    encapsulated = element[:4] == b"\xe0\x7f\x10\x00" and element[8:] == b"\xff" * 4
    return _declared(ds, syntax, _frame_head(fp) if encapsulated else b"", path)


def _declared(ds: Dataset, syntax: UID, head: bytes, path: Path) -> list[DeclaredSize]:
    """The header's size, and that of the codestream starting the first frame, ``head``."""
    sizes = []
    if "Rows" in ds and "Columns" in ds:
        try:
            frames = int(ds.get("NumberOfFrames") or 1)
            samples = int(ds.get("SamplesPerPixel") or 1)
            size = DeclaredSize("DICOM header", int(ds.Columns), int(ds.Rows), frames, samples)
        except (TypeError, ValueError) as exc:
            raise _bad(
                path, f"is a corrupt DICOM file: its image size is unreadable ({exc})"
            ) from exc
        sizes.append(size)
    try:
        if head.startswith(b"\xff\xd8"):
            sizes += _jpeg_sizes(io.BytesIO(head[2:]), _JPEG_KIND.get(syntax, "JPEG"))
        elif head.startswith(_J2K) or head.startswith(_JP2):
            sizes += _j2k_sizes(head)
    except (struct.error, ValueError) as exc:
        raise _bad(
            path,
            f"is a truncated or corrupt DICOM file: its {syntax.name} pixel data cannot be "
            f"decoded (their codestream header cannot be read: {exc})",
        ) from exc
    return sizes


# JPEG-LS streams start like JPEG ones; their frame header is named for what they are. RLE
# data declare no size of their own: the decoder allocates the header's.
_JPEG_KIND = {"1.2.840.10008.1.2.4.80": "JPEG-LS", "1.2.840.10008.1.2.4.81": "JPEG-LS"}


def _syntax(fp: BinaryIO) -> str | None:
    """The transfer syntax in the file meta information, leaving ``fp`` just after it; None
    when it cannot be read (pydicom then says why, reading the file properly)."""
    fp.seek(0)
    try:
        read_preamble(fp, False)
        meta = read_dataset(fp, False, True, stop_when=lambda tag, *_: tag.group != 2)
    except Exception:  # pydicom raises many types on corrupt input
        return None
    return str(meta.get("TransferSyntaxUID", "")) or None


def _frame_head(fp: BinaryIO) -> bytes:
    """Up to _HEAD bytes of encapsulated pixel data after the Basic Offset Table: the start
    of the first frame, across fragments if it is split. ``fp`` is at the first item (the
    offset table); data that are not items give b"" (pydicom then says what is wrong)."""
    head, offset_table = b"", True
    while len(head) < _HEAD and len(item := fp.read(8)) == 8:
        tag, length = struct.unpack("<4sI", item)
        if tag != b"\xfe\xff\x00\xe0":  # not an item: the sequence delimiter, or corrupt
            break
        part = b"" if offset_table else fp.read(min(length, _HEAD - len(head)))
        head += part
        fp.seek(length - len(part), io.SEEK_CUR)
        offset_table = False
    return head


def _inflated_header(fp: BinaryIO, path: Path) -> Dataset:
    """The header of a deflated DICOM file (``fp`` just after its file meta), after making
    sure that the file inflates to no more than its header declares: pydicom inflates a whole
    file in memory, and a few MB of zeros can inflate to gigabytes."""
    chunks = _inflate(fp)
    prefix = bytearray()
    try:
        for chunk in chunks:
            prefix += chunk
            if len(prefix) >= _INFLATED_HEADER:
                break
        buffer = io.BytesIO(prefix)
        ds = read_dataset(buffer, False, True, stop_when=_at_pixels, defer_size=_HEAD)
        if "Rows" not in ds and len(prefix) >= _INFLATED_HEADER:
            raise ValueError(f"its header inflates to more than {_INFLATED_HEADER >> 20} MB")
        declared = 1
        for key in ("Rows", "Columns", "NumberOfFrames", "SamplesPerPixel"):
            declared *= int(ds.get(key) or 1)
        bound = buffer.tell() + declared * ((int(ds.get("BitsAllocated") or 8) + 7) // 8)
        total = len(prefix)
        for chunk in chunks:
            total += len(chunk)
            if total > bound + _TRAILING:
                raise ValueError(
                    f"its data inflate to more than its header declares "
                    f"({ds.get('Columns')}x{ds.get('Rows')} px)"
                )
    except Exception as exc:  # zlib and pydicom raise many types on corrupt input
        raise _bad(path, f"is a truncated or corrupt deflated DICOM file ({exc})") from exc
    return ds


def _at_pixels(tag: int, *_: object) -> bool:
    return tag in (0x7FE00008, 0x7FE00009, 0x7FE00010)


def _inflate(fp: BinaryIO) -> Iterator[bytes]:
    """The raw deflate stream from ``fp`` inflated in chunks of at most 1 MB."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    while not inflater.eof:
        data = inflater.unconsumed_tail or fp.read(1 << 16)
        if not data:
            raise EOFError("the deflated data are cut off")
        yield inflater.decompress(data, 1 << 20)


def _check_consistent(sizes: list[DeclaredSize], path: Path) -> None:
    """A DICOM codestream must declare the header's size and samples per pixel."""
    header = next((s for s in sizes if s.what == "DICOM header"), None)
    for stream in sizes:
        if header is None or stream is header:
            continue
        if (stream.width, stream.height) != (header.width, header.height):
            raise _bad(
                path,
                f"is corrupt: its DICOM header declares {header.width}x{header.height} px but "
                f"its {stream.what} {stream.width}x{stream.height} px",
            )
        if stream.samples != header.samples:
            raise _bad(
                path,
                f"is corrupt: its DICOM header declares {header.samples} sample(s) per pixel "
                f"but its {stream.what} {stream.samples} components",
            )
