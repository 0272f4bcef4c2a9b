"""Every config choice composes, and what it chooses is what gets built: the network, the
strategy's frozen blocks, the optimizer, scheduler, loss, Mixup, trainer, logger and callbacks.

One test per `group=choice` (a failure names it and hides no other). A choice with no
expectation here fails, so a new config file comes with its check.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from hydra.errors import MissingConfigException
from hydra.utils import get_class, instantiate
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
)
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig
from timm.data import Mixup
from torch import nn

from medx.config import compose, config_dir
from medx.evaluation.callback import ClinicalEvaluation
from medx.models.losses import BinaryCrossEntropy, CrossEntropy, FocalLoss
from medx.models.quality import QualityBaseline
from medx.models.segmentation_nets import ARCHITECTURES
from medx.quality.features import FEATURES

CONF = Path(config_dir())
GROUPS = (
    "data",
    "model",
    "strategy",
    "optimizer",
    "scheduler",
    "trainer",
    "logger",
    "callbacks",
    "debug",
    "experiment",
    "loss",
    "mixup",
    "hparams_search",
)


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def every(group: str) -> list[Any]:
    return [pytest.param(c, id=f"{group}={c}") for c in choices(group)]


def no_check(group: str, choice: str) -> None:
    pytest.fail(f"{group}={choice} has no expectation in {__file__}: add one")


def build(cfg: DictConfig, **model_kwargs: Any) -> L.LightningModule:
    """The model as `medx.train` builds it (model_kwargs: what the data module passes)."""
    return instantiate(
        cfg.model,
        **model_kwargs,
        strategy=cfg.strategy,
        optimizer=cfg.optimizer,
        scheduler=cfg.get("scheduler"),
        _convert_="object",
    )


def tiny(*overrides: str, num_classes: int = 2) -> tuple[DictConfig, L.LightningModule]:
    """The composed config and a test_resnet classifier built from it."""
    cfg = compose([*overrides, "model=resnet18", "model.backbone=test_resnet"])
    return cfg, build(cfg, num_classes=num_classes)


def trainable(model: L.LightningModule) -> set[str]:
    return {n for n, p in model.net.named_parameters() if p.requires_grad}


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    ("group", "choice"),
    [pytest.param(g, c, id=f"{g}={c}") for g in GROUPS for c in choices(g)],
)
def test_every_choice_composes(group: str, choice: str, tmp_path: Path):
    cfg = compose([f"{group}={choice}", f"paths.root_dir={tmp_path}"])
    assert cfg.hydra.runtime.choices[group] == choice
    assert cfg.data._target_ and cfg.model._target_


# --- model: the network the choice names, built without weights ---------------------------

CLASSIFIERS = {"densenet121", "efficientnet_b0", "resnet18", "resnet50", "vgg16"}


@pytest.mark.parametrize("choice", every("model"))
def test_model_choice_builds_that_network(choice: str):
    cfg = compose([f"model={choice}"])
    assert not cfg.model.get("pretrained")  # nothing downloads by default
    x = torch.rand(2, 3, 64, 64)
    if choice in CLASSIFIERS:
        model = build(cfg, num_classes=3)
        with torch.device("meta"):  # timm's own network of that name: shapes only, no memory
            reference = timm.create_model(choice, num_classes=3)
        assert type(model.net) is type(reference)
        assert shapes(model.net) == shapes(reference)  # e.g. resnet18 is not resnet50
        assert model.net.get_classifier().out_features == 3
        assert model.eval()(x).shape == (2, 3)
    elif choice in ARCHITECTURES:
        model = build(cfg, image_size=64)
        with torch.device("meta"):
            reference = smp.create_model(
                ARCHITECTURES[choice], encoder_name=cfg.model.encoder, encoder_weights=None
            )
        assert type(model.net) is type(reference)
        assert type(model.net).__name__ == ARCHITECTURES[choice]
        assert shapes(model.net) == shapes(reference)  # the configured encoder (resnet34)
        assert model.eval()(x).shape == (2, 1, 64, 64)
    elif choice == "quality_logreg":
        model = build(cfg, num_classes=2)
        assert isinstance(model, QualityBaseline)
        assert (model.linear.in_features, model.linear.out_features) == (len(FEATURES), 2)
        return
    else:
        no_check("model", choice)
    assert len(model.blocks) >= 4  # stem + stages: what strategies act on


def test_model_overrides_reach_the_network():
    cfg = compose(["model=resnet18", "model.head_hidden=64", "model.small_input=true"])
    net = build(cfg, num_classes=2).net
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    assert [type(m) for m in net.fc] == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert net.fc[1].out_features == 64 and net.fc[4].out_features == 2


# --- strategy: which parameters train, in which optimizer group, at which LR --------------


@pytest.mark.parametrize("choice", every("strategy"))
def test_strategy_choice_freezes_what_it_says(choice: str):
    cfg, model = tiny(f"strategy={choice}", "optimizer=sgd", "scheduler=none")
    s, lr = cfg.strategy, cfg.optimizer.lr
    everything = {n for n, _ in model.net.named_parameters()}
    head = set(model.head)
    last = s.unfreeze_last and {n for b in model.blocks[-s.unfreeze_last :] for n in b}
    optimizer = model.configure_optimizers()
    groups = {g["name"]: g for g in optimizer.param_groups}
    names = {id(p): n for n, p in model.net.named_parameters()}
    in_group = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}

    if choice == "full":
        assert trainable(model) == everything
        assert in_group["head"] | in_group["backbone"] == everything
        assert {g["lr"] for g in groups.values()} == {lr}
    elif choice == "freeze":
        assert trainable(model) == head and in_group == {"head": head}
        assert groups["head"]["lr"] == lr
    elif choice == "finetune":
        assert 0 < s.unfreeze_last < len(model.blocks) and s.backbone_lr_scale < 1
        assert trainable(model) == head | last
        assert in_group == {"head": head, "backbone": last}
        assert groups["backbone"]["lr"] == pytest.approx(lr * s.backbone_lr_scale)
        assert groups["head"]["lr"] == lr
    elif choice == "two_stage":
        assert s.head_epochs > 0 and 0 < s.unfreeze_last < len(model.blocks)
        assert trainable(model) == head  # head only at first
        assert in_group == {"head": head, "backbone": last}
        model.strategy.start_epoch(model.net, model.blocks, s.head_epochs - 1)
        assert trainable(model) == head
        model.strategy.start_epoch(model.net, model.blocks, s.head_epochs)
        assert trainable(model) == head | last
        assert groups["backbone"]["lr"] == pytest.approx(lr * s.backbone_lr_scale)
    else:
        no_check("strategy", choice)


# --- optimizer, scheduler ----------------------------------------------------------------

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@pytest.mark.parametrize("choice", every("optimizer"))
def test_optimizer_choice_is_that_optimizer_with_its_settings(choice: str):
    cfg, model = tiny(f"optimizer={choice}", "scheduler=none")
    optimizer = model.configure_optimizers()
    if choice not in OPTIMIZERS:
        no_check("optimizer", choice)
    assert type(optimizer) is OPTIMIZERS[choice]
    settings = {k: v for k, v in cfg.optimizer.items() if not k.startswith("_")}
    assert settings, "an optimizer config with no settings"
    for group in optimizer.param_groups:
        assert {k: group[k] for k in settings} == pytest.approx(settings), group["name"]
    if choice == "sgd":
        assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["nesterov"]
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("choice", every("scheduler"))
def test_scheduler_choice_is_that_scheduler(choice: str):
    cfg, model = tiny(f"scheduler={choice}", "trainer.max_epochs=12")
    configured = model.configure_optimizers()
    if choice == "none":
        assert isinstance(configured, torch.optim.Optimizer)
        return
    scheduler = configured["lr_scheduler"]["scheduler"]
    assert configured["lr_scheduler"]["interval"] == "epoch"
    lr = torch.optim.lr_scheduler
    if choice == "cosine":
        assert cfg.scheduler.warmup_epochs == 0
        assert type(scheduler) is lr.CosineAnnealingLR
        assert scheduler.T_max == 12 and scheduler.eta_min == cfg.scheduler.eta_min
    elif choice == "multistep":
        assert type(scheduler) is lr.MultiStepLR
        assert sorted(scheduler.milestones) == [6, 9]  # 50% and 75% of 12 epochs
        assert scheduler.gamma == cfg.scheduler.gamma
    elif choice == "plateau":
        assert type(scheduler) is lr.ReduceLROnPlateau
        assert configured["lr_scheduler"]["monitor"] == "val/loss" and scheduler.mode == "min"
        assert (scheduler.factor, scheduler.patience) == (cfg.scheduler.factor, 3)
    else:
        no_check("scheduler", choice)


def test_cosine_warmup_chains_linear_then_cosine():
    _, model = tiny("scheduler.warmup_epochs=2", "trainer.max_epochs=12")
    scheduler = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    lr = torch.optim.lr_scheduler
    assert type(scheduler) is lr.SequentialLR and scheduler._milestones == [2]
    warmup, decay = scheduler._schedulers
    assert type(warmup) is lr.LinearLR and warmup.total_iters == 2
    assert type(decay) is lr.CosineAnnealingLR and decay.T_max == 10


# --- loss, mixup -------------------------------------------------------------------------


@pytest.mark.parametrize("choice", every("loss"))
def test_loss_choice_is_that_loss(choice: str):
    cfg, model = tiny(f"loss={choice}", "loss.label_smoothing=0.1")
    loss = model.criterion
    assert loss.label_smoothing == 0.1
    outputs = model.net.get_classifier().out_features
    if choice == "cross_entropy":
        assert type(loss) is CrossEntropy and outputs == 2
    elif choice == "focal":
        assert type(loss) is FocalLoss and outputs == 2
        assert loss.gamma == cfg.loss.gamma > 0  # gamma 0 would be cross-entropy
    elif choice == "bce":
        assert type(loss) is BinaryCrossEntropy and outputs == 1  # one logit...
        assert model.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 2)  # ...seen as two classes
    else:
        no_check("loss", choice)
    assert model.hparams["loss"]["_target_"] == cfg.loss._target_  # checkpoints rebuild it


@pytest.mark.parametrize("choice", every("mixup"))
def test_mixup_choice_is_timm_mixup_with_its_alphas(choice: str):
    cfg, model = tiny(f"mixup={choice}", "loss.label_smoothing=0.1", num_classes=3)
    if choice == "none":
        assert model.mixup is None
        return
    mixup = model.mixup
    assert type(mixup) is Mixup
    m = cfg.mixup
    assert (mixup.mixup_alpha, mixup.cutmix_alpha) == (m.mixup_alpha, m.cutmix_alpha)
    assert (mixup.mix_prob, mixup.switch_prob, mixup.mode) == (m.prob, m.switch_prob, m.mode)
    assert (mixup.num_classes, mixup.label_smoothing) == (3, 0.1)  # completed by the model
    if choice == "mixup":
        assert mixup.mixup_alpha > 0 and mixup.cutmix_alpha == 0
    elif choice == "cutmix":
        assert mixup.cutmix_alpha > 0 and mixup.mixup_alpha == 0
    else:
        no_check("mixup", choice)


# --- trainer, debug, logger, callbacks, data ---------------------------------------------

TRAINERS = {
    "default": {"accelerator": "auto", "devices": 1, "precision": "32-true"},
    "cpu": {"accelerator": "cpu", "devices": 1, "precision": "32-true"},
    "gpu": {"accelerator": "gpu", "devices": 1, "precision": "16-mixed"},
    "ddp": {"accelerator": "auto", "devices": "auto", "strategy": "ddp_spawn"},
}


@pytest.mark.parametrize("choice", every("trainer"))
def test_trainer_choice_sets_accelerator_and_precision(choice: str, tmp_path: Path):
    cfg = compose([f"trainer={choice}", f"paths.output_dir={tmp_path}"])
    if choice not in TRAINERS:
        no_check("trainer", choice)
    assert {k: cfg.trainer.get(k) for k in TRAINERS[choice]} == TRAINERS[choice]
    assert cfg.trainer.default_root_dir == str(tmp_path)
    if choice == "cpu":
        trainer = instantiate(cfg.trainer, logger=False)
        assert isinstance(trainer.accelerator, CPUAccelerator) and trainer.precision == "32-true"
    if choice == "ddp":  # on CPU as the README shows: two gloo processes, spawned
        trainer = instantiate(cfg.trainer, accelerator="cpu", devices=2, logger=False)
        assert type(trainer.strategy) is DDPStrategy and trainer.strategy._start_method == "spawn"
        assert trainer.num_devices == 2


@pytest.mark.parametrize("choice", every("debug"))
def test_debug_choice_shrinks_the_trainer(choice: str, tmp_path: Path):
    cfg = compose([f"debug={choice}", f"paths.output_dir={tmp_path}"])
    assert cfg.data.num_workers == 0 and cfg.task_name == "debug"
    trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer.accelerator, CPUAccelerator)
    if choice == "default":
        assert trainer.max_epochs == 1
    elif choice == "fdr":
        assert trainer.fast_dev_run is True
    elif choice == "limit":
        assert (trainer.max_epochs, trainer.limit_train_batches, trainer.limit_val_batches) == (
            3,
            4,
            2,
        )
    elif choice == "overfit":
        assert trainer.overfit_batches == 2 and cfg.callbacks.early_stopping is None
        assert cfg.data.augment == "none"
    else:
        no_check("debug", choice)


@pytest.mark.parametrize("choice", every("logger"))
def test_logger_choice_is_that_logger(choice: str, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose(
        [f"logger={choice}", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run"]
    )
    if choice == "none":
        assert cfg.logger is None
        assert cfg.callbacks.lr_monitor is None  # it needs a logger
        return
    logger = instantiate(cfg.logger)
    if choice == "csv":
        assert type(logger) is CSVLogger and logger.save_dir == f"{tmp_path}/run"
    elif choice == "mlflow":
        assert isinstance(logger, MLFlowLogger) and logger.register_as is None
        assert logger._tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
        assert logger._experiment_name == "medx"
        assert logger._run_name == "resnet18-phantom-full"
    else:
        no_check("logger", choice)


@pytest.mark.parametrize("choice", every("callbacks"))
def test_callbacks_choice_builds_those_callbacks(choice: str, tmp_path: Path):
    cfg = compose(
        [
            f"callbacks={choice}",
            f"paths.output_dir={tmp_path}",
            "monitor=val/auroc",
            "monitor_mode=max",
        ]
    )
    # as medx.train builds them
    built = {k: instantiate(c) for k, c in (cfg.get("callbacks") or {}).items() if c}
    if choice == "none":
        assert built == {}
        return
    if choice != "default":
        no_check("callbacks", choice)
    kinds = {
        "model_checkpoint": ModelCheckpoint,
        "early_stopping": EarlyStopping,
        "rich_progress_bar": RichProgressBar,
        "lr_monitor": LearningRateMonitor,
        "clinical_evaluation": ClinicalEvaluation,
    }
    assert set(kinds) <= set(built)
    for key, kind in kinds.items():
        assert isinstance(built[key], kind), key
    for key, callback in built.items():  # the reports beside them (segmentation, quality)
        assert isinstance(callback, L.Callback), key
        assert get_class(cfg.callbacks[key]._target_) is type(callback), key
    checkpoint, stopping = built["model_checkpoint"], built["early_stopping"]
    assert (checkpoint.monitor, checkpoint.mode, checkpoint.save_top_k) == ("val/auroc", "max", 1)
    assert checkpoint.dirpath == str(tmp_path / "checkpoints")
    assert (stopping.monitor, stopping.mode, stopping.patience) == ("val/auroc", "max", 5)
    clinical = built["clinical_evaluation"]
    assert clinical.target_sensitivity == cfg.eval.target_sensitivity
    assert (clinical.calibrate, clinical.bootstrap) == (cfg.eval.calibrate, cfg.eval.bootstrap)


@pytest.mark.parametrize("choice", every("data"))
def test_data_choice_builds_that_data_module(choice: str, tmp_path: Path):
    overrides = [f"data={choice}", f"paths.root_dir={tmp_path}"]
    if choice == "folder":
        overrides.append("data.root=/some/where")  # required (???) for a generic folder
    cfg = compose(overrides)
    datamodule = instantiate(cfg.data, _convert_="object")
    assert type(datamodule) is get_class(cfg.data._target_)
    assert datamodule.name == choice
    assert (datamodule.image_size, datamodule.batch_size) == (
        cfg.data.image_size,
        cfg.data.batch_size,
    )
    assert datamodule.num_workers == cfg.data.num_workers


def test_unknown_choice_lists_the_choices():
    with pytest.raises(MissingConfigException) as err:
        compose(["model=densenet999"])
    assert "densenet121" in str(err.value) and "resnet50" in str(err.value)


def test_stable_keys_exist():
    cfg = compose(["data=pneumonia"])
    for key in (
        "data.root",
        "data.image_size",
        "data.batch_size",
        "data.num_workers",
        "data.val_from_train",
        "data.swap_val_test",
        "model.pretrained",
        "model.weights",
        "strategy.unfreeze_last",
        "seed",
        "logger.experiment_name",
    ):
        node, *path = key.split(".")
        value = cfg[node]
        for part in path:
            assert part in value, key
            value = value[part]


def test_mlflow_tracking_uri_env_wins(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert compose().logger.tracking_uri == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert compose(["paths.root_dir=/x"]).logger.tracking_uri == "sqlite:////x/mlflow.db"


def _cli(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "medx.train", *args], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_cli_shows_config_and_choices():
    job = _cli("model=densenet121", "--cfg", "job")
    assert "backbone: densenet121" in job and "_target_: medx.data.folders" in job
    help_text = _cli("--help")
    for group, choice in [
        ("model", "efficientnet_b0"),
        ("data", "pneumonia"),
        ("strategy", "finetune"),
        ("debug", "fdr"),
    ]:
        assert group in help_text and choice in help_text


def test_configs_compose_from_several_threads_at_once():
    """A benchmark trains fold runs from a thread pool and composes each run's config."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        cfgs = list(pool.map(lambda f: compose([f"data.fold={f}"]), range(8)))
    assert [c.data.fold for c in cfgs] == list(range(8))
