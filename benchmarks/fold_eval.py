"""Issue 23: fold models judged on their own val fold, clean and under acquisition shifts.

`benchmarks/kermany.py --folds K --stress` trains each variant on K patient-grouped folds; this
module then evaluates each fold's best checkpoint on that fold's val split, as one model, with
test-time augmentation, or as an ensemble of several variants' models of the same fold (each
member trained on the same images, so the val fold stays unseen by all): val AUROC, the
threshold chosen on val for the target sensitivity, the rates at it, and the stress test
(`medx.evaluation.stress`'s shifts of `medx.data.acquisition`) on the val fold at that
threshold, worst case per shift family. The same stratified subsample of the val fold and the
same seeded shifts serve every variant, so variants are compared image for image.

TTA multiplies the cost of a stress test by its 7 views, hence the subsample and the choice of
severities (`--stress-images`, `--severities`); the clean figures always use the whole val fold.
Nothing here reads a test split.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate

from medx.data.acquisition import SHIFTS
from medx.data.shifted import ShiftedImages
from medx.evaluation import metrics
from medx.evaluation.ensemble import Ensemble
from medx.evaluation.stress import features_and_probs
from medx.evaluation.tta import TestTimeAugmentation
from medx.models.load import load, model_card

FAMILIES = tuple(SHIFTS)


@dataclass(frozen=True)
class ValFold:
    """A fold's val images as a model reads them (paths, labels, input size, intensity)."""

    paths: list[Path]
    labels: np.ndarray
    size: int
    intensity: str

    def subsample(self, n: int, seed: int = 0) -> ValFold:
        """n images drawn per class in proportion (all when n <= 0 or n >= the fold)."""
        if n <= 0 or n >= len(self.paths):
            return self
        rng = np.random.default_rng(seed)
        keep = []
        for c in np.unique(self.labels):
            idx = np.flatnonzero(self.labels == c)
            keep += list(rng.choice(idx, round(n * len(idx) / len(self.labels)), replace=False))
        keep = sorted(keep)
        return ValFold([self.paths[i] for i in keep], self.labels[keep], self.size, self.intensity)


_FOLDS: dict[str, ValFold] = {}


def val_fold(ckpt: Path) -> ValFold:
    """The val split the checkpoint's run validated on, rebuilt from its card's data config
    (the data module carves it again: same seed, fold and files, same images)."""
    card = model_card(ckpt)
    data = dict(card["data"]["config"])
    key = json.dumps({k: v for k, v in data.items() if k not in ("augment", "num_workers")})
    if key not in _FOLDS:
        data.update(num_workers=0, augment="none")
        dm = instantiate(data, _convert_="object")
        dm.setup("fit")
        val = dm.splits["val"]
        _FOLDS[key] = ValFold(
            list(val.paths), np.asarray(val.labels), int(dm.image_size), dm.intensity
        )
    return _FOLDS[key]


def model(ckpts: Sequence[Path], tta: bool = False) -> torch.nn.Module:
    """One checkpoint's model, or the mean probability of several; with TTA's 7 views."""
    members = [load(c).eval() for c in ckpts]
    num_classes = len(model_card(ckpts[0])["class_names"])
    module = members[0] if len(members) == 1 else Ensemble(members, num_classes)
    return (TestTimeAugmentation(module, num_classes) if tta else module).eval()


def _probs(module: torch.nn.Module, fold: ValFold, shift: str | None, severity: int) -> np.ndarray:
    data = ShiftedImages(fold.paths, fold.labels, fold.size, fold.intensity, shift, severity)
    return features_and_probs(module, data)[1][:, 1]


def _rates(labels: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float]:
    found = metrics.rates(labels, (p >= threshold).astype(int), 2)
    return float(found["sensitivity"][0]), float(found["specificity"][0])


def _auroc(labels: np.ndarray, p: np.ndarray) -> float:
    return float(metrics.auroc(labels, np.stack([1 - p, p], 1))[0])


def evaluate(
    module: torch.nn.Module,
    fold: ValFold,
    stress_images: int = 0,
    severities: Sequence[int] = (1, 2, 3),
    shifts: Sequence[str] = FAMILIES,
    target_sensitivity: float = 0.95,
) -> tuple[dict[str, float], list[dict]]:
    """(summary, stress rows) of `module` on `fold`: clean AUROC, val-chosen threshold and the
    rates at it on the whole fold; per shift family the worst AUROC, sensitivity and
    specificity over `severities` on a subsample of `stress_images` (empty `shifts`: none)."""
    torch.manual_seed(0)
    p = _probs(module, fold, None, 1)
    threshold = metrics.threshold_for_sensitivity(fold.labels, p, target_sensitivity)
    sens, spec = _rates(fold.labels, p, threshold)
    found = {"auroc": _auroc(fold.labels, p), "threshold": threshold, "sens": sens, "spec": spec}
    rows = []
    if not shifts:
        return found, rows
    sub = fold.subsample(stress_images)
    plan = [(None, 0)] + [(s, k) for s in shifts for k in severities]
    for shift, severity in plan:
        q = _probs(module, sub, shift, max(severity, 1))
        sens, spec = _rates(sub.labels, q, threshold)
        rows.append(
            {"shift": shift or "none", "severity": severity, "images": len(sub.labels),
             "auroc": _auroc(sub.labels, q), "sens": sens, "spec": spec}
        )  # fmt: skip
    for shift in shifts:
        mine = [r for r in rows if r["shift"] == shift]
        for key in ("auroc", "sens", "spec"):
            found[f"{shift}/{key}"] = min(r[key] for r in mine)
    shifted = [r for r in rows if r["severity"] > 0]
    found["stress/auroc_worst"] = min(r["auroc"] for r in shifted)
    found["stress/spec_worst"] = min(r["spec"] for r in shifted)
    found["stress/sens_worst"] = min(r["sens"] for r in shifted)
    top = max(severities)
    found[f"stress/auroc_mean_s{top}"] = float(
        np.mean([r["auroc"] for r in shifted if r["severity"] == top])
    )
    found["stress/spec_mean"] = float(np.mean([r["spec"] for r in shifted]))
    return found, rows
