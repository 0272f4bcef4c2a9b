"""LR schedules that Hydra cannot express with constructor arguments alone."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from medx.errors import ConfigError


def multistep(
    optimizer: torch.optim.Optimizer,
    max_epochs: int,
    at: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.MultiStepLR:
    """Multiply the LR by `gamma` at these fractions of training (MedMNIST: 50% and 75%)."""
    milestones = sorted({max(1, round(f * max_epochs)) for f in at})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)


def cosine(
    optimizer: torch.optim.Optimizer,
    max_epochs: int,
    warmup_epochs: int = 0,
    eta_min: float = 0.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay to `eta_min` by the last epoch, after a linear warmup: epoch k < warmup
    trains at (k + 1) / (warmup + 1) × LR, so no epoch runs at LR 0 and epoch `warmup` at LR."""
    if not 0 <= warmup_epochs < max_epochs:
        raise ConfigError(
            f"scheduler.warmup_epochs={warmup_epochs} must be >= 0 and below "
            f"trainer.max_epochs={max_epochs}: lower it, or set it to 0 for no warmup."
        )
    lr = torch.optim.lr_scheduler
    decay = lr.CosineAnnealingLR(optimizer, T_max=max_epochs - warmup_epochs, eta_min=eta_min)
    if not warmup_epochs:
        return decay
    start = 1.0 / (warmup_epochs + 1)
    warmup = lr.LinearLR(optimizer, start_factor=start, total_iters=warmup_epochs)
    return lr.SequentialLR(optimizer, [warmup, decay], milestones=[warmup_epochs])


def optimizer_config(
    optimizer: torch.optim.Optimizer,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None,
) -> Any:
    """What `configure_optimizers` returns: the optimizer, with its scheduler stepped per epoch
    (plateau watching val/loss) when one is configured. One place for every LightningModule."""
    if scheduler is None:
        return optimizer
    return {
        "optimizer": optimizer,
        "lr_scheduler": {
            "scheduler": scheduler(optimizer),
            "interval": "epoch",
            "monitor": "val/loss",
        },
    }
