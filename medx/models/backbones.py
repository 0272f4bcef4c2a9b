"""Backbone factory: a name in, a timm model with a new head and its layer groups out.

Every architecture goes through `timm.create_model`, so ImageNet weights, local weight files
and layer grouping work the same way for all of them. `blocks` lists the backbone's parameter
groups from input to output (timm's coarse `group_matcher`: stem, stage 1, ..., stage N); the
training strategies freeze or unfreeze them by position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models import group_parameters
from torch import nn

from medx.errors import ConfigError, MedxError

log = logging.getLogger(__name__)

# medx names → timm names. Any other timm architecture name is accepted as well.
BACKBONES: dict[str, str] = {
    "densenet121": "densenet121",
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "vgg16": "vgg16",
    "efficientnet_b0": "efficientnet_b0",
    "test_resnet": "test_resnet",  # ~0.4 M parameters: for tests and smoke runs
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UNIT_MEAN = (0.5, 0.5, 0.5)
UNIT_STD = (0.5, 0.5, 0.5)


@dataclass
class Network:
    """A network (a classifier, or a whole segmenter) plus what strategies need to know."""

    model: nn.Module
    blocks: list[list[str]]  # parameter names per block, input → output, head excluded
    head: list[str]  # parameter names of the new classification head
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def create_backbone(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    weights: str | Path | None = None,
    drop_rate: float = 0.0,
    head_hidden: int | None = None,
    small_input: bool = False,
    pretrained_url: str | None = None,
) -> Network:
    """Build `name` with a fresh `num_classes` head; ImageNet or local weights optional.

    `head_hidden=512` makes the head dropout → linear(512) → ReLU → dropout → linear (the
    seed projects' Keras head); `small_input` gives ResNets a 3×3 stride-1 stem without
    max-pooling, so 28 px inputs (MedMNIST) keep a 4×4 map at the last stage instead of 1×1.
    `pretrained_url`: where ImageNet weights come from instead of timm's hub (a mirror, a
    file server inside a hospital network).

    Args:
        name: a medx name (`BACKBONES`) or any timm architecture.
        num_classes: outputs of the new head.
        pretrained: ImageNet weights through timm (or `pretrained_url`).
        weights: a local timm/torchvision state dict, or a medx checkpoint whose network is
            taken; not together with `pretrained`.
        drop_rate: dropout before the classifier (inside the head with `head_hidden`).
        head_hidden: width of a hidden head layer; None: one linear layer.
        small_input: the small-input ResNet stem (ResNets only).
        pretrained_url: where ImageNet weights come from instead of timm's hub.

    Returns:
        The network with its parameter groups (`blocks`, `head`) and its input mean and std
        (ImageNet's when it starts from weights, 0.5/0.5 otherwise).
    """
    arch = _timm_name(name)
    if pretrained and weights:
        raise ConfigError(
            "Set either model.pretrained=true (download ImageNet weights) or "
            "model.weights=/path/to/file (local weights), not both."
        )
    model = _create(
        arch, num_classes, pretrained, 0.0 if head_hidden else drop_rate, pretrained_url
    )
    if weights:
        load_weights(model, Path(weights))
    if small_input:
        _small_stem(model, name)
    if head_hidden:
        _mlp_head(model, num_classes, head_hidden, drop_rate)
    head = _param_names(model, model.get_classifier())
    groups = group_parameters(model, model.group_matcher(coarse=True))
    blocks = [[n for n in names if n not in head] for names in groups.values()]
    normalised = pretrained or bool(weights)
    return Network(
        model=model,
        blocks=_fold_norm_only(model, [b for b in blocks if b]),
        head=sorted(head),
        mean=IMAGENET_MEAN if normalised else UNIT_MEAN,
        std=IMAGENET_STD if normalised else UNIT_STD,
    )


def _fold_norm_only(model: nn.Module, blocks: list[list[str]]) -> list[list[str]]:
    """A trailing group of normalisation parameters only (densenet's `features.norm5`) joins
    the stage before it: it is that stage's output norm, not a stage, so `unfreeze_last=2`
    means the last two real stages."""
    params = dict(model.named_parameters())
    if len(blocks) > 1 and all(params[n].ndim == 1 for n in blocks[-1]):
        return [*blocks[:-2], blocks[-2] + blocks[-1]]
    return blocks


def _timm_name(name: str) -> str:
    if name in BACKBONES:
        return BACKBONES[name]
    if timm.is_model(name):
        return name
    raise ConfigError(
        f"Unknown backbone model.backbone={name!r}. medx choices: {', '.join(BACKBONES)} "
        "(or any timm architecture name, see timm.list_models())."
    )


def _create(
    arch: str, num_classes: int, pretrained: bool, drop_rate: float, url: str | None = None
) -> nn.Module:
    overlay = {"pretrained_cfg_overlay": {"url": url, "hf_hub_id": None}} if url else {}
    try:
        return timm.create_model(
            arch, pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate, **overlay
        )
    except (OSError, RuntimeError) as err:  # huggingface_hub raises OSError subclasses offline
        if not pretrained:
            raise
        raise download_error(arch, err) from err


def download_error(arch: str, err: BaseException) -> MedxError:
    """The message for pretrained weights that cannot be fetched (offline, blocked hub)."""
    return MedxError(
        f"Could not download ImageNet weights for {arch!r} ({type(err).__name__}: {err}). "
        "Without internet access, train from scratch with model.pretrained=false, or load "
        "a local timm/torchvision state dict with model.pretrained=false "
        "model.weights=/path/to/weights.pth."
    )


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a local timm or torchvision state dict, or the network of a medx checkpoint.

    A classifier head is left new. Keys are matched under the prefix that fits most of them, so
    `module.` (DataParallel) files and medx `.ckpt` files (`net.`, a segmenter's `net.encoder.`)
    load as they are: e.g. a classifier trained on chest X-rays becomes a U-Net encoder.
    """
    if not path.is_file():
        raise ConfigError(f"model.weights={path} does not exist: give a local .pth/.pt file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MedxError(f"model.weights={path} is not a readable PyTorch file: {err}") from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = _under_best_prefix(state, model.state_dict())
    # Classifiers keep their new head; a segmentation encoder has none.
    head = (
        _param_names(model, model.get_classifier()) if hasattr(model, "get_classifier") else set()
    )
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k not in head and k in own}
    mismatched = [k for k, v in state.items() if v.shape != own[k].shape]
    missing = [k for k in own if k not in state and k not in head and _is_weight(k)]
    if mismatched or missing:
        bad = (mismatched + missing)[:5]
        raise MedxError(
            f"model.weights={path} does not fit {type(model).__name__} "
            f"({len(missing)} missing, {len(mismatched)} wrong-shape tensors, e.g. {bad}). "
            "Use a state dict of the same architecture as model.backbone."
        )
    model.load_state_dict(state, strict=False)
    log.info("Loaded %d tensors from %s", len(state), path)


def _under_best_prefix(state: dict, own: dict) -> dict:
    """The entries of `state` under the key prefix ("", "module.", "net.encoder.", ...) that
    names the most tensors of `own`, with that prefix removed."""
    prefixes = {""} | {k[: i + 1] for k in state for i, c in enumerate(k) if c == "."}

    def fits(prefix: str) -> int:
        return sum(k.startswith(prefix) and k[len(prefix) :] in own for k in state)

    best = max(sorted(prefixes), key=fits)
    return {k[len(best) :]: v for k, v in state.items() if k.startswith(best)}


def _is_weight(key: str) -> bool:
    return not key.endswith("num_batches_tracked")


def _param_names(model: nn.Module, module: nn.Module) -> set[str]:
    ids = {id(p) for p in module.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _small_stem(model: nn.Module, name: str) -> None:
    """3×3 stride-1 stem conv, no max-pool: the CIFAR/MedMNIST-28 ResNet (fresh stem weights)."""
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ConfigError(
            f"model.small_input=true needs a ResNet-style backbone (conv1 + maxpool); "
            f"{name!r} has none. Use a ResNet, or upscale the input (data.image_size)."
        )
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()


def _mlp_head(model: nn.Module, num_classes: int, hidden: int, drop_rate: float) -> None:
    """Replace timm's classifier (wherever the architecture keeps it) with a hidden layer."""
    head = nn.Sequential(
        nn.Dropout(drop_rate),
        nn.Linear(model.get_classifier().in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(drop_rate),
        nn.Linear(hidden, num_classes),
    )
    *parents, attr = model.pretrained_cfg["classifier"].split(".")
    owner = model
    for part in parents:
        owner = getattr(owner, part)
    setattr(owner, attr, head)
