"""`python -m medx.calibrate MODEL LABELLED --out NEW.ckpt`: fit a model to a new site.

Re-chooses a binary classifier's operating point (the same target sensitivity, or
`--target-sensitivity`) and refits its temperature on the site's labelled sample, with 95%
bootstrap intervals (`medx.evaluation.site`), and writes a new checkpoint whose card keeps the
replaced operating point (`previous_operating_points`) and records where the new one came from
(sample size, class counts, data digest, date, the site's shift test against the model's
validation reference). MODEL is a .ckpt file or a `models:/NAME/VERSION` URI; LABELLED a folder
`root/<class>/...` or a CSV with columns `path,label`. The model file is not changed.

The images are read and predicted by the inference core (`medx.inference.Predictor`), as
`medx.predict` and `medx.serve` read them: raw softmax probabilities, and in the same pass the
features of the shift test. `medx.predict`, `medx.serve` and the MLflow pyfunc of the new
checkpoint decide at the new threshold and say so: `threshold_source` "site calibration DATE
on N images, sensitivity S".
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("medx.calibrate")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m medx.calibrate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="a medx classifier checkpoint (.ckpt) or models:/NAME/VERSION")
    p.add_argument("labelled", type=Path, help="root/<class>/... or a path,label CSV")
    p.add_argument("--out", type=Path, required=True, help="the new checkpoint (.ckpt)")
    p.add_argument(
        "--target-sensitivity",
        type=float,
        help="sensitivity the threshold must reach (default: the model's operating point's)",
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (0: none)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from medx.cli import user_errors

    with user_errors("medx.calibrate"):
        return calibrate(args)


def calibrate(args: argparse.Namespace) -> dict[str, Any]:
    """Everything after parsing (heavy imports here)."""
    import numpy as np

    from medx.data.labelled import read_labelled
    from medx.errors import CheckpointError, ConfigError, DataError
    from medx.evaluation import site
    from medx.inference import Predictor, backend_of, open_model
    from medx.inference.shift import ShiftUnavailable, monitor_for
    from medx.models.load import update_card

    if args.target_sensitivity is not None and not 0 < args.target_sensitivity <= 1:
        raise ConfigError(f"--target-sensitivity={args.target_sensitivity} must be in (0, 1].")
    if args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a folder; give the new checkpoint's file name.")
    source = _resolve(args.model)  # once: the file calibrated is the file copied
    model = open_model(source)
    model.card["checkpoint"] = str(args.model)  # named as given, as open_model(URI) does
    if backend_of(model) == "onnxruntime":
        raise ConfigError(
            f"{args.model} is an ONNX export; medx.calibrate writes a new checkpoint: give the "
            ".ckpt (or models:/ URI) it was exported from, and export the new one again."
        )
    card = model.card
    names = list(card.get("class_names") or [])
    if getattr(model, "task", None) != "classification" or len(names) != 2:
        raise CheckpointError(
            f"{args.model}: site calibration is for binary classifiers (this one: "
            f"{getattr(model, 'task', '?')}, classes {names}); give a two-class classifier."
        )
    monitor, reason = monitor_for(model, str(args.model))
    if monitor is None:
        raise ShiftUnavailable(reason)
    target = args.target_sensitivity or (card.get("operating_point") or {}).get(
        "target_sensitivity"
    )
    if target is None:
        raise CheckpointError(
            f"{args.model} has no operating point to re-choose: give --target-sensitivity "
            "(e.g. 0.95)."
        )
    sample = read_labelled(args.labelled, names)
    warnings = site.check_sample(np.asarray(sample.labels), names, str(args.labelled))
    predictor = Predictor(model, calibrated=False, monitor=monitor, source=str(args.model))
    stream = predictor.stream(sample.paths, args.batch_size, args.workers)
    answers = list(stream)
    failed = [a.error for a in answers if a.error]
    if failed:
        raise DataError(
            f"{args.labelled}: {len(failed)} of {len(answers)} images cannot be read (e.g. "
            f"{failed[0]}); replace or remove them, so that the sample calibrated on is the "
            "one its provenance describes."
        )
    probs = np.array([[a.probabilities[c] for c in names] for a in answers], np.float64)
    logits = np.log(np.clip(probs, 1e-300, None))  # softmax(log p / T) = softmax(z / T)
    labels = np.asarray(sample.labels)
    found = site.recalibrate(logits, labels, float(target), args.bootstrap, args.seed)
    shift = stream.shift_report()
    provenance = {
        "by": "medx.calibrate",
        "source": str(args.labelled),
        "class_counts": sample.counts(names),
        "data_digest": "sha256:" + sample.digest(),
        "model": str(args.model),
        "shift": shift.to_dict(),
    }
    entries = site.card_entries(card, found, provenance)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if Path(source).resolve() != args.out.resolve():
        shutil.copyfile(source, args.out)
    update_card(args.out, **entries)
    for line in warnings:
        log.warning("%s: %s", args.labelled, line)
    _print(args, card, found, shift.summary())
    return entries


def _resolve(model: str) -> Path:
    """The local file of a checkpoint path or a `models:/` URI (an alias read once)."""
    from medx.inference.opening import is_model_uri

    if is_model_uri(model):
        from medx.tracking.registry import resolve_model_uri

        return Path(resolve_model_uri(model))
    return Path(model)


def _print(args: argparse.Namespace, card: dict, found: Any, shift: str) -> None:
    old = card.get("operating_point") or {}
    old_t = f"{old['threshold']:.4f}" if "threshold" in old else "none"
    print(
        f"{args.labelled}: {found.images} images ({found.positives} positive); {shift}\n"
        f"operating point for sensitivity {found.target_sensitivity:.2f}: threshold "
        f"{found.threshold:.4f} (95% CI {found.threshold_ci[0]:.4f}-{found.threshold_ci[1]:.4f};"
        f" was {old_t}), on new images of this site: sensitivity "
        f"{found.sensitivity_ci[0]:.3f}-{found.sensitivity_ci[1]:.3f}, specificity "
        f"{found.specificity_ci[0]:.3f}-{found.specificity_ci[1]:.3f}\n"
        f"temperature {found.temperature:.3f} (was "
        f"{(card.get('calibration') or {}).get('temperature', 1.0):.3f})\n"
        f"written to {args.out}"
    )


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
