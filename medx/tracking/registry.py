"""The MLflow Model Registry: register the selected model, and open `models:/NAME/...` URIs.

`logger.register_as=NAME` makes medx.train log the checkpoint it selected (and tested: the
clinical evaluation has written the operating point and temperature into its card) as an MLflow
pyfunc model in the training run, and register it as a new version of NAME. The pyfunc
(`MedxModel`) is an adapter around `medx.inference` (the core `medx.predict` and `medx.serve`
use too), so `mlflow models serve -m models:/NAME/1 --env-manager local` serves the same
calibrated probabilities and decision as they do for the same image.

Input: a DataFrame with one column `image` of binary file bytes (JPEG, PNG, BMP, TIFF, WebP or
DICOM, sniffed from the bytes); over REST (`/invocations`) the bytes are base64 strings, which
MLflow decodes by the signature. Bytes, not file paths: a server cannot see its clients' files.
Output for classifiers: `p_<class>` per class (calibrated unless `params={"calibrated": false}`),
`predicted`, and for binary models `decision` at the validation-chosen `threshold` (with its
`threshold_scale` and `threshold_source`: "site calibration ..." once `medx.calibrate` re-chose
it), `temperature`, with a shift reference on the card the shift monitor's `ood_score` and
`ood_flag` of each image (optional columns: absent without one), and `error` (empty, or why
that row's image was refused).
Segmenters answer `mask` (PNG bytes, 0/255, at the image's size) and `foreground` (its share).

`models:/NAME/VERSION` and `models:/NAME@ALIAS` are accepted wherever medx takes a model
(`medx.inference.open_model` calls `resolve_model_uri`): the version's checkpoint is downloaded once
into a cache ($MEDX_MODEL_CACHE, default ~/.cache/medx/models) and carries the registered name
and version in its card. The registry is $MLFLOW_REGISTRY_URI, else $MLFLOW_TRACKING_URI, else
medx's default store (logger.tracking_uri).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import mlflow
import numpy as np
import pandas as pd
import yaml
from lightning.pytorch.loggers import Logger, MLFlowLogger
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from medx.errors import CheckpointError, ConfigError
from medx.models.card import ModelCard
from medx.tracking.runs import EpochMLFlowLogger

log = logging.getLogger(__name__)

URI_PREFIX = "models:/"
MODEL_NAME = "model"  # the MLflow model's name in the run (its artifact folder)
CHECKPOINT_FILE = "model.ckpt"
BATCH = 16
# Distributions a served model imports; pinned to this environment's versions in the model's
# requirements. medx itself is not on PyPI: serve with `--env-manager local` from a medx venv.
REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "timm",
    "lightning",
    "segmentation-models-pytorch",
    "numpy",
    "pandas",
    "opencv-python-headless",
    "pydicom",
    "pylibjpeg",
    "hydra-core",
)
_NAME = re.compile(r"^[^/:@]+$")  # MLflow refuses / and :, and @ would read as an alias


# --- registering ----------------------------------------------------------------------------


class RegisteringMLFlowLogger(EpochMLFlowLogger):
    """Lightning's MLFlowLogger with `register_as`: the Model Registry name under which
    medx.train registers the selected model (None: not registered). A logger setting, because
    the registry is the run's tracking server; checked here, so a bad name fails before fit."""

    def __init__(self, *args: Any, register_as: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if register_as is not None and not _NAME.match(str(register_as).strip() or "/"):
            raise ConfigError(
                f"logger.register_as={register_as!r} is no Model Registry name: give a name "
                "without '/', ':' or '@' (e.g. logger.register_as=pneumonia)."
            )
        self.register_as = None if register_as is None else str(register_as).strip()


def register_selected(trainer: Any, loggers: list[Logger]) -> ModelVersion | None:
    """After training and testing: log the selected checkpoint as an MLflow model in the run
    and register it under `logger.register_as` (nothing when that is null). Rank 0 only."""
    from medx.tracking import runs

    wanted = [lg for lg in runs.mlflow_loggers(loggers) if getattr(lg, "register_as", None)]
    if not wanted:
        return None
    checkpoint = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not checkpoint:
        # no checkpoint callback (callbacks=none, fast_dev_run): the tested weights, saved now
        if trainer.world_size > 1:
            raise ConfigError(
                "logger.register_as needs the selected checkpoint, and this run saved none: "
                "keep callbacks.model_checkpoint."
            )
        checkpoint = str(Path(trainer.default_root_dir) / "checkpoints" / "registered.ckpt")
        trainer.save_checkpoint(checkpoint, weights_only=True)
    version = None
    for logger in wanted:
        version = log_and_register(Path(checkpoint), logger.register_as, logger)
    return version


def log_and_register(checkpoint: Path, name: str, logger: MLFlowLogger) -> ModelVersion:
    """Log `checkpoint` as the pyfunc `MedxModel` in the logger's run; a new version of
    `name`, tagged with the task, classes, operating point and temperature."""
    from medx.models.load import load

    model = load(checkpoint)
    typed = ModelCard.from_dict(model.card)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / CHECKPOINT_FILE  # one file name in every registered model
        shutil.copyfile(checkpoint, copy)
        with _in_run(logger):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(Path(__file__).with_name("pyfunc.py")),
                artifacts={"checkpoint": str(copy)},
                signature=signature(typed, model),
                input_example=_input_example(typed),
                pip_requirements=requirements(),
                metadata={"medx": typed.public_dict()},
                registered_model_name=name,
            )
    client = MlflowClient(logger._tracking_uri)
    version = client.get_model_version(name, str(info.registered_model_version))
    for key, value in _version_tags(typed, checkpoint).items():
        client.set_model_version_tag(name, version.version, key, value)
    client.set_tag(logger.run_id, "medx.registered_model", f"{name}/{version.version}")
    log.info(
        "Registered %s as %s%s/%s (%s)",
        checkpoint,
        URI_PREFIX,
        name,
        version.version,
        logger._tracking_uri,
    )
    return version


@contextmanager
def _in_run(logger: MLFlowLogger) -> Iterator[None]:
    """The logger's run as MLflow's active run on the logger's tracking server, for the
    fluent `log_model`; the caller's tracking URI is restored afterwards."""
    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(logger._tracking_uri)
    try:
        with mlflow.start_run(run_id=logger.run_id):
            yield
    finally:
        mlflow.set_tracking_uri(before)


def signature(card: ModelCard, model: Any = None) -> ModelSignature:
    """Images in (binary file bytes), the medx.predict columns out; for classifiers `tta`
    and `calibrated` as parameters, like medx.predict's --tta and --no-calibration."""
    inputs = Schema([ColSpec("binary", "image")])
    error = ColSpec("string", "error")
    if card.task == "segmentation":
        outputs = [ColSpec("binary", "mask"), ColSpec("double", "foreground"), error]
        return ModelSignature(inputs=inputs, outputs=Schema(outputs))
    classes = _classes(card, model)
    outputs = [ColSpec("double", f"p_{c}") for c in classes]
    outputs += [ColSpec("string", "predicted"), ColSpec("double", "temperature")]
    outputs += [  # the shift monitor's, with a shift reference on the card
        ColSpec("double", "ood_score", required=False),
        ColSpec("boolean", "ood_flag", required=False),
    ]
    if len(classes) == 2:
        outputs += [
            ColSpec("string", "decision", required=False),
            ColSpec("double", "threshold", required=False),
            ColSpec("string", "threshold_scale", required=False),
            ColSpec("string", "threshold_source", required=False),
        ]
    params = ParamSchema(
        [ParamSpec("tta", "boolean", False), ParamSpec("calibrated", "boolean", True)]
    )
    return ModelSignature(inputs=inputs, outputs=Schema([*outputs, error]), params=params)


def requirements() -> list[str]:
    """This environment's versions of what the served model imports (those installed)."""
    found = []
    for name in REQUIREMENTS:
        try:
            found.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _input_example(card: ModelCard) -> pd.DataFrame:
    """A gray gradient PNG at the model's input size: shows a client the request's shape."""
    size = int(card.image_size or 64)
    ramp = np.tile(np.linspace(0, 255, size, dtype=np.uint8), (size, 1))
    _, png = cv2.imencode(".png", ramp)
    return pd.DataFrame({"image": [png.tobytes()]})


def _version_tags(card: ModelCard, checkpoint: Path) -> dict[str, str]:
    op = card.operating_point
    tags = {
        "medx.task": str(card.task or ""),
        "medx.classes": ",".join(card.class_names),
        "medx.checkpoint": str(checkpoint),
        "medx.temperature": str(card.temperature),
    }
    if op is not None:
        tags["medx.threshold"] = str(op.threshold)
        tags["medx.threshold_scale"] = op.scale
        tags["medx.target_sensitivity"] = str(op.target_sensitivity)
    return {k: v for k, v in tags.items() if v}


def _classes(card: ModelCard, model: Any = None) -> list[str]:
    if card.class_names:
        return list(card.class_names)
    return [str(i) for i in range(int(model.hparams.num_classes))] if model else ["0", "1"]


# --- the pyfunc -----------------------------------------------------------------------------


class MedxModel(mlflow.pyfunc.PythonModel):
    """A medx checkpoint as an MLflow pyfunc: file bytes in, `medx.inference`'s answer out
    (the same reading, intensity step, probabilities and decision as medx.predict's)."""

    def load_context(self, context: Any) -> None:
        from medx.inference import Predictor, Segmenter, open_model

        model = open_model(context.artifacts["checkpoint"])
        segmenter = (model.card.get("task") or model.task) == "segmentation"
        self.segmenter = Segmenter(model) if segmenter else None
        self.predictor = None if segmenter else Predictor(model)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if "image" not in model_input:
            raise MlflowException(
                "medx models take a DataFrame with an `image` column of image file bytes "
                "(base64 strings over REST), one image per row."
            )
        params = params or {}
        images = [_image_bytes(v) for v in model_input["image"]]
        names = [f"row {i}" for i in range(len(images))]
        if self.segmenter is not None:
            return pd.DataFrame([_mask_row(s) for s in self.segmenter.segment(images, names)])
        predictor = self.predictor
        tta, calibrated = bool(params.get("tta")), bool(params.get("calibrated", True))
        if (predictor.tta, predictor.calibrated) != (tta, calibrated):
            predictor = predictor.configured(tta=tta, calibrated=calibrated)
        answers = predictor.predict(images, names, batch_size=BATCH)
        monitored = predictor.shift_monitor is not None
        return pd.DataFrame([_row(a, predictor.classes, monitored) for a in answers])


def _row(answer: Any, classes: list[str], monitored: bool = False) -> dict[str, Any]:
    """One output row of a `medx.inference.Prediction` (the signature's columns)."""
    probs = answer.probabilities or {}
    row: dict[str, Any] = {f"p_{c}": probs.get(c, math.nan) for c in classes}
    row.update(predicted=answer.predicted or "", temperature=answer.temperature)
    if monitored:
        row["ood_score"] = math.nan if answer.ood_score is None else answer.ood_score
        row["ood_flag"] = answer.ood_flag
    if answer.decision is not None:
        row["decision"] = answer.decision.label
        row["threshold"] = float(answer.decision.threshold)
        row["threshold_scale"] = answer.decision.scale
        row["threshold_source"] = answer.decision.source
    row["error"] = answer.error
    return row


def _mask_row(answer: Any) -> dict[str, Any]:
    if answer.error:
        return {"mask": b"", "foreground": float("nan"), "error": answer.error}
    _, png = cv2.imencode(".png", answer.mask)
    return {"mask": png.tobytes(), "foreground": answer.foreground, "error": ""}


def _image_bytes(value: Any) -> bytes:
    """Bytes as MLflow hands them over; a str is base64 (a client that skipped the schema)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=False)
        except ValueError:
            return b""
    return b""


# --- models:/ URIs --------------------------------------------------------------------------


def is_model_uri(path: str | Path) -> bool:
    return str(path).startswith(URI_PREFIX)


def resolve_model_uri(path: str | Path) -> Path:
    """A local checkpoint for `models:/NAME/VERSION` or `models:/NAME@ALIAS` (downloaded once
    into the cache); any other path is returned unchanged."""
    if not is_model_uri(path):
        return Path(path)
    uri = str(path)
    name, version, alias = parse_model_uri(uri)
    from medx.tracking import store

    tracking = tracking_uri()
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or tracking
    store.check(registry, write=False)  # a missing sqlite file: said, and not created
    client = MlflowClient(tracking_uri=tracking, registry_uri=registry)
    found = _model_version(client, uri, name, version, alias, registry)
    # keyed by the version's source too: the same name and version differ between registries
    key = _digest(f"{found.source} {found.run_id}")
    target = cache_dir() / name / str(found.version) / key / CHECKPOINT_FILE
    if not target.is_file():
        _download(client, found, target, tracking, registry, alias)
    return target


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME/VERSION` → (NAME, VERSION, None); `models:/NAME@ALIAS` → (NAME, None,
    ALIAS); anything else is a ConfigError showing both forms."""
    rest = uri[len(URI_PREFIX) :].strip("/")
    if "@" in rest and "/" not in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return name, None, alias
    parts = rest.split("/")
    if len(parts) == 2 and parts[0] and parts[1].isdigit():
        return parts[0], parts[1], None
    raise ConfigError(
        f"{uri} is no registered model URI medx reads: give models:/NAME/VERSION (e.g. "
        "models:/pneumonia/3) or models:/NAME@ALIAS (e.g. models:/pneumonia@champion)."
    )


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else medx's default store (the one medx.train logs to)."""
    from medx.tracking.store import default_uri

    return os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def cache_dir() -> Path:
    """Where registered checkpoints are kept: $MEDX_MODEL_CACHE, else the user's cache."""
    if os.environ.get("MEDX_MODEL_CACHE"):
        return Path(os.environ["MEDX_MODEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medx" / "models"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _model_version(
    client: MlflowClient,
    uri: str,
    name: str,
    version: str | None,
    alias: str | None,
    registry: str,
) -> ModelVersion:
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as err:
        known = _known_versions(client, name)
        where = f"in the registry {registry}"
        if known is None:
            hint = f"no registered model {name!r} {where}: register one with " + (
                f"logger.register_as={name}, or set MLFLOW_TRACKING_URI to its server"
            )
        else:
            hint = f"{name!r} {where} has versions {known or 'none'}" + (
                f" and aliases {_aliases(client, name) or 'none'}" if alias else ""
            )
        raise CheckpointError(f"{uri} cannot be opened: {hint}.") from err


def _known_versions(client: MlflowClient, name: str) -> list[str] | None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        return None
    found = client.search_model_versions(f"name = '{name}'")
    return sorted((str(v.version) for v in found), key=int)


def _aliases(client: MlflowClient, name: str) -> list[str]:
    return sorted(client.get_registered_model(name).aliases or {})


def _download(
    client: MlflowClient,
    found: ModelVersion,
    target: Path,
    tracking: str,
    registry: str,
    alias: str | None,
) -> None:
    """The version's checkpoint into `target`, its card naming the registered model; written
    to a temporary folder beside it and moved in whole, so a crash leaves no half file."""
    from medx.models.load import update_card

    uri = f"{URI_PREFIX}{found.name}/{found.version}"
    source = client.get_model_version_download_uri(found.name, found.version)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        try:
            mlmodel = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source.rstrip('/')}/MLmodel",
                dst_path=tmp,
                tracking_uri=tracking,
            )
            spec = yaml.safe_load(Path(mlmodel).read_text())
            relative = _checkpoint_path(spec, uri)
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source.rstrip('/')}/{relative}",
                dst_path=tmp,
                tracking_uri=tracking,
            )
        except MlflowException as err:
            raise CheckpointError(
                f"{uri} cannot be downloaded from {source} ({err.message.splitlines()[0]}); "
                "check that the tracking server serves its artifacts."
            ) from err
        update_card(
            local,
            registered_as=found.name,
            registered_version=str(found.version),
            registry={"uri": registry, "alias": alias, "run_id": found.run_id},
        )
        os.replace(local, target)
    log.info("%s (version %s) downloaded to %s", uri, found.version, target)


def _checkpoint_path(spec: dict[str, Any], uri: str) -> str:
    """The checkpoint's path inside a medx MLflow model, from its MLmodel file."""
    artifacts = ((spec.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
    path = (artifacts.get("checkpoint") or {}).get("path")
    if not (spec.get("metadata") or {}).get("medx") or not path:
        raise CheckpointError(
            f"{uri} is not a medx model (its MLmodel has no medx card and no checkpoint): "
            "medx opens the models medx.train registers with logger.register_as."
        )
    return str(path)
