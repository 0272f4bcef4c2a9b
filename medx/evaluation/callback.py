"""`ClinicalEvaluation`: after testing, the full clinical report of the tested model.

A Lightning Callback (not code in the LightningModule), so every classification model family
(CNN classifier, quality baseline) gets the same report and `medx.eval` reuses it unchanged.
At `on_test_end` the trainer holds the tested (best-checkpoint) weights: the callback runs them
over the datamodule's validation and test loaders and computes everything from the logits.
Anything chosen (the operating threshold, the temperature) is chosen on validation and applied
unchanged to test. The validation images also give the model its shift reference
(`medx.evaluation.drift`, card entry `shift_reference`), which the test split is checked
against, and with `stress=True` the test split (`stress_split`: val, to compare recipes on
validation folds) is re-read under simulated acquisition shifts (`medx.evaluation.stress`).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from medx.data.acquisition import check_shifts
from medx.data.shifted import ShiftedImages
from medx.errors import ConfigError
from medx.evaluation import calibration, metrics, plots, stress
from medx.evaluation.drift import MIN_VAL_IMAGES, ShiftReference, reference_scores
from medx.evaluation.tta import tta_logits
from medx.models.load import update_card
from medx.tracking import runs

log = logging.getLogger(__name__)

CALIBRATIONS = ("temperature",)
ARTIFACT_DIR = "evaluation"  # the folder in the run dir and in the MLflow run


@dataclass
class Predictions:
    """Logits (n, K) and integer labels (n,) of one split, in loader order."""

    logits: np.ndarray
    labels: np.ndarray

    @property
    def probs(self) -> np.ndarray:
        return calibration.softmax(self.logits)


def check_settings(target_sensitivity: float, calibrate: str | None) -> str | None:
    """Config errors now, naming the key, rather than a wrong report after training."""
    if not (isinstance(target_sensitivity, int | float) and 0 < target_sensitivity <= 1):
        raise ConfigError(
            f"eval.target_sensitivity={target_sensitivity!r} must be in (0, 1], e.g. 0.95."
        )
    calibrate = None if calibrate in (None, "none", False) else calibrate
    if calibrate is not None and calibrate not in CALIBRATIONS:
        raise ConfigError(
            f"eval.calibrate={calibrate!r} is unknown; choices: {', '.join(CALIBRATIONS)} or null."
        )
    return calibrate


def clinical_report(
    val: Predictions,
    test: Predictions,
    out_dir: Path,
    class_names: Sequence[str],
    target_sensitivity: float = 0.95,
    calibrate: str | None = "temperature",
    n_boot: int = 1000,
    seed: int = 0,
    test_paths: Sequence[str] | None = None,
    test_columns: Mapping[str, Sequence] | None = None,
) -> tuple[dict[str, float], list[Path]]:
    """All `test/...` (and val-side `val/..._at_op`) metrics, and the files written to out_dir.

    Args:
        val: the validation split's logits and labels (the operating point and the
            temperature are chosen there).
        test: the test split's logits and labels (every metric is computed there).
        out_dir: where the figures and tables are written.
        class_names: in logit order (class 1 is the positive class of a binary task).
        target_sensitivity: for the operating point (binary tasks).
        calibrate: "temperature" or None.
        n_boot: bootstrap resamples for the 95% CIs.
        seed: of the bootstrap.
        test_paths: each test image's file, for `test_predictions.csv`.
        test_columns: more per-image facts from the datamodule (e.g. the quality task's
            degradation and severity), appended to test_predictions.csv; each text column
            also gets `test_by_<column>.csv`, the errors per value, to show which kind of case
            a model misses.

    Returns:
        The metrics (name → value) and the files written.
    """
    test_columns = {
        k: list(v) for k, v in (test_columns or {}).items() if len(v) == len(test.labels)
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    probs, num_classes = test.probs, test.logits.shape[1]
    found = {f"test/{k}": v for k, v in metrics.classification_metrics(test.labels, probs).items()}
    for name, (low, high) in metrics.bootstrap_ci(test.labels, probs, n_boot, seed).items():
        found[f"test/{name}_ci_low"], found[f"test/{name}_ci_high"] = low, high

    threshold = _operating_point(val, target_sensitivity, num_classes)
    if threshold is not None:
        found["test/threshold_at_op"] = threshold
        for split, pred in (("val", val), ("test", test)):
            at_op = metrics.classification_metrics(pred.labels, pred.probs, threshold)
            for key in ("sensitivity", "specificity", "ppv", "npv"):
                if key in at_op:
                    found[f"{split}/{key}_at_op"] = at_op[key]
        # the clinical claim is made at the operating point: its rates get CIs too
        cis = metrics.bootstrap_ci(test.labels, probs, n_boot, seed, threshold=threshold)
        for name in ("sensitivity", "specificity"):
            if name in cis:
                low, high = cis[name]
                found[f"test/{name}_at_op_ci_low"], found[f"test/{name}_at_op_ci_high"] = low, high

    before = calibration.reliability(test.labels, probs)
    found["test/ece"], found["test/mce"] = before.ece, before.mce
    curves = {"uncalibrated": before}
    calibrated = None
    if calibrate == "temperature":
        t = calibration.fit_temperature(val.logits, val.labels)
        calibrated = calibration.softmax(test.logits, t)
        after = calibration.reliability(test.labels, calibrated)
        curves[f"temperature scaled (T={t:.2f}, fitted on val)"] = after
        found["test/temperature"] = t
        found["test/ece_calibrated"], found["test/mce_calibrated"] = after.ece, after.mce
        for split, pred in (("val", val), ("test", test)):
            found[f"{split}/nll"] = calibration.nll(pred.logits, pred.labels)
            found[f"{split}/nll_calibrated"] = calibration.nll(pred.logits, pred.labels, t)

    preds = metrics.predictions(probs)
    files = plots.confusion_matrices(
        out_dir, metrics.confusion(test.labels, preds, num_classes), class_names
    )
    files += plots.roc_pr_curves(out_dir, test.labels, probs, class_names, threshold)
    files.append(plots.reliability_diagram(out_dir / "reliability_diagram.png", curves))
    report = out_dir / "classification_report.txt"
    report.write_text(metrics.report(test.labels, probs, class_names))
    files.append(report)
    files.append(
        _write_predictions(
            out_dir / "test_predictions.csv",
            test,
            probs,
            preds,
            class_names,
            test_paths,
            threshold,
            calibrated,
            test_columns,
        )
    )
    at_op = None if threshold is None else (probs[:, 1] >= threshold).astype(int)
    for name, values in test_columns.items():
        if all(isinstance(v, str) for v in values):
            path = out_dir / f"test_by_{name}.csv"
            files.append(_errors_by(path, name, values, test.labels, preds, probs, at_op))
    return found, files


def _errors_by(
    path: Path,
    name: str,
    values: Sequence[str],
    labels: np.ndarray,
    preds: np.ndarray,
    probs: np.ndarray,
    at_op: np.ndarray | None,
) -> Path:
    """Per value of one test column: images, errors at argmax (and at the operating point),
    mean probability of the predicted positive class (binary) or of the true class."""
    values = np.asarray(values)
    binary = probs.shape[1] == 2
    score = probs[:, 1] if binary else probs[np.arange(len(labels)), labels]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        header = [name, "images", "errors", "error_rate"]
        header += ["errors_at_op"] if at_op is not None else []
        writer.writerow([*header, "mean_probability" if binary else "mean_true_class_probability"])
        for value in sorted(set(values.tolist())):
            rows = values == value
            errors = int((preds[rows] != labels[rows]).sum())
            row = [value, int(rows.sum()), errors, f"{errors / rows.sum():.4f}"]
            row += [int((at_op[rows] != labels[rows]).sum())] if at_op is not None else []
            writer.writerow([*row, f"{score[rows].mean():.4f}"])
    return path


def _operating_point(val: Predictions, target: float, num_classes: int) -> float | None:
    if num_classes != 2:
        log.info("Operating point: binary tasks only (%d classes); none chosen.", num_classes)
        return None
    try:
        threshold = metrics.threshold_for_sensitivity(val.labels, val.probs[:, 1], target)
    except ValueError:
        log.warning("No positive case in the validation split: no operating point chosen.")
        return None
    log.info("Operating point on val: p >= %.4f for sensitivity >= %.3f", threshold, target)
    return threshold


def _write_predictions(
    path: Path,
    test: Predictions,
    probs: np.ndarray,
    preds: np.ndarray,
    class_names: Sequence[str],
    paths: Sequence[str] | None,
    threshold: float | None,
    calibrated: np.ndarray | None,
    columns: Mapping[str, Sequence] | None = None,
) -> Path:
    """One row per test image: path, label, probability (positive class, or of the
    prediction when multi-class), prediction; per-class probabilities when multi-class; then
    the datamodule's own `columns`."""
    columns = columns or {}
    binary = probs.shape[1] == 2
    header = ["path", "label", "probability", "prediction"]
    header += ["prediction_at_op"] if threshold is not None else []
    header += ["probability_calibrated"] if calibrated is not None else []
    header += [] if binary else [f"probability_{c}" for c in class_names]
    header += list(columns)
    paths = paths if paths is not None and len(paths) == len(preds) else range(len(preds))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i, (name, label, pred) in enumerate(zip(paths, test.labels, preds, strict=True)):
            column = 1 if binary else pred
            row = [name, class_names[label], f"{probs[i, column]:.6f}", class_names[pred]]
            if threshold is not None:
                row.append(class_names[int(probs[i, 1] >= threshold)])
            if calibrated is not None:
                row.append(f"{calibrated[i, column]:.6f}")
            row += [] if binary else [f"{p:.6f}" for p in probs[i]]
            writer.writerow(row + [values[i] for values in columns.values()])
    return path


class ClinicalEvaluation(Callback):
    """After `trainer.test`: metrics with bootstrap CIs, val-chosen operating point,
    calibration, figures and per-image predictions, logged to the trainer's loggers and
    written to `<default_root_dir>/evaluation` (also uploaded as MLflow artifacts).

    The operating point, the temperature and the shift reference go into the model card of
    the tested checkpoint. Classifiers only: other modules are left alone. Configured from the
    `eval.*` keys (`conf/callbacks/default.yaml`).

    Args:
        target_sensitivity: the operating point is the highest threshold reaching this
            sensitivity on validation (`eval.target_sensitivity`, in (0, 1]).
        calibrate: "temperature" (one temperature fitted on validation NLL) or None
            (`eval.calibrate`).
        bootstrap: resamples for the 95% CIs (`eval.bootstrap`).
        seed: of the bootstrap, the shift reference's split of val and the stress test.
        tta: evaluate with test-time augmentation; the operating point is then TTA's own
            (`operating_point_tta`) (`eval.tta`).
        shift_reference: keep the validation images' shift reference on the card and test
            the test split against it (`test/shift_p_value`) (`eval.shift_reference`).
        stress: re-evaluate `stress_split` under every simulated acquisition shift and
            severity (`eval.stress`; `medx.evaluation.stress`).
        stress_shifts: the shifts of the stress test (None: all of
            `medx.data.acquisition.SHIFTS`) (`eval.stress_shifts`).
        stress_split: "test", or "val" to compare recipes on validation folds
            (`eval.stress_split`).
    """

    def __init__(
        self,
        target_sensitivity: float = 0.95,
        calibrate: str | None = "temperature",
        bootstrap: int = 1000,
        seed: int = 0,
        tta: bool = False,
        shift_reference: bool = True,
        stress: bool = False,
        stress_shifts: Sequence[str] | None = None,
        stress_split: str = "test",
    ) -> None:
        self.calibrate = check_settings(target_sensitivity, calibrate)
        self.tta, self.shift_reference, self.stress = bool(tta), bool(shift_reference), bool(stress)
        self.stress_shifts = check_shifts(stress_shifts) if stress_shifts else None
        if stress_split not in ("test", "val"):
            raise ConfigError(f"eval.stress_split={stress_split!r} must be test or val.")
        self.stress_split = stress_split
        self.target_sensitivity, self.bootstrap, self.seed = target_sensitivity, bootstrap, seed
        self.metrics: dict[str, float] = {}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:  # under DDP: rank 0 predicts every image itself
            return
        if getattr(pl_module, "task", "classification") != "classification":
            log.debug("Clinical evaluation skipped: %s is no classifier", type(pl_module).__name__)
            return
        if trainer.fast_dev_run or trainer.datamodule is None:
            log.info("Clinical evaluation skipped (fast_dev_run, or no datamodule).")
            return
        dm = trainer.datamodule
        val, test = (
            _predict(pl_module, dm.val_dataloader(), self.tta),
            _predict(pl_module, dm.test_dataloader(), self.tta),
        )
        num_classes = test.logits.shape[1]
        class_names = list(getattr(dm, "classes", None) or map(str, range(num_classes)))
        splits = getattr(dm, "splits", {})
        test_paths = [str(p) for p in splits["test"].paths] if "test" in splits else None
        describe = getattr(dm, "describe_samples", None)
        test_columns = describe("test") if describe is not None else None
        out_dir = Path(trainer.default_root_dir) / ARTIFACT_DIR
        found, files = clinical_report(
            val,
            test,
            out_dir,
            class_names,
            self.target_sensitivity,
            self.calibrate,
            self.bootstrap,
            self.seed,
            test_paths,
            test_columns,
        )
        reference = self._shift_reference(pl_module, dm, val) if self.shift_reference else None
        if reference is not None:
            found.update(_check_test(pl_module, dm, reference))
        if self.stress:
            # the stress test runs the plain model: its threshold is the plain one, not TTA's
            threshold = found.get("test/threshold_at_op")
            if self.tta and threshold is not None:
                plain = _predict(pl_module, dm.val_dataloader(), tta=False)
                threshold = _operating_point(plain, self.target_sensitivity, num_classes)
            rows = self._stress(pl_module, dm, threshold, reference)
            if rows:
                split = self.stress_split
                found.update(stress.summary(rows, split))
                files.append(stress.write_csv(rows, out_dir / f"stress_{split}.csv"))
                files.append(stress.plot(rows, out_dir / f"stress_{split}.png", split))
        history = _history(trainer)
        if history:
            files.append(plots.training_curves(out_dir / "training_curves.png", history))
        # The module already logged its own test/acc, test/auroc, ...: the same numbers, kept
        # once; with TTA the callback's numbers are another model's and replace them.
        new = (
            found
            if self.tta
            else {k: v for k, v in found.items() if k not in trainer.callback_metrics}
        )
        for logger in trainer.loggers:
            logger.log_metrics(new, step=trainer.global_step)
            logger.save()
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in new.items()})
        for logger in runs.mlflow_loggers(trainer.loggers):  # in the run's evaluation/
            for path in files:
                logger.experiment.log_artifact(logger.run_id, str(path), ARTIFACT_DIR)
        self.metrics = found
        _remember_choices(trainer, pl_module, found, self.target_sensitivity, self.tta, reference)
        lines = [f"{k} {v:.4f}" for k, v in sorted(found.items()) if math.isfinite(v)]
        log.info("Clinical evaluation in %s\n  %s", out_dir, "\n  ".join(lines))

    def _shift_reference(
        self, module: L.LightningModule, dm: L.LightningDataModule, val: Predictions
    ) -> ShiftReference | None:
        """The validation images' reference in the model's feature space, or None (no
        `embed`: an ensemble or a feature baseline; too few val images)."""
        if not hasattr(module, "embed"):
            log.info("No shift reference: %s has no feature space.", type(module).__name__)
            return None
        if len(val.labels) < MIN_VAL_IMAGES:
            log.warning(
                "No shift reference: %d validation images (%d needed).",
                len(val.labels),
                MIN_VAL_IMAGES,
            )
            return None
        feats, probs = _split_features(module, dm, "val")
        return ShiftReference.fit(
            feats,
            reference_scores(probs),
            seed=self.seed,
            fitted_on="val",
            feature="penultimate layer (timm forward_head pre_logits)",
            score="softmax p(class 1)" if probs.shape[1] == 2 else "softmax max probability",
        )

    def _stress(
        self,
        module: L.LightningModule,
        dm: L.LightningDataModule,
        threshold: float | None,
        reference: ShiftReference | None,
    ) -> list[dict]:
        reading = _reading(dm, self.stress_split)
        if reading is None:
            log.warning(
                "Stress test skipped: the %s split has no files to re-read.", self.stress_split
            )
            return []
        paths, labels, size, intensity = reading
        return stress.stress_table(
            module, paths, labels, size, intensity, threshold, self.stress_shifts, reference,
            seed=self.seed,
        )  # fmt: skip


def _reading(dm: L.LightningDataModule, split: str) -> tuple | None:
    """(paths, labels, image size, intensity method) of a split read from files, else None."""
    samples = getattr(dm, "splits", {}).get(split)
    size = getattr(dm, "image_size", None)
    if samples is None or size is None or not getattr(samples, "paths", None):
        return None
    if not Path(samples.paths[0]).is_file():  # arrays named like files (MedMNIST's npz:split[i])
        return None
    return samples.paths, samples.labels, int(size), getattr(dm, "intensity", "none")


def _split_features(module: L.LightningModule, dm: L.LightningDataModule, split: str) -> tuple:
    """(features, probabilities) of a split, read as `medx.predict` reads files (no decoded
    cache), so that a reference and the images it will be compared with share every step;
    from the split's loader when it has no files (arrays)."""
    reading = _reading(dm, split)
    if reading is not None:
        paths, labels, size, intensity = reading
        return stress.features_and_probs(module, ShiftedImages(paths, labels, size, intensity))
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    with torch.inference_mode():
        out = [module.embed(batch[0].to(module.device)) for batch in loader]
    feats = torch.cat([f for f, _ in out]).double().cpu().numpy()
    return feats, calibration.softmax(torch.cat([z for _, z in out]).double().cpu().numpy())


def _check_test(
    module: L.LightningModule, dm: L.LightningDataModule, reference: ShiftReference
) -> dict[str, float]:
    """The monitor on the test split: in distribution, it should not fire."""
    feats, probs = _split_features(module, dm, "test")
    report = reference.test(feats, reference_scores(probs))
    log.info("Test split against the val reference: %s", report.summary())
    return {
        "test/shift_p_value": report.p_value,
        "test/shift_effect": report.effect,
        "test/ood_rate": report.ood_rate,
    }


def _remember_choices(
    trainer: L.Trainer,
    module: L.LightningModule,
    found: dict[str, float],
    target: float,
    tta: bool,
    reference: ShiftReference | None = None,
) -> None:
    """The operating point and temperature chosen on validation go into the model card, and
    into the tested checkpoint file (the one the run selected), so the model carries them.
    With TTA the operating point is TTA's own (`operating_point_tta`): a threshold chosen on
    plain probabilities does not hold for averaged ones.

    The shift reference goes there too; a checkpoint evaluated by `medx.eval` (no tested
    file of a fit) gets the reference only, and only when it has none: that is how a model
    trained before the monitor is given one, and nothing it was shipped with changes."""
    choices = {}
    if "test/threshold_at_op" in found:
        choices["operating_point_tta" if tta else "operating_point"] = {
            "threshold": found["test/threshold_at_op"],
            "target_sensitivity": float(target),
            "chosen_on": "val",
            "tta": tta,
        }
    if "test/temperature" in found and not tta:
        choices["calibration"] = {"temperature": found["test/temperature"], "fitted_on": "val"}
    if reference is not None:
        choices["shift_reference"] = reference.to_dict()
    card = getattr(module, "card", None)
    if not choices or card is None:
        return
    had_reference = bool(card.get("shift_reference"))
    card.update(choices)
    tested = trainer.ckpt_path
    if tested and Path(tested).is_file():
        update_card(tested, **choices)
        log.info("Operating point, temperature and shift reference written into %s", tested)
        return
    source = card.get("checkpoint")
    if reference is not None and not had_reference and source and Path(source).is_file():
        update_card(source, shift_reference=choices["shift_reference"])
        log.info("Shift reference of the validation images written into %s", source)


@torch.inference_mode()
def _predict(module: L.LightningModule, loader: DataLoader, tta: bool = False) -> Predictions:
    """Logits of a split; with TTA the log of the views' mean probability."""
    tta = tta and getattr(module, "inputs", "image") == "image"  # features have no views
    was_training = module.training
    module.eval()
    logits, labels = [], []
    for batch in loader:
        x, y = batch[0].to(module.device), batch[1]
        logits.append((tta_logits(module, x) if tta else module(x)).float().cpu())
        labels.append(torch.as_tensor(y))
    module.train(was_training)
    return Predictions(torch.cat(logits).double().numpy(), torch.cat(labels).long().numpy())


def _history(trainer: L.Trainer) -> dict[str, list[tuple[int, float]]]:
    """train/ and val/ metric histories of the (first) MLflow run, for the training curves."""
    for logger in runs.mlflow_loggers(trainer.loggers):
        client, run_id = logger.experiment, logger.run_id
        keys = [k for k in client.get_run(run_id).data.metrics if k.startswith(("train/", "val/"))]
        keys = [k for k in keys if not k.endswith(("_at_op", "nll", "nll_calibrated"))]
        return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in keys}
    return {}
