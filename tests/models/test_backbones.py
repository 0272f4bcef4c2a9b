"""The backbone factory: names, heads, layer groups, local and ImageNet weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from medx.errors import ConfigError, MedxError
from medx.models.backbones import IMAGENET_MEAN, UNIT_MEAN, create_backbone


def test_new_head_and_blocks_from_input_to_output():
    spec = create_backbone("resnet18", num_classes=4)

    assert spec.model.get_classifier().out_features == 4
    assert spec.head == ["fc.bias", "fc.weight"]
    assert spec.blocks[0][0].startswith("conv1")
    assert spec.blocks[-1][0].startswith("layer4")
    assert spec.mean == UNIT_MEAN  # not pretrained: no ImageNet statistics


def test_local_torchvision_state_dict_loads(tmp_path: Path):
    reference = torchvision.models.resnet18(num_classes=1000)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")

    spec = create_backbone("resnet18", num_classes=2, weights=tmp_path / "resnet18.pth")

    assert torch.equal(spec.model.conv1.weight, reference.conv1.weight)
    assert torch.equal(spec.model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert spec.model.fc.out_features == 2  # the 1000-class head is left behind
    assert spec.mean == IMAGENET_MEAN


def test_weights_of_another_architecture_are_refused(tmp_path: Path):
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")

    with pytest.raises(MedxError, match=r"r50\.pth does not fit"):
        create_backbone("resnet18", num_classes=2, weights=tmp_path / "r50.pth")


def test_missing_weights_file_names_the_key(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"model\.weights=.*does not exist"):
        create_backbone("resnet18", num_classes=2, weights=tmp_path / "nope.pth")


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(ConfigError, match=r"densenet121.*resnet50.*vgg16"):
        create_backbone("resnet19", num_classes=2)


def test_pretrained_offline_says_what_to_do():
    """No internet: a clear message naming model.pretrained=false and model.weights=."""
    code = (
        "from medx.models.backbones import create_backbone; "
        "create_backbone('resnet18', num_classes=2, pretrained=True)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the hub's offline mode answers at once
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode != 0
    assert "model.pretrained=false" in out.stderr and "model.weights=" in out.stderr


@pytest.mark.parametrize("name", ["test_resnet", "vgg16"])
def test_a_hidden_head_is_dropout_512_dropout(name: str):
    spec = create_backbone(name, num_classes=4, head_hidden=512, drop_rate=0.5)
    head = spec.model.get_classifier()
    assert [type(m).__name__ for m in head] == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert head[1].out_features == 512 and head[4].out_features == 4
    assert spec.model(torch.randn(2, 3, 64, 64)).shape == (2, 4)
    assert all(n.startswith(("fc.", "head.fc.")) for n in spec.head) and len(spec.head) == 4


def test_small_input_keeps_a_spatial_map_at_28_px():
    feature_map = create_backbone("resnet18", 2).model.eval().forward_features
    small = create_backbone("resnet18", 2, small_input=True).model.eval().forward_features
    x = torch.randn(1, 3, 28, 28)
    assert feature_map(x).shape[-1] == 1 and small(x).shape[-1] == 4
    with pytest.raises(ConfigError, match="small_input=true needs a ResNet"):
        create_backbone("vgg16", 2, small_input=True)
