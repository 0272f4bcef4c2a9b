"""Grad-CAM: it localises what a trained model learned, for every backbone family, frozen or
not, inside inference mode; overlays at the image's own size; the CAM mass inside a mask."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from medx.data.phantom import render_phantom_regions
from medx.errors import ConfigError, MedxError
from medx.evaluation.explain import LUNG_OUTLINE, grad_cam, mass_inside, overlay_cam
from medx.models.classifier import ClassificationModule
from medx.models.load import load
from medx.train import train


def tiny(backbone: str = "test_resnet", seed: int = 0, **kwargs) -> ClassificationModule:
    """A classifier with random weights (no download), in eval mode."""
    torch.manual_seed(seed)
    return ClassificationModule(backbone=backbone, num_classes=2, **kwargs).eval()


def images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """[0, 1] batch with structure (smooth blobs), as medx modules take it."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1)


def phantom_positives(n: int, size: int) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Fresh phantom positives (patients no run trained on) and where their opacities are."""
    pixels, regions = [], []
    for i in range(n):
        image, _, opacity = render_phantom_regions(np.random.default_rng([123, i]), size, True)
        pixels.append(image)
        regions.append(opacity > 0)
    x = torch.from_numpy(np.stack(pixels)).float().div(255)[:, None].expand(-1, 3, -1, -1)
    return x.contiguous(), regions


def mean_share(cams: np.ndarray, regions: list[np.ndarray]) -> float:
    """Mean share of CAM mass inside the regions; an all-zero CAM points nowhere (0)."""
    shares = [mass_inside(c, r) for c, r in zip(cams, regions, strict=True)]
    return float(np.mean(np.nan_to_num(shares)))


@pytest.mark.slow
def test_trained_models_cam_falls_on_the_opacities_and_a_random_models_does_not(make_cfg):
    size = 64
    cfg = make_cfg(
        "data.n_patients=400",  # test_resnet needs a few hundred images to learn the opacities
        f"data.size={size}",
        f"data.image_size={size}",
        "data.augment=none",
        "optimizer.lr=3e-3",
        "trainer.max_epochs=4",
        "logger=none",
    )
    metrics = train(cfg)
    assert metrics["val/auroc_best"] > 0.7  # it learned something to explain
    (best,) = (Path(cfg.paths.output_dir) / "checkpoints").glob("epoch*.ckpt")
    x, regions = phantom_positives(32, size)
    area = float(np.mean([r.mean() for r in regions]))

    model = load(best)
    with torch.inference_mode():  # as in a predict loop: grad_cam leaves it for the backward
        trained = grad_cam(model, x, classes=1)
    randomised = grad_cam(tiny(seed=0), x, classes=1)

    assert trained.cams.shape == (32, size, size)
    assert mean_share(trained.cams, regions) > 1.25 * area  # measured ~1.5x
    assert mean_share(randomised.cams, regions) < 1.1 * area  # measured ~1.0x
    assert mean_share(trained.cams, regions) > mean_share(randomised.cams, regions) + 0.02


class Classifier(torch.nn.Module):
    """A bare timm network as a medx module: `net` inside, class logits out."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


FAMILIES = [
    ("test_resnet", 64, "layer4", {}),
    ("resnet18", 64, "layer4", {}),
    ("densenet121", 64, "features.norm5", {}),
    ("vgg11", 64, "features.19", {"mlp_ratio": 1 / 16}),  # a small head: builds in 0.1 s
    ("vgg11_bn", 64, "features.27", {"mlp_ratio": 1 / 16}),  # conv, BN, ReLU: the ReLU
    ("efficientnet_b0", 64, "bn2", {}),
    ("convnext_atto", 64, "stages.3", {}),
    ("vit_tiny_patch16_224", 224, "blocks.11.norm1", {}),
    ("swin_tiny_patch4_window7_224", 224, "layers.3", {}),
]


@pytest.mark.parametrize(
    ("backbone", "size", "layer", "kwargs"), FAMILIES, ids=[f[0] for f in FAMILIES]
)
def test_each_family_gets_a_spatial_cam_at_the_input_size(
    backbone: str, size: int, layer: str, kwargs: dict
):
    torch.manual_seed(0)
    module = Classifier(timm.create_model(backbone, num_classes=2, **kwargs)).eval()
    x = images(2, size)

    explained = grad_cam(module, x)

    assert explained.layer == layer
    assert explained.cams.shape == (2, size, size) and explained.cams.dtype == np.float32
    assert explained.cams.min() >= 0 and explained.cams.max() <= 1
    for cam in explained.cams:  # a constant map would mean no gradient reached the layer
        assert cam.std() > 0.01
    with torch.no_grad():
        expected = module(x)
    torch.testing.assert_close(explained.logits, expected)
    assert explained.classes.tolist() == expected.argmax(1).tolist()


def test_a_medx_classifier_is_explained_through_its_normalisation():
    module, x = tiny(), images(2)
    explained = grad_cam(module, x)
    with torch.no_grad():
        torch.testing.assert_close(explained.logits, module(x))
    assert explained.layer == "layer4" and explained.cams.shape == (2, 64, 64)


def test_non_square_inputs_keep_height_and_width():
    explained = grad_cam(tiny(), images(1, 96)[..., :64, :])
    assert explained.cams.shape == (1, 64, 96)


def test_a_layer_can_be_named_and_a_wrong_name_is_a_config_error():
    module, x = tiny(), images(2)
    assert grad_cam(module, x, layer="layer3").layer == "layer3"
    assert grad_cam(module, x, layer="net.layer2").layer == "layer2"  # the module's own path
    with pytest.raises(ConfigError, match=r"'layer9'.*layer4"):
        grad_cam(module, x, layer="layer9")


def test_the_class_explained_is_the_predicted_one_unless_given():
    module, x = tiny(), images(3)
    predicted = grad_cam(module, x)
    other = 1 - predicted.classes

    chosen = grad_cam(module, x, classes=other)
    one_for_all = grad_cam(module, x, classes=int(other[0]))

    assert chosen.classes.tolist() == other.tolist()
    assert not np.allclose(chosen.cams, predicted.cams)
    assert one_for_all.classes.tolist() == [other[0]] * 3
    with pytest.raises(ValueError, match="2 classes for 3 images"):
        grad_cam(module, x, classes=[0, 1])
    for wrong in (2, -1):
        with pytest.raises(ConfigError, match=f"--gradcam-class.*{wrong}"):
            grad_cam(module, x, classes=wrong)
    assert not module.net.layer4._forward_hooks  # no call, failed or not, leaves its hooks


def test_a_frozen_backbone_explains_like_the_same_weights_unfrozen():
    frozen = tiny(strategy={"name": "freeze", "unfreeze_last": 0})
    trainable = tiny()
    trainable.load_state_dict(frozen.state_dict())
    flags = {n: p.requires_grad for n, p in frozen.named_parameters()}
    assert not any(v for n, v in flags.items() if n.startswith("net.layer"))
    x = images(2)

    cams = grad_cam(frozen, x).cams

    np.testing.assert_allclose(cams, grad_cam(trainable, x).cams, atol=1e-5)
    assert {n: p.requires_grad for n, p in frozen.named_parameters()} == flags
    assert all(p.grad is None for p in frozen.parameters())  # gradients of activations only


def test_runs_inside_no_grad_inference_mode_and_lightnings_predict_loop(tmp_path: Path):
    x, module = images(4), tiny()
    reference = grad_cam(module, x).cams
    with torch.no_grad():
        np.testing.assert_allclose(grad_cam(module, x).cams, reference, atol=1e-6)
    with torch.inference_mode():
        inference_x = x.clone()  # an inference tensor: autograd refuses to save it as is
        np.testing.assert_allclose(grad_cam(module, inference_x).cams, reference, atol=1e-6)
        with pytest.raises(MedxError, match=r"outside torch\.inference_mode"):
            grad_cam(tiny(), x)  # built in inference mode: its weights are inference tensors

    class Explaining(ClassificationModule):
        def predict_step(self, batch, batch_idx):
            return torch.from_numpy(grad_cam(self, batch[0]).cams)

    torch.manual_seed(0)
    module = Explaining(backbone="test_resnet", num_classes=2)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    (cams,) = trainer.predict(module, DataLoader(TensorDataset(x), batch_size=4))
    np.testing.assert_allclose(cams.numpy(), reference, atol=1e-6)


def test_a_module_without_an_image_network_is_refused():
    with pytest.raises(MedxError, match="no"):
        grad_cam(torch.nn.Linear(3, 2), images(1))


def hot_corner_cam() -> np.ndarray:
    """A 64x64 CAM that is 1 in the top-left quarter and 0 elsewhere."""
    cam = np.zeros((64, 64), np.float32)
    cam[:32, :32] = 1
    return cam


@pytest.mark.parametrize(
    "image",
    [
        np.full((300, 200), 128, np.uint8),  # grayscale
        np.full((300, 200, 1), 128, np.uint8),
        np.full((300, 200, 3), 128, np.uint8),  # RGB
        np.full((300, 200), 0.5, np.float32),
        np.full((300, 200), 32768, np.uint16),
    ],
    ids=["gray", "gray1", "rgb", "float", "uint16"],
)
def test_overlay_is_at_the_images_own_size_hot_where_the_cam_is(image: np.ndarray):
    out = overlay_cam(image, hot_corner_cam())

    assert out.shape == (300, 200, 3) and out.dtype == np.uint8
    hot, cold = out[20, 20].astype(int), out[280, 180].astype(int)
    assert hot[0] > hot[2] + 50  # red end of the jet map (use_rgb: R first)
    assert cold[2] > cold[0] + 50  # blue end


def test_overlay_outlines_the_lungs_at_any_mask_size():
    image = np.full((300, 200), 100, np.uint8)
    lungs = np.zeros((100, 100), np.uint8)
    lungs[25:75, 25:75] = 255  # half-size square in the middle, on a smaller grid

    plain = overlay_cam(image, hot_corner_cam())
    outlined = overlay_cam(image, hot_corner_cam(), lungs=lungs)

    white = np.all(outlined == LUNG_OUTLINE, axis=2)
    assert not np.all(plain == LUNG_OUTLINE, axis=2).any()
    rows, cols = np.nonzero(white)
    assert (rows.min(), rows.max()) == pytest.approx((75, 224), abs=3)
    assert (cols.min(), cols.max()) == pytest.approx((50, 149), abs=3)
    assert np.array_equal(outlined[150, 100], plain[150, 100])  # inside stays the heatmap


def test_mass_inside_a_mask():
    cam = hot_corner_cam()
    left = np.zeros((64, 64), bool)
    left[:, :32] = True
    top_left_quarter_of_quarter = np.zeros((128, 128), np.uint8)
    top_left_quarter_of_quarter[:32, :32] = 255  # a larger grid: the CAM is resized to it

    assert mass_inside(cam, left) == pytest.approx(1.0)
    assert mass_inside(cam, ~left) == pytest.approx(0.0)
    assert mass_inside(cam, top_left_quarter_of_quarter) == pytest.approx(0.25, abs=0.02)
    assert np.isnan(mass_inside(np.zeros((64, 64)), left))
