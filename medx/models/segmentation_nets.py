"""Segmentation network factory: architecture + encoder names in, an smp model and its groups out.

Every network goes through `segmentation_models_pytorch.create_model`, so smp's own encoders
(`resnet34`, `efficientnet-b0`, `densenet121`, ...) and timm's (`tu-<any timm name>`) work
alike, and `pretrained=true` goes through smp's real download code. The encoder's parameter
groups (stem, stage 1, ..., stage N) are found by the resolution at which each layer runs,
which holds for every encoder family, so the classification strategies apply unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from torch import nn

from medx.errors import ConfigError
from medx.models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    UNIT_MEAN,
    UNIT_STD,
    Network,
    download_error,
    load_weights,
)

log = logging.getLogger(__name__)

# medx names → smp architecture names.
ARCHITECTURES: dict[str, str] = {
    "unet": "Unet",
    "unetplusplus": "UnetPlusPlus",
    "fpn": "FPN",
    "deeplabv3plus": "DeepLabV3Plus",
}


def create_segmenter(
    arch: str,
    encoder: str,
    pretrained: bool = False,
    weights: str | Path | None = None,
    xavier_init: bool = False,
    arch_kwargs: dict | None = None,
) -> Network:
    """A one-class (binary) smp network; `blocks` are the encoder's, `head` the rest."""
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"Unknown segmentation architecture model.arch={arch!r}; choices: "
            f"{', '.join(ARCHITECTURES)}."
        )
    if pretrained and weights:
        raise ConfigError(
            "Set either model.pretrained=true (download ImageNet weights) or "
            "model.weights=/path/to/file (local weights), not both."
        )
    _check_encoder(encoder)
    try:
        net = smp.create_model(
            ARCHITECTURES[arch],
            encoder_name=encoder,
            encoder_weights=_smp_weights(encoder) if pretrained else None,
            in_channels=3,
            classes=1,
            **(arch_kwargs or {}),
        )
    except (OSError, RuntimeError) as err:  # huggingface_hub raises OSError subclasses offline
        if not pretrained:
            raise
        raise download_error(encoder, err) from err
    except ValueError as err:  # e.g. DenseNet encoders cannot be dilated for DeepLabV3+
        raise ConfigError(
            f"model.encoder={encoder} does not work with model.arch={arch}: {err}"
        ) from err
    if weights:
        # timm encoders wrap the timm network in `.model`; smp's own encoders are the network.
        target = net.encoder.model if encoder.startswith("tu-") else net.encoder
        load_weights(target, Path(weights))
    if xavier_init and not (pretrained or weights):
        _xavier(net.decoder)
        _xavier(net.segmentation_head)
    blocks = encoder_blocks(net.encoder)
    encoder_names = {f"encoder.{n}" for block in blocks for n in block}
    normalised = pretrained or bool(weights)
    return Network(
        model=net,
        blocks=[[f"encoder.{n}" for n in block] for block in blocks],
        head=[n for n, _ in net.named_parameters() if n not in encoder_names],
        mean=IMAGENET_MEAN if normalised else UNIT_MEAN,
        std=IMAGENET_STD if normalised else UNIT_STD,
    )


def encoder_blocks(encoder: nn.Module, size: int = 64) -> list[list[str]]:
    """Parameter names of the encoder grouped by the stride at which they run, input → output.

    One forward pass on a dummy image records each layer's output resolution: stride 2 is the
    stem, 4 the first stage, ..., 32 the last. Layers without an image-shaped output (e.g.
    attention projections, squeeze-excitation on pooled 1x1 maps) join the stage that ran just
    before them; layers that never run
    join the last stage.
    """
    stride_of: dict[str, int] = {}
    current = [1]

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: object) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] > 1:
                current[0] = max(1, size // output.shape[-1])
            stride_of.setdefault(name, current[0])

        return record

    owners = [(n, m) for n, m in encoder.named_modules() if list(m.parameters(recurse=False))]
    handles = [m.register_forward_hook(hook(n)) for n, m in owners]
    was_training = encoder.training
    try:
        encoder.eval()
        with torch.no_grad():
            encoder(torch.zeros(1, 3, size, size))
    finally:
        for handle in handles:
            handle.remove()
        encoder.train(was_training)
    last = max(stride_of.values(), default=1)
    groups: dict[int, list[str]] = {}
    for name, module in owners:
        stride = stride_of.get(name, last)
        prefix = f"{name}." if name else ""
        groups.setdefault(stride, []).extend(
            prefix + p for p, _ in module.named_parameters(recurse=False)
        )
    return [groups[s] for s in sorted(groups)]


def _check_encoder(encoder: str) -> None:
    if encoder.startswith("tu-"):
        import timm

        if not timm.is_model(encoder[3:].split(".")[0]):
            raise ConfigError(
                f"model.encoder={encoder!r}: {encoder[3:]!r} is not a timm architecture "
                "(see timm.list_models())."
            )
    elif encoder not in smp.encoders.get_encoder_names():
        raise ConfigError(
            f"Unknown encoder model.encoder={encoder!r}: use an smp encoder (resnet18, resnet34, "
            "efficientnet-b0, densenet121, ...; smp.encoders.get_encoder_names()) or "
            "'tu-<timm name>' for any timm network (e.g. tu-resnet18)."
        )


def _smp_weights(encoder: str) -> str | bool:
    """smp's name for ImageNet weights: `imagenet` for its own encoders, True for timm ones."""
    return True if encoder.startswith("tu-") else "imagenet"


def _xavier(module: nn.Module) -> None:
    """Xavier-uniform convolutions, zero biases: a scale-aware start for a random decoder."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
