"""Feature baseline for image quality: standardised handcrafted features → logistic regression.

A LightningModule, so the same Trainer, checkpointing, early stopping and MLflow logging serve
it and the CNNs, and `python -m medx.train -m data=quality model=quality_logreg,resnet18` gives
two runs with the same metric names (from `classification_metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medx.errors import ConfigError
from medx.models.base import MedxModule
from medx.models.classifier import (
    TEST_METRICS,
    VAL_METRICS,
    ClassifierSteps,
    classification_metrics,
)
from medx.models.losses import LossFactory, class_logits
from medx.models.schedulers import optimizer_config
from medx.quality.features import FEATURES, LOG_FEATURES

log = logging.getLogger(__name__)

BASELINES = ("logreg",)
LOG_OFFSET = 1e-8


class QualityBaseline(ClassifierSteps, MedxModule):
    """Logistic regression on standardised quality features; class 1 ("bad") is positive.

    The standardisation (mean, std per feature, after log of the `LOG_FEATURES`) is fitted on
    the training batches only, at the start of fitting, and saved in the checkpoint.

    `model=quality_logreg` builds it (with `data=quality`, which then serves feature vectors).

    Args:
        backbone: the feature classifier; `logreg` is the one there is.
        num_classes: classes of the task (2: good, bad).
        feature_names: the features it reads, in the data module's order.
        class_weights: weight the loss by inverse training class frequency.
        class_counts: training samples per class (needed by `class_weights`).
        lr: replaces the optimizer's learning rate (a linear model on standardised features
            wants a far larger step than a CNN); None: the optimizer's own.
        class_names: class names in label order.
        strategy: accepted for a uniform config; there are no blocks to freeze.
        optimizer: a partial optimizer, completed with the parameters.
        scheduler: a partial LR scheduler, completed with the optimizer.
        loss: a partial loss (`loss=` group); None: cross-entropy.
    """

    task = "classification"
    inputs = "features"  # the datamodule serves feature vectors, not images
    monitor, monitor_mode = "val/auroc", "max"

    def __init__(
        self,
        backbone: str = "logreg",
        num_classes: int = 2,
        feature_names: Sequence[str] = FEATURES,
        class_weights: bool = False,
        class_counts: Sequence[int] | None = None,
        lr: float | None = 0.05,
        class_names: Sequence[str] = ("good", "bad"),
        strategy: Any = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        loss: LossFactory | dict | None = None,
    ) -> None:
        super().__init__()
        if backbone not in BASELINES:
            raise ConfigError(
                f"model.backbone={backbone!r} is no quality baseline; choices: "
                f"{', '.join(BASELINES)}."
            )
        # strategy (which backbone blocks train) has nothing to act on: one linear layer.
        self.save_hyperparameters(
            ignore=["optimizer", "scheduler", "strategy", "loss"], logger=False
        )
        self.feature_names = list(feature_names)
        n = len(self.feature_names)
        outputs = self.use_loss(loss, None, num_classes, class_weights, class_counts)
        self.linear = nn.Linear(n, outputs)
        self.optimizer_factory = optimizer or torch.optim.AdamW
        self.scheduler_factory = scheduler
        log_mask = torch.tensor([name in LOG_FEATURES for name in self.feature_names])
        self.register_buffer("log_mask", log_mask, persistent=False)
        self.register_buffer("feature_mean", torch.zeros(n))
        self.register_buffer("feature_std", torch.ones(n))
        self.register_buffer("fitted", torch.tensor(False))
        self.val_metrics = classification_metrics(num_classes, VAL_METRICS, "val/")
        self.test_metrics = classification_metrics(num_classes, TEST_METRICS, "test/")
        self._test_outputs: list[tuple[torch.Tensor, ...]] = []
        # raw test features (n, F) and labels (n,) of the last test, for the figures that
        # `medx.evaluation.quality_report.QualityReport` draws
        self.test_features: tuple[np.ndarray, np.ndarray] | None = None

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features → the log where it applies (no standardisation)."""
        x = x.float()
        return torch.where(self.log_mask, torch.log(x.clamp(min=0) + LOG_OFFSET), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return class_logits(self.linear((self.scale(x) - self.feature_mean) / self.feature_std))

    def coefficients(self) -> np.ndarray:
        """Per feature: log-odds of "bad" per training standard deviation (binary tasks)."""
        w = self.linear.weight.detach().cpu().numpy()
        if len(w) == 1:  # loss=bce: the single logit is the log-odds of "bad"
            return w[0]
        return w[1] - w[0] if len(w) == 2 else w

    def on_train_start(self) -> None:
        """Fit the standardisation on the training data, once (not again on resume)."""
        if bool(self.fitted):
            return
        rows = [self.scale(x.to(self.device)) for x, _ in self.trainer.train_dataloader]
        z = torch.cat(rows)
        self.feature_mean.copy_(z.mean(0))
        self.feature_std.copy_(z.std(0, unbiased=False).clamp(min=1e-6))
        self.fitted.fill_(True)
        log.info("Standardisation fitted on %d training feature vectors", len(z))

    def on_test_epoch_start(self) -> None:
        self._test_outputs, self.test_features = [], None

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        scores = super().test_step(batch, batch_idx)
        self._test_outputs.append((batch[0].cpu(), batch[1].cpu()))
        return scores

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self._test_outputs:
            x, y = (torch.cat(parts).numpy() for parts in zip(*self._test_outputs, strict=True))
            self.test_features = (x, y)
        self._test_outputs = []

    def configure_optimizers(self) -> Any:
        """The configured optimizer; `lr` (when set) replaces its LR, as a linear model on
        standardised features wants a far larger step than a CNN."""
        extra = {"lr": self.hparams.lr} if self.hparams.lr is not None else {}
        optimizer = self.optimizer_factory(self.parameters(), **extra)
        return optimizer_config(optimizer, self.scheduler_factory)
