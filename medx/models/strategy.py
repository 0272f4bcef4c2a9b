"""Transfer-learning strategies: which backbone blocks train, and at which learning rate.

One mechanism serves `freeze` (head only), `finetune` (head + last N blocks, lower LR),
`full` (everything) and `two_stage` (head only for `head_epochs`, then as finetune): they
differ only in `unfreeze_last`, `backbone_lr_scale` and `head_epochs`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from medx.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Strategy:
    """`unfreeze_last=None` trains every block; 0 trains the head only."""

    name: str = "full"
    unfreeze_last: int | None = None
    backbone_lr_scale: float = 1.0
    head_epochs: int = 0  # > 0: the unfrozen blocks wait this many epochs (two-stage)

    def __post_init__(self) -> None:
        if self.head_epochs < 0:
            raise ConfigError(f"strategy.head_epochs={self.head_epochs} must be >= 0.")
        if self.unfreeze_last is not None and self.unfreeze_last < 0:
            raise ConfigError(
                f"strategy.unfreeze_last={self.unfreeze_last} must be >= 0 (or null for all)."
            )
        if self.backbone_lr_scale <= 0:
            raise ConfigError(f"strategy.backbone_lr_scale={self.backbone_lr_scale} must be > 0.")

    def trainable_blocks(self, blocks: list[list[str]]) -> list[list[str]]:
        if self.unfreeze_last is None:
            return blocks
        return blocks[len(blocks) - self.unfreeze_last :] if self.unfreeze_last else []

    def apply(self, model: nn.Module, blocks: list[list[str]], head: list[str]) -> list[dict]:
        """Set requires_grad; return parameter groups (head, backbone) with their LR scale.

        The backbone group exists from the start even in two-stage training, its parameters
        frozen (no gradient, so the optimizer skips them) until `start_epoch` unfreezes them:
        the optimizer state then has one shape throughout, and a checkpoint resumes anywhere.
        """
        params = dict(model.named_parameters())
        trainable = {n for block in self.trainable_blocks(blocks) for n in block}
        for name, param in params.items():
            param.requires_grad = name in head or (name in trainable and not self.head_epochs)
        groups = [{"name": "head", "params": [params[n] for n in head], "lr_scale": 1.0}]
        if trainable:
            backbone = [p for n, p in params.items() if n in trainable]
            groups.append(
                {"name": "backbone", "params": backbone, "lr_scale": self.backbone_lr_scale}
            )
        return groups

    def summary(self, model: nn.Module, blocks: list[list[str]]) -> str:
        """What `apply` set, for the training log (logged when an optimizer is made, so that
        loading a model to use it says nothing about training)."""
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        trainable = len(self.trainable_blocks(blocks))
        return (
            f"strategy={self.name}: {trainable}/{len(blocks)} blocks trainable, "
            f"{frozen / 1e6:.2f} M parameters frozen"
        )

    def start_epoch(self, model: nn.Module, blocks: list[list[str]], epoch: int) -> None:
        """Two-stage: from epoch `head_epochs` on, the last `unfreeze_last` blocks train too."""
        if not self.head_epochs:
            return
        trainable = {n for block in self.trainable_blocks(blocks) for n in block}
        unfrozen = epoch >= self.head_epochs
        for name, param in model.named_parameters():
            if name in trainable and param.requires_grad != unfrozen:
                param.requires_grad = unfrozen
        if epoch == self.head_epochs:
            log.info("strategy=%s: epoch %d, backbone blocks unfrozen", self.name, epoch)

    @staticmethod
    def frozen_modules(model: nn.Module) -> list[nn.Module]:
        """Modules all of whose own parameters are frozen: kept in eval mode so that
        BatchNorm running statistics of a frozen block do not drift either."""
        out = []
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if own and not any(p.requires_grad for p in own):
                out.append(module)
        return out
