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

from medx.models.classifier import ClassifierSteps, classification_metrics

TEST_METRICS = ["acc", "auroc", "f1", "sensitivity", "specificity"]


class Ensemble(ClassifierSteps, L.LightningModule):
    """Test-only module over trained members; inputs arrive normalised for the first member."""

    task = "classification"

    def __init__(self, members: Sequence[L.LightningModule], num_classes: int) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.mean, self.std = members[0].mean, members[0].std  # what the data module applies
        self.criterion = nn.NLLLoss()  # on the log mean probability: the ensemble's NLL
        self.test_metrics = classification_metrics(num_classes, TEST_METRICS, "test/")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = [torch.softmax(m(self._inputs_for(m, x)).float(), dim=1) for m in self.members]
        return torch.stack(probs).mean(0).clamp_min(1e-12).log()

    def _inputs_for(self, member: L.LightningModule, x: torch.Tensor) -> torch.Tensor:
        """Images re-normalised for a member trained with another mean/std (e.g. ImageNet's)."""
        same = (tuple(member.mean), tuple(member.std)) == (tuple(self.mean), tuple(self.std))
        if x.ndim != 4 or same:
            return x

        def channels(values: Sequence[float]) -> torch.Tensor:
            return torch.as_tensor(values, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)

        pixels = x * channels(self.std) + channels(self.mean)
        return (pixels - channels(member.mean)) / channels(member.std)
