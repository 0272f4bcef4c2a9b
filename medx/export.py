"""`python -m medx.export CKPT --out model.onnx`: a trained classifier or segmenter as ONNX,
checked against PyTorch with onnxruntime, carrying everything needed to use it.

**The graph** is the module's `forward`: [0, 1] images in, logits out. Normalisation (the
model's mean/std, and a segmenter's per-image z-score) is inside the graph, as it is inside the
module, so every caller feeds the same pixels as `medx.predict`; softmax/sigmoid, temperature
and threshold stay outside (they are metadata), so one file serves raw and calibrated use.

**Input contract** (also in the file as `medx.input`): input `image`, float32, NCHW, RGB (gray
images repeated into 3 channels), values in [0, 1] (uint8 pixels / 255), decoded and resized
as `medx.data.io.read_image` + `ImageTransform` do (`medx.preprocessing`).

- Classifier: `image` [batch, 3, S, S] with S the training `image_size`; any batch size.
  Output `logits` [batch, classes]; probabilities = softmax(logits / `medx.temperature`); a
  binary model's `medx.threshold` (`{"value", "scale": "raw"}`) applies to
  softmax(logits)[:, 1], uncalibrated (as in the card; `medx.inference.DecisionRule` maps it
  onto the calibrated scale).
- Segmenter: `image` [batch, 3, H, W], any batch, H and W multiples of the network's stride
  (`medx.input.stride`, 32 for a 5-stage encoder). A caller pads other sizes at the bottom and
  right by repeating the edge pixels (`numpy.pad(x, ((0, 0), (0, 0), (0, -H % s), (0, -W % s)),
  mode="edge")`, as `medx.inference.onnx_model.pad_to_stride` does) and crops the output back
  to [..., :H, :W]. Output `logits` [batch, 1, H, W]; mask = sigmoid(logits) >=
  `medx.threshold.value`, then the
  `medx.postprocess` step named in the file.

**Exporter and opset.** The TorchScript exporter (`torch.onnx.export(..., dynamo=False)`) at
opset 17. The torch.export-based one (`dynamo=True`, torch's default since 2.9) needs the
`onnxscript` package, which medx's environment does not have (`import onnxscript` fails with
torch 2.14 here; the exporter raises ModuleNotFoundError), and adding a dependency for an
exporter that traces the same CNNs to the same operators buys nothing: medx's networks (timm
classifiers, smp U-Nets/FPNs) have no data-dependent control flow, which is what the dynamo
exporter handles better. Opset 17 holds every operator these networks use (Conv,
BatchNormalization folded, Resize, GlobalAveragePool, Gemm) and runs on onnxruntime ≥ 1.11,
TensorRT 8.6 and OpenVINO; newer opsets add nothing these graphs use. The export is not done
until it is verified (as MONAI's `convert_to_onnx(verify=True)`): the written file is run with
onnxruntime and PyTorch at a batch size, and for segmenters an image size, other than the
export's dummy input, and a logit difference over `--tolerance` (1e-4) fails the export. It
runs on `--check-images DIR` (3 images spread over the sorted folder); without one, on 3
synthetic phantom chest images (seed 0), and the command says so.

**Metadata** (`metadata_props`, every value JSON): `medx.card` (the whole model card),
`medx.task`, `medx.class_names`, `medx.threshold`, `medx.operating_point`,
`medx.target_sensitivity`, `medx.temperature`, `medx.run_id`, `medx.input`, `medx.output`,
`medx.preprocessing`, `medx.export` (exporter, opset, versions, checkpoint) and `medx.check`
(the verification's largest difference). `medx.inference.OnnxModel` reads them back and
runs the file (the onnxruntime backend of `medx.predict` and `medx.serve`).

**MLflow.** When the card names a training run and its tracking store answers, the file is
logged to that run under `onnx/` (also to a FINISHED run) with the tag `medx.onnx`; an
unreachable store is a warning, not a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import warnings
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medx.errors import MedxError

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger("medx.export")  # also under `python -m`

OPSET = 17
MAX_OPSET = 20  # the TorchScript exporter's highest
INPUT, OUTPUT = "image", "logits"  # as medx.inference.onnx_model (which reads these files)
TOLERANCE = 1e-4  # largest |logit difference| onnxruntime vs PyTorch that passes
EXPORT_BATCH = 2  # the dummy input's batch; the check runs 1 and CHECK_BATCH
CHECK_BATCH = 3
EXPORTER = "torch.onnx.export(dynamo=False) (TorchScript)"


class ExportError(MedxError):
    """A model cannot be exported, or an ONNX file cannot be used as a medx model."""


class CheckError(ExportError):
    """onnxruntime and PyTorch disagree on an exported file."""

    def __init__(
        self, path: Path, diff: float, case: str, tolerance: float, rounding: float, kept: bool
    ) -> None:
        self.path, self.diff, self.case, self.rounding = path, diff, case, rounding
        fate = "" if kept else "; the file was not written"
        if diff <= 4 * rounding:  # as far from PyTorch as PyTorch's float32 is from float64
            advice = "the export is right, the limit is below float32 precision for logits this "
            advice += "large: raise --tolerance"
        else:
            advice = "the export is wrong: try another --opset, or report the network"
        super().__init__(
            f"ONNX export {path} disagrees with PyTorch: largest |logit difference| {diff:.3g} "
            f"> {tolerance:g} ({case}){fate}. PyTorch's own float32 rounding there is "
            f"{rounding:.3g} (vs float64), so {advice}."
        )


# --- export ---------------------------------------------------------------------------------


def stride(model: torch.nn.Module) -> int:
    """The factor a segmenter's input height and width must be multiples of (1: any)."""
    encoder = getattr(getattr(model, "net", None), "encoder", None)
    return int(getattr(encoder, "output_stride", 32)) if model.task == "segmentation" else 1


def image_size(model: torch.nn.Module) -> int:
    """The square size the model was trained at (its card, or a segmenter's hyper-parameter)."""
    size = (model.card.get("input") or {}).get("image_size") or model.hparams.get("image_size")
    if not size:
        raise ExportError(
            "The checkpoint's model card has no input.image_size (a checkpoint from before "
            "model cards): pass --image-size, the size it was trained at."
        )
    return int(size)


def metadata(model: torch.nn.Module, size: int, opset: int) -> dict[str, Any]:
    """What goes into the file's metadata_props (values before JSON encoding)."""
    import onnxruntime
    import torch

    from medx.models.card import ModelCard

    typed = ModelCard.from_dict(model.card)
    card = typed.to_dict()
    segmenter = model.task == "segmentation"
    op = typed.operating_point.to_dict() if typed.operating_point else None
    temperature = typed.temperature
    decoding = {k: v for k, v in (card.get("input") or {}).items() if k not in ("mean", "std")}
    spatial = ["height", "width"] if segmenter else [size, size]
    contract = {
        "name": INPUT,
        "dtype": "float32",
        "layout": "NCHW",
        "shape": ["batch", 3, *spatial],
        "range": [0.0, 1.0],
        "channels": "RGB; gray images repeated into 3 channels",
        "image_size": size,
        "normalisation": "inside the graph: (x - mean) / std per channel",
        "mean": list(model.mean),
        "std": list(model.std),
    }
    if segmenter:
        contract.update(
            stride=stride(model),
            padding="height and width must be multiples of stride: pad bottom/right repeating "
            "edge pixels, crop the logits back",
            zscore=bool(model.hparams.get("zscore")),
        )
        output = {
            "name": OUTPUT,
            "shape": ["batch", 1, "height", "width"],
            "meaning": "mask logits; mask = sigmoid(logits) >= medx.threshold, then "
            "medx.postprocess",
        }
        threshold = {"value": float(model.threshold), "scale": "raw"}  # on the sigmoid
        card["segmentation"] = {
            "threshold": threshold,
            "postprocess": model.hparams.get("postprocess", "none"),
            "stride": stride(model),
        }
    else:
        output = {
            "name": OUTPUT,
            "shape": ["batch", len(card.get("class_names") or []) or "classes"],
            "meaning": "class logits; probabilities = softmax(logits / medx.temperature); binary "
            "decision: softmax(logits)[:, 1] >= medx.threshold.value (on medx.threshold.scale: "
            "raw = uncalibrated)",
        }
        threshold = {"value": op["threshold"], "scale": op["scale"]} if op else None
    return {
        "medx.format": 2,  # 2: medx.threshold is {"value", "scale"}
        "medx.task": model.task,
        "medx.class_names": list(card.get("class_names") or []),
        "medx.threshold": threshold,
        "medx.operating_point": op,
        "medx.target_sensitivity": op.get("target_sensitivity") if op else None,
        "medx.temperature": temperature,
        "medx.postprocess": card.get("segmentation", {}).get("postprocess"),
        "medx.run_id": (card.get("run") or {}).get("id"),
        "medx.input": contract,
        "medx.output": output,
        "medx.preprocessing": {
            **decoding,
            "to_tensor": "uint8 HxWx3 RGB -> float32 3xHxW / 255 (medx.data.transforms)",
        },
        "medx.export": {
            "exporter": EXPORTER,
            "opset": opset,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "checkpoint": card.get("checkpoint"),
            "dummy_input": [EXPORT_BATCH, 3, size, size],
        },
        "medx.card": card,
    }


def write_onnx(model: torch.nn.Module, out: Path, size: int, opset: int = OPSET) -> None:
    """Trace `model` (eval mode, float32, CPU) into `out` with dynamic axes and metadata."""
    import onnx
    import torch

    model = model.float().cpu().eval()
    dims = {0: "batch", 2: "height", 3: "width"} if model.task == "segmentation" else {0: "batch"}
    dummy = torch.rand(EXPORT_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():  # the exporter's deprecation notice and tracer remarks
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(out),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: dims, OUTPUT: dims},
            do_constant_folding=True,
        )
    proto = onnx.load(str(out))
    set_metadata(proto, metadata(model, size, opset))
    proto.doc_string = f"medx {model.task} model; see metadata_props medx.* for its contract"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))


def set_metadata(proto: Any, entries: dict[str, Any]) -> None:
    """Add or replace `metadata_props` entries, each value JSON-encoded."""
    kept = [p for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, json.dumps(value, default=str)


# --- verification ---------------------------------------------------------------------------


def check_images(
    folder: Path | None, n: int = CHECK_BATCH, intensity: str = "none"
) -> tuple[list[np.ndarray], str]:
    """n uint8 RGB images to verify on: spread over `folder` (sorted, so both ends of a
    class-per-folder tree), or, without one, n synthetic phantom chest images (seed 0). Files
    are read by `medx.inference`, with the model's `intensity` step, as every door reads them."""
    import numpy as np

    if folder is None:
        from medx.data.phantom import render_phantom

        rng = np.random.default_rng(0)
        grays = [render_phantom(rng, 256, opacity=bool(i % 2))[0] for i in range(n)]
        images = [np.repeat(g[..., None], 3, axis=2) for g in grays]
        return images, f"{n} synthetic phantom images (no --check-images given)"
    from medx.inference import find_inputs, read

    paths = find_inputs(Path(folder))
    picked = [paths[round(i * (len(paths) - 1) / max(n - 1, 1))] for i in range(n)]
    images = [read(p, intensity=intensity) for p in picked]
    return images, f"{len(set(picked))} images from {folder}"


def as_batch(images: list[np.ndarray], batch: int, height: int, width: int) -> torch.Tensor:
    """`batch` [0, 1] float images resized to height x width (cycling through `images`)."""
    import cv2
    import numpy as np
    import torch

    chosen = [images[i % len(images)] for i in range(batch)]
    small = [cv2.resize(im, (width, height), interpolation=cv2.INTER_AREA) for im in chosen]
    return torch.from_numpy(np.stack(small)).permute(0, 3, 1, 2).float().div(255).contiguous()


@dataclass
class Check:
    """The verification's outcome: the largest |logit difference| and where it was measured."""

    max_abs_diff: float
    cases: list[str]
    images: str
    tolerance: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_abs_diff": self.max_abs_diff,
            "cases": self.cases,
            "images": self.images,
            "tolerance": self.tolerance,
        }


def check_cases(model: torch.nn.Module, size: int) -> list[tuple[int, int, int]]:
    """(batch, height, width) to compare at: batch 1 at the export size (the served case) and
    batch 3, for segmenters at a non-square size other than the export's."""
    step = stride(model)
    if model.task == "segmentation":
        return [(1, size, size), (CHECK_BATCH, size + step, size + 2 * step)]
    return [(1, size, size), (CHECK_BATCH, size, size)]


def verify(
    model: torch.nn.Module,
    onnx_path: Path,
    images: list[np.ndarray],
    described: str = "",
    tolerance: float = TOLERANCE,
) -> Check:
    """Run `onnx_path` with onnxruntime and `model` with PyTorch on the same batches; raise
    CheckError (naming the file and the difference) when the logits differ by more than
    `tolerance`. A NaN anywhere fails too."""
    import numpy as np
    import torch

    from medx.inference import OnnxModel

    runtime = OnnxModel(onnx_path)
    size = int(runtime.input["image_size"])
    worst, worst_case, worst_x, cases = 0.0, "", None, []
    for batch, height, width in check_cases(model, size):
        x = as_batch(images, batch, height, width)
        with torch.inference_mode():
            expected = model(x).float().numpy()
        case = f"batch {batch}, {height}x{width} px"
        cases.append(case)
        try:
            got = runtime(x.numpy())
        except Exception as err:  # onnxruntime refuses the shape: an axis was fixed by tracing
            got, case = None, f"{case}: onnxruntime failed: {str(err).splitlines()[0][:200]}"
        same = got is not None and got.shape == expected.shape
        diff = float(np.max(np.abs(got - expected))) if same else np.inf
        diff = np.inf if np.isnan(diff) else diff
        if diff > worst:
            worst, worst_case, worst_x = diff, case, x
    if not worst <= tolerance:
        case = f"{worst_case}, {described}"
        rounding = float32_rounding(model, worst_x)
        raise CheckError(onnx_path, worst, case, tolerance, rounding, kept=True)
    return Check(worst, cases, described, tolerance)


def float32_rounding(model: torch.nn.Module, x: torch.Tensor) -> float:
    """How far the model's float32 logits are from its float64 ones on x: the precision that
    an exact export can be held to (deep segmenters with logits near 10 reach 5e-5)."""
    import torch

    exact = deepcopy(model).double()
    with torch.inference_mode():
        return float((model(x).double() - exact(x.double())).abs().max())


# --- MLflow ---------------------------------------------------------------------------------


def log_to_run(card: dict[str, Any], path: Path, check: Check, tracking_uri: str | None) -> bool:
    """Log the file to the card's training run (artifact `onnx/<name>`, tag `medx.onnx`).
    False, with a warning, when there is no run or its store does not answer."""
    from mlflow import MlflowClient

    run = card.get("run") or {}
    uri = tracking_uri or run.get("tracking_uri")
    if not run.get("id"):
        log.info("The model card names no MLflow run: the export is not logged.")
        return False
    if not uri or (reason := _unreachable(uri)):
        log.warning(
            "Not logged to MLflow run %s: %s (export again with --tracking-uri URI to log it).",
            run["id"],
            reason or "the model card names no tracking store",
        )
        return False
    client = MlflowClient(tracking_uri=uri)
    try:
        client.log_artifact(run["id"], str(path), "onnx")
        client.set_tag(run["id"], "medx.onnx", f"onnx/{path.name}")
        client.set_tag(run["id"], "medx.onnx.max_abs_diff", f"{check.max_abs_diff:.3g}")
    except Exception as err:  # MLflow raises many types (missing run, permissions, HTTP)
        log.warning("Not logged to MLflow run %s in %s: %s", run["id"], uri, err)
        return False
    log.info("Logged %s to MLflow run %s (%s) under onnx/", path.name, run["id"], uri)
    return True


def _unreachable(uri: str) -> str | None:
    """Why the tracking store at `uri` cannot be used (None: it can), in seconds (no MLflow
    retries); a missing sqlite file is not created."""
    from medx.tracking import store

    try:
        store.check(uri, write=False)  # exists, is a store; a server answers
        store.check(uri, write=True)  # and can be written
    except MedxError as err:
        return str(err)
    return None


# --- the whole command ----------------------------------------------------------------------


@dataclass
class Exported:
    path: Path
    check: Check
    logged: bool


def export(
    checkpoint: str | Path,
    out: str | Path | None = None,
    images: Path | None = None,
    tolerance: float = TOLERANCE,
    opset: int = OPSET,
    size: int | None = None,
    tracking_uri: str | None = None,
    mlflow: bool = True,
) -> Exported:
    """Export a medx model (a checkpoint or `models:/` URI) to `out` (default: next to the
    checkpoint, .onnx), verify it, log it."""
    from medx.inference import backend_of, open_model
    from medx.inference.naming import writable_folder
    from medx.models.card import ModelCard

    model = open_model(checkpoint)
    if backend_of(model) != "pytorch":
        raise ExportError(f"{checkpoint} is already an ONNX export; give its .ckpt file.")
    if out is None and str(checkpoint).startswith("models:/"):
        raise ExportError(f"{checkpoint} is a registered model: name the file with --out.")
    out = Path(out) if out else Path(checkpoint).with_suffix(".onnx")
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name such as model.onnx.")
    writable_folder(out.parent, "The folder of --out")  # before minutes of exporting
    pictures, described = check_images(images, intensity=ModelCard.from_dict(model.card).intensity)
    check = export_model(model, out, pictures, described, tolerance, opset, size)
    logged = mlflow and log_to_run(model.card, out, check, tracking_uri)
    return Exported(out, check, logged)


def export_model(
    model: torch.nn.Module,
    out: Path,
    images: list[np.ndarray],
    described: str,
    tolerance: float = TOLERANCE,
    opset: int = OPSET,
    size: int | None = None,
) -> Check:
    """Write `out` only once verified: exported to a hidden file beside it, checked, then
    renamed (a failed check leaves no file, nor an older export replaced)."""
    import onnx

    if getattr(model, "inputs", "image") != "image":
        raise ExportError(
            f"{model.card.get('checkpoint', 'This model')} is a {type(model).__name__}, which "
            "takes image features, not images: only image classifiers and segmenters export."
        )
    if not 9 <= opset <= MAX_OPSET:
        raise ExportError(
            f"--opset {opset}: the TorchScript exporter writes opsets 9 to {MAX_OPSET}."
        )
    from medx.inference.naming import writing

    size = size or image_size(model)
    tmp = out.parent / f".{out.name}.unverified"
    try:
        with writing(out):  # a folder that cannot be written: one line, not a traceback
            write_onnx(model, tmp, size, opset)
            try:
                check = verify(model, tmp, images, described, tolerance)
            except CheckError as err:
                raise CheckError(out, err.diff, err.case, tolerance, err.rounding, False) from err
            proto = onnx.load(str(tmp))
            set_metadata(proto, {"medx.check": check.as_dict()})
            onnx.save(proto, str(tmp))
            os.replace(tmp, out)
    finally:
        with contextlib.suppress(OSError):  # its folder may refuse this too: the error above
            tmp.unlink(missing_ok=True)  # is the one that says what went wrong
    return check


# --- command line ---------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m medx.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint",
        metavar="MODEL",
        help="a medx checkpoint (.ckpt) or models:/NAME/VERSION|@ALIAS: classifier or segmenter",
    )
    p.add_argument("--out", type=Path, help="the .onnx file (default: CKPT with .onnx)")
    p.add_argument(
        "--check-images",
        type=Path,
        help="a folder of real images to verify on (default: 3 synthetic phantom images)",
    )
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="largest |logit diff|")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p.add_argument("--image-size", type=int, help="only for checkpoints without a model card")
    p.add_argument("--tracking-uri", help="MLflow store of the training run (default: the card's)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to the training run")
    return p


def main(argv: list[str] | None = None) -> Exported:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from medx.cli import user_errors

    with user_errors("medx.export"):
        done = export(
            args.checkpoint,
            args.out,
            args.check_images,
            args.tolerance,
            args.opset,
            args.image_size,
            args.tracking_uri,
            not args.no_mlflow,
        )
    check = done.check
    if "synthetic" in check.images:
        print("No --check-images: verified on synthetic phantom images, not real ones.")
    print(
        f"Exported {done.path} (TorchScript exporter, opset {args.opset}); onnxruntime vs "
        f"PyTorch on {check.images} at {' and '.join(check.cases)}: largest |logit "
        f"difference| {check.max_abs_diff:.3g} (limit {check.tolerance:g})."
    )
    return done


if __name__ == "__main__":
    main()
