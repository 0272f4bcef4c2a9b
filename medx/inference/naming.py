"""Names for per-image output files (overlays, masks) that no two inputs can share.

An output mirrors its input's place under the input folder (`a/x.jpeg` → `a/x.png`), so a
folder of per-study `IM0001.dcm` files keeps one overlay per study. Inputs that would still
meet in one name (`x.jpeg` and `x.png` beside each other, DICOM files named by UIDs that
differ only after their last dot) each get a short digest of their own path added, so every
output is its input's alone.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

__all__ = ["output_names"]


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
