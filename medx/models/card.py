"""The model card: what a trained model needs to be used, written into its checkpoint.

medx.train fills it when the model is built (task, classes, input contract, data, training run,
the resolved config); the clinical evaluation adds the operating point and the temperature it
chose on validation; site calibration may replace them later (keeping the replaced ones).

`ModelCard` is the one reader and writer of the card: `ModelCard.from_dict` reads every card
medx has written (schema 2, the format-1 cards before it, and checkpoints with no card at
all), `to_dict` writes schema 2. In the checkpoint (`checkpoint["medx"]`) and on a module
(`module.card`) the card is stored as plain values (strings, numbers, lists, dicts), so the
checkpoint loads with `weights_only=True` and is readable without medx.

Every threshold says its scale: `"raw"` (the softmax of the logits, on which the operating
point is chosen) or `"calibrated"` (after temperature scaling). Credentials in URIs
(`user:password@`, tokens in query strings) are redacted whenever a card is read or written,
and `public_dict` (what a service shows) holds no local paths.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from copy import deepcopy
from dataclasses import dataclass, field, fields
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

CARD_KEY = "medx"  # where a checkpoint keeps the model card
SCHEMA_VERSION = 2  # 1: the untyped card (key "format"); 2: scales, provenance, redaction
SCALES = ("raw", "calibrated")
REDACTED = "REDACTED"

# How medx.data.io turns any file into the model's input (the same in training, evaluation,
# prediction and serving).
DECODING = {
    "range": [0.0, 1.0],
    "channels": 3,
    "gray": "repeated into 3 channels",
    "high_bit_depth": "16-bit and float pixels windowed to the image's own min..max, then 8 bits",
    "resize": "squashed to image_size x image_size (aspect not kept), antialiased",
}

# Query parameters that carry secrets (pre-signed URLs, API tokens).
_SECRET_PARAMS = re.compile(
    r"token|secret|password|passwd|pwd|key|signature|sig|credential|auth|x-amz-security",
    re.IGNORECASE,
)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")


# --- redaction ------------------------------------------------------------------------------


def redact_uri(uri: str) -> str:
    """`uri` without credentials: `user:password@` and secret query values become REDACTED.

    Args:
        uri: any string; one that is not a URL with credentials is returned unchanged.
    """
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if not parts.scheme or (not parts.netloc and not parts.query):
        return uri
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAMS.search(k) for k, _ in pairs):
            query = urlencode([(k, REDACTED if _SECRET_PARAMS.search(k) else v) for k, v in pairs])
    if (netloc, query) == (parts.netloc, parts.query):
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URL inside `text` (e.g. a config's YAML) redacted by `redact_uri`."""
    return _URL.sub(lambda m: redact_uri(m.group(0)), text)


def _redacted(value: Any) -> Any:
    """A copy of a plain value with every string's URLs redacted."""
    if isinstance(value, str):
        return redact_text(value) if "://" in value else value
    if isinstance(value, Mapping):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v) for v in value]
    return value


def _without_local_paths(value: Any) -> Any:
    """A copy in which absolute local paths (also inside file: and sqlite: URIs) are reduced
    to their last component: what a client may see of where the model came from."""
    if isinstance(value, str):
        return _local_name(value)
    if isinstance(value, Mapping):
        return {k: _without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_local_paths(v) for v in value]
    return value


def _local_name(text: str) -> str:
    for prefix in ("sqlite:///", "file://", "file:"):
        if text.startswith(prefix):
            rest = text[len(prefix) :]
            return f"{prefix}{_local_name(rest)}" if rest else text
    if text.startswith(("/", "~")) and "\n" not in text:
        return PurePosixPath(text).name or text
    if re.match(r"^[A-Za-z]:[\\/]", text):
        return PureWindowsPath(text).name
    return text


# --- the parts of a card --------------------------------------------------------------------


def _extra(raw: Mapping[str, Any], cls: type) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    return {k: deepcopy(v) for k, v in raw.items() if k not in known}


def _stored(part: Any) -> dict[str, Any] | None:
    return None if part is None else part.to_dict()


def check_scale(scale: str, where: str = "scale") -> str:
    """`scale` if it is one of SCALES, else ValueError naming `where`."""
    if scale not in SCALES:
        raise ValueError(f"{where}={scale!r}: a threshold's scale is one of {', '.join(SCALES)}")
    return scale


@dataclass
class OperatingPoint:
    """A binary classifier's decision threshold on p(positive class), chosen on validation.

    Args:
        threshold: p(positive) at or above which the positive class is decided.
        scale: the probability scale `threshold` is on: "raw" (softmax of the logits; where
            the clinical evaluation chooses it) or "calibrated" (temperature-scaled).
        target_sensitivity: the sensitivity it was chosen to reach.
        chosen_on: the split it was chosen on ("val").
        tta: chosen on test-time-augmented probabilities.
        provenance: where a (re)chosen point came from (sample size, class counts, data
            digest, date, command); None for the training run's own choice.
    """

    threshold: float
    scale: str = "raw"
    target_sensitivity: float | None = None
    chosen_on: str | None = None
    tta: bool = False
    provenance: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.threshold = float(self.threshold)
        check_scale(self.scale, "operating_point.scale")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> OperatingPoint | None:
        """None for a missing point (or one without a threshold); format-1 points are raw."""
        if not raw or raw.get("threshold") is None:
            return None
        return cls(
            threshold=float(raw["threshold"]),
            scale=str(raw.get("scale") or "raw"),
            target_sensitivity=raw.get("target_sensitivity"),
            chosen_on=raw.get("chosen_on"),
            tta=bool(raw.get("tta", False)),
            provenance=deepcopy(raw.get("provenance")),
            extra=_extra(raw, cls),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "scale": self.scale,
            "target_sensitivity": self.target_sensitivity,
            "chosen_on": self.chosen_on,
            "tta": self.tta,
            "provenance": deepcopy(self.provenance),
            **deepcopy(self.extra),
        }


@dataclass
class Calibration:
    """Temperature scaling fitted on validation: calibrated p = softmax(logits / temperature).

    Args:
        temperature: the fitted temperature (1.0: calibration changes nothing).
        fitted_on: the split it was fitted on ("val").
        provenance: where a refitted temperature came from; None for the training run's own.
    """

    temperature: float = 1.0
    fitted_on: str | None = None
    provenance: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> Calibration | None:
        if not raw or raw.get("temperature") is None:
            return None
        return cls(
            temperature=float(raw["temperature"]),
            fitted_on=raw.get("fitted_on"),
            provenance=deepcopy(raw.get("provenance")),
            extra=_extra(raw, cls),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "fitted_on": self.fitted_on,
            "provenance": deepcopy(self.provenance),
            **deepcopy(self.extra),
        }


@dataclass
class InputSpec:
    """What the model takes: [0, 1] RGB images at `image_size`, decoded as DECODING says, after
    the per-image `intensity` standardisation (`medx.data.intensity`) it was trained with.

    Args:
        image_size: the square side the model was trained at (None: unknown, an old card).
        intensity: none, zscore, equalize or clahe.
        mean: the normalisation inside the model (per channel), for reference.
        std: likewise.
    """

    image_size: int | None = None
    intensity: str = "none"
    mean: list[float] | None = None
    std: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> InputSpec | None:
        if not raw:
            return None
        size = raw.get("image_size")
        return cls(
            image_size=int(size) if size else None,
            intensity=str(raw.get("intensity") or "none"),
            mean=None if raw.get("mean") is None else [float(v) for v in raw["mean"]],
            std=None if raw.get("std") is None else [float(v) for v in raw["std"]],
            extra=_extra(raw, cls),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image_size": self.image_size, "intensity": self.intensity}
        out.update(deepcopy(self.extra))
        if self.mean is not None:
            out["mean"] = list(self.mean)
        if self.std is not None:
            out["std"] = list(self.std)
        return out


# --- the card -------------------------------------------------------------------------------


@dataclass
class ModelCard:
    """Everything using a trained model needs, typed (see the module docstring).

    Args:
        task: "classification" or "segmentation".
        module: the LightningModule class that `medx.models.load` builds.
        inputs: what the model takes: "image", or "features" (the quality baseline).
        class_names: classifier classes, in logit order.
        input: the input contract (None: a checkpoint from before model cards).
        data: the training data's name, patient pattern and config.
        run: the training run (id, experiment, tracking_uri redacted, git commit).
        config: the training job's resolved config (YAML).
        operating_point: the decision threshold chosen on validation (binary classifiers).
        operating_point_tta: the one chosen on test-time-augmented probabilities.
        previous_operating_points: operating points replaced by site calibration, oldest
            first (each an `OperatingPoint.to_dict()`).
        calibration: the temperature fitted on validation.
        shift_reference: what the shift monitor compares new images with (opaque here).
        registered_as: the MLflow Model Registry name it was opened as.
        registered_version: that version.
        registry: where it was registered (uri redacted, alias, run id).
        checkpoint: where this copy was opened from (a path or a models:/ URI; never served
            as a path).
        schema_version: the card's schema (SCHEMA_VERSION when written by this medx).
        extra: keys this medx does not know, kept as they are.
    """

    task: str | None = None
    module: str | None = None
    inputs: str = "image"
    class_names: list[str] = field(default_factory=list)
    input: InputSpec | None = None
    data: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    config: str | None = None
    operating_point: OperatingPoint | None = None
    operating_point_tta: OperatingPoint | None = None
    previous_operating_points: list[dict[str, Any]] = field(default_factory=list)
    calibration: Calibration | None = None
    shift_reference: dict[str, Any] | None = None
    registered_as: str | None = None
    registered_version: str | None = None
    registry: dict[str, Any] | None = None
    checkpoint: str | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> ModelCard:
        """The card of any medx checkpoint: schema 2, format 1 (`{"format": 1, ...}`: every
        threshold raw), or none at all (`{}`: schema_version 0, the fields left empty)."""
        raw = _redacted(dict(raw or {}))
        version = raw.get("schema_version", raw.get("format", 1 if raw else 0))
        known = {f.name for f in fields(cls)} | {"format"}
        registered = raw.get("registered_version")
        return cls(
            task=raw.get("task"),
            module=raw.get("module"),
            inputs=str(raw.get("inputs") or "image"),
            class_names=[str(c) for c in raw.get("class_names") or []],
            input=InputSpec.from_dict(raw.get("input")),
            data=dict(raw.get("data") or {}),
            run=dict(raw.get("run") or {}),
            config=raw.get("config"),
            operating_point=OperatingPoint.from_dict(raw.get("operating_point")),
            operating_point_tta=OperatingPoint.from_dict(raw.get("operating_point_tta")),
            previous_operating_points=list(raw.get("previous_operating_points") or []),
            calibration=Calibration.from_dict(raw.get("calibration")),
            shift_reference=raw.get("shift_reference"),
            registered_as=raw.get("registered_as"),
            registered_version=None if registered is None else str(registered),
            registry=raw.get("registry"),
            checkpoint=raw.get("checkpoint"),
            schema_version=int(version),
            extra={k: v for k, v in raw.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """The card as stored (schema SCHEMA_VERSION, plain values, credentials redacted);
        fields that are unset are left out, so `from_dict(to_dict())` is the same card."""
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        for name, value in (
            ("task", self.task),
            ("module", self.module),
            ("inputs", self.inputs),
            ("class_names", list(self.class_names)),
            ("input", _stored(self.input)),
            ("data", self.data),
            ("run", self.run),
            ("config", self.config),
            ("operating_point", _stored(self.operating_point)),
            ("operating_point_tta", _stored(self.operating_point_tta)),
            ("previous_operating_points", self.previous_operating_points),
            ("calibration", _stored(self.calibration)),
            ("shift_reference", self.shift_reference),
            ("registered_as", self.registered_as),
            ("registered_version", self.registered_version),
            ("registry", self.registry),
            ("checkpoint", self.checkpoint),
        ):
            if value is not None and value != [] and value != {}:
                out[name] = deepcopy(value)
        out.update(deepcopy(self.extra))
        return _redacted(out)

    def public_dict(self) -> dict[str, Any]:
        """What a service may show: the card without its training config, without local
        paths (the checkpoint by its file name) and without credentials."""
        card = self.to_dict()
        card.pop("config", None)
        if self.checkpoint is not None:
            card["checkpoint"] = self.source_name
        return _without_local_paths(card)

    # --- what using the model reads -----------------------------------------------------------

    @property
    def temperature(self) -> float:
        """The temperature fitted on validation (1.0: uncalibrated)."""
        return self.calibration.temperature if self.calibration else 1.0

    @property
    def image_size(self) -> int | None:
        return self.input.image_size if self.input else None

    @property
    def intensity(self) -> str:
        """The per-image standardisation the model was trained with (none for old cards)."""
        return self.input.intensity if self.input else "none"

    def operating_point_for(self, tta: bool) -> OperatingPoint | None:
        """The point chosen for plain (`tta=False`) or TTA-averaged probabilities."""
        return self.operating_point_tta if tta else self.operating_point

    def missing(self) -> list[str]:
        """What this card lacks that using an image model needs (empty: nothing)."""
        lost = []
        if self.task is None:
            lost.append("task")
        if self.inputs == "image" and self.image_size is None:
            lost.append("input.image_size")
        if self.task == "classification" and not self.class_names:
            lost.append("class_names")
        return lost

    @property
    def model_id(self) -> str:
        """The name every output gives the model: `NAME@RUN` (registered name, else the
        checkpoint's file name)."""
        run = self.run.get("id")
        name = self.registered_as or self.source_name
        return f"{name}@{run}" if run else name

    @property
    def source_name(self) -> str:
        """Where the model was opened from, without the folder: the checkpoint's file name,
        or a `models:/` URI as it was given."""
        source = str(self.checkpoint or "model")
        if source.startswith("models:/"):
            return source
        return PureWindowsPath(source).name if "\\" in source else PurePosixPath(source).name


def training_card(
    datamodule: Any,
    data_config: Mapping[str, Any],
    config_yaml: str,
    run: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The card as training knows it: classes, input contract, data, run and config (stored
    form; `ModelCard` adds the rest when the checkpoint is written)."""
    card = ModelCard(
        class_names=[str(c) for c in getattr(datamodule, "classes", None) or []],
        data={
            "name": data_config.get("name"),
            "patient_pattern": getattr(datamodule, "patient_pattern", None)
            or data_config.get("patient_pattern"),
            "config": dict(data_config),
        },
        run=dict(run or {}),
        config=config_yaml,
    )
    size = getattr(datamodule, "image_size", None)
    if size is not None:
        intensity = getattr(datamodule, "intensity", "none")
        card.input = InputSpec(int(size), intensity, extra=dict(DECODING))
    stored = card.to_dict()
    stored.pop("schema_version")
    stored.pop("inputs")  # the module says what it takes, when it is saved
    return stored


def operating_point(card: Mapping[str, Any]) -> dict[str, Any] | None:
    """The validation-chosen operating point of a binary classifier, if it has been chosen."""
    point = ModelCard.from_dict(card).operating_point
    return point.to_dict() if point else None


def temperature(card: Mapping[str, Any]) -> float:
    """The temperature fitted on validation (1.0: uncalibrated)."""
    return ModelCard.from_dict(card).temperature
