"""One word per seed project: `experiment=<name>` composes the whole recipe, and it runs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from medx.config import compose
from medx.train import train


@pytest.mark.parametrize(
    ("experiment", "model", "strategy"),
    [
        ("pneumonia_vgg16_frozen", "vgg16", "freeze"),
        ("pneumonia_resnet50_finetune", "resnet50", "two_stage"),
        ("pneumonia_densenet121_finetune", "densenet121", "two_stage"),
    ],
)
def test_the_pneumonia_seed_recipes(experiment: str, model: str, strategy: str) -> None:
    cfg = compose([f"experiment={experiment}"])
    assert (cfg.data.name, cfg.model.backbone, cfg.strategy.name) == ("pneumonia", model, strategy)
    assert cfg.data.image_size == 224 and cfg.model.pretrained and cfg.model.class_weights


def test_the_medmnist_recipe() -> None:
    cfg = compose(["experiment=medmnist_resnet18"])
    assert cfg.data.name == "pneumoniamnist" and cfg.data.image_size == 28
    assert cfg.model.small_input and not cfg.model.pretrained
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 1e-3
    assert list(cfg.scheduler.at) == [0.5, 0.75] and cfg.trainer.max_epochs == 100
    assert cfg.data.batch_size == 128 and cfg.monitor == "val/auroc"
    assert cfg.callbacks.early_stopping is None


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
    assert 0.0 <= metrics["test/auroc"] <= 1.0


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
    assert 0.0 <= metrics["test/auroc"] <= 1.0
    head = cfg.model.head_hidden
    assert head == 512
