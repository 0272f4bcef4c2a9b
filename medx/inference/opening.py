"""Opening a trained model, whichever way it is named.

- a medx checkpoint (`.ckpt`): `medx.models.load`, PyTorch;
- a registered model, `models:/NAME/VERSION` or `models:/NAME@ALIAS`: its checkpoint,
  downloaded once into a cache by `medx.tracking.registry` (imported only for such a URI, so
  using a local file never imports MLflow);
- an ONNX export (`.onnx`, written by `python -m medx.export`): onnxruntime (`OnnxModel`).

Every one comes back ready (eval mode, CPU) with its card in `model.card`, naming where it
was opened from (`card["checkpoint"]`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from medx.errors import CheckpointError
from medx.inference.onnx_model import OnnxModel
from medx.models.card import ModelCard
from medx.models.load import load

__all__ = ["backend_of", "is_model_uri", "open_model", "warn_if_synthetic"]

log = logging.getLogger(__name__)

URI_PREFIX = "models:/"
_WARNED: set[str] = set()  # models whose synthetic training data this process has warned of


def is_model_uri(source: str | Path) -> bool:
    """Whether `source` names a registered model (`models:/...`).

    Args:
        source: a path or URI.
    """
    return str(source).startswith(URI_PREFIX)


def open_model(source: str | Path, threads: int | None = None) -> Any:
    """A ready model (a medx module, or an `OnnxModel`) with its card.

    Args:
        source: a checkpoint path, `models:/NAME/VERSION`, `models:/NAME@ALIAS`, or a .onnx
            file.
        threads: onnxruntime's threads for an ONNX file (PyTorch's are the process's).

    Raises:
        CheckpointError: the file or URI cannot be opened; one line naming it.
    """
    text = str(source)
    if text.lower().endswith(".onnx"):
        model: Any = OnnxModel(text, threads=threads)
    elif is_model_uri(text):
        from medx.tracking.registry import resolve_model_uri  # MLflow: only for a URI

        model = load(resolve_model_uri(text))
    else:
        model = load(text)
    model.card["checkpoint"] = text
    return model


def backend_of(model: Any) -> str:
    """ "onnxruntime" for an ONNX export, "pytorch" for a module.

    Args:
        model: an opened model (`open_model`).
    """
    return "onnxruntime" if isinstance(model, OnnxModel) else "pytorch"


def checked_card(model: Any, source: str, task: str | None = None) -> ModelCard:
    """The model's typed card; a CheckpointError in one line when it lacks what using the
    model needs (a checkpoint written before model cards), or is not a `task` model."""
    card = ModelCard.from_dict(model.card)
    if card.task is None:
        card.task = getattr(model, "task", None)
    if card.input is None and getattr(model, "hparams", None) is not None:
        size = _hparam(model, "image_size")  # segmenters know their size without a card
        if size:
            card = ModelCard.from_dict({**card.to_dict(), "input": {"image_size": int(size)}})
    if not card.class_names and card.task == "classification":
        classes = _hparam(model, "num_classes")
        card.class_names = [str(i) for i in range(int(classes or 0))]
    card.inputs = getattr(model, "inputs", card.inputs)
    lost = card.missing()
    if lost:
        raise CheckpointError(
            f"{source} lacks {', '.join(lost)} in its model card (a checkpoint written before "
            "medx model cards): medx cannot tell how to feed it; train it again with this medx."
        )
    return card


def _hparam(model: Any, name: str) -> Any:
    hparams = model.hparams
    return hparams.get(name) if isinstance(hparams, dict) else getattr(hparams, name, None)


def device_of(model: Any) -> torch.device:
    """Where the model's inputs must go."""
    return getattr(model, "device", torch.device("cpu"))


def warn_if_synthetic(card: ModelCard, source: str) -> None:
    """Warn, once per model and process, that a model trained on synthetic data (the phantom)
    is being used: its answers on real images mean nothing clinically."""
    data = card.synthetic_data
    if data is None or source in _WARNED:
        return
    _WARNED.add(source)
    log.warning(
        "%s was trained on synthetic data (data=%s), never on a real image: its answers on "
        "real images are not clinical evidence. Train it on real data to use it.",
        source,
        data,
    )
