"""A site's labelled sample: image files and their class, from a folder tree or a CSV.

`medx.calibrate` re-chooses a model's operating point on such a sample. Two forms:
- a folder `root/<class>/...` (images anywhere below each class folder);
- a CSV with columns `path,label` (a header row; relative paths are relative to the CSV).
Labels are the model's class names (case-insensitive). The sample's digest (SHA-256 over each
file's bytes and label, in path order) goes into the new operating point's provenance, so the
data a threshold came from can be recognised later.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medx.data.io import find_images, is_hidden
from medx.errors import DataError


@dataclass
class LabelledSample:
    """Image paths and integer labels (indices into the model's class names)."""

    paths: list[Path]
    labels: list[int]
    source: Path

    def counts(self, class_names: Sequence[str]) -> dict[str, int]:
        return {name: self.labels.count(i) for i, name in enumerate(class_names)}

    def digest(self) -> str:
        """SHA-256 over each file's bytes and label, in path order."""
        total = hashlib.sha256()
        for path, label in sorted(zip(map(str, self.paths), self.labels, strict=True)):
            total.update(hashlib.sha256(Path(path).read_bytes()).digest())
            total.update(str(label).encode())
        return total.hexdigest()


def read_labelled(source: Path, class_names: Sequence[str]) -> LabelledSample:
    """The sample at `source` (folder or CSV) with labels matched to `class_names`."""
    source = Path(source)
    index = {name.lower(): i for i, name in enumerate(class_names)}
    if source.is_dir():
        pairs = _from_folder(source)
    elif source.is_file() and source.suffix.lower() == ".csv":
        pairs = _from_csv(source)
    else:
        raise DataError(
            f"{source} is neither a folder of class subfolders nor a .csv file (path,label); "
            "check the path."
        )
    unknown = sorted({label for _, label in pairs if label.lower() not in index})
    if unknown:
        raise DataError(
            f"{source}: labels {', '.join(map(repr, unknown[:5]))} match no class of the model "
            f"({', '.join(class_names)}); name the folders or CSV labels after its classes."
        )
    missing = [p for p, _ in pairs if not p.is_file()]
    if missing:
        raise DataError(
            f"{source}: {len(missing)} listed images do not exist (e.g. {missing[0]}); fix the "
            "paths (relative paths are relative to the CSV's folder)."
        )
    return LabelledSample([p for p, _ in pairs], [index[lb.lower()] for _, lb in pairs], source)


def _from_folder(root: Path) -> list[tuple[Path, str]]:
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not is_hidden(d))
    if not classes:
        raise DataError(
            f"{root} has no class subfolders: give root/<class>/... (e.g. root/NORMAL, "
            "root/PNEUMONIA) or a path,label CSV."
        )
    return [(path, folder.name) for folder in classes for path in find_images(folder)]


def _from_csv(path: Path) -> list[tuple[Path, str]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DataError(f"{path} needs a header row with columns path,label and one row an image.")
    base = path.parent
    return [(base / r["path"].strip(), r["label"].strip()) for r in rows]
