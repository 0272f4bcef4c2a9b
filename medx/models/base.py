"""What every medx LightningModule shares: a network whose encoder blocks a strategy freezes.

Classification and segmentation differ in their networks, losses and metrics, but freezing,
per-group learning rates, keeping frozen BatchNorm in eval mode and building the optimizer and
scheduler are one mechanism, kept here once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from torch import nn

from medx.models.schedulers import optimizer_config
from medx.models.strategy import Strategy

log = logging.getLogger(__name__)

Optimizer = Callable[..., torch.optim.Optimizer]
Scheduler = Callable[[torch.optim.Optimizer], Any]


class TransferModule(L.LightningModule):
    """Base class: call `use_strategy` once the network exists; subclasses own `self.net`."""

    net: nn.Module

    def use_strategy(
        self,
        strategy: Strategy | dict | None,
        optimizer: Optimizer | None,
        scheduler: Scheduler | None,
        blocks: list[list[str]],
        head: list[str],
        starts_trained: bool,
    ) -> None:
        """Freeze per the strategy; remember the optimizer param groups (after save_hparams)."""
        strategy = Strategy(**strategy) if isinstance(strategy, dict) else strategy or Strategy()
        self.hparams["strategy"] = asdict(strategy)
        self.strategy = strategy
        self.optimizer_factory = optimizer or torch.optim.AdamW
        self.scheduler_factory = scheduler
        self.blocks, self.head = blocks, head
        self._param_groups = strategy.apply(self.net, blocks, head)
        if strategy.unfreeze_last is not None and not starts_trained:
            log.warning(
                "strategy=%s freezes backbone blocks, but the backbone is randomly initialised "
                "(model.pretrained=false, no model.weights): frozen blocks stay random.",
                strategy.name,
            )

    def train(self, mode: bool = True) -> TransferModule:
        """Keep frozen blocks in eval mode (BatchNorm statistics frozen too)."""
        super().train(mode)
        if mode:
            for module in Strategy.frozen_modules(self.net):
                module.eval()
        return self

    def on_train_epoch_start(self) -> None:
        self.strategy.start_epoch(self.net, self.blocks, self.current_epoch)
        self.train()  # Lightning leaves module modes alone; re-assert the frozen blocks' eval

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self._param_groups)
        for group in optimizer.param_groups:  # the strategy's lower backbone LR
            group["lr"] *= group["lr_scale"]
        return optimizer_config(optimizer, self.scheduler_factory)
