"""Losses, Mixup/CutMix, warmup and gradient clipping: from conf/ to the trained module."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig

from medx.config import compose, config_dir
from medx.errors import ConfigError
from medx.eval import run as eval_run
from medx.models.classifier import ClassificationModule, inverse_frequency_weights
from medx.models.losses import BinaryCrossEntropy, CrossEntropy, FocalLoss
from medx.train import train

WEIGHT = torch.tensor([0.5, 1.0, 2.0])
ONE_BATCH = ("debug=limit", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1")


def _batch(n: int = 64, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(n, classes, generator=generator) * 3
    return logits, torch.randint(classes, (n,), generator=generator)


@pytest.mark.parametrize("weight", [None, WEIGHT])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_focal_with_gamma_0_is_torch_cross_entropy(weight, smoothing):
    logits, y = _batch()
    soft = torch.softmax(torch.randn(len(y), 3), dim=1)
    focal = FocalLoss(3, gamma=0.0, class_weight=weight, label_smoothing=smoothing)
    ce = CrossEntropy(3, class_weight=weight, label_smoothing=smoothing)

    expected = F.cross_entropy(logits, y, weight=weight, label_smoothing=smoothing)
    assert focal(logits, y) == pytest.approx(expected.item(), rel=1e-5)
    assert ce(logits, y) == pytest.approx(expected.item(), rel=1e-5)
    # soft targets (Mixup) come smoothed already: no second smoothing
    expected_soft = F.cross_entropy(logits, soft, weight=weight)
    assert focal(logits, soft) == pytest.approx(expected_soft.item(), rel=1e-5)
    assert ce(logits, soft) == pytest.approx(expected_soft.item(), rel=1e-5)


@pytest.mark.parametrize(
    "choice", sorted(p.stem for p in (Path(config_dir()) / "loss").glob("*.yaml"))
)
def test_every_loss_choice_builds_from_config_with_class_weights(choice: str):
    factory = instantiate(compose([f"loss={choice}"]).loss)
    weight = inverse_frequency_weights([30, 10])  # [0.5, 1.5]
    loss = factory(num_classes=2, class_weight=weight)
    logits, y = _batch(classes=2)

    log_p = F.log_softmax(logits, dim=1).gather(1, y[:, None])[:, 0]  # log p(true class)
    expected = {
        "cross_entropy": F.cross_entropy(logits, y, weight=weight),
        # -Σ α_y (1 - p_y)^γ log p_y / Σ α_y, γ = 2
        "focal": -(weight[y] * (1 - log_p.exp()) ** 2 * log_p).sum() / weight[y].sum(),
        "bce": F.binary_cross_entropy_with_logits(
            logits[:, 1] - logits[:, 0], y.float(), pos_weight=torch.tensor(30 / 10)
        ),
    }
    assert choice in expected, f"loss={choice}: add its formula here"
    assert loss(logits, y).item() == pytest.approx(expected[choice].item(), rel=1e-5)


def test_focal_down_weights_easy_examples_more_than_hard_ones():
    easy = torch.tensor([[4.0, 0.0]])  # p(correct) = 0.98
    hard = torch.tensor([[0.0, 1.0]])  # p(correct) = 0.27
    y = torch.tensor([0])
    focal, ce = FocalLoss(2, gamma=2.0), CrossEntropy(2)

    easy_ratio = focal(easy, y) / ce(easy, y)
    hard_ratio = focal(hard, y) / ce(hard, y)
    assert easy_ratio < 0.001 < 0.5 < hard_ratio < 1


def test_label_smoothing_mixes_in_the_mean_log_probability():
    logits, y = _batch()
    eps = 0.2
    log_p = F.log_softmax(logits, dim=1)

    # torch's formula: (1 - ε) · NLL + ε · mean over classes of -log p
    expected = (1 - eps) * F.nll_loss(log_p, y) + eps * (-log_p.mean(dim=1)).mean()
    smoothed = CrossEntropy(3, label_smoothing=eps)(logits, y)
    assert smoothed == pytest.approx(expected.item(), rel=1e-5)
    assert smoothed != pytest.approx(CrossEntropy(3)(logits, y).item(), rel=1e-3)


def test_bce_is_binary_cross_entropy_on_one_logit_with_pos_weight_from_counts():
    z = torch.randn(16, 1)
    y = torch.randint(2, (16,))
    loss = BinaryCrossEntropy(2, class_weight=inverse_frequency_weights([30, 10]))
    two = torch.cat([torch.zeros_like(z), z], dim=1)  # what the module's forward hands on

    assert loss.pos_weight.item() == pytest.approx(3.0)  # n_neg / n_pos
    expected = F.binary_cross_entropy_with_logits(z[:, 0], y.float(), pos_weight=torch.tensor(3.0))
    assert loss(two, y) == pytest.approx(expected.item(), rel=1e-5)


def test_bce_on_more_than_two_classes_is_a_config_error():
    with pytest.raises(ConfigError, match=r"loss=bce.*3 classes"):
        ClassificationModule("test_resnet", num_classes=3, loss=BinaryCrossEntropy)


def test_bce_run_trains_one_logit_and_its_checkpoint_evaluates(make_cfg, tracked_runs):
    cfg = make_cfg("loss=bce", "model.class_weights=true", "eval.bootstrap=50", "debug=limit")

    metrics = train(cfg)

    (run,) = tracked_runs()
    assert run.info.status == "FINISHED"
    for key in ("val/auroc", "test/auroc", "test/sensitivity", "test/ece"):
        assert key in run.data.metrics, key
    (best,) = (Path(cfg.paths.output_dir) / "checkpoints").glob("epoch*.ckpt")
    model = ClassificationModule.load_from_checkpoint(best)
    assert model.net.get_classifier().out_features == 1
    assert isinstance(model.criterion, BinaryCrossEntropy)
    counts = [int(run.data.params[f"dataset.counts.train.{c}"]) for c in ("NORMAL", "OPACITY")]
    assert model.criterion.pos_weight.item() == pytest.approx(counts[0] / counts[1])  # n_neg/n_pos
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 2)  # [0, z]: two-class logits

    again = eval_run(compose([f"ckpt_path={best}"], "eval"))
    assert again["test/auroc"] == pytest.approx(metrics["test/auroc"], abs=1e-6)


def _fit(cfg: DictConfig, *callbacks: L.Callback) -> tuple:
    """A tiny classifier with the config's optimizer, scheduler, loss and mixup, after one
    real batch per epoch with the config's trainer."""
    datamodule = instantiate(cfg.data, _convert_="object")
    parts = {k: instantiate(cfg.get(k)) for k in ("optimizer", "scheduler", "loss", "mixup")}
    model = ClassificationModule("test_resnet", num_classes=2, **parts)
    trainer = instantiate(
        cfg.trainer, callbacks=list(callbacks), logger=False, enable_checkpointing=False
    )
    trainer.fit(model, datamodule=datamodule)
    return model, datamodule


@pytest.mark.parametrize("choice", ["mixup", "cutmix"])
def test_mixup_trains_on_soft_smoothed_targets(make_cfg, choice: str):
    cfg = make_cfg(f"mixup={choice}", "loss.label_smoothing=0.1", *ONE_BATCH)

    model, datamodule = _fit(cfg)

    x, y = next(iter(datamodule.train_dataloader()))
    mixed_x, target = model.mix((x.clone(), y))  # timm mixes in place
    assert target.shape == (len(mixed_x), 2) and target.is_floating_point()
    assert torch.allclose(target.sum(dim=1), torch.ones(len(target)))
    assert target.min() >= 0.05 - 1e-6  # ε / C from loss.label_smoothing
    assert not torch.equal(mixed_x, x[: len(mixed_x)])
    logits = model(mixed_x)
    expected = F.cross_entropy(logits, target)  # soft targets: no second smoothing, no weights
    assert model.criterion(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


class _EpochLR(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_cosine_warmup_ramps_linearly_to_the_base_lr(make_cfg):
    cfg = make_cfg(
        "scheduler.warmup_epochs=2", "trainer.max_epochs=5", "optimizer.lr=0.003", *ONE_BATCH
    )
    seen = _EpochLR()

    _fit(cfg, seen)

    assert seen.lrs[:3] == pytest.approx([0.001, 0.002, 0.003])  # (k + 1) / (warmup + 1) × LR
    assert seen.lrs[2] > seen.lrs[3] > seen.lrs[4] > 0  # then cosine decay


def test_warmup_as_long_as_training_is_a_config_error(make_cfg):
    cfg = make_cfg("scheduler.warmup_epochs=2")  # trainer.max_epochs=2
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    with pytest.raises(ConfigError, match=r"scheduler\.warmup_epochs=2.*trainer\.max_epochs=2"):
        instantiate(cfg.scheduler)(optimizer)


def test_gradient_clipping_reaches_the_trainer(make_cfg):
    trainer = instantiate(make_cfg("trainer.gradient_clip_val=0.5").trainer)

    assert trainer.gradient_clip_val == 0.5
    assert trainer.gradient_clip_algorithm == "norm"
    assert instantiate(make_cfg().trainer).gradient_clip_val is None
