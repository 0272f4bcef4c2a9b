"""Segmentation model: overlap metrics by hand, strategies on encoders, weights, losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medx.errors import ConfigError, MedxError
from medx.models.overlap import overlap_scores, pooled_dice
from medx.models.segmentation import SegmentationModule
from medx.models.segmentation_nets import create_segmenter
from medx.models.strategy import Strategy
from medx.train import train


def test_dice_and_iou_agree_with_a_hand_computation():
    truth = torch.zeros(3, 1, 4, 4)
    pred = torch.zeros(3, 1, 4, 4)
    truth[0, 0, :2, :] = 1  # 8 true pixels
    pred[0, 0, 1:3, :] = 1  # 8 predicted, 4 of them right: tp 4, fp 4, fn 4
    truth[1, 0, 0, 0] = 1  # one pixel, missed entirely
    # image 2: both empty

    scores = overlap_scores(pred, truth)

    assert scores["dice"].tolist() == pytest.approx([2 * 4 / (2 * 4 + 4 + 4), 0.0, 1.0])
    assert scores["iou"].tolist() == pytest.approx([4 / (4 + 4 + 4), 0.0, 1.0])
    assert scores["accuracy"].tolist() == pytest.approx([8 / 16, 15 / 16, 1.0])
    # pooled over all pixels: tp 4, fp 4, fn 4 + 1 (the missed pixel); the empty image adds 0
    pooled = pooled_dice(scores["tp"], scores["fp"], scores["fn"])
    assert pooled.item() == pytest.approx(2 * 4 / (2 * 4 + 4 + 5))
    assert pooled.item() != pytest.approx(scores["dice"].mean().item())  # two conventions


@pytest.mark.parametrize("arch", ["unet", "fpn"])
def test_strategies_freeze_encoder_blocks_as_for_classifiers(arch: str):
    frozen = SegmentationModule(
        arch, "tu-test_resnet", strategy=Strategy("freeze", unfreeze_last=0)
    )
    finetune = SegmentationModule(
        arch, "tu-test_resnet", strategy=Strategy("finetune", 2, backbone_lr_scale=0.1)
    )

    encoder = dict(frozen.net.encoder.named_parameters())
    assert not any(p.requires_grad for p in encoder.values())
    assert all(p.requires_grad for p in frozen.net.decoder.parameters())
    assert len(finetune.blocks) == 5  # stem + four stages, input → output
    trainable = {n for n, p in finetune.net.named_parameters() if p.requires_grad}
    assert set(finetune.blocks[-1]) <= trainable and not set(finetune.blocks[0]) & trainable
    groups = {g["name"]: g["lr_scale"] for g in finetune.configure_optimizers().param_groups}
    assert groups == {"head": 1.0, "backbone": 0.1}
    frozen.train()  # frozen BatchNorm keeps its statistics
    assert not frozen.net.encoder.model.bn1.training and frozen.net.decoder.training


def test_every_parameter_is_in_exactly_one_group():
    spec = create_segmenter("unet", "resnet18")
    names = [n for block in spec.blocks for n in block] + spec.head
    assert sorted(names) == sorted(n for n, _ in spec.model.named_parameters())
    assert spec.blocks[0][0] == "encoder.conv1.weight" and len(spec.blocks) == 5


def test_local_encoder_weights_are_loaded(tmp_path: Path):
    source = create_segmenter("unet", "tu-test_resnet").model
    path = tmp_path / "encoder.pth"
    torch.save(source.encoder.model.state_dict(), path)

    loaded = create_segmenter("unet", "tu-test_resnet", weights=str(path))

    first = "model.conv1.0.weight"
    assert torch.equal(loaded.model.encoder.state_dict()[first], source.encoder.state_dict()[first])
    assert loaded.mean == (0.485, 0.456, 0.406)  # ImageNet normalisation with trained weights


def test_a_medx_classifier_checkpoint_becomes_the_encoder(make_cfg, tmp_path: Path):
    """In-domain pretraining offline: a backbone trained on chest X-rays seeds the U-Net."""
    train(make_cfg("debug=limit", "trainer.max_epochs=1"))  # a classifier on the phantom
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    trained = torch.load(checkpoint, weights_only=True)["state_dict"]

    spec = create_segmenter("unet", "tu-test_resnet", weights=str(checkpoint))

    encoder = spec.model.encoder.model.state_dict()
    assert torch.equal(encoder["conv1.0.weight"], trained["net.conv1.0.weight"])
    assert torch.equal(encoder["layer4.0.bn2.running_var"], trained["net.layer4.0.bn2.running_var"])
    fresh = create_segmenter("unet", "tu-test_resnet").model.encoder.model.state_dict()
    assert not torch.equal(fresh["conv1.0.weight"], trained["net.conv1.0.weight"])


def test_pretrained_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MedxError, match=r"model\.pretrained=false.*model\.weights="):
        create_segmenter("unet", "resnet18", pretrained=True)


@pytest.mark.parametrize("loss", ["dice", "bce", "dice_bce", "focal"])
def test_losses_train_on_logits(loss: str):
    module = SegmentationModule("unet", "tu-test_resnet", loss=loss, xavier_init=True)
    x, y = torch.randn(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float()
    value = module.loss_fn(module(x), y)
    value.backward()
    assert value.item() > 0 and module.net.segmentation_head[0].weight.grad is not None


def test_zscore_makes_the_output_exposure_invariant():
    module = SegmentationModule("unet", "tu-test_resnet", zscore=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(module(x), module(3 * x + 1), atol=1e-4)


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match=r"model\.arch='segnet'"):
        create_segmenter("segnet", "resnet18")
    with pytest.raises(ConfigError, match=r"model\.encoder='resnet9'.*tu-"):
        create_segmenter("unet", "resnet9")
    with pytest.raises(ConfigError, match=r"model\.loss='hinge'"):
        SegmentationModule("unet", "tu-test_resnet", loss="hinge")
