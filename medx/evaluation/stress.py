"""Robustness stress test: the test set re-evaluated under simulated acquisition shifts.

In-distribution AUROC saturates (0.99+ on Kermany's carved test) and says nothing of another
scanner (0.957 on the official test set, acquired later). The stress test re-reads every test
image under each shift of `medx.data.acquisition` at each severity and reports AUROC and
sensitivity / specificity at the val-chosen operating point, so recipes can be compared for
robustness as well. With a shift reference, each row also says whether the shift monitor
would have seen that shifted test set (`monitor_p`) and which share of its images it flags.

The figures go to `stress_test.csv` and `stress_test.png` (the MLflow run's `evaluation/`),
and `test/stress_auroc_s<k>` (mean AUROC over shifts at severity k) and
`test/stress_auroc_worst` to the run's metrics. Recipes are compared on validation folds, never
on a test split: `eval.stress_split=val` stress-tests the val split instead (`val/stress_...`,
`stress_val.csv`).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from medx.data.acquisition import SEVERITIES, check_shifts
from medx.data.shifted import ShiftedImages
from medx.evaluation import calibration, metrics
from medx.evaluation.drift import ShiftReference, reference_scores

log = logging.getLogger(__name__)

COLUMNS = (
    "shift", "severity", "images", "auroc", "threshold", "sensitivity", "specificity",
    "monitor_p", "ood_rate",
)  # fmt: skip


@torch.inference_mode()
def features_and_probs(
    module: torch.nn.Module, dataset: ShiftedImages, batch_size: int = 64
) -> tuple[np.ndarray | None, np.ndarray]:
    """(penultimate features or None, softmax probabilities) of a dataset, in its order."""
    embed = getattr(module, "embed", None)
    feats, logits = [], []
    for x, _ in DataLoader(dataset, batch_size=batch_size):
        x = x.to(module.device)
        if embed is not None:
            f, z = embed(x)
            feats.append(f.float().cpu())
        else:
            z = module(x)
        logits.append(z.float().cpu())
    probs = calibration.softmax(torch.cat(logits).double().numpy())
    return (torch.cat(feats).double().numpy() if feats else None), probs


def stress_table(
    module: torch.nn.Module,
    paths: Sequence[Path],
    labels: Sequence[int],
    image_size: int,
    intensity: str = "none",
    threshold: float | None = None,
    shifts: Sequence[str] | None = None,
    reference: ShiftReference | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> list[dict]:
    """One row per shift × severity (and a first `none` row, severity 0, unshifted).

    Args:
        module: a classifier (with `embed`, for the monitor's columns).
        paths: the split's image files (re-read and shifted: `medx.data.shifted`).
        labels: their class indices.
        image_size: the model's input size.
        intensity: the model's per-image standardisation, applied after the shift.
        threshold: the val-chosen operating point (raw scale): sensitivity and specificity
            at it (None: AUROC only).
        shifts: names from `medx.data.acquisition.SHIFTS` (None: all).
        reference: the model's shift reference: each row's `monitor_p` and `ood_rate`.
        batch_size: images per forward pass.
        seed: the shifts' randomness (noise), per image.

    Returns:
        Rows with the keys of `COLUMNS`: shift, severity, images, auroc, sensitivity,
        specificity, monitor_p, ood_rate.
    """
    shifts = check_shifts(shifts)
    labels = np.asarray(labels)
    was_training = module.training
    module.eval()
    rows = []
    plan = [(None, 0)] + [(s, k) for s in shifts for k in range(1, SEVERITIES + 1)]
    for shift, severity in plan:
        data = ShiftedImages(paths, labels, image_size, intensity, shift, max(severity, 1), seed)
        feats, probs = features_and_probs(module, data, batch_size)
        rows.append(_row(shift or "none", severity, labels, probs, threshold, feats, reference))
        log.info("stress %s %d: AUROC %.4f", shift or "none", severity, rows[-1]["auroc"])
    module.train(was_training)
    return rows


def _row(
    shift: str,
    severity: int,
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float | None,
    feats: np.ndarray | None,
    reference: ShiftReference | None,
) -> dict:
    row = {"shift": shift, "severity": severity, "images": len(labels)}
    row["auroc"] = float(metrics.auroc(labels, probs)[0])
    if threshold is not None and probs.shape[1] == 2:
        preds = metrics.predictions(probs, threshold)
        found = metrics.rates(labels, preds, 2)
        row["threshold"] = float(threshold)  # raw scale, the plain model's operating point
        row["sensitivity"] = float(found["sensitivity"][0])
        row["specificity"] = float(found["specificity"][0])
    if reference is not None and feats is not None:
        report = reference.test(feats, reference_scores(probs))
        row["monitor_p"], row["ood_rate"] = report.p_value, report.ood_rate
    return row


def summary(rows: Sequence[dict], split: str = "test") -> dict[str, float]:
    """`<split>/stress_auroc_s<k>`: mean AUROC over shifts at severity k; `..._worst`: the
    lowest of any shift and severity."""
    found = {}
    for k in range(1, SEVERITIES + 1):
        values = [r["auroc"] for r in rows if r["severity"] == k and np.isfinite(r["auroc"])]
        if values:
            found[f"{split}/stress_auroc_s{k}"] = float(np.mean(values))
    shifted = [r["auroc"] for r in rows if r["severity"] > 0 and np.isfinite(r["auroc"])]
    if shifted:
        found[f"{split}/stress_auroc_worst"] = float(np.min(shifted))
    return found


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k), k) for k in COLUMNS})
    return path


def _fmt(value: object, key: str) -> object:
    """Rates to 4 decimals; p-values to 3 significant digits (0.00995 is not 0.0100);
    the threshold as the card keeps it."""
    if isinstance(value, float):
        if key == "threshold":
            return f"{value:.6f}"
        return f"{value:.3g}" if key == "monitor_p" else f"{value:.4f}"
    return "" if value is None else value


def plot(rows: Sequence[dict], path: Path, split: str = "test") -> Path:
    """AUROC (and sensitivity / specificity at the operating point) against severity, one
    line per shift, the unshifted test set at severity 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("auroc", "sensitivity", "specificity") if k in rows[0]]
    clean = rows[0]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for shift in dict.fromkeys(r["shift"] for r in rows[1:]):
            line = [clean] + [r for r in rows if r["shift"] == shift]
            ax.plot([r["severity"] for r in line], [r[key] for r in line], marker="o", label=shift)
        ax.set_xlabel("severity (0 = as acquired)")
        ax.set_xticks(range(SEVERITIES + 1))
        ax.set_title(key if key == "auroc" else f"{key} at the operating point")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{split} split")
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.suptitle("Stress test: simulated acquisition shifts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
