"""Open a medx checkpoint: the one way medx turns a `.ckpt` file into a ready model.

Everything needed travels inside the checkpoint (`hyper_parameters`, the weights, and the model
card under `checkpoint["medx"]`), so loading touches neither `model.weights`, nor
`model.pretrained` (no download), nor the network, nor the run directory. Files are read with
`torch.load(weights_only=True)`: a checkpoint carrying a pickled object is refused, and the
object never runs. Only medx's own module classes are built, chosen from a fixed table.

Local files only: a registered model (`models:/NAME/VERSION`) is resolved to its checkpoint by
`medx.tracking.registry` (MLflow code stays out of `medx.models`); `medx.inference` opens both.
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch

from medx.errors import CheckpointError
from medx.models.backbones import IMAGENET_MEAN, IMAGENET_STD, UNIT_MEAN, UNIT_STD
from medx.models.base import MedxModule
from medx.models.card import CARD_KEY, ModelCard

log = logging.getLogger(__name__)

_TRAIN_ONE = "train one with `python -m medx.train`"


def _module_classes() -> dict[str, type[MedxModule]]:
    """The card's `module` name → class; imported here, so the table has no import cycle."""
    from medx.models.classifier import ClassificationModule
    from medx.models.quality import QualityBaseline
    from medx.models.segmentation import SegmentationModule

    return {
        f"{cls.__module__}.{cls.__qualname__}": cls
        for cls in (ClassificationModule, SegmentationModule, QualityBaseline)
    }


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents (plain tensors and values only), or a CheckpointError that
    names the file and says what is wrong with it.

    Args:
        path: a local `.ckpt` file (a `models:/` URI is refused: `medx.inference.open_model`
            resolves those).

    Raises:
        CheckpointError: missing, empty, truncated, not a PyTorch checkpoint, holding pickled
            objects (refused by `weights_only=True`), or not written by medx; one line.
    """
    if str(path).startswith("models:/"):
        raise CheckpointError(
            f"{path} is a registered model URI: open it with medx.inference (or resolve it "
            "with medx.tracking.registry.resolve_model_uri) rather than as a file."
        )
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint {path} does not exist; check the path.")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} is not a file; give a .ckpt file.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes): an interrupted copy?")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"Checkpoint {path} is not a PyTorch checkpoint (no zip archive inside: a text "
            f"file, an image, or a file cut short by an interrupted copy); {_TRAIN_ONE}."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"Checkpoint {path} was refused: it holds Python objects, not only weights and "
            f"plain values ({first}). medx never unpickles objects from a checkpoint (they "
            "could run code); use a checkpoint written by medx.train."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(
            f"Checkpoint {path} cannot be read ({type(err).__name__}: {err}): it is damaged or "
            f"truncated; copy it again or {_TRAIN_ONE}."
        ) from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise CheckpointError(
            f"{path} is a PyTorch file but not a medx checkpoint (no `state_dict`): it may be a "
            f"bare state dict, which model.weights=... takes as a starting point; {_TRAIN_ONE}."
        )
    if not isinstance(ckpt.get("hyper_parameters"), Mapping):
        raise CheckpointError(
            f"{path} is a Lightning checkpoint without `hyper_parameters`: not written by "
            f"medx; {_TRAIN_ONE}."
        )
    return ckpt


def model_card(path: str | Path) -> dict[str, Any]:
    """The model card of a checkpoint (task, classes, input, run, operating point, ...), in
    its stored form; `ModelCard.from_dict` types it.

    Args:
        path: a local `.ckpt` file; the weights are read too, but no module is built.
    """
    ckpt = read_checkpoint(path)
    return card_of(ckpt)


def card_of(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's card as `ModelCard` reads it (any schema, or none), stored form; the
    module class of a checkpoint from before the card is told by its hyper-parameters.

    Args:
        ckpt: a checkpoint's contents, as `read_checkpoint` returns them.
    """
    card = ModelCard.from_dict(ckpt.get(CARD_KEY))
    card.module = card.module or _legacy_module(ckpt["hyper_parameters"])
    return card.to_dict()


def load(path: str | Path, map_location: str | torch.device = "cpu") -> MedxModule:
    """A ready, eval-mode module from any medx checkpoint (classifier, segmenter, quality
    baseline, quality CNN), with its card in `module.card`.

    Args:
        path: a local `.ckpt` file written by `medx.train` (or by `medx.calibrate`). A
            registered model (`models:/NAME/VERSION`) or an ONNX export is opened by
            `medx.inference.open_model`, which calls this for checkpoints.
        map_location: the device the module is moved to ("cpu", "cuda", a `torch.device`).

    Returns:
        The module (`ClassificationModule`, `SegmentationModule` or `QualityBaseline`), in
        eval mode, its `card` holding the model card and `card["checkpoint"]` the path.

    Raises:
        CheckpointError: the file is not a readable medx checkpoint, names a module class this
            medx cannot build, or its tensors do not fit the network its hyper-parameters
            describe; one line naming the file.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    card = card_of(ckpt)
    classes = _module_classes()
    cls = classes.get(card["module"])
    if cls is None:
        raise CheckpointError(
            f"{path} holds a {card['module']}, which this medx cannot build (known: "
            f"{', '.join(sorted(classes))}); use the medx version that trained it."
        )
    model = cls(**_build_args(cls, ckpt["hyper_parameters"]))
    state = dict(ckpt["state_dict"])
    _fill_legacy_normalisation(model, state, ckpt["hyper_parameters"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit the {cls.__name__} its hyper-parameters describe "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. "
            f"{(list(missing) + list(unexpected))[:3]}); it was changed after training."
        )
    model.on_load_checkpoint(ckpt)
    model.card = card
    model.card["checkpoint"] = str(path)
    return model.to(map_location).eval()


def update_card(path: str | Path, **entries: Any) -> None:
    """Add entries to a checkpoint's card (e.g. the operating point chosen after training),
    written by `ModelCard` (schema version, scales, redaction) and atomically: a crash leaves
    the old file whole.

    Args:
        path: the `.ckpt` file, rewritten in place.
        entries: card keys and their plain values, e.g. `operating_point={"threshold": 0.3,
            "scale": "raw", "target_sensitivity": 0.95, "chosen_on": "val"}`; each replaces
            the key's old value.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    raw = dict(ckpt.get(CARD_KEY) or {})
    raw.update(deepcopy(entries))
    ckpt[CARD_KEY] = ModelCard.from_dict(raw).to_dict()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build_args(cls: type[MedxModule], hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments from the saved hyper-parameters: the weights come from the
    checkpoint, so no download and no weights file; the strategy (which blocks trained) does
    not matter for using the model, so every block is left trainable (Grad-CAM needs that)."""
    accepted = inspect.signature(cls.__init__).parameters
    args = {k: deepcopy(v) for k, v in hparams.items() if k in accepted}
    offline = {"pretrained": False, "weights": None, "pretrained_url": None}
    args.update({k: v for k, v in offline.items() if k in accepted})
    args.pop("strategy", None)
    return args


def _legacy_module(hparams: Mapping[str, Any]) -> str:
    """Checkpoints written before the card: the module told by its hyper-parameters."""
    if "arch" in hparams and "encoder" in hparams:
        return "medx.models.segmentation.SegmentationModule"
    if "feature_names" in hparams:
        return "medx.models.quality.QualityBaseline"
    return "medx.models.classifier.ClassificationModule"


def _fill_legacy_normalisation(
    model: MedxModule, state: dict[str, Any], hparams: Mapping[str, Any]
) -> None:
    """Checkpoints from before the model owned its normalisation lack its buffers: they were
    ImageNet's when the network started from ImageNet or local weights, 0.5/0.5 otherwise."""
    if not hasattr(model, "input_mean") or "input_mean" in state:
        return
    imagenet = bool(hparams.get("pretrained") or hparams.get("weights"))
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else (UNIT_MEAN, UNIT_STD)
    state["input_mean"] = torch.tensor(mean).view(1, -1, 1, 1)
    state["input_std"] = torch.tensor(std).view(1, -1, 1, 1)
