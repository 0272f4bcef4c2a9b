"""The typed model card: one reader and writer (`ModelCard`), a schema version, thresholds
that say their scale, old checkpoints that still load, credentials that never get written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medx.errors import CheckpointError
from medx.inference import Predictor
from medx.models.card import CARD_KEY, SCHEMA_VERSION, ModelCard, redact_uri
from medx.models.classifier import ClassificationModule
from medx.models.load import load, read_checkpoint, update_card
from medx.train import train

SECRET_URI = "https://alice:s3cret@mlflow.example.org/?token=t0k3n&experiment=7"


def _trained(make_cfg) -> Path:
    cfg = make_cfg("trainer.max_epochs=1", "eval.bootstrap=20", "logger=none")
    train(cfg)
    (best,) = (Path(cfg.paths.output_dir) / "checkpoints").glob("epoch*.ckpt")
    return best


def _as_format_1(card: dict) -> dict:
    """The card as medx wrote it before the typed card: `format: 1`, bare thresholds."""
    old = {k: v for k, v in card.items() if k != "schema_version"}
    old["format"] = 1
    old["operating_point"] = {
        k: v for k, v in card["operating_point"].items() if k not in ("scale", "provenance")
    }
    old["calibration"] = {k: v for k, v in card["calibration"].items() if k != "provenance"}
    return old


def test_a_checkpoint_written_before_the_typed_card_answers_as_before(
    make_cfg, phantom_cache: Path, tmp_path: Path
):
    ckpt = _trained(make_cfg)
    content = read_checkpoint(ckpt)
    card = content[CARD_KEY]
    assert card["schema_version"] == SCHEMA_VERSION and card["operating_point"]["scale"] == "raw"
    content[CARD_KEY] = _as_format_1(card)
    old = tmp_path / "format1.ckpt"
    torch.save(content, old)
    image = next(phantom_cache.rglob("*.png"))

    (new_answer,) = Predictor.from_checkpoint(ckpt).predict([image])
    (old_answer,) = Predictor.from_checkpoint(old).predict([image])

    assert old_answer.probabilities == new_answer.probabilities
    assert old_answer.decision == new_answer.decision  # the format-1 threshold read as raw
    assert old_answer.decision.scale == "calibrated"
    typed = ModelCard.from_dict(load(old).card)
    assert typed.operating_point.scale == "raw"
    assert typed.operating_point.threshold == card["operating_point"]["threshold"]
    update_card(old, note="seen")  # written again: by ModelCard, as schema 2
    assert read_checkpoint(old)[CARD_KEY]["schema_version"] == SCHEMA_VERSION
    assert read_checkpoint(old)[CARD_KEY]["operating_point"]["scale"] == "raw"

    # no card at all (medx before model cards): one line saying what is missing
    del content[CARD_KEY]
    torch.save(content, tmp_path / "no_card.ckpt")
    with pytest.raises(CheckpointError, match=r"no_card\.ckpt lacks input\.image_size") as err:
        Predictor.from_checkpoint(tmp_path / "no_card.ckpt")
    assert "\n" not in str(err.value)


def test_the_card_round_trips_and_carries_the_shift_fields():
    raw = {
        "task": "classification",
        "class_names": ["NORMAL", "OPACITY"],
        "input": {"image_size": 64, "intensity": "zscore", "range": [0.0, 1.0]},
        "operating_point": {"threshold": 0.0879, "target_sensitivity": 0.95, "chosen_on": "val",
                            "tta": False, "provenance": {"n": 120, "by": "medx.calibrate"}},
        "previous_operating_points": [{"threshold": 0.2, "scale": "raw"}],
        "calibration": {"temperature": 1.3, "fitted_on": "val", "provenance": {"n": 120}},
        "shift_reference": {"histogram": [1, 2, 3]},
        "something_new": {"kept": True},
    }  # fmt: skip
    card = ModelCard.from_dict(raw)
    assert card.intensity == "zscore" and card.image_size == 64 and card.temperature == 1.3
    assert card.operating_point.provenance == {"n": 120, "by": "medx.calibrate"}
    stored = card.to_dict()
    assert json.loads(json.dumps(stored)) == stored  # plain values: weights_only loads it
    assert stored["schema_version"] == SCHEMA_VERSION
    assert stored["operating_point"]["scale"] == "raw"
    assert stored["shift_reference"] == raw["shift_reference"]
    assert stored["previous_operating_points"] == raw["previous_operating_points"]
    assert stored["something_new"] == {"kept": True}
    assert ModelCard.from_dict(stored).to_dict() == stored
    with pytest.raises(ValueError, match="scale"):
        ModelCard.from_dict({"operating_point": {"threshold": 0.1, "scale": "logit"}})


def test_credentials_are_redacted_when_the_card_is_written_and_never_shown(tmp_path: Path):
    assert redact_uri(SECRET_URI) == (
        "https://REDACTED@mlflow.example.org/?token=REDACTED&experiment=7"
    )
    assert redact_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    module = ClassificationModule("test_resnet", num_classes=2)
    module.card.update(
        class_names=["NORMAL", "OPACITY"],
        input={"image_size": 64},
        run={"id": "abc", "tracking_uri": SECRET_URI},
        config=f"logger:\n  tracking_uri: {SECRET_URI}\n",
        registry={"uri": "postgresql://bob:hunter2@db.example/mlflow", "alias": None},
        data={"config": {"root": str(tmp_path / "data" / "chest_xray")}},
    )
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)  # how Lightning writes every medx checkpoint
    written = json.dumps(checkpoint[CARD_KEY])
    for secret in ("s3cret", "t0k3n", "hunter2", "alice:", "bob:"):
        assert secret not in written, secret
    assert "mlflow.example.org" in written  # what was not secret stays

    # a card written by an older medx, credentials and all, is redacted when read
    card = ModelCard.from_dict({**module.card, "checkpoint": str(tmp_path / "run" / "x.ckpt")})
    shown = json.dumps(card.public_dict())
    assert "s3cret" not in shown and "hunter2" not in shown
    assert str(tmp_path) not in shown  # no local paths: the checkpoint by its name
    assert card.public_dict()["checkpoint"] == "x.ckpt" and "config" not in card.public_dict()
