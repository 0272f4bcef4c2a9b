"""The model card: what a trained model needs to be used, written into its checkpoint.

medx.train fills it when the model is built (task, classes, input contract, data, training run,
the resolved config); the clinical evaluation adds the operating point and the temperature it
chose on validation. Plain values only (strings, numbers, lists, dicts), so the checkpoint
still loads with `weights_only=True` and the card is readable without medx.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# How medx.data.io turns any file into the model's input (the same in training, evaluation,
# prediction and serving).
DECODING = {
    "range": [0.0, 1.0],
    "channels": 3,
    "gray": "repeated into 3 channels",
    "high_bit_depth": "16-bit and float pixels windowed to the image's own min..max, then 8 bits",
    "resize": "squashed to image_size x image_size (aspect not kept), antialiased",
}


def training_card(
    datamodule: Any,
    data_config: Mapping[str, Any],
    config_yaml: str,
    run: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The card as training knows it: classes, input contract, data, run and config."""
    card: dict[str, Any] = {
        "class_names": [str(c) for c in getattr(datamodule, "classes", None) or []],
        "data": {
            "name": data_config.get("name"),
            "patient_pattern": getattr(datamodule, "patient_pattern", None)
            or data_config.get("patient_pattern"),
            "config": dict(data_config),
        },
        "run": dict(run or {}),
        "config": config_yaml,
    }
    size = getattr(datamodule, "image_size", None)
    if size is not None:
        intensity = getattr(datamodule, "intensity", "none")
        card["input"] = {"image_size": int(size), "intensity": intensity, **DECODING}
    return card


def operating_point(card: Mapping[str, Any]) -> dict[str, Any] | None:
    """The validation-chosen operating point of a binary classifier, if it has been chosen."""
    return card.get("operating_point") or None


def temperature(card: Mapping[str, Any]) -> float:
    """The temperature fitted on validation (1.0: uncalibrated)."""
    return float((card.get("calibration") or {}).get("temperature", 1.0))
