"""An ensemble of trained classifiers: the mean of their class probabilities.

Probabilities, not logits, are averaged (the deep-ensemble rule: members of different
calibration weigh alike). `forward` returns the log of the mean probability, so its softmax is
that mean and everything that reads logits (test metrics, `ClinicalEvaluation`, temperature
scaling) evaluates the ensemble as it would one model.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import nn

from medx.models.classifier import TEST_METRICS, ClassifierSteps, classification_metrics


class Ensemble(ClassifierSteps, L.LightningModule):
    """Test-only module over trained members; inputs are [0, 1] images."""

    task = "classification"

    def __init__(self, members: Sequence[L.LightningModule], num_classes: int) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.criterion = nn.NLLLoss()  # on the log mean probability: the ensemble's NLL
        self.test_metrics = classification_metrics(num_classes, TEST_METRICS, "test/")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each member normalises the [0, 1] images its own way (ImageNet's or 0.5/0.5)."""
        probs = [torch.softmax(m(x).float(), dim=1) for m in self.members]
        return torch.stack(probs).mean(0).clamp_min(1e-12).log()
