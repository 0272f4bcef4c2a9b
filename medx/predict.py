"""`python -m medx.predict MODEL INPUT [--out DIR]`: use a trained model on images.

MODEL is a checkpoint (.ckpt), a registered model (`models:/NAME/VERSION`,
`models:/NAME@ALIAS`) or an ONNX export (.onnx); it says what it is. This command is the
command-line door to `medx.inference`, which does the work: the answers are the service's and
the MLflow pyfunc's for the same image.

Shift monitor (a classifier whose card keeps a shift reference of its validation images,
written by its evaluation): every row gets `ood_score` (about 1 for a typical validation
image) and `ood_flag` (above the 99th percentile of validation images); a folder is also
tested as a set against the validation images (MMD permutation test of the features and a KS
test of the scores), its p-value, verdict and effect size printed in one line and written to
OUT/shift.json. One image gets its own columns only: a set test needs a set. A checkpoint
without a reference (add one with `python -m medx.eval ckpt_path=CKPT`), or an ONNX export,
is said to have no monitor, once, and predicts all the same.

- A classifier gives one row per image: a calibrated probability per class (the temperature
  fitted on validation; `--no-calibration` for the raw softmax), the predicted class and, for
  binary models, the decision at the operating point chosen on validation, with the threshold,
  its scale (`threshold_scale`: the probabilities' own, calibrated or raw) and where it came
  from. One image prints one line; a folder (searched recursively; JPEG, PNG, BMP, TIFF,
  WebP, DICOM) writes `predictions.csv` under `--out`, streaming through DataLoader workers,
  so a folder of 50,000 files never sits in memory. A file that cannot be read gets its reason
  in the `error` column and the run goes on.
- A segmenter writes one mask PNG (0/255) per image, at the image's own size, mirroring the
  input folder's tree.

Options add Grad-CAM overlays (`--gradcam`, under OUT/gradcam/, mirroring the input tree),
test-time augmentation (`--tta`), a quality gate (`--qc QC_MODEL`), lung masks and the share
of the Grad-CAM inside them (`--lungs SEG_MODEL`), and the clinical metrics for a labelled
folder `root/<class>/...` (`--labels`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m medx.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint",
        metavar="MODEL",
        help="a medx checkpoint (.ckpt), models:/NAME/VERSION, models:/NAME@ALIAS, or .onnx",
    )
    p.add_argument("input", type=Path, help="an image file (JPEG/PNG/DICOM/...) or a folder")
    p.add_argument("output", type=Path, nargs="?", help="same as --out (segmentation masks)")
    p.add_argument("--out", type=Path, help="folder for predictions.csv, overlays and masks")
    p.add_argument("--no-calibration", action="store_true", help="raw softmax probabilities")
    p.add_argument(
        "--threshold",
        type=float,
        help="classifier: p(positive) for the decision, on the probabilities' scale (default: "
        "the checkpoint's operating point); segmenter: mask probability (default: the model's)",
    )
    p.add_argument("--tta", action="store_true", help="average chest-X-ray-safe views")
    p.add_argument("--gradcam", action="store_true", help="write Grad-CAM overlays to OUT/gradcam")
    p.add_argument("--gradcam-layer", help="target layer (default: by backbone family)")
    p.add_argument("--gradcam-class", help="class to explain (default: the predicted one)")
    p.add_argument("--qc", help="a data=quality model: quality gate")
    p.add_argument("--qc-mode", default="flag", help="flag (default) or refuse bad images")
    p.add_argument("--qc-threshold", type=float, help="p_bad at or above: bad (default: its op)")
    p.add_argument("--lungs", help="a lung segmentation model: masks, CAM share")
    p.add_argument("--labels", action="store_true", help="root/<class>/...: clinical metrics")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (0: none)")
    p.add_argument(
        "--max-pixels", type=float, help="refuse larger images before decoding (default 50e6)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    seg = p.add_argument_group("segmentation")
    seg.add_argument("--postprocess", help="none or lungs (default: the model's)")
    seg.add_argument("--skip-bad-images", action="store_true", help="skip unreadable files")
    return p


def main(argv: list[str] | None = None) -> list[Any]:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from medx.cli import user_errors

    out = args.out or args.output
    with user_errors("medx.predict"):
        from medx.inference import MAX_PIXELS, open_model

        args.max_pixels = int(args.max_pixels or MAX_PIXELS)
        model = open_model(args.checkpoint)
        if model.card.get("task", getattr(model, "task", None)) == "segmentation":
            return _segment(model, args, out)
        return _classify(model, args, out)


# --- classification -------------------------------------------------------------------------


def _classify(model: Any, args: argparse.Namespace, out: Path | None) -> list[dict[str, Any]]:
    from medx.errors import DataError
    from medx.inference import Predictor, QualityGate, Segmenter, find_inputs

    max_pixels = args.max_pixels
    predictor = Predictor(
        model,
        calibrated=not args.no_calibration,
        threshold=args.threshold,
        tta=args.tta,
        quality=QualityGate.from_checkpoint(args.qc, args.qc_threshold, args.qc_mode)
        if args.qc
        else None,
        lungs=Segmenter.from_checkpoint(args.lungs, max_pixels=max_pixels) if args.lungs else None,
        gradcam=args.gradcam,
        gradcam_layer=args.gradcam_layer,
        gradcam_class=args.gradcam_class,
        max_pixels=max_pixels,
        source=args.checkpoint,
    )
    paths = find_inputs(args.input)
    if args.gradcam and out is None and len(paths) > 1:
        raise DataError("--gradcam writes overlays: give --out FOLDER.")
    overlays = _overlay_files(paths, args.input, out) if args.gradcam and out else {}
    writer = _CsvRows(out / "predictions.csv") if out else None
    rows = []
    stream = _shift_tested(predictor.stream(paths, args.batch_size, args.workers), paths, out)
    for answer in _progress(stream, len(paths), not args.no_progress):
        row = _row(answer, predictor)
        if answer.overlay is not None and answer.source in overlays:
            row["gradcam"] = _write_overlay(answer.overlay, overlays[answer.source])
        rows.append(row)
        if writer:
            writer.write(row)
    if writer:
        writer.close()
    if args.labels:
        _labelled_metrics(rows, predictor.classes, paths, out, predictor.rule)
    if out is None or len(paths) == 1:
        for row in rows:
            print(_one_line(row))
    failed = sum(bool(r.get("error")) for r in rows)
    if out is not None:
        print(f"{len(rows)} images ({failed} failed): {out / 'predictions.csv'}")
    return rows


def _row(answer: Any, predictor: Any) -> dict[str, Any]:
    """One CSV row of a `medx.inference.Prediction`."""
    row: dict[str, Any] = {"path": answer.source, "model": answer.model}
    if answer.error:
        row["error"] = answer.error
        log.warning("%s", answer.error)
        return row
    probs = answer.probabilities or {}
    row.update({f"p_{c}": f"{probs[c]:.6f}" if probs else "" for c in predictor.classes})
    row["predicted"] = answer.predicted or ""
    row["temperature"] = f"{answer.temperature:.4f}"
    rule = predictor.rule
    if rule is not None:
        row["decision"] = answer.decision.label if answer.decision else ""
        row["threshold"] = f"{rule.threshold:.6f}"
        row["threshold_scale"] = rule.scale
        row["threshold_source"] = rule.source
    if answer.quality is not None:
        row["qc_p_bad"] = f"{answer.quality.p_bad:.4f}"
        row["qc_verdict"] = answer.quality.verdict
        if answer.quality.reason:
            row["qc_reason"] = answer.quality.reason
    if answer.cam_in_lungs is not None:
        row["cam_in_lungs"] = f"{answer.cam_in_lungs:.4f}"
        row["shortcut_alarm"] = "yes" if answer.shortcut_alarm else "no"
    if answer.ood_score is not None:
        row["ood_score"] = f"{answer.ood_score:.4f}"
        row["ood_flag"] = "yes" if answer.ood_flag else "no"
    row["error"] = ""
    return row


def _shift_tested(stream: Any, paths: Sequence[Path], out: Path | None) -> Iterator[Any]:
    """The predictions of `stream`; after the last, for a folder, the shift monitor's test of
    the whole set: one line, and OUT/shift.json (with `status` "unavailable" and its reason
    when the model has no monitor, which the predictor has said already)."""
    yield from stream
    if len(paths) < 2:
        return  # one image: its ood columns; a set test needs a set
    report = stream.shift_report()
    if report is not None:
        found = {"status": "tested", **report.to_dict()}
        found["reference"] = stream.sample.monitor.reference.info
        print(report.summary())
    elif stream.sample is not None:
        found = {"status": "not tested", "reason": "fewer than 2 images were classified"}
        print(f"shift monitor: not tested ({found['reason']}; a set test needs a set)")
    else:
        found = {"status": "unavailable", "reason": stream.unavailable}
    if out is not None:
        (out / "shift.json").write_text(json.dumps(found, indent=2))


def _overlay_files(paths: Sequence[Path], root: Path, out: Path) -> dict[str, Path]:
    """Each input's overlay file under OUT/gradcam/, mirroring the input tree, none shared."""
    from medx.inference.naming import output_names

    names = output_names(paths, root)
    return {str(p): out / "gradcam" / name for p, name in zip(paths, names, strict=True)}


def _write_overlay(picture: Any, target: Path) -> str:
    import cv2

    from medx.errors import DataError

    target.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(target), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
        raise DataError(f"Could not write {target}; check that the folder is writable.")
    return str(target)


class _CsvRows:
    """predictions.csv written row by row; columns grow in a fixed order as they appear."""

    ORDER = (
        "path",
        "model",
        "predicted",
        "decision",
        "threshold",
        "threshold_scale",
        "threshold_source",
    )

    def __init__(self, path: Path) -> None:
        from medx.errors import DataError

        if path.parent.exists() and not path.parent.is_dir():
            raise DataError(f"--out {path.parent} is a file; give a folder for the outputs.")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.rows = path, []

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) % 256 == 0:
            self._flush()

    def close(self) -> None:
        self._flush()
        log.info("Wrote %d rows to %s", len(self.rows), self.path)

    def _flush(self) -> None:
        keys: list[str] = [k for k in self.ORDER if any(k in r for r in self.rows)]
        for row in self.rows:
            keys += [k for k in row if k not in keys and k != "error"]
        keys.append("error")
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, keys, restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)


def _progress(stream: Iterable, total: int, show: bool) -> Iterator:
    if not show or total < 2:
        yield from stream
        return
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task("Predicting", total=total)
        for item in stream:
            yield item
            bar.advance(task, 1)


def _labelled_metrics(
    rows: list[dict[str, Any]],
    classes: list[str],
    paths: Sequence[Path],
    out_dir: Path | None,
    rule: Any,
) -> dict[str, float]:
    """`--labels`: the true class is the folder `root/<class>/...`; metrics with 95% CIs."""
    import numpy as np

    from medx.errors import DataError
    from medx.evaluation import metrics

    labels, probs = [], []
    for row, path in zip(rows, paths, strict=True):
        label = next((c for c in path.parts[::-1][1:] if c in classes), None)
        if label is None or row.get("error") or not row.get(f"p_{classes[0]}"):
            continue
        labels.append(classes.index(label))
        probs.append([float(row[f"p_{c}"]) for c in classes])
    if not labels:
        raise DataError(
            f"--labels: no image lies in a folder named after a class ({', '.join(classes)})."
        )
    y, p = np.asarray(labels), np.asarray(probs)
    threshold = rule.threshold if rule is not None else None
    found = metrics.classification_metrics(y, p, threshold)
    for name, (low, high) in metrics.bootstrap_ci(y, p, 1000, 0, threshold=threshold).items():
        found[f"{name}_ci_low"], found[f"{name}_ci_high"] = low, high
    found["images"] = len(y)
    if out_dir is not None:
        (out_dir / "metrics.json").write_text(json.dumps(found, indent=2))
    print("  ".join(f"{k} {v:.4f}" for k, v in found.items() if isinstance(v, float)))
    return found


def _one_line(row: dict[str, Any]) -> str:
    if row.get("error"):
        return f"{row['path']}: error: {row['error']}"
    probs = ", ".join(f"{k[2:]} {v}" for k, v in row.items() if k.startswith("p_") and v)
    line = f"{row['path']}: {row.get('predicted') or '-'} ({probs})"
    if row.get("decision"):
        line += (
            f"; at threshold {row['threshold']} {row['threshold_scale']} "
            f"({row['threshold_source']}): {row['decision']}"
        )
    if row.get("qc_verdict"):
        line += f"; quality {row['qc_verdict']} (p_bad {row['qc_p_bad']})"
    return line


# --- segmentation ---------------------------------------------------------------------------


def _segment(model: Any, args: argparse.Namespace, out: Path | None) -> list[Path]:
    from medx.errors import DataError
    from medx.inference import Segmenter

    if out is None:
        raise DataError("A segmentation checkpoint writes masks: give --out FOLDER.")
    segmenter = Segmenter(model, args.threshold, args.postprocess, args.max_pixels, args.checkpoint)
    paths = _write_masks(segmenter, args.input, out, args.skip_bad_images)
    print(f"{len(paths)} masks written to {out}")
    return paths


def predict_folder(
    ckpt_path: str | Path,
    input_dir: str | Path,
    output_dir: str | Path,
    threshold: float | None = None,
    skip_bad_images: bool = False,
    postprocess: str | None = None,
    max_pixels: int | None = None,
) -> list[Path]:
    """Write one mask PNG per image under `input_dir` into `output_dir` (mirroring its tree);
    returns the mask paths. `threshold` and `postprocess` (a `model.postprocess` name) default
    to the model's. A bad file stops the run, naming it, unless `skip_bad_images`."""
    from medx.inference import MAX_PIXELS, Segmenter

    segmenter = Segmenter.from_checkpoint(
        ckpt_path, threshold, postprocess, max_pixels or MAX_PIXELS
    )
    return _write_masks(segmenter, Path(input_dir), Path(output_dir), skip_bad_images)


def _write_masks(segmenter: Any, inputs: Path, out: Path, skip_bad_images: bool) -> list[Path]:
    import cv2

    from medx.data.io import BadImageError, with_hint
    from medx.errors import DataError
    from medx.inference import find_inputs
    from medx.inference.naming import output_names

    if out.exists() and not out.is_dir():
        raise DataError(f"Output {out} is a file; give a folder for the masks.")
    out.mkdir(parents=True, exist_ok=True)
    paths = find_inputs(inputs)
    written = []
    for path, name in zip(paths, output_names(paths, inputs), strict=True):
        try:
            image = segmenter.read(path)
        except BadImageError as err:
            if not skip_bad_images:
                hint = "Delete or replace the file, or pass --skip-bad-images to skip bad images."
                raise BadImageError(f"{with_hint(err, '')} {hint}", path) from err
            log.warning("Skipping %s", err)
            continue
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(target), segmenter.mask(image)):
            raise DataError(f"Could not write {target}; check that the folder is writable.")
        written.append(target)
    log.info("Wrote %d masks to %s", len(written), out)
    return written


if __name__ == "__main__":
    main()
