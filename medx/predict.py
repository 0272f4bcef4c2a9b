"""`python -m medx.predict MODEL INPUT [--out DIR]`: use a trained model on images.

MODEL is a checkpoint (.ckpt), a registered model (`models:/NAME/VERSION`,
`models:/NAME@ALIAS`) or an ONNX export (.onnx); it says what it is. This command is the
command-line door to `medx.inference`, which does the work: the answers are the service's and
the MLflow pyfunc's for the same image.

- A classifier gives one row per image: a calibrated probability per class (the temperature
  fitted on validation; `--no-calibration` for the raw softmax), the predicted class and, for
  binary models, the decision at the operating point chosen on validation, with the threshold,
  its scale (`threshold_scale`: the probabilities' own, calibrated or raw) and where it came
  from. One image prints one line; a folder (searched recursively; JPEG, PNG, BMP, TIFF,
  WebP, DICOM) writes `predictions.csv` under `--out`, streaming through DataLoader workers,
  so a folder of 50,000 files never sits in memory. A file that cannot be read gets its reason
  in the `error` column and the run goes on; what a folder holds besides images (broken
  symlinks, other files) is left out and counted.
- A segmenter writes one mask PNG (0/255) per image, at the image's own size, mirroring the
  input folder's tree.

Options add Grad-CAM overlays (`--gradcam`, under OUT/gradcam/, mirroring the input tree; two
inputs never share an overlay, and each row names its own in the `gradcam` column),
test-time augmentation (`--tta`), a quality gate (`--qc QC_MODEL`), lung masks and the share
of the Grad-CAM inside them (`--lungs SEG_MODEL`), and the clinical metrics of a labelled set
(`--labels`). An option that would change nothing for this model or these options is refused.

The shift monitor (a classifier whose card keeps a shift reference of its validation images,
written by its evaluation): every row gets `ood_score` (about 1 for a typical validation
image) and `ood_flag` (above the 99th percentile of validation images); a folder is also
tested as a set against the validation images (MMD permutation test of the features and a KS
test of the scores), its p-value, verdict and effect size printed in one line and written to
OUT/shift.json. One image gets its own columns only: a set test needs a set. A checkpoint
without a reference (add one with `python -m medx.eval ckpt_path=CKPT`), or an ONNX export,
is said to have no monitor, once, and predicts all the same.

--labels (metrics with 95% CIs, printed and written to OUT/metrics.json):
  --labels            class folders: the folder directly under INPUT names the class of every
                      image below it (INPUT/NORMAL/..., INPUT/OPACITY/...).
  --labels FILE.csv   a CSV file with a header row and the columns path,label: a relative
                      path is relative to the CSV file's folder, an absolute one is itself;
                      label is a class name of the model (or its index, 0 for the first).
  The counts come first: images matched to each class, unmatched ones (a folder or label
  that names no class of the model, an image outside any class folder or not in the CSV,
  each named), failed ones. No metrics are computed when a class has no image.

Exit status:
  0  every input was predicted (an image the quality gate refused counts: its row says so)
  1  an error, one line on stderr (a bad option, a model or --out that cannot be used,
     --labels that cannot be scored), or no input could be predicted
  2  the command line could not be parsed
  3  some inputs were predicted and some failed: the counts are printed, and each failed
     row's `error` says why
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    about, labels, exits = __doc__.partition("\n--labels (")  # the last two after the options
    p = argparse.ArgumentParser(
        prog="python -m medx.predict",
        description=about,
        epilog=(labels + exits).strip(),
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
    p.add_argument("--qc-mode", choices=("flag", "refuse"), help="flag (default) or refuse bad")
    p.add_argument("--qc-threshold", type=float, help="p_bad at or above: bad (default: its op)")
    p.add_argument("--lungs", help="a lung segmentation model: masks, CAM share")
    p.add_argument(
        "--labels",
        nargs="?",
        const=True,
        type=Path,
        metavar="CSV",
        help="clinical metrics: by class folders INPUT/<class>/..., or a path,label CSV file",
    )
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


# Exit statuses (see the module docstring).
ALL_PREDICTED, FAILED, USAGE, PARTIAL = 0, 1, 2, 3

# Options that only a classifier uses, and only a segmenter (flag: its argparse dest).
CLASSIFIER_ONLY = {
    "--tta": "tta",
    "--gradcam": "gradcam",
    "--gradcam-layer": "gradcam_layer",
    "--gradcam-class": "gradcam_class",
    "--qc": "qc",
    "--lungs": "lungs",
    "--labels": "labels",
    "--no-calibration": "no_calibration",
}
SEGMENTER_ONLY = {"--postprocess": "postprocess"}


@dataclass
class Outcome:
    """How many inputs a run had and how many of them failed: its exit status."""

    inputs: int
    failed: int

    @property
    def status(self) -> int:
        if not self.failed:
            return ALL_PREDICTED
        return FAILED if self.failed >= self.inputs else PARTIAL


def main(argv: list[str] | None = None) -> list[Any]:
    """The rows of a classifier (dicts, as in predictions.csv) or the mask files of a
    segmenter, for Python callers; `run` is the command line, with its exit status."""
    return _main(argv)[0]


def run(argv: list[str] | None = None) -> int:
    """`python -m medx.predict`: `main` and its exit status (see the module docstring)."""
    return _main(argv)[1].status


def _main(argv: list[str] | None) -> tuple[list[Any], Outcome]:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from medx.cli import user_errors

    out = args.out or args.output
    with user_errors("medx.predict"):
        from medx.inference import MAX_PIXELS, open_model
        from medx.inference.naming import writable_folder

        _check_options(args, out)
        args.max_pixels = int(args.max_pixels or MAX_PIXELS)
        if out is not None:
            writable_folder(out)
        model = open_model(args.checkpoint)
        segmenter = model.card.get("task", getattr(model, "task", None)) == "segmentation"
        _check_options_for(args, segmenter)
        if segmenter:
            return _segment(model, args, out)
        return _classify(model, args, out)


def _check_options(args: argparse.Namespace, out: Path | None) -> None:
    """Refuse, in one line and before a model is opened, options that are out of range or
    that would change nothing."""
    import math

    from medx.errors import ConfigError
    from medx.inference import check_threshold

    if args.threshold is not None:
        check_threshold(args.threshold)
    if args.qc_threshold is not None:
        check_threshold(args.qc_threshold, "--qc-threshold")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: give 1 or more images per batch.")
    if args.workers < 0:
        raise ConfigError(f"--workers {args.workers}: give 0 (read in this process) or more.")
    if args.max_pixels is not None and not (
        math.isfinite(args.max_pixels) and args.max_pixels >= 1
    ):
        raise ConfigError(f"--max-pixels {args.max_pixels}: give a positive number, e.g. 50e6.")
    explained, qc = args.gradcam or args.lungs, "--qc QC_MODEL"
    for flag, given, needs in (
        ("--qc-mode", args.qc_mode is not None, None if args.qc else qc),
        ("--qc-threshold", args.qc_threshold is not None, None if args.qc else qc),
        ("--gradcam-class", args.gradcam_class is not None, None if explained else "--gradcam"),
        ("--gradcam-layer", args.gradcam_layer is not None, None if explained else "--gradcam"),
        ("--gradcam", args.gradcam, None if out else "--out FOLDER (overlays are files)"),
    ):
        if given and needs:
            raise ConfigError(f"{flag} does nothing without {needs}; add it, or leave {flag} out.")


def _check_options_for(args: argparse.Namespace, segmenter: bool) -> None:
    """Refuse options that this kind of model does not use."""
    from medx.errors import ConfigError

    wrong = CLASSIFIER_ONLY if segmenter else SEGMENTER_ONLY
    given = [flag for flag, dest in wrong.items() if getattr(args, dest) not in (None, False)]
    if given:
        kind, users = (
            ("segmentation", "classifiers") if segmenter else ("classification", "segmenters")
        )
        raise ConfigError(
            f"{given[0]} is for {users}; {args.checkpoint} is a {kind} model: leave it out."
        )
    if args.skip_bad_images and not segmenter:
        log.warning(
            "--skip-bad-images changes nothing for a classifier: it always goes on past a file "
            "that cannot be read, whose row says why."
        )


# --- classification -------------------------------------------------------------------------


def _classify(
    model: Any, args: argparse.Namespace, out: Path | None
) -> tuple[list[dict[str, Any]], Outcome]:
    from medx.inference import Predictor, QualityGate, find_inputs

    max_pixels = args.max_pixels
    predictor = Predictor(
        model,
        calibrated=not args.no_calibration,
        threshold=args.threshold,
        tta=args.tta,
        quality=QualityGate.from_checkpoint(args.qc, args.qc_threshold, args.qc_mode or "flag")
        if args.qc
        else None,
        lungs=_lungs(args.lungs, max_pixels) if args.lungs else None,
        gradcam=args.gradcam,
        gradcam_layer=args.gradcam_layer,
        gradcam_class=args.gradcam_class,
        max_pixels=max_pixels,
        source=args.checkpoint,
    )
    skipped: Counter[str] = Counter()
    paths = find_inputs(args.input, skipped)
    overlays = _overlay_files(paths, args.input, out) if args.gradcam and out else {}
    writer = _CsvRows(out / "predictions.csv") if out else None
    printed = out is None or len(paths) == 1
    rows = []
    stream = predictor.stream(paths, args.batch_size, args.workers)
    for answer in _progress(stream, len(paths), not args.no_progress):
        row = _row(answer, predictor)
        if answer.overlay is not None and answer.source in overlays:
            row["gradcam"] = _write_overlay(answer.overlay, overlays[answer.source])
        if row["error"] and not printed:
            log.warning("%s", row["error"])
        rows.append(row)
        if writer:
            writer.write(row)
    if writer:
        writer.close()
    if printed:
        for row in rows:
            print(_one_line(row))
    outcome = Outcome(len(rows), sum(bool(r["error"]) for r in rows))
    if len(paths) > 1 or out is not None:
        print(_counts(rows, outcome, skipped, out))
    _shift_report(stream, paths, out)
    if args.labels:
        labels = None if args.labels is True else args.labels
        _labelled_metrics(rows, predictor.classes, paths, args.input, labels, out, predictor.rule)
    _say_none_predicted(outcome)
    return rows, outcome


def _lungs(source: str, max_pixels: int) -> Any:
    """The `--lungs` segmenter (DataError naming the flag when it is no segmenter)."""
    from medx.errors import DataError
    from medx.inference import Segmenter

    try:
        return Segmenter.from_checkpoint(source, max_pixels=max_pixels)
    except DataError as err:
        raise DataError(f"--lungs needs a lung segmentation model: {err}") from err


def _counts(
    rows: list[dict[str, Any]], outcome: Outcome, skipped: Counter[str], out: Path | None
) -> str:
    """The run in one line: images, predicted, failed, what was left out, where it went."""
    refused = sum(bool(not r["error"] and r.get("qc_reason")) for r in rows)
    line = f"{outcome.inputs} images: {outcome.inputs - outcome.failed} predicted"
    if refused:
        line += f" ({refused} refused by the quality gate)"
    line += f", {outcome.failed} failed"
    if skipped:
        from medx.data.io import SKIP_REASONS

        left = ", ".join(f"{n} {SKIP_REASONS[k].split(' (')[0]}" for k, n in skipped.items())
        line += f"; left out: {left}"
    return line + (f": {out / 'predictions.csv'}" if out is not None else "")


def _say_none_predicted(outcome: Outcome) -> None:
    if outcome.status == FAILED:
        import sys

        what = "the input" if outcome.inputs == 1 else f"any of the {outcome.inputs} inputs"
        print(f"medx.predict: could not predict {what}; see the errors above.", file=sys.stderr)


def _row(answer: Any, predictor: Any) -> dict[str, Any]:
    """One CSV row of a `medx.inference.Prediction`."""
    row: dict[str, Any] = {"path": answer.source, "model": answer.model}
    if answer.error:
        row["error"] = answer.error
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


def _shift_report(stream: Any, paths: Sequence[Path], out: Path | None) -> None:
    """For a folder, once `stream` is spent: the shift monitor's test of the whole set, one
    line, and OUT/shift.json (`status` "unavailable" with its reason when the model has no
    monitor, which the predictor has said already)."""
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
        from medx.inference.naming import writing

        with writing(out / "shift.json"):
            (out / "shift.json").write_text(json.dumps(found, indent=2))


def _overlay_files(paths: Sequence[Path], root: Path, out: Path) -> dict[str, Path]:
    """Each input's overlay file under OUT/gradcam/, mirroring the input tree, none shared."""
    from medx.inference.naming import output_names

    names = output_names(paths, root)
    return {str(p): out / "gradcam" / name for p, name in zip(paths, names, strict=True)}


def _write_overlay(picture: Any, target: Path) -> str:
    import cv2

    _write_png(target, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    return str(target)


def _write_png(target: Path, pixels: Any) -> None:
    import cv2

    from medx.errors import DataError
    from medx.inference.naming import writing

    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(target), pixels):
            raise DataError(f"Could not write {target}; check that the folder is writable.")


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
        from medx.inference.naming import writable_folder

        writable_folder(path.parent)
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
        from medx.inference.naming import writing

        tmp = self.path.with_suffix(".csv.tmp")
        with writing(self.path):
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
    root: Path,
    labels: Path | None,
    out_dir: Path | None,
    rule: Any,
) -> dict[str, Any]:
    """`--labels`: the true class of each image by its class folder or a CSV file
    (`medx.inference.labels`); the counts, then metrics with 95% CIs."""
    import numpy as np

    from medx.evaluation import metrics
    from medx.inference.labels import Tally, match

    matching = match(labels, paths, root, classes)
    failed = [bool(r["error"]) for r in rows]
    classified = [bool(r.get(f"p_{classes[0]}")) for r in rows]
    tally = Tally.of(matching, failed, classified, classes)
    tally.check()  # a class without images: refused, the counts in its one line
    print(tally.summary())
    y = np.asarray([index for _, index in tally.rows])
    p = np.asarray([[float(rows[i][f"p_{c}"]) for c in classes] for i, _ in tally.rows])
    threshold = rule.threshold if rule is not None else None
    found: dict[str, Any] = metrics.classification_metrics(y, p, threshold)
    for name, (low, high) in metrics.bootstrap_ci(y, p, 1000, 0, threshold=threshold).items():
        found[f"{name}_ci_low"], found[f"{name}_ci_high"] = low, high
    print("  ".join(f"{k} {v:.4f}" for k, v in found.items() if isinstance(v, float)))
    found["images"] = len(y)
    found["matched"] = dict(tally.matched)
    found["unmatched"] = dict(tally.unmatched)
    found["failed"] = tally.failed
    if out_dir is not None:
        from medx.inference.naming import writing

        with writing(out_dir / "metrics.json"):
            (out_dir / "metrics.json").write_text(json.dumps(found, indent=2))
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


def _segment(model: Any, args: argparse.Namespace, out: Path | None) -> tuple[list[Path], Outcome]:
    from medx.errors import DataError
    from medx.inference import Segmenter

    if out is None:
        raise DataError("A segmentation checkpoint writes masks: give --out FOLDER.")
    segmenter = Segmenter(model, args.threshold, args.postprocess, args.max_pixels, args.checkpoint)
    skipped: Counter[str] = Counter()
    paths, inputs = _write_masks(segmenter, args.input, out, args.skip_bad_images, skipped)
    outcome = Outcome(inputs, inputs - len(paths))
    line = f"{inputs} images: {len(paths)} masks written to {out}, {outcome.failed} failed"
    if skipped:
        line += f"; left out: {sum(skipped.values())} files that are no images"
    print(line)
    _say_none_predicted(outcome)
    return paths, outcome


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
    return _write_masks(segmenter, Path(input_dir), Path(output_dir), skip_bad_images)[0]


def _write_masks(
    segmenter: Any,
    inputs: Path,
    out: Path,
    skip_bad_images: bool,
    skipped: Counter[str] | None = None,
) -> tuple[list[Path], int]:
    """The masks written, and how many inputs there were."""
    from medx.data.io import BadImageError, with_hint
    from medx.inference import find_inputs
    from medx.inference.naming import output_names, writable_folder

    writable_folder(out)
    paths = find_inputs(inputs, skipped)
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
        _write_png(target, segmenter.mask(image))
        written.append(target)
    log.info("Wrote %d masks to %s", len(written), out)
    return written, len(paths)


if __name__ == "__main__":
    import sys

    sys.exit(run())
