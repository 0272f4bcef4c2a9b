"""`python -m medx.predict CKPT INPUT [--out DIR]`: use a trained model on images.

One command for every task; the checkpoint says what it is (`medx.models.load`).

- A classifier gives one row per image: a calibrated probability per class (the temperature
  fitted on validation; `--no-calibration` for the raw softmax), the predicted class and, for
  binary models, the decision at the operating point chosen on validation, with the threshold
  and where it came from. One image prints one line; a folder (searched recursively; JPEG,
  PNG, BMP, TIFF, WebP, DICOM) writes `predictions.csv` under `--out`, streaming through
  DataLoader workers, so a folder of 50,000 files never sits in memory. A file that cannot be
  read gets its reason in the `error` column and the run goes on.
- A segmenter writes one mask PNG (0/255) per image, at the image's own size.

Options add Grad-CAM overlays (`--gradcam`), test-time augmentation (`--tta`), a quality gate
(`--qc QC_CKPT`), lung masks and the share of the Grad-CAM inside them (`--lungs SEG_CKPT`),
and the clinical metrics for a labelled folder `root/<class>/...` (`--labels`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medx.cli import user_errors
from medx.data.io import BadImageError, is_image_file, read_image, with_hint
from medx.data.transforms import ImageTransform
from medx.errors import DataError, MedxError
from medx.models.load import load
from medx.models.postprocess import POSTPROCESS, make_postprocess

log = logging.getLogger(__name__)

MAX_PIXELS = 50_000_000  # larger images are refused before decoding (decompression bombs)
QC_MODES = ("flag", "refuse")
LUNG_SHARE_ALARM = 0.5  # less Grad-CAM mass than this inside the lungs: flagged as a shortcut


# --- inputs -------------------------------------------------------------------------------


def find_inputs(path: Path) -> list[Path]:
    """One image file, or every image file under a folder (recursively), sorted."""
    if not path.exists():
        raise DataError(f"Input {path} does not exist; give an image file or a folder.")
    if path.is_file():
        return [path]
    found = sorted(
        p
        for p in path.rglob("*")
        if not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(path).parts)
        and p.is_file()
        and is_image_file(p)
    )
    if not found:
        raise DataError(
            f"{path} holds no images (JPEG, PNG, BMP, TIFF, WebP or DICOM), also in subfolders."
        )
    return found


def pixel_count(path: Path) -> int | None:
    """Width × height from the file's header, without decoding its pixels (None: unknown)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.MAX_IMAGE_PIXELS = None  # we judge the size ourselves, below
            with Image.open(path) as img:
                return img.width * img.height
    except Exception:
        pass
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return int(ds.Rows) * int(ds.Columns)
    except Exception:
        return None


def read_checked(path: Path, max_pixels: int, intensity: str = "none") -> np.ndarray:
    """Decode one file after refusing one whose header claims more than `max_pixels`;
    `intensity`: the model's per-image standardisation (its card's `input.intensity`)."""
    n = pixel_count(path)
    if n is not None and n > max_pixels:
        raise BadImageError(
            f"Image {path} has {n / 1e6:.1f} megapixels, over --max-pixels "
            f"{max_pixels / 1e6:.0f} M: refused before decoding (raise --max-pixels if it is "
            "a real image).",
            path,
        )
    return read_image(path, intensity)


class ImageFiles(Dataset):
    """Files → (image tensor in [0, 1] at the model's size, index, error message)."""

    def __init__(
        self, paths: Sequence[Path], size: int, max_pixels: int, intensity: str = "none"
    ) -> None:
        self.paths, self.size, self.max_pixels = list(paths), size, max_pixels
        self.intensity = intensity
        self.transform = ImageTransform(size, "none")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            image = read_checked(self.paths[i], self.max_pixels, self.intensity)
            return self.transform(image), i, ""
        except MedxError as err:  # the row says why; the other files are predicted
            message = with_hint(err, "")
            message = message if str(self.paths[i]) in message else f"{self.paths[i]}: {message}"
            return torch.zeros(3, self.size, self.size), i, message


def batches(
    paths: Sequence[Path],
    size: int,
    max_pixels: int,
    batch_size: int,
    workers: int,
    intensity: str = "none",
) -> Iterator[tuple[torch.Tensor, list[int], list[str]]]:
    loader = DataLoader(
        ImageFiles(paths, size, max_pixels, intensity),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
    )
    for x, index, errors in loader:
        yield x, index.tolist(), list(errors)


# --- classification -------------------------------------------------------------------------


@dataclass
class Options:
    """What `medx.predict` was asked for (the command line's flags)."""

    calibrated: bool = True
    threshold: float | None = None
    tta: bool = False
    gradcam: bool = False
    gradcam_layer: str | None = None
    gradcam_class: str | None = None
    qc: Path | None = None
    qc_mode: str = "flag"
    qc_threshold: float | None = None
    lungs: Path | None = None
    labels: bool = False
    batch_size: int = 16
    workers: int = 2
    max_pixels: int = MAX_PIXELS
    progress: bool = True


class Decision:
    """The binary decision rule: p(positive) at or above the threshold, and its provenance.

    The operating point is chosen on validation on the uncalibrated probability; temperature
    scaling is monotonic, so the same threshold is mapped onto the reported (calibrated)
    probability's scale and the decision does not change with calibration.
    """

    def __init__(self, card: dict[str, Any], options: Options, temperature: float) -> None:
        op = dict(card.get("operating_point") or {})
        if options.tta:
            tta_op = card.get("operating_point_tta")
            if tta_op:
                op = dict(tta_op)
            elif op:
                log.warning(
                    "--tta: the checkpoint has no operating point chosen on validation with "
                    "TTA on; using the plain one (evaluate with eval.tta=true to choose one)."
                )
        run = (card.get("run") or {}).get("id", "")
        if options.threshold is not None:
            self.threshold, self.source = options.threshold, "--threshold"
        elif op.get("threshold") is not None:
            self.threshold = _on_scale(float(op["threshold"]), temperature)
            self.source = (
                f"val sensitivity {op.get('target_sensitivity')}"
                + (" with TTA" if op.get("tta") else "")
                + (f", run {run}" if run else "")
            )
        else:
            self.threshold, self.source = None, ""

    def __call__(self, p_positive: float) -> int:
        return int(p_positive >= self.threshold)


def _on_scale(threshold: float, temperature: float) -> float:
    """A threshold on softmax probabilities, mapped onto temperature-scaled ones."""
    if temperature == 1.0 or not 0.0 < threshold < 1.0:
        return threshold
    z = math.log(threshold / (1 - threshold))
    return 1.0 / (1.0 + math.exp(-z / temperature))


@dataclass(frozen=True)
class Reading:
    """How to read a classifier, from its card: class names, input size, temperature, the
    decision rule (binary models) and the id that names the model in every output. Shared by
    `medx.predict` and `medx.serve`, so both give the same answer for the same image."""

    classes: list[str]
    size: int
    temperature: float
    decide: Decision | None
    model_id: str
    intensity: str = "none"  # the per-image standardisation the model was trained with

    @classmethod
    def of(cls, model: torch.nn.Module, options: Options) -> Reading:
        card = model.card
        classes = card.get("class_names") or [str(i) for i in range(model.hparams.num_classes)]
        temperature = float((card.get("calibration") or {}).get("temperature", 1.0))
        temperature = temperature if options.calibrated else 1.0
        return cls(
            classes=list(classes),
            size=int((card.get("input") or {}).get("image_size") or 224),
            temperature=temperature,
            decide=Decision(card, options, temperature) if len(classes) == 2 else None,
            model_id=_model_id(card, model),
            intensity=(card.get("input") or {}).get("intensity") or "none",
        )


def classify(
    model: torch.nn.Module,
    x: torch.Tensor,
    temperature: float,
    tta: bool,
) -> torch.Tensor:
    """Class probabilities of a batch of [0, 1] images (TTA averages views in probability)."""
    with torch.inference_mode():
        if tta:
            from medx.evaluation.tta import tta_logits

            logits = tta_logits(model, x)
        else:
            logits = model(x)
        return torch.softmax(logits.float() / temperature, dim=1)


def predict_classifier(
    model: torch.nn.Module, paths: Sequence[Path], out_dir: Path | None, options: Options
) -> list[dict[str, Any]]:
    """One row per file (see the module docstring); writes predictions.csv under out_dir."""
    reading = Reading.of(model, options)
    classes, size, temperature = reading.classes, reading.size, reading.temperature
    decide, model_id = reading.decide, reading.model_id
    gate = QualityGate(options) if options.qc else None
    lungs = load(options.lungs) if options.lungs else None
    explain_class = _class_index(options.gradcam_class, classes)
    rows: list[dict[str, Any]] = []
    writer = _CsvRows(out_dir / "predictions.csv") if out_dir else None
    stream = batches(
        paths, size, options.max_pixels, options.batch_size, options.workers, reading.intensity
    )
    for x, index, errors in _progress(stream, len(paths), options):
        probs = classify(model, x, temperature, options.tta)
        if options.gradcam or lungs:  # the class reported (TTA's too) is the one explained
            wanted = probs.argmax(1) if explain_class is None else explain_class
            cams = _cams(model, x, options, wanted)
        else:
            cams = None
        for j, i in enumerate(index):
            row = _row(paths[i], errors[j], probs[j], classes, decide, model_id, temperature)
            if not errors[j]:
                if gate is not None:
                    gate.judge(paths[i], row, options)
                if cams is not None:
                    _explain(paths[i], cams[j], lungs, out_dir, row, options)
            rows.append(row)
            if writer:
                writer.write(row)
    if writer:
        writer.close()
    if options.labels:
        _labelled_metrics(rows, classes, paths, out_dir, decide)
    return rows


def _row(
    path: Path,
    error: str,
    probs: torch.Tensor,
    classes: list[str],
    decide: Decision | None,
    model_id: str,
    temperature: float,
) -> dict[str, Any]:
    row: dict[str, Any] = {"path": str(path), "model": model_id}
    if error:
        row["error"] = error
        log.warning("%s", error)
        return row
    p = probs.tolist()
    row.update({f"p_{c}": f"{v:.6f}" for c, v in zip(classes, p, strict=True)})
    row["predicted"] = classes[int(np.argmax(p))]
    row["temperature"] = f"{temperature:.4f}"
    if decide is not None and decide.threshold is not None:
        row["decision"] = classes[decide(p[1])]
        row["threshold"] = f"{decide.threshold:.6f}"
        row["threshold_source"] = decide.source
    row["error"] = ""
    return row


def _model_id(card: dict[str, Any], model: torch.nn.Module) -> str:
    run = (card.get("run") or {}).get("id")
    name = card.get("registered_as") or Path(str(card.get("checkpoint", "model"))).name
    return f"{name}@{run}" if run else str(name)


class _CsvRows:
    """predictions.csv written row by row; columns grow in a fixed order as they appear."""

    ORDER = ("path", "model", "predicted", "decision", "threshold", "threshold_source")

    def __init__(self, path: Path) -> None:
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


def _progress(stream: Iterator, total: int, options: Options) -> Iterator:
    if not options.progress or total < 2:
        yield from stream
        return
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task("Predicting", total=total)
        for item in stream:
            yield item
            bar.advance(task, len(item[1]))


def _class_index(name: str | None, classes: list[str]) -> int | None:
    if name is None:
        return None
    if name in classes:
        return classes.index(name)
    if name.isdigit() and int(name) < len(classes):
        return int(name)
    raise DataError(f"--gradcam-class {name!r} is not one of the model's classes {classes}.")


def _cams(
    model: torch.nn.Module, x: torch.Tensor, options: Options, classes: int | torch.Tensor
) -> np.ndarray:
    from medx.evaluation.explain import grad_cam

    return grad_cam(model, x, classes, options.gradcam_layer).cams


def _explain(
    path: Path,
    cam: np.ndarray,
    lungs: torch.nn.Module | None,
    out_dir: Path | None,
    row: dict[str, Any],
    options: Options,
) -> None:
    """Lung mask, Grad-CAM share inside it, and the overlay PNG (image at its own size)."""
    from medx.evaluation.explain import mass_inside, overlay_cam

    image = read_checked(path, options.max_pixels)
    mask = None
    if lungs is not None:
        mask = predict_mask(lungs, image, lungs.threshold)
        share = mass_inside(cam, mask)
        row["cam_in_lungs"] = f"{share:.4f}"
        row["shortcut_alarm"] = "yes" if share < LUNG_SHARE_ALARM else "no"
    if options.gradcam and out_dir is not None:
        target = out_dir / "gradcam" / f"{path.stem}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        picture = overlay_cam(image, cam, mask)
        cv2.imwrite(str(target), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        row["gradcam"] = str(target)


class QualityGate:
    """`--qc QC_CKPT`: a data=quality model (feature baseline or CNN) scores each image first."""

    def __init__(self, options: Options) -> None:
        self.model = load(options.qc)
        if list(self.model.card.get("class_names") or ["good", "bad"]) != ["good", "bad"]:
            raise DataError(
                f"--qc {options.qc} is not an image-quality model (classes "
                f"{self.model.card.get('class_names')}); train one with data=quality."
            )
        op = self.model.card.get("operating_point") or {}
        self.threshold = options.qc_threshold or float(op.get("threshold", 0.5))

    def p_bad(self, image: np.ndarray) -> float:
        from medx.quality.features import image_features

        with torch.inference_mode():
            if self.model.inputs == "features":
                gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
                x = torch.as_tensor(image_features(gray), dtype=torch.float32)[None]
            else:
                size = int(self.model.card["input"]["image_size"])
                x = ImageTransform(size, "none")(image)[None]
            return float(torch.softmax(self.model(x).float(), 1)[0, 1])

    def judge(self, path: Path, row: dict[str, Any], options: Options) -> None:
        p = self.p_bad(read_checked(path, options.max_pixels))
        row["qc_p_bad"] = f"{p:.4f}"
        row["qc_verdict"] = "bad" if p >= self.threshold else "good"
        if row["qc_verdict"] == "bad" and options.qc_mode == "refuse":
            for key in [k for k in row if k.startswith("p_")] + ["predicted", "decision"]:
                row[key] = ""
            row["qc_reason"] = f"refused: image quality p_bad {p:.3f} >= {self.threshold:.3f}"


def _labelled_metrics(
    rows: list[dict[str, Any]],
    classes: list[str],
    paths: Sequence[Path],
    out_dir: Path | None,
    decide: Decision | None,
) -> dict[str, float]:
    """`--labels`: the true class is the folder `root/<class>/...`; metrics with 95% CIs."""
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
    threshold = decide.threshold if decide is not None else None
    found = metrics.classification_metrics(y, p, threshold)
    for name, (low, high) in metrics.bootstrap_ci(y, p, 1000, 0, threshold=threshold).items():
        found[f"{name}_ci_low"], found[f"{name}_ci_high"] = low, high
    found["images"] = len(y)
    if out_dir is not None:
        (out_dir / "metrics.json").write_text(json.dumps(found, indent=2))
    print("  ".join(f"{k} {v:.4f}" for k, v in found.items() if isinstance(v, float)))
    return found


# --- segmentation ---------------------------------------------------------------------------


def load_segmenter(ckpt_path: str | Path) -> torch.nn.Module:
    """The trained module of a medx segmentation checkpoint, on CPU, in eval mode."""
    model = load(ckpt_path)
    if model.task != "segmentation":
        raise DataError(
            f"{ckpt_path} is not a medx segmentation checkpoint (it is a {model.task} model); "
            "train one with `python -m medx.train model=unet data=lung_seg`."
        )
    return model


@torch.no_grad()
def predict_mask(model: torch.nn.Module, image: np.ndarray, threshold: float) -> np.ndarray:
    """HxWx3 uint8 image → HxW uint8 mask of 0/255 at the image's own size."""
    size = model.hparams.image_size
    h, w = image.shape[:2]
    small = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(small).permute(2, 0, 1).float().div(255)
    prob = model.predict_masks(x[None].to(model.device))[0, 0].cpu().numpy()
    prob = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
    mask = np.where(prob >= threshold, 255, 0).astype(np.uint8)
    return model.postprocess(mask) if model.postprocess else mask


def predict_folder(
    ckpt_path: str | Path,
    input_dir: str | Path,
    output_dir: str | Path,
    threshold: float | None = None,
    skip_bad_images: bool = False,
    postprocess: str | None = None,
    max_pixels: int = MAX_PIXELS,
) -> list[Path]:
    """Write `output_dir/<stem>.png` for every image under `input_dir`; returns the mask
    paths. `threshold` and `postprocess` (a `model.postprocess` name) default to the
    checkpoint's. A bad file stops the run, naming it, unless `skip_bad_images`."""
    model = load_segmenter(ckpt_path)
    intensity = (model.card.get("input") or {}).get("intensity") or "none"
    threshold = model.threshold if threshold is None else threshold
    if postprocess is not None:
        model.postprocess = make_postprocess(postprocess)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"Output {out} is a file; give a folder for the masks.")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in find_inputs(Path(input_dir)):
        try:
            image = read_checked(path, max_pixels, intensity)
        except BadImageError as err:
            if not skip_bad_images:
                hint = "Delete or replace the file, or pass --skip-bad-images to skip bad images."
                raise BadImageError(with_hint(err, hint), path) from err
            log.warning("Skipping %s", err)
            continue
        target = out / f"{path.stem}.png"
        if not cv2.imwrite(str(target), predict_mask(model, image, threshold)):
            raise DataError(f"Could not write {target}; check that the folder is writable.")
        written.append(target)
    log.info("Wrote %d masks to %s", len(written), out)
    return written


# --- command line ---------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m medx.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="a medx checkpoint (.ckpt): classifier or segmenter")
    p.add_argument("input", type=Path, help="an image file (JPEG/PNG/DICOM/...) or a folder")
    p.add_argument("output", type=Path, nargs="?", help="same as --out (segmentation masks)")
    p.add_argument("--out", type=Path, help="folder for predictions.csv, overlays and masks")
    p.add_argument("--no-calibration", action="store_true", help="raw softmax probabilities")
    p.add_argument(
        "--threshold",
        type=float,
        help="classifier: p(positive) for the decision (default: the checkpoint's operating "
        "point); segmenter: mask probability (default: the model's, 0.5)",
    )
    p.add_argument("--tta", action="store_true", help="average chest-X-ray-safe views")
    p.add_argument("--gradcam", action="store_true", help="write Grad-CAM overlays to OUT/gradcam")
    p.add_argument("--gradcam-layer", help="target layer (default: by backbone family)")
    p.add_argument("--gradcam-class", help="class to explain (default: the predicted one)")
    p.add_argument("--qc", type=Path, help="a data=quality checkpoint: quality gate")
    p.add_argument("--qc-mode", choices=QC_MODES, default="flag", help="flag or refuse bad images")
    p.add_argument("--qc-threshold", type=float, help="p_bad at or above: bad (default: its op)")
    p.add_argument("--lungs", type=Path, help="a lung segmentation checkpoint: masks, CAM share")
    p.add_argument("--labels", action="store_true", help="root/<class>/...: clinical metrics")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (0: none)")
    p.add_argument("--max-pixels", type=float, default=MAX_PIXELS, help="refuse larger images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    seg = p.add_argument_group("segmentation")
    seg.add_argument("--postprocess", choices=list(POSTPROCESS), help="default: the model's")
    seg.add_argument("--skip-bad-images", action="store_true", help="skip unreadable files")
    return p


def main(argv: list[str] | None = None) -> list[Any]:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = args.out or args.output
    with user_errors("medx.predict"):
        model = load(args.checkpoint)
        if model.task == "segmentation":
            if out is None:
                raise DataError("A segmentation checkpoint writes masks: give --out FOLDER.")
            paths = predict_folder(
                args.checkpoint,
                args.input,
                out,
                args.threshold,
                args.skip_bad_images,
                args.postprocess,
                int(args.max_pixels),
            )
            print(f"{len(paths)} masks written to {out}")
            return paths
        options = Options(
            calibrated=not args.no_calibration,
            threshold=args.threshold,
            tta=args.tta,
            gradcam=args.gradcam,
            gradcam_layer=args.gradcam_layer,
            gradcam_class=args.gradcam_class,
            qc=args.qc,
            qc_mode=args.qc_mode,
            qc_threshold=args.qc_threshold,
            lungs=args.lungs,
            labels=args.labels,
            batch_size=args.batch_size,
            workers=args.workers,
            max_pixels=int(args.max_pixels),
            progress=not args.no_progress,
        )
        paths = find_inputs(args.input)
        if args.gradcam and out is None and len(paths) > 1:
            raise DataError("--gradcam writes overlays: give --out FOLDER.")
        rows = predict_classifier(model, paths, out, options)
        if out is None or len(paths) == 1:
            for row in rows:
                print(_one_line(row))
        failed = sum(bool(r.get("error")) for r in rows)
        if out is not None:
            print(f"{len(rows)} images ({failed} failed): {out / 'predictions.csv'}")
        return rows


def _one_line(row: dict[str, Any]) -> str:
    if row.get("error"):
        return f"{row['path']}: error: {row['error']}"
    probs = ", ".join(f"{k[2:]} {v}" for k, v in row.items() if k.startswith("p_") and v)
    line = f"{row['path']}: {row.get('predicted') or '-'} ({probs})"
    if row.get("decision"):
        line += f"; at threshold {row['threshold']} ({row['threshold_source']}): {row['decision']}"
    if row.get("qc_verdict"):
        line += f"; quality {row['qc_verdict']} (p_bad {row['qc_p_bad']})"
    return line


if __name__ == "__main__":
    main()
