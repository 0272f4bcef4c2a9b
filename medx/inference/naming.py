"""Output files: names for per-image outputs (overlays, masks) that no two inputs can share,
in a folder that is known to be writable before the work starts.

An output mirrors its input's place under the input folder (`a/x.jpeg` → `a/x.png`), so a
folder of per-study `IM0001.dcm` files keeps one overlay per study. Inputs that would still
meet in one name (`x.jpeg` and `x.png` beside each other, DICOM files named by UIDs that
differ only after their last dot) each get a short digest of their own path added, so every
output is its input's alone.

`writable_folder` creates the output folder and writes a probe file in it before a model is
run, so a read-only file system, a missing permission or a file in the way is one line naming
the folder, not a traceback after the first image; `writing` turns a write that fails later
(a full disk) into such a line too.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from medx.errors import DataError

__all__ = ["output_names", "writable_folder", "writing"]


def output_names(paths: Sequence[Path], root: Path | None, suffix: str = ".png") -> list[Path]:
    """One relative output path per input, all different.

    Args:
        paths: the inputs (files under `root`, or anywhere when `root` is None or a file).
        root: the folder the inputs were found in; their outputs mirror the tree below it.
        suffix: the outputs' file type.
    """
    relative = [_relative(Path(p), root) for p in paths]
    plain = [r.with_suffix(suffix) if r.suffix else r.with_name(r.name + suffix) for r in relative]
    taken = Counter(str(p).lower() for p in plain)  # case-insensitive file systems meet too
    names = []
    for rel, name in zip(relative, plain, strict=True):
        if taken[str(name).lower()] > 1:
            digest = hashlib.sha256(rel.as_posix().encode()).hexdigest()[:8]
            name = name.with_name(f"{name.stem}-{digest}{suffix}")
        names.append(name)
    if len({str(n).lower() for n in names}) != len(names):  # a digest clash: longer digests
        names = [n.with_name(f"{n.stem}-{i}{suffix}") for i, n in enumerate(names)]
    return names


def _relative(path: Path, root: Path | None) -> Path:
    if root is not None and root.is_dir():
        try:
            return Path(PurePosixPath(path.relative_to(root).as_posix()))
        except ValueError:
            pass
    return Path(path.name)


def writable_folder(folder: str | Path, flag: str = "--out") -> Path:
    """`folder`, created if needed, once a file could be written in it.

    Args:
        folder: where outputs go.
        flag: how messages name it (the command's option).

    Raises:
        DataError: one line naming `flag` and why it cannot be written (a file in the way, a
            read-only file system, no permission).
    """
    folder = Path(folder)
    for above in (folder, *folder.parents):
        if above.exists() or above.is_symlink():
            if not above.is_dir():
                where = "is a file" if above == folder else f"lies under the file {above}"
                raise DataError(f"{flag} {folder} {where}; give a folder for the outputs.")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".medx-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise DataError(
            f"{flag} {folder} cannot be written ({err.strerror or err}); give a folder you can "
            "write to."
        ) from err
    return folder


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Writing `path`: an OSError (a full disk, a folder made read-only meanwhile) becomes a
    DataError naming the file and the reason."""
    try:
        yield
    except OSError as err:
        raise DataError(f"Could not write {path} ({err.strerror or err}).") from err
