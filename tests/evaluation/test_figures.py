"""Every figure medx writes keeps its text inside the image: nothing cut at the edge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from medx.evaluation import calibration, plots
from medx.evaluation.quality_report import coefficient_figure, distribution_figure
from medx.quality.features import FEATURES

rng = np.random.default_rng(0)
LABELS = rng.integers(0, 2, 200)
PROBS = np.clip(LABELS * 0.6 + rng.normal(0.2, 0.25, 200), 0.01, 0.99)
BINARY = np.stack([1 - PROBS, PROBS], axis=1)
CLASSES = ["NORMAL", "PNEUMONIA"]
CURVES = {  # the clinical evaluation's two panels, with its long second title
    "uncalibrated": calibration.reliability(LABELS, BINARY),
    "temperature scaled (T=1.37, fitted on val)": calibration.reliability(LABELS, BINARY),
}
HISTORY = {
    "train/loss": [(e, 0.7 - 0.05 * e) for e in range(12)],
    "val/loss": [(e, 0.69 - 0.04 * e) for e in range(12)],
    "val/auroc": [(e, 0.6 + 0.03 * e) for e in range(12)],
    "val/acc": [(e, 0.55 + 0.03 * e) for e in range(12)],
}
NAMES = [f"resnet18-pneumonia-finetune lr=0.003 seed={s}" for s in range(5)]


CM = np.array([[80, 20], [5, 95]])
FIGURES = {  # one of each figure medx writes, from realistic inputs
    "confusion_matrix": lambda: plots.confusion_figure(CM, CLASSES, "d"),
    "confusion_matrix_normalised": lambda: plots.confusion_figure(CM / 100, CLASSES, ".2f"),
    "roc_curve": lambda: plots.roc_pr_figures(LABELS, BINARY, CLASSES, threshold=0.31)[0],
    "pr_curve": lambda: plots.roc_pr_figures(LABELS, BINARY, CLASSES, threshold=0.31)[1],
    "reliability_diagram": lambda: plots.reliability_figure(CURVES),
    "training_curves": lambda: plots.training_curves_figure(HISTORY),
    "coefficients": lambda: coefficient_figure(rng.normal(size=len(FEATURES)), list(FEATURES)),
    "feature_distributions": lambda: distribution_figure(
        rng.normal(size=(200, len(FEATURES))), LABELS, list(FEATURES), CLASSES
    ),
    "compare": lambda: plots.ranking_figure(
        NAMES, [0.91, 0.9, 0.88, 0.8, 0.7], "val/auroc_best", [0.85] * 5, [0.95] * 5
    ),
}


@pytest.mark.parametrize("name", list(FIGURES))
def test_every_figure_keeps_its_text_inside_the_canvas(name: str, tmp_path: Path):
    fig = FIGURES[name]()
    path = plots.save_figure(fig, tmp_path / f"{name}.png")

    assert plots.overflow(fig) == (0, 0, 0, 0)  # the tight bounding box lies on the canvas
    width, height = fig.get_size_inches() * plots.DPI
    assert Image.open(path).size == (round(width), round(height))  # the PNG is that canvas


def test_a_title_wider_than_its_panel_grows_the_canvas_instead_of_being_cut():
    """What the reliability diagram did: its one-line title ran past the right edge."""
    fig = Figure(figsize=(9, 4.5))
    for ax in fig.subplots(1, 2):
        ax.set_title("temperature scaled (T=1.37, fitted on val): ECE 0.048, MCE 0.500")
    fig.tight_layout()  # what the figures were saved with before
    assert plots.overflow(fig)[2] > 0  # cut at the right edge

    plots.fit_text(fig)

    assert plots.overflow(fig) == (0, 0, 0, 0)
    assert fig.get_size_inches()[0] > 9
