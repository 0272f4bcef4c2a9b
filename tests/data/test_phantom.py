"""The embedded phantom: deterministic, cached once, with masks, learnable but not trivial."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from medx.data.phantom import CLASSES, ensure_phantom, write_phantom


def _images(root: Path) -> list[Path]:
    return sorted(p for c in CLASSES for p in (root / c).glob("*.png"))


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path):
    a = write_phantom(tmp_path / "a", n_patients=6, size=64, seed=3)
    b = write_phantom(tmp_path / "b", n_patients=6, size=64, seed=3)
    c = write_phantom(tmp_path / "c", n_patients=6, size=64, seed=4)

    names = [p.relative_to(a) for p in _images(a)]
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    assert any(not (c / n).exists() or (a / n).read_bytes() != (c / n).read_bytes() for n in names)


def test_every_image_has_a_plausible_lung_mask(tmp_path: Path):
    root = write_phantom(tmp_path, n_patients=10, images_per_patient=2, size=96, seed=0)

    for image in _images(root):
        mask = cv2.imread(str(root / "masks" / image.name), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (96, 96) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        assert 0.10 < (mask > 0).mean() < 0.50


def test_labels_follow_prevalence_and_patients_keep_theirs(tmp_path: Path):
    root = write_phantom(tmp_path, n_patients=20, images_per_patient=3, size=64, prevalence=0.25)

    positives = {p.name.split("_")[0] for p in (root / "OPACITY").glob("*.png")}
    negatives = {p.name.split("_")[0] for p in (root / "NORMAL").glob("*.png")}
    assert len(positives) == 5 and len(negatives) == 15
    assert not positives & negatives
    assert len(list((root / "OPACITY").glob("*.png"))) == 15


def test_cache_is_generated_once(tmp_path: Path):
    first = ensure_phantom(tmp_path, n_patients=4, size=64)
    stamp = first.stat().st_mtime_ns
    second = ensure_phantom(tmp_path, n_patients=4, size=64)

    assert second == first and second.stat().st_mtime_ns == stamp
    assert ensure_phantom(tmp_path, n_patients=4, size=64, seed=1) != first


def test_opacity_is_real_signal_but_global_statistics_do_not_solve_it(tmp_path: Path):
    root = write_phantom(tmp_path, n_patients=120, images_per_patient=1, size=96, seed=0)
    stats, lung_means, labels = [], [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((root / name).glob("*.png")):
            image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float32)
            mask = cv2.imread(str(root / "masks" / path.name), cv2.IMREAD_GRAYSCALE) > 0
            stats.append([image.mean(), image.std()])
            lung_means.append(image[mask].mean() - image[~mask].mean())
            labels.append(label)
    labels_arr, lung = np.array(labels), np.array(lung_means)

    # opacities brighten the lungs relative to the rest of the image...
    assert lung[labels_arr == 1].mean() > lung[labels_arr == 0].mean()
    # ...yet whole-image brightness and contrast are far from a perfect rule
    auroc = cross_val_score(
        LogisticRegression(), np.array(stats), labels_arr, cv=5, scoring="roc_auc"
    ).mean()
    assert auroc < 0.85
