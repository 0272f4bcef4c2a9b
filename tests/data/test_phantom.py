"""The phantom data set: deterministic, cached once, with lung masks, learnable but not trivial."""

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from medx.data.phantom import (
    CLASSES,
    GENERATOR_VERSION,
    ensure_phantom,
    phantom_images,
    render_phantom,
    render_phantom_regions,
    sample_anatomy,
    write_phantom,
)
from medx.errors import ConfigError

PATIENT = re.compile(r"patient(\d+)_")


def images(root: Path) -> list[tuple[Path, int]]:
    """(path, label index) of every image, as a data loader would list them."""
    return [(p, c) for c, name in enumerate(CLASSES) for p in sorted((root / name).glob("*.png"))]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom(tmp_path_factory.mktemp("phantom"), n_patients=150, seed=3)


def test_render_phantom_returns_image_and_lung_mask() -> None:
    anatomy = sample_anatomy(np.random.default_rng(0))  # one patient...
    first, mask1 = render_phantom(np.random.default_rng(1), 128, opacity=True, anatomy=anatomy)
    second, mask2 = render_phantom(np.random.default_rng(2), 128, opacity=True, anatomy=anatomy)
    assert first.shape == mask1.shape == (128, 128) and first.dtype == mask1.dtype == np.uint8
    assert not np.array_equal(first, second)  # ...two acquisitions
    assert 0.75 < (mask1 > 0).sum() / (mask2 > 0).sum() < 1.33  # same lungs, moved and rescaled


def test_the_label_changes_the_image_but_not_the_lungs() -> None:
    anatomy = sample_anatomy(np.random.default_rng(0))
    normal, normal_mask = render_phantom(np.random.default_rng(1), 128, False, anatomy)
    opacity, opacity_mask = render_phantom(np.random.default_rng(1), 128, True, anatomy)
    assert np.array_equal(normal_mask, opacity_mask)
    brighter = opacity.astype(int) - normal
    assert brighter.min() >= 0 and brighter[opacity_mask > 0].max() > 10


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    a = write_phantom(tmp_path / "a", n_patients=6, size=64, seed=1)
    b = write_phantom(tmp_path / "b", n_patients=6, size=64, seed=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 2 * 6 * 2  # images + masks
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_different_seed_gives_different_images(tmp_path: Path) -> None:
    a = write_phantom(tmp_path / "a", n_patients=4, size=64, seed=1)
    b = write_phantom(tmp_path / "b", n_patients=4, size=64, seed=2)
    name = "patient0000_0.png"
    first = next(a.glob(f"*/{name}"))
    second = next(b.glob(f"*/{name}"))
    assert not np.array_equal(cv2.imread(str(first), 0), cv2.imread(str(second), 0))


def test_every_image_has_a_binary_lung_mask_with_the_same_stem(phantom: Path) -> None:
    for path, _ in images(phantom):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(phantom / "masks" / path.name), cv2.IMREAD_UNCHANGED)
        assert mask is not None and mask.shape == image.shape == (128, 128)
        assert set(np.unique(mask)) <= {0, 255}
        assert 0.15 < (mask > 0).mean() < 0.45


def test_class_counts_follow_prevalence_and_patients_share_a_label(tmp_path: Path) -> None:
    root = write_phantom(tmp_path, n_patients=20, images_per_patient=3, size=64, prevalence=0.3)
    labels: dict[int, set[int]] = {}
    for path, label in images(root):
        labels.setdefault(int(PATIENT.match(path.name).group(1)), set()).add(label)
    assert sorted(labels) == list(range(20))
    assert all(len(s) == 1 for s in labels.values())
    assert sum(s == {1} for s in labels.values()) == round(0.3 * 20)
    assert len(images(root)) == 20 * 3


def test_ensure_phantom_generates_once(tmp_path: Path) -> None:
    first = ensure_phantom(tmp_path, n_patients=5, size=64)
    probe = first / "masks" / "patient0000_0.png"
    mtime = probe.stat().st_mtime_ns
    assert ensure_phantom(str(tmp_path), n_patients=5, size=64) == first
    assert probe.stat().st_mtime_ns == mtime
    assert f"v{GENERATOR_VERSION}" in first.name
    assert ensure_phantom(tmp_path, n_patients=5, size=64, seed=1) != first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_concurrent_ensure_phantom_calls_agree_on_one_complete_copy(tmp_path: Path) -> None:
    with ThreadPoolExecutor(4) as pool:  # like sweep jobs starting at once on a shared cache
        roots = set(pool.map(lambda _: ensure_phantom(tmp_path, n_patients=30, size=64), range(4)))
    assert len(roots) == 1
    assert len(images(roots.pop())) == 60
    assert len(list(tmp_path.iterdir())) == 1  # losers cleaned up their temporary copies


@pytest.mark.parametrize("bad", [{"n_patients": 0}, {"size": 8}, {"prevalence": 1.5}])
def test_bad_parameters_are_config_errors(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ConfigError):
        ensure_phantom(tmp_path, **bad)


def test_opacities_make_the_lungs_brighter_on_average(phantom: Path) -> None:
    lung_mean: dict[int, list[float]] = {0: [], 1: []}
    for path, label in images(phantom):
        mask = cv2.imread(str(phantom / "masks" / path.name), 0) > 0
        lung_mean[label].append(cv2.imread(str(path), 0)[mask].mean())
    assert np.mean(lung_mean[1]) > np.mean(lung_mean[0]) + 3


def test_whole_image_mean_and_std_do_not_separate_the_classes(phantom: Path) -> None:
    pairs = images(phantom)
    pixels = [cv2.imread(str(p), 0).astype(float) for p, _ in pairs]
    features = np.array([[im.mean(), im.std()] for im in pixels])
    labels = np.array([label for _, label in pairs])
    scores = cross_val_predict(
        LogisticRegression(), features, labels, cv=5, method="predict_proba"
    )[:, 1]
    assert roc_auc_score(labels, scores) < 0.75  # the task needs looking inside the lungs


def test_the_opacity_mask_is_where_the_opacities_brighten_the_image() -> None:
    anatomy = sample_anatomy(np.random.default_rng(4))
    image, lungs, opacity = render_phantom_regions(np.random.default_rng(5), 128, True, anatomy)
    normal, _, none = render_phantom_regions(np.random.default_rng(5), 128, False, anatomy)

    same = render_phantom(np.random.default_rng(5), 128, True, anatomy)
    assert np.array_equal(same[0], image) and np.array_equal(same[1], lungs)  # same pixels
    assert none.max() == 0  # negatives have no opacity
    region = opacity > 0
    assert set(np.unique(opacity)) == {0, 255} and 0.005 < region.mean() < 0.3
    brighter = image.astype(int) - normal
    assert brighter[region].mean() > 10 > 4 * brighter[~region].mean()
    assert (region & (lungs > 0)).sum() > 0.8 * region.sum()  # drawn inside the lungs


def test_phantom_images_are_the_files_write_phantom_writes(tmp_path: Path) -> None:
    root = write_phantom(tmp_path, n_patients=4, size=64, seed=2)
    items = list(phantom_images(n_patients=4, size=64, seed=2))

    assert len(items) == len(images(root)) == 8
    for item in items:
        assert np.array_equal(cv2.imread(str(root / item.label / item.name), 0), item.image)
        assert np.array_equal(cv2.imread(str(root / "masks" / item.name), 0), item.lungs)
        assert (item.opacity.max() > 0) == (item.label == "OPACITY")
