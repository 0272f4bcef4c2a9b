"""Decode once (`data.cache`): every image decoded, converted and resized once into a uint8 store.

Without it every epoch decodes every file again at full size (a 2,000 px JPEG costs tens of
milliseconds) only to shrink it to a 224 px crop. The store keeps each image at the size
training crops from (`geometry`), gray as ONE channel (expanded to RGB when read: X-rays are
gray, so a third of the memory), either

- `disk`: in one memory-mapped file, `<cache_dir>/decoded/<name>-<settings hash>.medxcache`.
  The page cache holds it once, however many DataLoader workers read it;
- `memory`: the same arrays in RAM (workers forked from the trainer share them; spawned
  workers, the default on macOS and Windows, each get a copy);
- `none`: no store, every epoch decodes (the behaviour before).

The store is filled by the pass that decodes every image once anyway (bad files, corrupt JPEGs,
the pixel digests of the duplicate check) and remembers what that pass found, so a later run
whose files are unchanged decodes nothing at all. An entry is keyed by its files' paths, sizes
and mtimes and its own parameters; a file by the settings (root, resize, intensity) in its
name, and by the format version and medx's version in its header. A changed image is decoded
again (the rest is copied); a file of another version or other settings is rebuilt; both are
logged. A build writes a temporary file and renames it into place under a lock, so two runs
building at once end with one valid file. A disk that cannot take the file (read-only, full)
gets a warning naming the path, and the run goes on as with `none`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

import medx
from medx.data.decoder_warnings import map_watching_decoders
from medx.data.intensity import standardise

# The decoder's own steps, so that the store holds exactly what read_image gives and the digest
# is exactly check_images' (the duplicate check compares the two kinds).
from medx.data.io import BadImageError, CheckedImages, _to_rgb, _to_uint8, pixel_digest
from medx.data.io import _read as _read_file
from medx.data.io import corrupt_image_error as _corrupt
from medx.data.transforms import ImageTransform
from medx.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MODES = ("none", "memory", "disk")
FORMAT_VERSION = 1  # bump when the file layout or what an entry holds changes
SUFFIX = ".medxcache"
_MAGIC = b"MEDXDEC\x01"
_TRAILER = 16  # header length (8 bytes, little-endian), then the magic again


def check_mode(mode: str | None) -> str:
    """The mode, or a ConfigError naming `data.cache` and the choices."""
    mode = mode or "none"
    if mode not in MODES:
        raise ConfigError(f"data.cache={mode!r} is unknown; choices: {', '.join(MODES)}.")
    return mode


class Geometry(NamedTuple):
    """How the store resizes: "square" = `side` x `side`, exactly the eval transform's resize
    (training takes whole images); "short" = the short side down to `side`, aspect kept."""

    kind: str
    side: int


def geometry(size: int, augment: str) -> Geometry:
    """The store's size for a training transform: no margin when it takes the whole image, else
    enough that its smallest random crop is never upsampled.

    RandomResizedCrop(scale=(s, 1), ratio=(r0, r1)) cuts at least min(sqrt(s / r1), sqrt(s * r0))
    of the short side: 0.875 for `light` (224 px → a 257 px short side), 0.771 for `strong`
    (291 px). Cropping the smaller image takes the same part of the anatomy as cropping the
    original (the aspect is kept): only the resampling differs.
    """
    steps = ImageTransform(size, augment).steps.transforms
    crops = [t for t in steps if isinstance(t, v2.RandomResizedCrop)]
    if not crops:
        return Geometry("square", size)
    scale, (low, high) = min(crops[0].scale), crops[0].ratio
    smallest = min(math.sqrt(scale / high), math.sqrt(scale * low))
    return Geometry("short", math.ceil(size / smallest - 1e-9))


def fit(pixels: np.ndarray, shape: Geometry) -> np.ndarray:
    """HxW or HxWx3 uint8 resized as the store keeps it, by ImageTransform's own resampling
    (bilinear, antialiased); an image already within a "short" side is kept as it is."""
    height, width = pixels.shape[:2]
    if shape.kind == "square":
        target = [shape.side, shape.side]
    elif min(height, width) <= shape.side:
        return pixels
    else:
        target = [shape.side]
    t = torch.from_numpy(np.ascontiguousarray(pixels))
    t = F.resize(t[None] if t.ndim == 2 else t.permute(2, 0, 1), target, antialias=True)
    return t[0].numpy() if pixels.ndim == 2 else t.permute(1, 2, 0).contiguous().numpy()


def one_channel(pixels: np.ndarray) -> np.ndarray:
    """HxW when the three channels are equal (gray saved as RGB, as many X-ray exports are)."""
    gray = pixels.ndim == 3 and (pixels[..., 0] == pixels[..., 1]).all()
    if gray and (pixels[..., 0] == pixels[..., 2]).all():
        return np.ascontiguousarray(pixels[..., 0])
    return pixels


def decode_image(path: Path, intensity: str = "none") -> tuple[np.ndarray, bytes]:
    """(pixels, digest) of one file: the pixels of read_image, with gray kept as HxW, and the
    digest of check_images (of the pixels before `intensity`, alpha dropped), in one decode."""
    deep = intensity not in (None, "none")
    img, channels = _read_file(path, keep_depth=deep)
    raw = _to_uint8(img, path) if deep else img  # refuses NaN as read_image does
    if channels == 2:
        raw = raw[:, :, 0]
    elif channels == 4:
        raw = raw[:, :, :3]
    digest = pixel_digest(raw)
    if deep:
        return standardise(img[..., 0] if channels == 2 else img, intensity), digest
    if channels in (1, 2):
        return np.ascontiguousarray(img.reshape(img.shape[0], img.shape[1], -1)[:, :, 0]), digest
    return _to_rgb(img, channels), digest


class Decoded(NamedTuple):
    """What the store keeps of one item: its arrays (uint8, any shape) and a pixel digest."""

    arrays: tuple[np.ndarray, ...]
    digest: bytes = b""


@dataclass(frozen=True)
class Item:
    """One entry: the files it is made from, and whatever else makes its arrays (`params`,
    e.g. a degradation and its seed)."""

    files: tuple[Path, ...]
    params: tuple = ()


def image_entry(item: Item, intensity: str, shape: Geometry) -> Decoded | BadImageError:
    """A classification entry: one image, resized by `shape`, gray as one channel."""
    try:
        pixels, digest = decode_image(item.files[0], intensity)
    except BadImageError as err:
        return err
    return Decoded((one_channel(fit(pixels, shape)),), digest)


def verify_entry(item: Item) -> Decoded | BadImageError:
    """An entry with no arrays: only what the verification pass found (good or why not)."""
    try:
        return Decoded((), decode_image(item.files[0])[1])
    except BadImageError as err:
        return err


class Store:
    """The entries of a list of items, in the order asked for: a digest, an error, arrays.

    Pickles without its memory map (a spawned DataLoader worker maps the file itself) and
    refuses a file that another run has replaced meanwhile.
    """

    def __init__(
        self,
        entries: list[dict],
        path: Path | None = None,
        memory: list[tuple[np.ndarray, ...]] | None = None,
        identity: tuple[int, int, int] | None = None,
        data: np.ndarray | None = None,
    ) -> None:
        self.entries, self.path, self.memory, self.identity = entries, path, memory, identity
        self._data = data

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def has_arrays(self) -> bool:
        return self.path is not None or self.memory is not None

    def digest(self, i: int) -> bytes:
        return bytes.fromhex(self.entries[i]["digest"])

    def error(self, i: int) -> BadImageError | None:
        found = self.entries[i]["error"]
        return None if found is None else BadImageError(found[0], Path(found[1]))

    def arrays(self, i: int) -> tuple[np.ndarray, ...]:
        if self.memory is not None:
            return self.memory[i]
        data = self._map()
        return tuple(
            data[offset : offset + math.prod(shape)].reshape(shape)
            for offset, shape in self.entries[i]["arrays"]
        )

    def column(self, rows: Sequence[int], field: int = 0, rgb: bool = False) -> Column:
        return Column(self, list(rows), field, rgb)

    def checked(self, skip_bad: bool) -> CheckedImages:
        """What medx.data.io.check_images would say of these one-file entries, by the same
        rules: the first bad file raises, or each is skipped with a warning."""
        checked = CheckedImages()
        for i, entry in enumerate(self.entries):
            error = self.error(i)
            path = Path(entry["files"][0][0])
            if error is None:
                checked.paths.append(path)
                checked.digests.append(self.digest(i))
            elif not skip_bad:
                raise error
            else:
                log.warning("Skipping bad image: %s", error)
                checked.bad.append(error)
        if checked.bad:
            log.warning(
                "Skipped %d of %d images as bad (data.skip_bad_images=true)",
                len(checked.bad),
                len(self),
            )
        return checked

    def _map(self) -> np.ndarray:
        if self._data is None:
            with self.path.open("rb") as f:
                if _identity(os.fstat(f.fileno())) != self.identity:
                    raise DataError(
                        f"The decoded cache {self.path} was replaced by another run while this "
                        "one used it; run again (or set data.cache=memory)."
                    )
                self._data = np.memmap(f, dtype=np.uint8, mode="r")
        return self._data

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}


class Column:
    """One array of some store entries, as a sequence; gray expanded to RGB when `rgb`."""

    def __init__(self, store: Store, rows: list[int], field: int = 0, rgb: bool = False) -> None:
        self.store, self.rows, self.field, self.rgb = store, rows, field, rgb

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        array = self.store.arrays(self.rows[i])[self.field]
        if self.rgb and array.ndim == 2:
            return np.repeat(array[:, :, None], 3, axis=2)
        return array

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def subset(self, index: Sequence[int]) -> Column:
        return Column(self.store, [self.rows[i] for i in index], self.field, self.rgb)


def open_store(
    items: Sequence[Item],
    make: Callable[[Item], Decoded | BadImageError],
    *,
    mode: str,
    directory: Path | None,
    name: str,
    settings: Mapping[str, Any],
    fallback: str = "none",
    what: str = "images",
) -> Store | None:
    """The store of `items` (None for `none`): read when the file holds them all unchanged,
    else built, decoding only the entries that are missing or stale.

    `make` decodes one item (threads: it must return a BadImageError, not raise it); `settings`
    is everything else the arrays depend on. `fallback`: what a disk that cannot take the file
    leaves: "none" keeps only what the pass found (the data set decodes every epoch), "memory"
    keeps the arrays in RAM.
    """
    mode = check_mode(mode)
    if mode == "none":
        return None
    stats = [_stats(item) for item in items]
    keep = mode == "memory" or fallback == "memory"
    if mode == "memory":
        return _build(items, stats, make, _Sink(None, keep), None, what)
    if directory is None:
        raise ConfigError("data.cache=disk needs data.cache_dir, the folder to keep it in.")
    settings = _plain(settings)
    slot = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(directory) / "decoded" / f"{name}-{slot}{SUFFIX}"
    store, old = _select(_load(path, settings), items, stats, what)
    if store is not None:
        return store
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(_locked(path))
            found = _load(path, settings, quiet=True)
            store, old = _select(found, items, stats, what, quiet=True)
            if store is not None:
                log.info("Decoded cache %s: built by another run meanwhile", path)
                return store
            sink = _Sink(path, keep, settings)
        except OSError as err:  # no folder, lock or file can be made there: read-only, full
            _cannot_write(path, err)
            sink = _Sink(None, keep)
        store = _build(items, stats, make, sink, old, what)
        if sink.written:  # read back what is now in place, from one open file
            written, _ = _select(_load(path, settings), items, stats, what, quiet=True)
            store = written or store
        return store


def _cannot_write(path: Path, err: OSError) -> None:
    log.warning(
        "data.cache=disk cannot write the decoded cache %s (%s); decoding as with data.cache=none",
        path,
        err.strerror or err,
    )


class _OnDisk(NamedTuple):
    """A cache file as read: its header, its entries by key, its memory map."""

    header: dict
    by_key: dict[str, int]
    data: np.ndarray
    path: Path
    identity: tuple[int, int, int]

    def entry(self, stats: list[list], params: Sequence) -> dict | None:
        """The entry of these files and params, if its files are unchanged (size, mtime)."""
        i = self.by_key.get(_key(stats, params))
        entry = self.header["items"][i] if i is not None else None
        return entry if entry is not None and entry["files"] == stats else None


def _load(path: Path, settings: dict, quiet: bool = False) -> _OnDisk | None:
    """The file at `path` if it is a complete cache of this format, medx and settings; why
    not is logged (nothing when there is no file)."""
    say = log.debug if quiet else log.info
    try:
        with path.open("rb") as f:
            stat = os.fstat(f.fileno())
            size = stat.st_size
            f.seek(max(0, size - _TRAILER))
            tail = f.read(_TRAILER)
            length = int.from_bytes(tail[:8], "little")
            if f.seek(0) != 0 or f.read(8) != _MAGIC or tail[8:] != _MAGIC:
                raise ValueError("no medx decoded-cache markers")
            if not 8 + length + _TRAILER <= size:
                raise ValueError("truncated")
            f.seek(size - _TRAILER - length)
            header = json.loads(f.read(length))
            data = np.memmap(f, dtype=np.uint8, mode="r") if size else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        (log.debug if quiet else log.warning)(
            "%s is not a readable medx decoded cache (%s); rebuilding it", path, err
        )
        return None
    written = (header.get("format"), header.get("medx"))
    if written != (FORMAT_VERSION, medx.__version__):
        say(
            "The decoded cache %s was written by medx %s (format %s); rebuilding it for medx %s "
            "(format %s)",
            path,
            written[1],
            written[0],
            medx.__version__,
            FORMAT_VERSION,
        )
        return None
    if header.get("settings") != settings:
        say("The decoded cache %s holds images decoded with other settings; rebuilding it", path)
        return None
    by_key = {_key(e["files"], e["params"]): i for i, e in enumerate(header["items"])}
    return _OnDisk(header, by_key, data, path, _identity(stat))


def _select(
    found: _OnDisk | None,
    items: Sequence[Item],
    stats: list[list],
    what: str,
    quiet: bool = False,
) -> tuple[Store | None, _OnDisk | None]:
    """(the store, when `found` holds every item unchanged; else None and `found`)."""
    if found is None:
        return None, None
    entries, stale = [], []
    for item, stat in zip(items, stats, strict=True):
        entry = found.entry(stat, item.params)
        if entry is None:
            stale.append(item)
        entries.append(entry)
    if not stale:
        if not quiet:
            log.info("Decoded cache %s: %d %s, nothing to decode", found.path, len(items), what)
        return Store(entries, found.path, identity=found.identity, data=found.data), None
    (log.debug if quiet else log.info)(
        "%d of %d %s are new or changed since the decoded cache %s was built (e.g. %s); "
        "decoding them",
        len(stale),
        len(items),
        what,
        found.path,
        stale[0].files[0],
    )
    return None, found


class _Sink:
    """Where a build puts arrays: a temporary file renamed into place at the end (`path`), or
    RAM when `keep` (also beside a file, for a disk that fails halfway)."""

    def __init__(self, path: Path | None, keep: bool, settings: dict | None = None) -> None:
        self.path, self.keep, self.settings = path, keep, settings
        self.memory: dict[int, tuple[np.ndarray, ...]] = {}
        self.size, self.failed, self.written = 0, False, False
        self.lock = threading.Lock()
        self.file = None
        if path is not None:
            self.tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            self.file = self.tmp.open("wb")
            self._write(_MAGIC)

    def put(self, i: int, arrays: tuple[np.ndarray, ...]) -> list:
        """Keep entry `i`'s arrays; their [offset in the file, shape]."""
        arrays = tuple(np.ascontiguousarray(a, dtype=np.uint8) for a in arrays)
        if self.keep:
            self.memory[i] = arrays
        with self.lock:
            if self.file is None:
                return []
            specs = []
            try:
                for a in arrays:
                    specs.append([self.size, list(a.shape)])
                    self._write(memoryview(a).cast("B"))
            except OSError as err:
                self._fail(err)
                return []
            return specs

    def finish(self, entries: list[dict], what: str) -> Store:
        """The store built: in place at `path` (then `written`), else in RAM or none."""
        if self.file is not None:
            header = {
                "format": FORMAT_VERSION,
                "medx": medx.__version__,
                "settings": self.settings,
                "items": entries,
            }
            try:
                text = json.dumps(header, separators=(",", ":")).encode()
                self._write(text)
                self._write(len(text).to_bytes(8, "little") + _MAGIC)
                self.file.close()
                self.file = None
                os.replace(self.tmp, self.path)
            except OSError as err:
                self._fail(err)
            else:
                self.written = True
                log.info("Decoded %s cached in %s", what, self.path)
        if self.failed:
            entries = [{**e, "arrays": []} for e in entries]
        memory = [self.memory.get(i, ()) for i in range(len(entries))] if self.keep else None
        return Store(entries, memory=memory)

    def abort(self) -> None:
        self._close()

    def _write(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self.size += len(data)

    def _fail(self, err: OSError) -> None:
        self.failed = True
        _cannot_write(self.path, err)
        self._close()

    def _close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None
        if self.path is not None and not self.written:
            with contextlib.suppress(OSError):
                self.tmp.unlink(missing_ok=True)


def _build(
    items: Sequence[Item],
    stats: list[list],
    make: Callable[[Item], Decoded | BadImageError],
    sink: _Sink,
    old: _OnDisk | None,
    what: str,
) -> Store:
    """Decode what `old` lacks (threads, decoder warnings watched), copy the rest, finish."""
    try:
        entries: list[dict] = [{}] * len(items)
        todo = []
        for i, (item, stat) in enumerate(zip(items, stats, strict=True)):
            entry = old.entry(stat, item.params) if old is not None else None
            if entry is None:
                todo.append(i)
                continue
            reused = Store([entry], old.path, identity=old.identity, data=old.data)
            entries[i] = {**entry, "arrays": sink.put(i, reused.arrays(0))}
        with _progress(len(todo), what) as advance:

            def one(i: int) -> dict:
                result = make(items[i])
                entry = {"files": stats[i], "params": _plain(list(items[i].params))}
                if isinstance(result, BadImageError):
                    entry.update(digest="", error=_error(result), arrays=[])
                else:
                    arrays = sink.put(i, result.arrays)
                    entry.update(digest=result.digest.hex(), error=None, arrays=arrays)
                advance()
                return entry

            workers = min(32, (os.cpu_count() or 1) + 4)
            done, warned = map_watching_decoders(
                one, todo, lambda i: items[i].files, workers, "medx-cache"
            )
        for k, (path, warning) in warned.items():
            done[k].update(error=_error(_corrupt(path, warning)), digest="", arrays=[])
        for i, entry in zip(todo, done, strict=True):
            entries[i] = entry
        return sink.finish(entries, what)
    except BaseException:
        sink.abort()
        raise


@contextlib.contextmanager
def _progress(total: int, what: str) -> Iterator[Callable[[], None]]:
    if total == 0:
        yield lambda: None
        return
    from rich.progress import Progress

    log.info("Decoding %d %s once", total, what)
    with Progress(transient=True) as bar:
        task = bar.add_task(f"Decoding {total} {what}", total=total)
        yield lambda: bar.advance(task)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Held while one process builds `path`: the others wait, then read what it built. Where
    there is no fcntl (Windows), both build and the last rename wins (the same content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(path.name + ".lock").open("a+b") as lock:
        try:
            import fcntl
        except ImportError:
            yield
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Waiting for another run that is building the decoded cache %s", path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _stats(item: Item) -> list[list]:
    """[[path, size, mtime in ns], ...] of an item's files; a missing file never matches."""
    out = []
    for path in item.files:
        try:
            stat = path.stat()
            out.append([str(path), stat.st_size, stat.st_mtime_ns])
        except OSError:
            out.append([str(path), -1, -1])
    return out


def _key(files: list, params: Sequence) -> str:
    return json.dumps([[f[0] for f in files], _plain(list(params))])


def _plain(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(value, default=str))


def _identity(stat: os.stat_result) -> tuple[int, int, int]:
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _error(err: BadImageError) -> list[str]:
    return [str(err), str(err.path or "")]
