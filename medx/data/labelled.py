"""A site's labelled sample: image files and their class, from a folder tree or a CSV.

`medx.calibrate` re-chooses a model's operating point on such a sample. Two forms:
- a folder `root/<class>/...` (images anywhere below each class folder);
- a CSV with columns `path,label` (a header row, more columns ignored; a relative path is
  relative to the CSV's folder, an absolute one is itself).
A label is a class name of the model (exact, else case-insensitive), or its index (0 for the
first class) when the names are not digits. `medx.predict --labels` reads CSVs and matches
labels with the same functions (`read_label_csv`, `class_index`). The sample's digest
(SHA-256 over each file's bytes and label, in path order) goes into the new operating point's
provenance, so the data a threshold came from can be recognised later.
"""

from __future__ import annotations

import csv
import hashlib
import os
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
    """The sample at `source` (folder or CSV) with labels matched to `class_names`.

    Args:
        source: a folder `root/<class>/...` or a `path,label` CSV file.
        class_names: the model's classes, in logit order.

    Raises:
        DataError: a label names no class, a listed image does not exist, or `source` is
            neither a folder nor a CSV (one line each).
    """
    source = Path(source)
    if source.is_dir():
        pairs = _from_folder(source)
    elif source.is_file() and source.suffix.lower() == ".csv":
        pairs = [(Path(path), label) for path, label in read_label_csv(source).items()]
    else:
        raise DataError(
            f"{source} is neither a folder of class subfolders nor a .csv file (path,label); "
            "check the path."
        )
    index = [class_index(label, class_names) for _, label in pairs]
    unknown = sorted({label for (_, label), i in zip(pairs, index, strict=True) if i is None})
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
    return LabelledSample([p for p, _ in pairs], [int(i) for i in index], source)


def class_index(label: str, class_names: Sequence[str]) -> int | None:
    """The index of the class `label` names: the name itself, else the name in another case,
    else its index when the names are not digits (names "0", "1" decide alone); None if none."""
    names = [str(c) for c in class_names]
    if label in names:
        return names.index(label)
    folded = [c.lower() for c in names]
    if label.lower() in folded and folded.count(label.lower()) == 1:
        return folded.index(label.lower())
    by_index = not any(c.isdigit() for c in names)
    if by_index and label.isdigit() and int(label) < len(names):
        return int(label)
    return None


def read_label_csv(table: Path) -> dict[str, str]:
    """{resolved image path: label} of a `path,label` CSV (see the module docstring).

    Raises:
        DataError: the file cannot be read, lacks a column, has a row without a path or
            label, or gives one image two labels (one line naming the file and line).
    """
    if not table.is_file():
        raise DataError(
            f"{table} is not a file; give a CSV file with path,label columns (or class folders)."
        )
    try:
        with table.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{table} cannot be read as a CSV file ({err}).") from err
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if "path" not in header or "label" not in header:
        raise DataError(
            f"{table} needs a header row with the columns path and label (it has "
            f"{', '.join(header) or 'none'}): one row per image, e.g. NORMAL/im1.png,NORMAL."
        )
    at, label_at = header.index("path"), header.index("label")
    labels: dict[str, str] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(at, label_at):
            raise DataError(f"{table}, line {number}: the row has no path or label.")
        text, label = row[at].strip(), row[label_at].strip()
        key = path_key(Path(text) if os.path.isabs(text) else table.parent / text)
        if labels.get(key, label) != label:
            raise DataError(
                f"{table}, line {number}: {text} is labelled both {labels[key]!r} and "
                f"{label!r}; give each image one label."
            )
        labels[key] = label
    return labels


def path_key(path: Path) -> str:
    """How two spellings of one file compare equal (symlinks and `..` resolved)."""
    return os.path.normcase(os.path.realpath(path))


def _from_folder(root: Path) -> list[tuple[Path, str]]:
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not is_hidden(d))
    if not classes:
        raise DataError(
            f"{root} has no class subfolders: give root/<class>/... (e.g. root/NORMAL, "
            "root/PNEUMONIA) or a path,label CSV."
        )
    return [(path, folder.name) for folder in classes for path in find_images(folder)]
