"""Patient-grouped, stratified splits, checked on the real Kermany file names."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest

from medx.data.io import list_images
from medx.data.splits import (
    KERMANY_PATIENT,
    kfold_by_patient,
    patient_id,
    patient_ids,
    split_by_patient,
)
from medx.errors import ConfigError

CLASSES = ("NORMAL", "PNEUMONIA")


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1_bacteria_1.jpeg", "1"),
        ("person1000_virus_1681.jpeg", "1000"),
        ("IM-0115-0001.jpeg", "115"),
        ("NORMAL2-IM-0333-0001.jpeg", "333"),
        ("IM-0429-0001-0002.jpeg", "429"),  # a second series of patient 429
    ],
)
def test_kermany_names_map_to_their_patient(name: str, patient: str) -> None:
    assert patient_id(Path("chest_xray/train/X") / name, KERMANY_PATIENT) == patient


def test_person_and_im_numbers_share_one_namespace() -> None:
    # Not documented as distinct, so merged: merging never leaks, splitting one patient would.
    assert patient_id(Path("person12_virus_3.jpeg"), KERMANY_PATIENT) == patient_id(
        Path("IM-0012-0001.jpeg"), KERMANY_PATIENT
    )


def test_patient_id_falls_back_to_the_stem() -> None:
    assert patient_id(Path("scan_17.png"), None) == "scan_17"
    assert patient_id(Path("scan_17.png"), KERMANY_PATIENT) == "scan_17"  # no match
    assert patient_id(Path("ab-CD7-x.png"), r"[A-Z]+\d") == "CD7"  # no group: whole match


def test_patient_ids_warns_about_names_that_match_no_pattern(
    caplog: pytest.LogCaptureFixture,
) -> None:
    names = [Path("person3_virus_7.jpeg"), Path("IM-0003-0001.jpeg"), Path("odd_scan.jpeg")]
    with caplog.at_level(logging.WARNING, logger="medx.data.splits"):
        ids = patient_ids(names, KERMANY_PATIENT)

    assert ids == ["3", "3", "odd_scan"]
    assert "1 of 3 file names" in caplog.text and "odd_scan.jpeg" in caplog.text


def test_invalid_pattern_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a valid regex"):
        patient_id(Path("a.png"), "person(")


@pytest.fixture(scope="module")
def kermany(medx_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, patients) of all 5,216 real training images; label = class folder."""
    root = medx_data / "chest_xray" / "train"
    paths, labels = [], []
    for label, name in enumerate(CLASSES):
        found = list_images(root / name)
        paths += found
        labels += [label] * len(found)
    assert len(paths) == 5216, f"expected the 5,216 Kermany training images under {root}"
    assert all(re.search(KERMANY_PATIENT, p.name) for p in paths), "a name matches no pattern"
    return np.array(labels), np.array(patient_ids(paths, KERMANY_PATIENT))


def test_real_split_keeps_patients_apart_and_classes_balanced(
    kermany: tuple[np.ndarray, np.ndarray],
) -> None:
    labels, patients = kermany
    fractions = {"val": 0.1, "test": 0.1}
    splits = split_by_patient(labels, patients, fractions, seed=0)

    assert set(splits) == {"train", "val", "test"}
    everything = np.concatenate(list(splits.values()))
    assert sorted(everything.tolist()) == list(range(len(labels)))  # a partition of the pool
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = set(patients[splits[a]]) & set(patients[splits[b]])
            assert not shared, f"patients in both {a} and {b}: {sorted(shared)[:5]}"

    pool_ratio = labels.mean()
    for name, share in {"train": 0.8, **fractions}.items():
        idx = splits[name]
        assert abs(len(idx) / len(labels) - share) < 0.02, name
        assert abs(labels[idx].mean() - pool_ratio) < 0.03, name


def test_real_split_is_deterministic_from_the_seed(
    kermany: tuple[np.ndarray, np.ndarray],
) -> None:
    labels, patients = kermany
    fractions = {"val": 0.1, "test": 0.1}
    first = split_by_patient(labels, patients, fractions, seed=1)
    again = split_by_patient(labels, patients, fractions, seed=1)
    other = split_by_patient(labels, patients, fractions, seed=2)

    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["val"], other["val"])


def test_real_kfold_partitions_the_pool_by_patient(
    kermany: tuple[np.ndarray, np.ndarray],
) -> None:
    labels, patients = kermany
    seen = []
    for fold in range(5):
        train, val = kfold_by_patient(labels, patients, n_folds=5, fold=fold, seed=0)
        assert not set(patients[train]) & set(patients[val])
        assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
        assert abs(labels[val].mean() - labels.mean()) < 0.03
        seen.append(val)
    assert sorted(np.concatenate(seen).tolist()) == list(range(len(labels)))  # each once


def small_pool(n_patients: int, images_each: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Half the patients negative, half positive, each with a few images."""
    patients = np.repeat([f"p{i}" for i in range(n_patients)], images_each)
    labels = np.repeat(np.arange(n_patients) % 2, images_each)
    return labels, patients


def test_zero_fraction_gives_an_empty_split() -> None:
    labels, patients = small_pool(40)
    splits = split_by_patient(labels, patients, {"val": 0.25, "test": 0.0}, seed=0)

    assert splits["test"].size == 0
    assert splits["val"].size + splits["train"].size == labels.size


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ({"val": 0.5, "test": 0.5}, "val=0.5, test=0.5 sum to 1"),
        ({"val": 0.7, "test": 0.4}, "sum to 1.1"),
        ({"val": -0.1}, "val=-0.1"),
        ({"train": 0.8}, "'train'"),
    ],
)
def test_bad_fractions_are_config_errors(fractions: dict[str, float], message: str) -> None:
    labels, patients = small_pool(40)
    with pytest.raises(ConfigError, match=re.escape(message)):
        split_by_patient(labels, patients, fractions, seed=0)


def test_too_few_patients_is_a_config_error_saying_how_many() -> None:
    labels, patients = small_pool(6, images_each=10)  # 60 images, but only 6 patients
    with pytest.raises(ConfigError, match="only 6 patients"):
        split_by_patient(labels, patients, {"val": 0.1}, seed=0)


def test_rare_class_is_a_config_error_naming_the_class() -> None:
    labels, patients = small_pool(100)
    labels[patients == "p1"] = 2  # class 2: one patient, cannot be in both train and val
    with pytest.raises(ConfigError, match="class 2 has only 1"):
        split_by_patient(labels, patients, {"val": 0.2}, seed=0)
    names = ["NORMAL", "PNEUMONIA", "COVID"]
    with pytest.raises(ConfigError, match="class COVID has only 1"):
        split_by_patient(labels, patients, {"val": 0.2}, seed=0, class_names=names)
    with pytest.raises(ConfigError, match="class COVID has only 1"):
        kfold_by_patient(labels, patients, n_folds=3, fold=0, seed=0, class_names=names)


def test_kfold_needs_as_many_patients_as_folds() -> None:
    labels, patients = small_pool(4)
    with pytest.raises(ConfigError, match="only 4 patients"):
        kfold_by_patient(labels, patients, n_folds=5, fold=0, seed=0)
    with pytest.raises(ConfigError, match="fold must be in"):
        kfold_by_patient(labels, patients, n_folds=2, fold=2, seed=0)
