"""LR schedules that Hydra cannot express with constructor arguments alone."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def multistep(
    optimizer: torch.optim.Optimizer,
    max_epochs: int,
    at: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.MultiStepLR:
    """Multiply the LR by `gamma` at these fractions of training (MedMNIST: 50% and 75%)."""
    milestones = sorted({max(1, round(f * max_epochs)) for f in at})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)
