"""The shift monitor, the stress test and site calibration on real chest X-rays (Kermany).

One small model is trained for the module (resnet18 at 64 px on 400 Kermany images, no
acquisition augmentation, its evaluation with `eval.stress=true`); the images it never met
(`held_apart`, other patients) play a new site: as they are, and under simulated shifts.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from medx.calibrate import main as calibrate_main
from medx.config import compose
from medx.data.shifted import ShiftedImages
from medx.evaluation import metrics
from medx.inference import Predictor
from medx.inference.shift import ShiftMonitor
from medx.models.base import CARD_KEY
from medx.models.load import load, model_card
from medx.train import train

pytestmark = pytest.mark.slow
CLASSES = ("NORMAL", "PNEUMONIA")
TRAIN_PER_CLASS, HELD_PER_CLASS = 200, 150


@pytest.fixture(scope="module")
def kermany(medx_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A model trained on the first 400 Kermany images (val and test carved by patient), and
    300 images of other patients held apart: {"ckpt", "run", "held": [(path, label)]}."""
    tmp = tmp_path_factory.mktemp("kermany")
    pool, held = tmp / "pool", []
    for label, name in enumerate(CLASSES):
        files = sorted((medx_data / "chest_xray" / "train" / name).glob("*.jpeg"))
        (pool / name).mkdir(parents=True)
        for f in files[:TRAIN_PER_CLASS]:
            (pool / name / f.name).symlink_to(f)
        held += [(f, label) for f in files[-HELD_PER_CLASS:]]
    cfg = compose(
        [
            "data=pneumonia",
            f"data.root={pool}",
            "data.val_from_train=0.25",
            "data.test_from_train=0.25",
            "data.image_size=64",
            "data.augment=none",
            "data.num_workers=0",
            "model=resnet18",
            "trainer.max_epochs=6",
            "optimizer.lr=2e-3",
            "eval.bootstrap=50",
            "eval.stress=true",
            "logger=csv",
            "callbacks.rich_progress_bar=null",
            "callbacks.early_stopping=null",
            "trainer.enable_progress_bar=false",
            f"paths.root_dir={tmp}",
            f"paths.cache_dir={tmp / 'cache'}",
        ]
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / "run")
    HydraConfig().set_config(cfg)
    train(cfg)
    (ckpt,) = (tmp / "run" / "checkpoints").glob("epoch*.ckpt")
    return {"ckpt": ckpt, "run": tmp / "run", "held": held, "tmp": tmp}


def _balanced(held: list, per_class: int, offset: int = 0) -> list:
    by_class = [[h for h in held if h[1] == c] for c in range(len(CLASSES))]
    return [h for group in by_class for h in group[offset : offset + per_class]]


def _features(model, pairs: list, shift: str | None = None, severity: int = 3) -> tuple:
    card = model.card
    data = ShiftedImages(
        [p for p, _ in pairs],
        [y for _, y in pairs],
        card["input"]["image_size"],
        card["input"]["intensity"],
        shift,
        severity,
    )
    from medx.evaluation.stress import features_and_probs

    return features_and_probs(model, data)


def test_the_monitor_passes_held_apart_images_and_flags_shifted_copies(kermany: dict):
    model = load(kermany["ckpt"])
    monitor = ShiftMonitor.from_card(model.card)
    batch = _balanced(kermany["held"], 50)  # 100 images of patients the model never met

    feats, probs = _features(model, batch)
    report = monitor.test(feats, probs[:, 1])
    assert not report.shifted and report.p_value > 0.05, report
    assert report.ood_rate <= 0.1

    # shifts a 64 px model sees (blur, noise, resolution and JPEG of a 224 px image mostly
    # vanish in its 64 px input: its AUROC and the monitor do not move, rightly)
    for shift in ("gamma", "contrast", "crop", "collimation"):
        feats, probs = _features(model, batch, shift, 3)
        report = monitor.test(feats, probs[:, 1])
        assert report.shifted and report.p_value < 0.01, (shift, report)
        assert report.effect > 3, (shift, report)


def test_the_stress_table_has_every_shift_and_auroc_falls_with_severity(kermany: dict):
    rows = list(csv.DictReader((kermany["run"] / "evaluation" / "stress_test.csv").open()))
    found = {(r["shift"], int(r["severity"])) for r in rows}
    from medx.data.acquisition import SEVERITIES, SHIFTS

    assert found == {("none", 0)} | {(s, k) for s in SHIFTS for k in range(1, SEVERITIES + 1)}
    auroc = {
        k: np.mean([float(r["auroc"]) for r in rows if int(r["severity"]) == k]) for k in (0, 1, 3)
    }
    assert auroc[0] > auroc[1] > auroc[3], auroc  # trained without acquisition augmentation
    # the monitor sees every shift that costs this model AUROC, on the 100 carved test images
    harmful = [r for r in rows if float(r["auroc"]) < auroc[0] - 0.03]
    assert harmful and all(float(r["monitor_p"]) < 0.01 for r in harmful), harmful


def _write_site(pairs: list, folder: Path, shift: str, severity: int) -> list:
    """Shifted copies as PNG files under folder/<class>/, as a site would hand them over."""
    data = ShiftedImages([p for p, _ in pairs], [y for _, y in pairs], 224, "none", shift, severity)
    written = []
    for i, (path, label) in enumerate(pairs):
        out = folder / CLASSES[label] / f"{path.stem}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), data.pixels(i)[..., 0])
        written.append((out, label))
    return written


def test_site_calibration_restores_the_target_sensitivity_on_held_apart_shifted_images(
    kermany: dict, tmp_path: Path, capsys
):
    # collimator shutters: this model's sensitivity at its val threshold collapses
    site = _write_site(kermany["held"], tmp_path / "site", "collimation", 1)
    rest = _balanced(site, 50, offset=100)  # the first 100 of each class calibrate
    for path, label in rest:  # keep only the calibration part under site/
        path.rename(tmp_path / f"rest_{label}_{path.name}")
    rest = [(tmp_path / f"rest_{y}_{p.name}", y) for p, y in rest]
    new = tmp_path / "site.ckpt"

    entries = calibrate_main([str(kermany["ckpt"]), str(tmp_path / "site"), "--out", str(new)])

    old_card, card = model_card(kermany["ckpt"]), model_card(new)
    point = card["operating_point"]
    assert point["chosen_on"] == "site" and point["scale"] == "raw"
    assert (
        card["previous_operating_points"][-1]["threshold"]
        == old_card["operating_point"]["threshold"]
    )
    provenance = point["provenance"]
    assert provenance["class_counts"] == {"NORMAL": 100, "PNEUMONIA": 100}
    assert provenance["data_digest"].startswith("sha256:") and provenance["shift"]["shifted"]
    assert card["calibration"]["provenance"]["previous_temperature"] == pytest.approx(
        old_card["calibration"]["temperature"]
    )
    assert entries["operating_point"] == point
    assert "written to" in capsys.readouterr().out

    # the new checkpoint, used as medx.predict uses it: the site's threshold, said so
    predictor = Predictor.from_checkpoint(new, calibrated=False)
    assert predictor.rule.source.startswith("site calibration") and predictor.rule.scale == "raw"
    answers = predictor.predict([p for p, _ in rest])
    p_pneumonia = np.array([a.probabilities["PNEUMONIA"] for a in answers])
    labels = np.array([y for _, y in rest])
    sens = lambda t: metrics.rates(labels, (p_pneumonia >= t).astype(int), 2)["sensitivity"][0]  # noqa: E731
    low, high = provenance["sensitivity_ci"]
    before, after = sens(old_card["operating_point"]["threshold"]), sens(point["threshold"])
    assert before < low <= after <= high, (before, after, low, high)
    decided = np.array([a.decision.label == "PNEUMONIA" for a in answers])
    assert np.array_equal(decided, p_pneumonia >= point["threshold"])


def _exits(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        calibrate_main(argv)
    return str(stop.value.code)


def test_calibrate_refuses_bad_samples_and_models_in_one_line(kermany: dict, tmp_path: Path):
    ckpt, held = str(kermany["ckpt"]), kermany["held"]
    out = ["--out", str(tmp_path / "new.ckpt")]

    one_class = _write_site(_balanced(held, 20)[:20], tmp_path / "normal_only", "gamma", 1)
    assert one_class and all(y == 0 for _, y in one_class)
    message = _exits([ckpt, str(tmp_path / "normal_only"), *out])
    assert message.startswith("medx.calibrate: ") and "no image of class PNEUMONIA" in message

    _write_site(_balanced(held, 4), tmp_path / "few", "gamma", 1)
    assert "too few images (NORMAL: 4, PNEUMONIA: 4" in _exits([ckpt, str(tmp_path / "few"), *out])

    table = tmp_path / "labels.csv"
    table.write_text("path,label\n" + "".join(f"{p},COVID\n" for p, _ in held[:3]))
    message = _exits([ckpt, str(table), *out])
    assert "'COVID' match no class of the model (NORMAL, PNEUMONIA)" in message

    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    del raw[CARD_KEY]["shift_reference"]
    bare = tmp_path / "bare.ckpt"
    torch.save(raw, bare)
    message = _exits([str(bare), str(tmp_path / "few"), *out])
    assert "no shift reference" in message and f"medx.eval ckpt_path={bare}" in message
    assert all("\n" not in m for m in (message,))
    assert not (tmp_path / "new.ckpt").exists()
