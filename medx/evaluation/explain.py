"""Grad-CAM for medx classifiers: where in the image the predicted class's evidence lies.

Grad-CAM (Selvaraju et al., 2017, via the `grad-cam` package) weighs a layer's activations by
the mean gradient of one class logit. Which layer depends on the backbone family: the last
spatial feature map before global pooling (`FAMILIES`); transformers hand over tokens, which a
reshape computed from the input size and patch size turns back into a map. `layer=` overrides
the choice by module name (as `print(module.net)` shows it).

Gradients are taken with respect to the activations, never the weights: the input is made to
require grad and the parameters are excluded, so a backbone trained frozen (requires_grad
False) explains as well as a fine-tuned one, and no `.grad` is left behind. Grad-CAM runs
under `torch.inference_mode(False)` and `torch.enable_grad()`, so it can be called from
Lightning's predict loop or any `no_grad` block.

`pytorch_grad_cam` is imported on first use: it pulls in matplotlib and scipy (~5 s), which a
prediction without `--gradcam` should not pay for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
import torch
from timm.models.convnext import ConvNeXt
from timm.models.densenet import DenseNet
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vgg import VGG
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from medx.errors import ConfigError, MedxError

LUNG_OUTLINE = (255, 255, 255)  # RGB: white stays visible over every colour of the jet map


@dataclass(frozen=True)
class Family:
    """A backbone family: its timm class, the default Grad-CAM layer, its activation layout.

    layout: "nchw" (CNN feature map), "tokens" (N, prefix + h*w, C: ViT), "nhwc" (Swin's
    channels-last stages).
    """

    name: str
    network: type[nn.Module]
    layer: Callable[[nn.Module], str]
    layout: str = "nchw"


def _last_vgg_activation(net: nn.Module) -> str:
    """The output of VGG's last conv block (conv, [BatchNorm,] ReLU), before its final pool."""
    layers = list(net.features)
    last = max(i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d))
    while last + 1 < len(layers) and not isinstance(layers[last + 1], nn.MaxPool2d | nn.Conv2d):
        last += 1
    return f"features.{last}"


FAMILIES: tuple[Family, ...] = (
    Family("resnet", ResNet, lambda net: "layer4"),
    Family("densenet", DenseNet, lambda net: "features.norm5"),  # BN + ReLU after block 4
    Family("vgg", VGG, _last_vgg_activation),
    Family("efficientnet", EfficientNet, lambda net: "bn2"),  # conv_head's BN + activation
    Family("convnext", ConvNeXt, lambda net: f"stages.{len(net.stages) - 1}"),
    # The last block's output reaches the head only through the class token, so its patch
    # tokens get no gradient: take the input of its attention (norm1), as grad-cam advises.
    Family("vit", VisionTransformer, lambda n: f"blocks.{len(n.blocks) - 1}.norm1", "tokens"),
    Family("swin", SwinTransformer, lambda net: f"layers.{len(net.layers) - 1}", "nhwc"),
)


class CamLayer(NamedTuple):
    """The layer Grad-CAM reads: its name within the network, the module and its family."""

    name: str
    module: nn.Module
    family: Family | None  # None: a timm model of no listed family (timm's feature_info used)


class Explanation(NamedTuple):
    """What `grad_cam` returns for a batch of N images of size HxW."""

    cams: np.ndarray  # (N, H, W) float32 in [0, 1]; all zero where no evidence was found
    classes: np.ndarray  # (N,) int: the class each CAM explains
    logits: torch.Tensor  # (N, num_classes): the module's output for the batch (detached)
    layer: str  # the target layer's name within `module.net`


def family_of(net: nn.Module) -> Family | None:
    """The listed family of a timm network, or None."""
    return next((f for f in FAMILIES if isinstance(net, f.network)), None)


def target_layer(net: nn.Module, layer: str | None = None) -> CamLayer:
    """The Grad-CAM layer of `net` (a timm model): `layer` by name, else the family's default.

    Networks of other families fall back to the last entry of timm's `feature_info` (the
    deepest feature map). Raises `ConfigError` for an unknown layer name, listing candidates.
    """
    family = family_of(net)
    if layer is None:
        if family is not None:
            layer = family.layer(net)
        elif getattr(net, "feature_info", None):
            layer = net.feature_info[-1]["module"]
        else:
            raise ConfigError(
                f"No default Grad-CAM layer for {type(net).__name__}: name one with "
                "--gradcam-layer (a module name of the network, e.g. its last conv stage)."
            )
    name = layer.removeprefix("net.")  # "net.layer4" (the LightningModule's name) works too
    modules = dict(net.named_modules())
    if name not in modules or name == "":
        hints = [f["module"] for f in getattr(net, "feature_info", [])][-3:]
        raise ConfigError(
            f"--gradcam-layer={layer!r} is not a module of {type(net).__name__}; give a module "
            f"name as print(model.net) shows it, e.g. {', '.join(hints) or 'its last stage'}."
        )
    return CamLayer(name, modules[name], family)


def grad_cam(
    module: nn.Module,
    x: torch.Tensor,
    classes: int | Sequence[int] | torch.Tensor | None = None,
    layer: str | None = None,
) -> Explanation:
    """Grad-CAM maps for a batch, at the input's size.

    Args:
        module: a medx classifier (`module(x)` returns class logits; its network is
            `module.net`), in the mode it should explain in (normally eval).
        x: (N, C, H, W) batch exactly as `module` takes it.
        classes: the class to explain, one for all or one per image; None: each image's
            predicted class (argmax of the logits).
        layer: target layer name within `module.net`; None: the family's default.
    """
    from pytorch_grad_cam import GradCAM  # heavy (matplotlib, scipy): only when explaining
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net = getattr(module, "net", None)
    if not isinstance(net, nn.Module):
        raise MedxError(
            f"Grad-CAM needs an image network; {type(module).__name__} has none (a feature "
            "baseline cannot be explained this way)."
        )
    chosen = target_layer(net, layer)
    if x.ndim != 4:
        raise ValueError(f"grad_cam takes a (N, C, H, W) batch, got shape {tuple(x.shape)}")
    if any(t.is_inference() for t in (*module.parameters(), *module.buffers())):
        raise MedxError(
            "Grad-CAM needs a model built outside torch.inference_mode (its weights are "
            "inference tensors, which autograd cannot use): load it before entering that mode."
        )
    params = [p for p in module.parameters() if p.requires_grad]
    training = module.training
    with torch.inference_mode(False), torch.enable_grad():
        # clone: x may be an inference tensor (made under inference_mode), unusable in autograd
        inputs = x.detach().clone().requires_grad_(True)
        reshape = _reshape(chosen, net, tuple(inputs.shape[-2:]))
        wanted = _per_image(classes, len(x))
        targets = None if wanted is None else [ClassifierOutputTarget(c) for c in wanted]
        cam = GradCAM(module, [chosen.module], reshape_transform=reshape)  # puts module in eval
        try:
            for p in params:  # gradients w.r.t. activations only: cheaper, no .grad left over
                p.requires_grad_(False)
            maps = cam(input_tensor=inputs, targets=targets)
            logits = cam.outputs.detach()
        except IndexError as err:  # a class index the logits do not have
            raise ConfigError(
                f"--gradcam-class {sorted(set(wanted or []))} is not a class of this model "
                f"(it has {cam.outputs.shape[1]}: 0 to {cam.outputs.shape[1] - 1})"
            ) from err
        finally:
            cam.activations_and_grads.release()
            for p in params:
                p.requires_grad_(True)
            module.train(training)
    explained = logits.argmax(1) if targets is None else torch.as_tensor(wanted)
    return Explanation(maps.astype(np.float32), explained.cpu().numpy(), logits, chosen.name)


def _per_image(classes: int | Sequence[int] | torch.Tensor | None, n: int) -> list[int] | None:
    """One class index per image (an int applies to all), or None for the predicted ones."""
    if classes is None:
        return None
    wanted = [int(c) for c in torch.as_tensor(classes).reshape(-1)]
    if len(wanted) not in (1, n):
        raise ValueError(f"grad_cam got {len(wanted)} classes for {n} images; give 1 or {n}")
    if min(wanted) < 0:
        raise ConfigError(f"--gradcam-class {min(wanted)} is negative; classes count from 0")
    return wanted * n if len(wanted) == 1 else wanted


def _reshape(
    chosen: CamLayer, net: nn.Module, size: tuple[int, int]
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The transform from the layer's activations to (N, C, h, w), or None when they are so."""
    layout = chosen.family.layout if chosen.family else "nchw"

    def to_map(t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 3:  # tokens, whatever the family (e.g. a ViT block named by the user)
            return _token_grid(t, net, size)
        if t.ndim == 4 and layout == "nhwc":
            return t.permute(0, 3, 1, 2)
        return t

    return to_map if layout != "nchw" or _is_transformer(net) else None


def _is_transformer(net: nn.Module) -> bool:
    return hasattr(net, "patch_embed")


def _token_grid(t: torch.Tensor, net: nn.Module, size: tuple[int, int]) -> torch.Tensor:
    """(N, prefix + h*w, C) tokens → (N, C, h, w), h and w from the input size.

    The grid is the input size over the patch size (ViT), or over the patch size times a power
    of two (a hierarchical stage); prefix tokens (class, registers) are dropped.
    """
    patch = getattr(getattr(net, "patch_embed", None), "patch_size", (16, 16))
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    prefix = int(getattr(net, "num_prefix_tokens", 0))
    for level in range(6):
        h, w = (size[0] // (patch[0] << level), size[1] // (patch[1] << level))
        if h * w and t.shape[1] - h * w in (prefix, 0):
            grid = t[:, t.shape[1] - h * w :, :]
            return grid.reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)
    raise MedxError(
        f"Cannot lay {t.shape[1]} tokens out on a grid for a {size[0]}x{size[1]} input with "
        f"patch size {patch}: name a layer with spatial output (--gradcam-layer)."
    )


def overlay_cam(
    image: np.ndarray,
    cam: np.ndarray,
    lungs: np.ndarray | None = None,
    image_weight: float = 0.5,
) -> np.ndarray:
    """HxWx3 uint8 RGB picture: the CAM as a jet heatmap over `image`, at the image's own size.

    Args:
        image: HxW (grayscale), HxWx1 or HxWx3 (RGB), uint8, uint16 or float in [0, 1].
        cam: hxw map in [0, 1] (e.g. at the model's input size); resized to the image.
        lungs: optional mask (any size; > 0 inside) whose outline is drawn in white.
        image_weight: share of the image in the blend (grad-cam's `show_cam_on_image`).
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = _float_rgb(image)
    h, w = rgb.shape[:2]
    heat = cv2.resize(np.clip(cam, 0, 1).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    out = show_cam_on_image(rgb, heat, use_rgb=True, image_weight=image_weight)
    if lungs is not None:
        mask = (lungs > 0).astype(np.uint8)
        if mask.shape[:2] != (h, w):
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        out = np.ascontiguousarray(out)
        cv2.drawContours(out, contours, -1, LUNG_OUTLINE, max(1, round(min(h, w) / 128)))
    return out


def _float_rgb(image: np.ndarray) -> np.ndarray:
    """Any 2-D or channel-last image as HxWx3 float32 in [0, 1]."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"overlay_cam takes an HxW or HxWx3 image, got shape {image.shape}")
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float32) / np.iinfo(image.dtype).max
    return np.clip(image.astype(np.float32), 0, 1)


def mass_inside(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of the CAM's mass (sum of its values) that falls inside `mask` (> 0), in [0, 1].

    The CAM is resized to the mask's size first (masks usually come at the image's own size).
    A model that looks at the lungs scores high; one that reads text markers, the shoulder or
    the image border scores low (the shortcut alarm). NaN when the CAM is all zero.
    """
    inside = mask > 0
    if cam.shape != inside.shape:
        cam = cv2.resize(cam.astype(np.float32), inside.shape[::-1], interpolation=cv2.INTER_LINEAR)
    cam = np.clip(cam, 0, None)
    total = float(cam.sum())
    return float(cam[inside].sum()) / total if total > 0 else float("nan")
