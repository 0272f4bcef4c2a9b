"""The true class of each input, for clinical metrics on a labelled set (`medx.predict --labels`).

Labels come the two ways sites keep them:

- **folders**: `INPUT/<class>/...`: the folder directly under INPUT names the class of every
  image below it, at any depth (for one file given as INPUT: the folder it is in). Images
  directly in INPUT, and folders named after no class of the model, are unmatched.
- **a CSV file** with the columns `path,label` (a header row; more columns are ignored): a
  relative `path` is relative to the CSV file's folder, an absolute one is itself; `label`
  is a class name of the model (exact, else in another case), or its index (0 for the first
  class) when the names are not digits. Inputs the CSV does not list, and labels that name
  no class, are unmatched. The CSV is read, and labels matched, as `medx.calibrate` reads a
  site's sample (`medx.data.labelled`).

`match` gives each input its class or why it has none, and `Tally` counts what metrics can be
computed on: images matched to each class and predicted, unmatched ones (by reason), failed
ones. Metrics are refused when a class of the model has no image (`Tally.check`): numbers
computed on a silent subset, or with a class missing, would mean something else than they say.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medx.data.labelled import class_index, path_key, read_label_csv
from medx.errors import DataError

__all__ = ["Matching", "Tally", "from_csv", "from_folders", "match"]

NOT_IN_FOLDER = "directly in INPUT, not in a class folder"


@dataclass
class Matching:
    """Each input's class index (None: unmatched) and, for the unmatched, why.

    Args:
        index: per input, the index of its class among the model's classes, or None.
        reasons: per input, why it is unmatched ("" when matched).
        unused: CSV rows that name no input (0 for folders).
        source: where the labels came from (for messages).
    """

    index: list[int | None]
    reasons: list[str]
    unused: int = 0
    source: str = "folders"


def match(
    labels: str | Path | None, paths: Sequence[Path], root: Path, classes: Sequence[str]
) -> Matching:
    """The labels of `paths`: from a CSV file when `labels` is one, else from class folders.

    Args:
        labels: a CSV file (`path,label`), or None for class folders.
        paths: the inputs, as found under `root`.
        root: the INPUT they were found in (a folder, or the one file).
        classes: the model's class names, in logit order.
    """
    if labels is None:
        return from_folders(paths, root, classes)
    return from_csv(Path(labels), paths, classes)


def from_folders(paths: Sequence[Path], root: Path, classes: Sequence[str]) -> Matching:
    """Labels by the folder directly under `root` (see the module docstring)."""
    index: list[int | None] = []
    reasons: list[str] = []
    for path in paths:
        folder = _class_folder(Path(path), Path(root))
        if folder is None:
            index.append(None)
            reasons.append(NOT_IN_FOLDER)
        elif folder in classes:
            index.append(list(classes).index(folder))
            reasons.append("")
        else:
            index.append(None)
            reasons.append(f"folder {folder!r}")
    return Matching(index, reasons)


def _class_folder(path: Path, root: Path) -> str | None:
    if root.is_file() or root == path:
        return path.parent.name or None
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return path.parent.name or None
    return parts[0] if len(parts) > 1 else None


def from_csv(table: Path, paths: Sequence[Path], classes: Sequence[str]) -> Matching:
    """Labels from a `path,label` CSV file (see the module docstring).

    Raises:
        DataError: the file cannot be read, lacks a column, or gives one path two labels.
    """
    if not table.is_file():
        raise DataError(
            f"--labels {table} is not a file; give a CSV file with path,label columns, or "
            "--labels alone to label images by their class folders."
        )
    wanted = read_label_csv(table)
    index: list[int | None] = []
    reasons: list[str] = []
    used = set()
    for path in paths:
        key = path_key(Path(path))
        label = wanted.get(key)
        if label is None:
            index.append(None)
            reasons.append(f"not in {table.name}")
            continue
        used.add(key)
        found = class_index(label, classes)
        index.append(found)
        reasons.append("" if found is not None else f"label {label!r}")
    return Matching(index, reasons, len(set(wanted) - used), table.name)


@dataclass
class Tally:
    """What the metrics of a labelled run rest on.

    Args:
        classes: the model's classes.
        matched: per class, the images matched to it and predicted.
        unmatched: per reason, the images without a class.
        failed: images that could not be read.
        unclassified: images the quality gate refused (read, not classified).
        unused: CSV rows that name no input.
        source: where the labels came from.
        rows: the indices of the inputs the metrics are computed on, and their classes.
    """

    classes: list[str]
    matched: Counter[str] = field(default_factory=Counter)
    unmatched: Counter[str] = field(default_factory=Counter)
    failed: int = 0
    unclassified: int = 0
    unused: int = 0
    source: str = "folders"
    rows: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def of(cls, matching: Matching, failed: Sequence[bool], classified: Sequence[bool], classes):
        """Count a run: `failed[i]` the input could not be read, `classified[i]` it has
        probabilities."""
        tally = cls(list(classes), unused=matching.unused, source=matching.source)
        for i, (index, reason) in enumerate(zip(matching.index, matching.reasons, strict=True)):
            if failed[i]:
                tally.failed += 1
            elif index is None:
                tally.unmatched[reason] += 1
            elif not classified[i]:
                tally.unclassified += 1
            else:
                tally.matched[tally.classes[index]] += 1
                tally.rows.append((i, index))
        return tally

    def summary(self) -> str:
        """One line: matched per class, unmatched by reason, failed."""
        total = sum(self.matched.values())
        per_class = ", ".join(f"{c} {self.matched[c]}" for c in self.classes)
        line = f"labels ({self.source}): {total} images matched to a class ({per_class})"
        missed = sum(self.unmatched.values())
        reasons = ", ".join(f"{r}: {n}" for r, n in self.unmatched.most_common())
        line += f"; {missed} unmatched" + (f" ({reasons})" if missed else "")
        if self.unclassified:
            line += f"; {self.unclassified} refused by the quality gate"
        line += f"; {self.failed} failed"
        if self.unused:
            line += f"; rows of {self.source} naming no input: {self.unused}"
        return line

    def check(self) -> None:
        """Refuse metrics when a class of the model has no image (DataError, one line)."""
        empty = [c for c in self.classes if not self.matched[c]]
        if not empty:
            return
        how = (
            f"name the folders under INPUT after the model's classes ({', '.join(self.classes)})"
            " or give --labels labels.csv (path,label)"
            if self.source == "folders"
            else f"label images with the model's classes ({', '.join(self.classes)})"
        )
        raise DataError(
            f"--labels: no predicted image of class {', '.join(empty)}, so no metrics "
            f"({self.summary()}); {how}."
        )
