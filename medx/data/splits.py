"""Patient-grouped, label-stratified splits.

Several images often belong to one patient; a split that puts one patient in both training and
validation lets the model recognise the patient instead of the disease, and the validation
score leaks. Everything here splits whole patients, keeps each split's class mix close to the
pool's, and is deterministic from the seed.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from fractions import Fraction
from pathlib import Path
from typing import Self

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from medx.errors import ConfigError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")  # every data module's split names, in this order


class Subsettable:
    """Mixin for a dataclass of parallel lists, one entry per image (a split's samples):
    `subset` keeps the entries at `index` in every list, so that no field is forgotten."""

    def subset(self, index: Sequence[int]) -> Self:
        return type(self)(*([getattr(self, f.name)[i] for i in index] for f in fields(self)))


# Kermany chest X-rays (see $MEDX_DATA/README.md): personN_bacteria_M / personN_virus_M are
# patient N; IM-XXXX-YYYY and NORMAL2-IM-XXXX-YYYY (also IM-XXXX-YYYY-ZZZZ) are patient XXXX.
#
# The README does not say that "person" numbers and "IM" numbers are distinct namespaces, so
# patient_id() reduces both to the bare number (leading zeros stripped): person12, IM-0012-0001
# and NORMAL2-IM-0012-0001 are one group. Merging two real patients only makes the split a
# little coarser; splitting one real patient in two leaks. On the 5,216 training images this
# gives 1,737 groups (up to 2,846 if the three name families were distinct), 898 of them with
# both NORMAL and PNEUMONIA images, and stratification still holds to a point or so.
KERMANY_PATIENT = r"person(\d+)_|IM-(\d+)-"

_SPLIT_RULES = "Fractions are shares of the whole pool, each in [0, 1); 'train' gets the rest."


def patient_id(path: Path, pattern: str | None) -> str:
    """The patient a file belongs to, from its name.

    pattern: regex searched in the file name; the patient is the first non-None group (or the
    whole match). None or no match → the file stem (each image its own patient). An all-digit
    id loses its leading zeros, so "0012" and "12" are one patient (see KERMANY_PATIENT).
    """
    path = Path(path)
    if pattern is None:
        return path.stem
    match = _compile(pattern).search(path.name)
    if match is None:
        return path.stem
    found = next((g for g in match.groups() if g is not None), match.group(0))
    if not found:
        return path.stem
    if found.isascii() and found.isdigit():
        return str(int(found))
    return found


def patient_ids(paths: Iterable[Path], pattern: str | None) -> list[str]:
    """patient_id() for many files; warns once if names match no pattern (silent leak risk).

    A DICOM file's own PatientID, when it has one, wins over its name.
    """
    from medx.data.dicom import dicom_patient_id, is_dicom_file  # dicom -> io -> ... -> splits

    paths = [Path(p) for p in paths]
    from_dicom = [dicom_patient_id(p) if is_dicom_file(p) else None for p in paths]
    if any(from_dicom):
        log.info(
            "%d of %d images take their patient from the DICOM PatientID",
            sum(map(bool, from_dicom)),
            len(paths),
        )
    ids = [d or patient_id(p, pattern) for p, d in zip(paths, from_dicom, strict=True)]
    if pattern is not None:
        regex = _compile(pattern)
        unmatched = [
            p.name
            for p, d in zip(paths, from_dicom, strict=True)
            if not d and not regex.search(p.name)
        ]
        if unmatched:
            log.warning(
                "%d of %d file names do not match the patient pattern %r, so each of them is "
                "treated as its own patient (e.g. %s); if several of them come from one patient, "
                "fix the pattern or the split will leak",
                len(unmatched),
                len(paths),
                pattern,
                ", ".join(unmatched[:3]),
            )
    return ids


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"Patient pattern {pattern!r} is not a valid regex: {exc}") from exc


def _encode(
    labels: Sequence[int], groups: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and groups as integer codes (sklearn wants arrays; codes keep it fast).

    Returns (label codes, group codes, the distinct labels that the codes index).
    """
    y = np.asarray(labels)
    g = np.asarray(groups)
    if y.ndim != 1 or g.ndim != 1 or len(y) != len(g):
        raise ValueError(
            f"labels and groups must be 1-D and of equal length, got shapes {y.shape} and {g.shape}"
        )
    if len(y) == 0:
        raise ConfigError("Cannot split an empty data set: no images were found.")
    classes, y_codes = np.unique(y, return_inverse=True)
    return y_codes, np.unique(g, return_inverse=True)[1], classes


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {seed}")


def _check_fractions(fractions: Mapping[str, float]) -> None:
    if "train" in fractions:
        raise ConfigError(f"Split fractions must not name 'train'. {_SPLIT_RULES}")
    for name, frac in fractions.items():
        if not (isinstance(frac, numbers.Real) and math.isfinite(frac) and 0 <= frac < 1):
            raise ConfigError(f"Split fraction {name}={frac!r} is not in [0, 1). {_SPLIT_RULES}")
    total = sum(fractions.values())
    if total >= 1:
        keys = ", ".join(f"{k}={v}" for k, v in fractions.items())
        raise ConfigError(
            f"Split fractions {keys} sum to {total:g}, leaving nothing for 'train'; "
            f"make them sum to less than 1. {_SPLIT_RULES}"
        )


def _fold_plan(share: float) -> tuple[int, int]:
    """(m, k): taking m of k group folds gives about ``share`` of the pool.

    A single fold of round(1/share) would make 0.4 into 0.5; a fraction with a small
    denominator (at most 20, or 1/share for small shares) stays within a couple of percent.
    """
    limit = max(20, round(1 / share))
    approx = Fraction(share).limit_denominator(limit)
    m, k = approx.numerator, approx.denominator
    if m == 0:
        m, k = 1, limit
    if m == k:
        m, k = limit - 1, limit
    return m, k


def _class_name(classes: np.ndarray, code: int, names: Sequence[str] | None) -> str:
    """A label code's class name when the caller gave names (labels index them), else the label."""
    label = classes.tolist()[code]
    if names is not None and isinstance(label, int) and 0 <= label < len(names):
        return str(names[label])
    return str(label)


def _check_enough_patients(
    what: str,
    y: np.ndarray,
    g: np.ndarray,
    classes: np.ndarray,
    k: int,
    per_class: int,
    names: Sequence[str] | None,
) -> None:
    """ConfigError unless there are >= k patients and >= per_class patients of each class."""
    n_groups = len(np.unique(g))
    if n_groups < k:
        raise ConfigError(
            f"{what} needs the pool cut into {k} groups of patients, but it holds only {n_groups} "
            f"patients ({len(g)} images). Use fewer or larger splits, fewer folds, or more data; "
            f"check the patient pattern if each image should not be its own patient."
        )
    for cls in np.unique(y):
        n_cls = len(np.unique(g[y == cls]))
        if n_cls < per_class:
            raise ConfigError(
                f"{what} needs at least {per_class} patients of every class, but class "
                f"{_class_name(classes, cls, names)} has only {n_cls} in a pool of {n_groups} "
                "patients, "
                f"so some split would get none of them. Use fewer or larger splits, fewer folds, "
                f"merge rare classes, or add data."
            )


def _group_folds(y: np.ndarray, g: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Positions of the k test folds of a shuffled StratifiedGroupKFold."""
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # We check patients per class ourselves; sklearn's check counts images and only warns.
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        return [test for _, test in sgkf.split(np.zeros(len(y)), y, g)]


def split_by_patient(
    labels: Sequence[int],
    groups: Sequence[str],
    fractions: Mapping[str, float],
    seed: int,
    class_names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Carve named splits (e.g. {"val": .1, "test": .1}) out of one pool; the rest is "train".

    Grouped by patient (no patient in two splits) and stratified by label, via scikit-learn's
    StratifiedGroupKFold: each split is m of k folds of what is still left. Splits are carved
    in sorted name order, so the result depends only on the data, the fractions and the seed
    (not on the order of the images or of the keys). Returns sorted index arrays into
    ``labels``; a fraction of 0 gives an empty array. ``class_names[label]`` names a class in
    messages (NORMAL rather than 0).
    """
    _check_fractions(fractions)
    _check_seed(seed)
    y, g, classes = _encode(labels, groups)
    remaining = np.arange(len(y))
    remaining_share = 1.0
    splits: dict[str, np.ndarray] = {}
    for name in sorted(fractions):
        frac = float(fractions[name])
        if frac == 0:
            splits[name] = np.array([], dtype=np.int64)
            continue
        m, k = _fold_plan(frac / remaining_share)
        what = f"Split {name}={frac:g}"
        per_class = math.ceil(k / min(m, k - m))
        _check_enough_patients(what, y[remaining], g[remaining], classes, k, per_class, class_names)
        folds = _group_folds(y[remaining], g[remaining], k, seed)
        taken = np.zeros(len(remaining), dtype=bool)
        for fold in folds[:m]:
            taken[fold] = True
        splits[name] = np.sort(remaining[taken]).astype(np.int64)
        remaining = remaining[~taken]
        remaining_share -= frac
    splits["train"] = np.sort(remaining).astype(np.int64)
    _log_splits(splits, y, g, classes, class_names)
    return {"train": splits.pop("train"), **splits}


def kfold_by_patient(
    labels: Sequence[int],
    groups: Sequence[str],
    n_folds: int,
    fold: int,
    seed: int,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx) of fold ``fold`` of a patient-grouped, stratified k-fold.

    Every patient is in exactly one validation fold; the folds together cover the pool.
    ``class_names`` as for split_by_patient.
    """
    if n_folds < 2:
        raise ConfigError(f"n_folds must be at least 2, got {n_folds}")
    if not 0 <= fold < n_folds:
        raise ConfigError(f"fold must be in [0, {n_folds - 1}] for n_folds={n_folds}, got {fold}")
    _check_seed(seed)
    y, g, classes = _encode(labels, groups)
    what = f"{n_folds}-fold cross-validation"
    _check_enough_patients(what, y, g, classes, n_folds, n_folds, class_names)
    val = np.sort(_group_folds(y, g, n_folds, seed)[fold]).astype(np.int64)
    train = np.setdiff1d(np.arange(len(y)), val).astype(np.int64)
    return train, val


def _log_splits(
    splits: Mapping[str, np.ndarray],
    y: np.ndarray,
    g: np.ndarray,
    classes: np.ndarray,
    names: Sequence[str] | None,
) -> None:
    shown = [_class_name(classes, code, names) for code in range(len(classes))]
    for name, idx in splits.items():
        counts = np.bincount(y[idx], minlength=len(classes))
        log.info(
            "Split %s: %d images, %d patients, images per class %s",
            name,
            len(idx),
            len(np.unique(g[idx])),
            dict(zip(shown, counts.tolist(), strict=True)),
        )
