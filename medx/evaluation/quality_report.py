"""Quality-baseline reports: why the linear model decides as it does.

`QualityReport`, a Lightning Callback, writes them after testing a `QualityBaseline` (binary
tasks), into `<default_root_dir>/quality_report/`, and logs them as MLflow artifacts (at the
run's top level): a coefficient plot and the per-class distribution of every feature on the
test split. The confusion matrix and the classification
report in scikit-learn's text layout (what the seed project printed) come from the clinical
evaluation, as for every classifier, under `evaluation/`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from matplotlib.figure import Figure

from medx.evaluation.plots import save_figure
from medx.models.quality import QualityBaseline
from medx.quality.features import LOG_FEATURES
from medx.tracking import runs

log = logging.getLogger(__name__)

REPORT_DIR = "quality_report"  # in the run's output folder


class QualityReport(Callback):
    """After `trainer.test` of a binary `QualityBaseline`: its coefficient and feature
    distribution figures; does nothing for other modules."""

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not isinstance(pl_module, QualityBaseline):
            return
        if pl_module.test_features is None or pl_module.hparams.num_classes != 2:
            return
        features, labels = pl_module.test_features
        out_dir = Path(trainer.default_root_dir or ".") / REPORT_DIR
        paths = write_reports(
            out_dir,
            labels,
            features,
            pl_module.feature_names,
            pl_module.coefficients(),
            list(pl_module.hparams.class_names),
        )
        runs.log_artifacts(trainer.loggers, paths)
        log.info("Quality reports in %s", out_dir)


def write_reports(
    out_dir: Path,
    labels: np.ndarray,
    features: np.ndarray,
    feature_names: Sequence[str],
    coefficients: np.ndarray,
    class_names: Sequence[str],
) -> list[Path]:
    """Write the baseline's own reports for one test split; return the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels).astype(int)
    return [
        save_figure(coefficient_figure(coefficients, feature_names), out_dir / "coefficients.png"),
        save_figure(
            distribution_figure(features, labels, feature_names, class_names),
            out_dir / "feature_distributions.png",
            dpi=90,
        ),
    ]


def coefficient_figure(coefficients: np.ndarray, names: Sequence[str]) -> Figure:
    """Log-odds of "bad" per standard deviation of each feature: which features matter."""
    coef = np.asarray(coefficients, dtype=float).reshape(-1)
    order = np.argsort(np.abs(coef))
    fig = Figure(figsize=(6, 0.35 * len(coef) + 1))
    ax = fig.subplots()
    ax.barh([names[i] for i in order], coef[order], color=np.where(coef[order] > 0, "C3", "C0"))
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel('coefficient (log-odds of "bad" per SD)')
    return fig


def distribution_figure(
    features: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    class_names: Sequence[str],
) -> Figure:
    """Per-class histograms of every feature on the test split."""
    cols = 4
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        if k >= len(names):
            ax.axis("off")
            continue
        values = features[:, k].astype(float)
        if names[k] in LOG_FEATURES:
            values = np.log10(np.clip(values, 0, None) + 1e-8)
        bins = np.histogram_bin_edges(values, bins=30)
        for c, cls in enumerate(class_names):
            ax.hist(values[labels == c], bins=bins, alpha=0.55, density=True, label=cls)
        ax.set_title(("log10 " if names[k] in LOG_FEATURES else "") + names[k], fontsize=9)
    axes.ravel()[0].legend(fontsize=8)
    return fig
