"""Classification losses chosen by `loss=<choice>` (conf/loss/), one interface for all of them.

Every loss takes two-class-or-more logits (N, C) and either integer labels (N,) or soft targets
(N, C) from Mixup/CutMix. The module completes the configured partial with `num_classes` and
the class weights; `outputs` tells it how many logits the network must produce (BCE: one,
turned back into two-class logits by `class_logits`, so metrics, evaluation, temperature
scaling and predictions never see the difference).

Soft targets arrive already smoothed (timm's Mixup applies `label_smoothing`), so the losses
smooth integer labels only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from medx.errors import ConfigError


class ClassLoss(nn.Module):
    """Base: remembers the class weights (a buffer, so it follows the device) and smoothing."""

    def __init__(
        self,
        num_classes: int,
        class_weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing={label_smoothing} must be in [0, 1).")
        self.num_classes = num_classes
        self.outputs = num_classes
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weight", class_weight, persistent=False)

    def smoothed(self, target: torch.Tensor) -> torch.Tensor:
        """Integer labels → (1 - ε) one-hot + ε / C (torch's smoothing); soft targets as given."""
        if target.is_floating_point():
            return target
        one_hot = F.one_hot(target, self.num_classes).float()
        return one_hot * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes


class CrossEntropy(ClassLoss):
    """torch's cross-entropy with class weights and label smoothing."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        smoothing = 0.0 if target.is_floating_point() else self.label_smoothing
        return F.cross_entropy(
            logits.float(), target, weight=self.class_weight, label_smoothing=smoothing
        )


class FocalLoss(ClassLoss):
    """Multi-class focal loss (Lin et al. 2017): -Σ_c t_c α_c (1 - p_c)^γ log p_c.

    α is the class weight; γ = 0 is weighted cross-entropy, normalised as torch does (by the
    summed weights of the labels for integer labels, by N for soft targets), so the two agree.
    """

    def __init__(self, num_classes: int, gamma: float = 2.0, **kwargs: Any) -> None:
        super().__init__(num_classes, **kwargs)
        if gamma < 0:
            raise ConfigError(f"loss.gamma={gamma} must be >= 0 (0 is cross-entropy).")
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1)
        alpha = self.class_weight
        if alpha is None:
            alpha = log_p.new_ones(log_p.shape[1])
        focus = (1.0 - log_p.exp()).pow(self.gamma)
        total = -(self.smoothed(target) * alpha * focus * log_p).sum()
        if target.is_floating_point():
            return total / len(target)
        return total / alpha[target].sum()


class BinaryCrossEntropy(ClassLoss):
    """Single-logit BCE for binary tasks; class weights become pos_weight = n_neg / n_pos."""

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        if num_classes != 2:
            raise ConfigError(
                f"loss=bce is for binary tasks, but the data has {num_classes} classes: "
                "use loss=cross_entropy or loss=focal."
            )
        super().__init__(num_classes, **kwargs)
        self.outputs = 1
        weight = self.class_weight
        self.register_buffer(
            "pos_weight", None if weight is None else weight[1:] / weight[0], persistent=False
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        z = (logits[:, 1] - logits[:, 0]).float()  # the single logit behind class_logits
        positive = self.smoothed(target)[:, 1]
        return F.binary_cross_entropy_with_logits(z, positive, pos_weight=self.pos_weight)


LossFactory = Callable[..., ClassLoss]


def build_loss(
    loss: LossFactory | Mapping | None, num_classes: int, class_weight: torch.Tensor | None
) -> ClassLoss:
    """The configured loss (a partial from conf/loss/, or its saved dict in a checkpoint)."""
    factory = instantiate(loss) if isinstance(loss, Mapping) else loss or CrossEntropy
    return factory(num_classes=num_classes, class_weight=class_weight)


def loss_spec(loss: LossFactory | Mapping | None) -> dict:
    """Plain-dict form for the checkpoint's hyperparameters, rebuilt by `build_loss`."""
    if isinstance(loss, Mapping):
        return dict(loss)
    func, keywords = (loss.func, loss.keywords) if isinstance(loss, partial) else (loss, {})
    func = func or CrossEntropy
    return {"_target_": f"{func.__module__}.{func.__qualname__}", "_partial_": True, **keywords}


def class_logits(z: torch.Tensor) -> torch.Tensor:
    """A single-logit network's z → [0, z] (softmax: 1 - sigmoid(z), sigmoid(z)); others as is."""
    return torch.cat([torch.zeros_like(z), z], dim=1) if z.shape[1] == 1 else z
