"""One word per seed project: `experiment=<name>` builds the recipe's network, strategy,
optimizer and schedule (checked on the built objects), and it runs."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import timm
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig
from sklearn.metrics import roc_auc_score
from torch import nn

from medx.config import compose
from medx.models.classifier import inverse_frequency_weights
from medx.train import train

KERMANY_COUNTS = [1341, 3875]  # NORMAL, PNEUMONIA in Kermany's train/


def build(cfg: DictConfig, **model_kwargs: Any) -> L.LightningModule:
    """The recipe's model as `medx.train` builds it (model_kwargs: the data module's)."""
    return instantiate(
        cfg.model,
        **model_kwargs,
        strategy=cfg.strategy,
        optimizer=cfg.optimizer,
        scheduler=cfg.get("scheduler"),
        _convert_="object",
    )


def trainable(model: L.LightningModule) -> set[str]:
    return {n for n, p in model.net.named_parameters() if p.requires_grad}


def trained_stages(model: L.LightningModule) -> set[str]:
    """Top-level backbone modules (`layer4`, `features.denseblock4`) with a trainable tensor."""
    names = trainable(model) - set(model.head)
    depth = {"features": 2}  # DenseNet/VGG keep their stages under `features.`
    return {".".join(n.split(".")[: depth.get(n.split(".")[0], 1)]) for n in names}


def same_network(net: nn.Module, arch: str, num_classes: int) -> bool:
    with torch.device("meta"):  # timm's network of that name: shapes only, no memory
        reference = timm.create_model(arch, num_classes=num_classes)
    shape = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    return type(net) is type(reference) and shape == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()
    }


@pytest.mark.parametrize(
    ("experiment", "arch", "stages"),
    [
        ("pneumonia_resnet50_finetune", "resnet50", {"layer3", "layer4"}),
        (  # a dense block with its transition; the last one with its output norm
            "pneumonia_densenet121_finetune",
            "densenet121",
            {
                "features.denseblock3",
                "features.transition3",
                "features.denseblock4",
                "features.norm5",
            },
        ),
    ],
)
def test_the_two_stage_pneumonia_recipes(experiment: str, arch: str, stages: set[str]) -> None:
    """Head first for head_epochs, then the last two stages at 0.1 x LR, class-weighted."""
    cfg = compose([f"experiment={experiment}"])
    assert cfg.model.pretrained and cfg.data.name == "pneumonia" and cfg.data.image_size == 224
    cfg.model.pretrained = False  # the same network, without downloading ImageNet weights

    model = build(cfg, num_classes=2, class_counts=KERMANY_COUNTS)

    assert same_network(model.net, arch, num_classes=2)
    expected = inverse_frequency_weights(KERMANY_COUNTS)
    assert torch.equal(model.criterion.class_weight, expected)
    assert trainable(model) == set(model.head)  # stage 1: the head alone
    assert model.strategy.head_epochs == 3
    model.strategy.start_epoch(model.net, model.blocks, 3)
    assert trained_stages(model) == stages  # stage 2: the last two stages too
    optimizer = model.configure_optimizers()["optimizer"]
    assert type(optimizer) is torch.optim.AdamW
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(
        {"head": 1e-3, "backbone": 1e-4}
    )


def test_the_vgg16_frozen_recipe() -> None:
    """ImageNet VGG16 as a fixed feature extractor: only the new head trains, dropout 0.5."""
    cfg = compose(["experiment=pneumonia_vgg16_frozen", "model.pretrained=false"])

    model = build(cfg, num_classes=2, class_counts=KERMANY_COUNTS)

    assert same_network(model.net, "vgg16", num_classes=2)
    assert trainable(model) == set(model.head) == {"head.fc.weight", "head.fc.bias"}
    model.strategy.start_epoch(model.net, model.blocks, 5)  # and it stays so
    assert trainable(model) == set(model.head)
    dropouts = [m.p for m in model.net.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and set(dropouts) == {0.5}
    optimizer = model.configure_optimizers()["optimizer"]
    assert [g["name"] for g in optimizer.param_groups] == ["head"]
    assert torch.equal(model.criterion.class_weight, inverse_frequency_weights(KERMANY_COUNTS))


def test_the_medmnist_recipe(tmp_path: Path) -> None:
    """MedMNIST v2's ResNet-18: 28 px stem, Adam 1e-3, x0.1 at epochs 50 and 75 of 100."""
    cfg = compose(["experiment=medmnist_resnet18", f"paths.output_dir={tmp_path}"])

    model = build(cfg, num_classes=2)

    net = model.net
    with torch.device("meta"):
        reference = timm.create_model("resnet18", num_classes=2)
    differ = {k for k, v in net.state_dict().items() if v.shape != reference.state_dict()[k].shape}
    assert type(net) is type(reference) and differ == {"conv1.weight"}  # ResNet-18, new stem
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    assert net.eval().forward_features(torch.rand(1, 3, 28, 28)).shape[-2:] == (4, 4)
    assert trainable(model) == {n for n, _ in net.named_parameters()}  # from scratch: all
    configured = model.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 0.0
    assert type(scheduler) is torch.optim.lr_scheduler.MultiStepLR
    assert sorted(scheduler.milestones) == [50, 75] and scheduler.gamma == 0.1
    trainer = instantiate(cfg.trainer, logger=False, accelerator="cpu")
    assert trainer.max_epochs == 100
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
    assert not any(isinstance(c, EarlyStopping) for c in callbacks)
    (checkpoint,) = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    assert (checkpoint.monitor, checkpoint.mode) == ("val/auroc", "max")
    datamodule = instantiate(cfg.data, _convert_="object")
    assert (datamodule.name, datamodule.image_size, datamodule.batch_size) == (
        "pneumoniamnist",
        28,
        128,
    )


@pytest.mark.parametrize("num_classes", [3, 4])
def test_the_cxr_multiclass_recipe_has_the_512_head(num_classes: int) -> None:
    """ResNet50 with dropout(0.5) -> Linear(2048, 512) -> ReLU -> dropout(0.5) -> Linear(512, K)."""
    cfg = compose(["experiment=cxr_multiclass", "data.root=/x", "model.pretrained=false"])

    model = build(cfg, num_classes=num_classes, class_counts=[10, 20, 30, 40][:num_classes])

    head = model.net.get_classifier()
    assert [type(m) for m in head] == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (head[0].p, head[3].p) == (0.5, 0.5)
    assert (head[1].in_features, head[1].out_features) == (2048, 512)
    assert (head[4].in_features, head[4].out_features) == (512, num_classes)
    assert set(model.head) == {f"fc.{i}.{w}" for i in (1, 4) for w in ("weight", "bias")}
    assert model.eval()(torch.rand(2, 3, 64, 64)).shape == (2, num_classes)
    assert trainable(model) == set(model.head)  # two_stage: the head first
    model.strategy.start_epoch(model.net, model.blocks, cfg.strategy.head_epochs)
    assert trained_stages(model) == {"layer3", "layer4"}


def _predictions(cfg: DictConfig) -> list[dict[str, str]]:
    path = Path(cfg.paths.output_dir) / "evaluation" / "test_predictions.csv"
    with path.open() as f:
        return list(csv.DictReader(f))


def _state(cfg: DictConfig) -> dict[str, torch.Tensor]:
    (best,) = (Path(cfg.paths.output_dir) / "checkpoints").glob("epoch*.ckpt")
    return torch.load(best, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow  # a real multi-epoch run: CI's make test-slow
def test_medmnist_recipe_runs(make_cfg, medx_data: Path, tmp_path: Path) -> None:
    """The real recipe (ResNet-18, 28 px stem) on the first 64 images of each official split."""
    with np.load(medx_data / "pneumoniamnist" / "pneumoniamnist.npz") as full:
        np.savez(tmp_path / "pneumoniamnist.npz", **{k: full[k][:64] for k in full.files})
    cfg = make_cfg(
        "experiment=medmnist_resnet18",
        f"data.root={tmp_path}",
        "data.image_size=28",
        "data.batch_size=32",
        "model.backbone=resnet18",
        "trainer.max_epochs=2",
        "eval.bootstrap=50",
    )
    metrics = train(cfg)

    rows = _predictions(cfg)
    assert len(rows) == 64
    labels = [r["label"] == "pneumonia" for r in rows]
    expected = roc_auc_score(labels, [float(r["probability"]) for r in rows])
    # 2 epochs leave the probabilities within 1e-3 of each other: the CSV's 6 decimals tie a
    # pair or two of the ~1000 (5e-4 each); a wrong column or label would be off by far more
    assert metrics["test/auroc"] == pytest.approx(expected, abs=3e-3)
    assert _state(cfg)["net.conv1.weight"].shape == (64, 3, 3, 3)  # the 28 px stem trained


def test_multiclass_cxr_with_the_512_head(make_cfg, medx_data: Path, tmp_path: Path) -> None:
    """Kermany's three labels from its file names (normal, bacterial, viral pneumonia)."""
    root = tmp_path / "cxr3"
    train_dir = medx_data / "chest_xray" / "train"
    for label, folder, pattern in [
        ("normal", "NORMAL", r"IM-"),
        ("bacteria", "PNEUMONIA", r"_bacteria_"),
        ("virus", "PNEUMONIA", r"_virus_"),
    ]:
        (root / label).mkdir(parents=True)
        found = sorted(p for p in (train_dir / folder).iterdir() if re.search(pattern, p.name))
        for path in found[:24]:
            (root / label / path.name).symlink_to(path)
    cfg = make_cfg(
        "experiment=cxr_multiclass",
        f"data.root={root}",
        "data.patient_pattern='person(\\d+)_|IM-(\\d+)-'",
        "data.val_from_train=0.25",
        "data.test_from_train=0.25",
        "model.pretrained=false",
        "strategy=full",
        "trainer.max_epochs=1",
        "eval.bootstrap=50",
    )
    metrics = train(cfg)

    classes = ["bacteria", "normal", "virus"]  # the subfolders, sorted: the label index
    rows = _predictions(cfg)
    labels = [classes.index(r["label"]) for r in rows]
    probs = np.array([[float(r[f"probability_{c}"]) for c in classes] for r in rows])
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    expected = roc_auc_score(labels, probs, multi_class="ovr")
    assert metrics["test/auroc"] == pytest.approx(expected, abs=1e-4)
    state = _state(cfg)  # the trained network: test_resnet with the 512 head, 3 classes
    assert state["net.fc.1.weight"].shape[0] == 512
    assert state["net.fc.4.weight"].shape == (3, 512)
