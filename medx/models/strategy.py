"""Transfer-learning strategies: which backbone blocks train, and at which learning rate.

One mechanism serves `freeze` (head only), `finetune` (head + last N blocks, lower LR) and
`full` (everything): they differ only in `unfreeze_last` and `backbone_lr_scale`.
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

    def __post_init__(self) -> None:
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
        """Set requires_grad; return parameter groups (head, backbone) with their LR scale."""
        params = dict(model.named_parameters())
        trainable = {n for block in self.trainable_blocks(blocks) for n in block}
        for name, param in params.items():
            param.requires_grad = name in trainable or name in head
        groups = [{"name": "head", "params": [params[n] for n in head], "lr_scale": 1.0}]
        if trainable:
            backbone = [p for n, p in params.items() if n in trainable]
            groups.append(
                {"name": "backbone", "params": backbone, "lr_scale": self.backbone_lr_scale}
            )
        frozen = sum(p.numel() for p in params.values() if not p.requires_grad)
        log.info(
            "strategy=%s: %d/%d blocks trainable, %.2f M parameters frozen",
            self.name,
            len(self.trainable_blocks(blocks)),
            len(blocks),
            frozen / 1e6,
        )
        return groups

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
