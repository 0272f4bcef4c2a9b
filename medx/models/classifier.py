"""Image classification LightningModule: backbone from the factory, strategy, metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from timm.data import Mixup
from torch import nn
from torchmetrics import AUROC, Accuracy, F1Score, MetricCollection, Recall, Specificity

from medx.models.backbones import create_backbone
from medx.models.base import Optimizer, Scheduler, TransferModule
from medx.models.losses import ClassLoss, LossFactory, build_loss, class_logits, loss_spec
from medx.models.strategy import Strategy

log = logging.getLogger(__name__)


def inverse_frequency_weights(counts: Sequence[int]) -> torch.Tensor:
    """w_c = (1/n_c) / sum_k(1/n_k) * K: mean weight 1, rare classes count more."""
    inv = 1.0 / torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
    return (inv / inv.sum() * len(counts)).float()


class ClassifierSteps:
    """Loss, metrics and logging shared by every classifier (CNN or feature baseline), so
    their MLflow metrics carry the same names and meaning. Needs `forward` (class logits),
    `criterion`, `mixup`, `val_metrics` and `test_metrics` on the LightningModule."""

    criterion: ClassLoss
    mixup: Mixup | None = None

    def use_loss(
        self,
        loss: LossFactory | Mapping | None,
        mixup: Callable[..., Mixup] | None,
        num_classes: int,
        class_weights: bool,
        class_counts: Sequence[int] | None,
    ) -> int:
        """Build the loss (class-weighted on request) and Mixup; return the network's outputs."""
        weight = None
        if class_weights:
            if class_counts is None:
                raise ValueError("model.class_weights=true needs the training class counts")
            weight = inverse_frequency_weights(class_counts)
            log.info("class weights %s from counts %s", weight.tolist(), list(class_counts))
        self.criterion = build_loss(loss, num_classes, weight)
        self.hparams["loss"] = loss_spec(loss)  # plain dict: checkpoints rebuild the same loss
        smoothing = self.criterion.label_smoothing
        self.mixup = mixup(num_classes=num_classes, label_smoothing=smoothing) if mixup else None
        return self.criterion.outputs

    def mix(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Training inputs and targets: Mixup/CutMix'ed (in place) with soft targets when
        configured, otherwise as they come."""
        x, y = batch
        if self.mixup is None:
            return x, y
        even = len(x) - len(x) % 2  # timm mixes pairs: an odd last sample sits this step out
        return self.mixup(x[:even], y[:even])

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        x, y = batch
        logits = self(x)
        return self.criterion(logits, y), class_scores(logits), y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self.mix(batch)
        loss = self.criterion(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, scores, y = self._step(batch)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.val_metrics.update(scores, y)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, scores, y = self._step(batch)
        self.log("test/loss", loss, on_epoch=True, batch_size=len(y))
        self.test_metrics.update(scores, y)
        return scores

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return torch.softmax(self(batch[0]), dim=1)


class ClassificationModule(ClassifierSteps, TransferModule):
    """Transfer-learning classifier; binary tasks treat class index 1 as positive.

    The `model=` choices `resnet18`, `densenet121`, ... build it; `model.<name>` keys are its
    arguments, and medx.train adds `num_classes` and `class_counts` from the data module and
    the `strategy`, `optimizer`, `scheduler`, `loss` and `mixup` groups. `forward` takes [0, 1]
    images and returns class logits; the normalisation is inside the model.

    Args:
        backbone: a medx name (`resnet18`, `resnet50`, `densenet121`, `vgg16`,
            `efficientnet_b0`) or any timm architecture.
        num_classes: classes of the task.
        pretrained: start from ImageNet weights through timm (needs the network, or
            `pretrained_url`).
        weights: start from a local timm/torchvision state dict or a medx checkpoint.
        drop_rate: dropout before the classifier (and inside the `head_hidden` head).
        head_hidden: 512: the head becomes dropout → linear(512) → ReLU → dropout → linear.
        small_input: a 3×3 stride-1 ResNet stem without max-pooling, for 28-64 px inputs.
        pretrained_url: where ImageNet weights come from instead of timm's hub.
        class_weights: weight the loss by inverse training class frequency.
        class_counts: training images per class (needed by `class_weights`).
        compile: `torch.compile` the network when fitting.
        strategy: which backbone blocks train and at which LR (`strategy=` group).
        optimizer: a partial optimizer, completed with the parameter groups.
        scheduler: a partial LR scheduler, completed with the optimizer.
        loss: a partial loss (`loss=` group: cross-entropy, focal, BCE); None: cross-entropy.
        mixup: a partial timm `Mixup` for training batches (`mixup=` group); None: off.
    """

    task = "classification"
    monitor, monitor_mode = "val/auroc", "max"  # checkpoint selection when cfg.monitor is null

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        pretrained: bool = False,
        weights: str | None = None,
        drop_rate: float = 0.0,
        head_hidden: int | None = None,
        small_input: bool = False,
        pretrained_url: str | None = None,
        class_weights: bool = False,
        class_counts: Sequence[int] | None = None,
        compile: bool = False,  # torch.compile the network when fitting (TransferModule)
        strategy: Strategy | dict | None = None,
        optimizer: Optimizer | None = None,
        scheduler: Scheduler | None = None,
        loss: LossFactory | dict | None = None,
        mixup: Callable[..., Mixup] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=["optimizer", "scheduler", "strategy", "loss", "mixup"], logger=False
        )
        outputs = self.use_loss(loss, mixup, num_classes, class_weights, class_counts)
        spec = create_backbone(
            backbone,
            outputs,
            pretrained,
            weights,
            drop_rate,
            head_hidden,
            small_input,
            pretrained_url,
        )
        self.net = spec.model
        self.use_normalisation(spec.mean, spec.std)
        self.use_strategy(
            strategy, optimizer, scheduler, spec.blocks, spec.head, pretrained or bool(weights)
        )
        self.val_metrics = classification_metrics(num_classes, VAL_METRICS, "val/")
        self.test_metrics = classification_metrics(num_classes, TEST_METRICS, "test/")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes) of [0, 1] images, also from a single-logit (BCE)
        network."""
        return class_logits(self.net(self.normalise(x)))

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, D), class logits (N, K)) of [0, 1] images in one pass.

        The features are what the head reads: timm's pooled `forward_head(pre_logits=True)`
        (the input of the MLP head too, with `model.head_hidden`). The shift monitor
        (`medx.inference.shift`) compares images in this space, the model's own view of them.
        """
        features = self.net.forward_features(self.normalise(x))
        pooled = self.net.forward_head(features, pre_logits=True)
        return pooled, class_logits(self.net.forward_head(features))


def class_scores(logits: torch.Tensor) -> torch.Tensor:
    """Positive-class probability for binary tasks, class probabilities otherwise."""
    probs = torch.softmax(logits.float(), dim=1)
    return probs[:, 1] if probs.shape[1] == 2 else probs


# Every classifier (CNN, quality baseline, ensemble) logs these, so their runs compare.
VAL_METRICS = ("acc", "auroc")
TEST_METRICS = ("acc", "auroc", "f1", "sensitivity", "specificity")


def classification_metrics(num_classes: int, names: Sequence[str], prefix: str) -> MetricCollection:
    kind = (
        {"task": "binary"}
        if num_classes == 2
        else {"task": "multiclass", "num_classes": num_classes, "average": "macro"}
    )
    build: dict[str, type[nn.Module]] = {
        "acc": Accuracy,
        "auroc": AUROC,
        "f1": F1Score,
        "sensitivity": Recall,
        "specificity": Specificity,
    }
    metrics = {}
    for name in names:
        args = dict(kind)
        if name == "acc" and num_classes > 2:
            args["average"] = "micro"
        metrics[name] = build[name](**args)
    return MetricCollection(metrics, prefix=prefix)
