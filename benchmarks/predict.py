"""Issue 12: `medx.predict` throughput on real chest X-rays at 1024 × 1024, JPEG and DICOM.

Prints images/s end to end (files → predictions.csv through DataLoader workers), model-only
(tensors already in memory), decode-only (the readers alone), the ratio end-to-end ÷
model-only (goal ≥ 0.8 with 2 workers on a 2-core CPU), Grad-CAM and TTA cost as multiples
of a plain prediction, and the shift monitor's: end to end with a shift reference on the card
(features from the same pass, each image's OOD score, and the set test of the folder at the
end) against without. Each figure is the median of `--repeats` runs; the sides
alternate within a repeat, so a noisy neighbour slows all of them alike.

Usage: MEDX_DATA=/path python benchmarks/predict.py [--images 64] [--repeats 3] [--size 224]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset

from medx.data.io import read_image
from medx.data.transforms import ImageTransform
from medx.evaluation.drift import ShiftReference
from medx.evaluation.explain import grad_cam
from medx.evaluation.tta import tta_logits
from medx.inference import Predictor
from medx.models.classifier import ClassificationModule

GOAL = 0.8


def write_inputs(medx_data: Path, folder: Path, n: int) -> dict[str, list[Path]]:
    """n real CXRs upscaled to 1024², as JPEG (quality 95) and as uncompressed DICOM."""
    sources = sorted((medx_data / "chest_xray" / "train" / "PNEUMONIA").glob("*.jpeg"))[:n]
    out: dict[str, list[Path]] = {"jpeg": [], "dicom": []}
    for kind in out:
        (folder / kind).mkdir(parents=True)
    for i, source in enumerate(sources):
        gray = cv2.imread(str(source), cv2.IMREAD_GRAYSCALE)
        big = cv2.resize(gray, (1024, 1024), interpolation=cv2.INTER_CUBIC)
        jpeg = folder / "jpeg" / f"{i:04d}.jpeg"
        cv2.imwrite(str(jpeg), big, [cv2.IMWRITE_JPEG_QUALITY, 95])
        out["jpeg"].append(jpeg)
        out["dicom"].append(_dicom(big, folder / "dicom" / f"{i:04d}.dcm"))
    return out


def _dicom(gray: np.ndarray, path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality, ds.PatientID = "DX", "BENCH"
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(gray).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=224, help="the model's input size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    medx_data = Path(os.environ.get("MEDX_DATA", "../shared/data")).resolve()
    if not (medx_data / "chest_xray").is_dir():
        sys.exit(f"MEDX_DATA={medx_data} has no chest_xray/: set MEDX_DATA to the data folder")
    torch.manual_seed(0)
    model = ClassificationModule("resnet18", 2).eval()  # untrained: the cost is the same
    model.card = {"class_names": ["NORMAL", "PNEUMONIA"], "input": {"image_size": args.size}}
    x = torch.rand(args.batch_size, 3, args.size, args.size)
    predictor = Predictor(model, monitor=False)  # what medx.predict streams a folder through
    monitored = Predictor(with_reference(model, args.size))

    def end_to_end(paths: list[Path], by: Predictor = predictor) -> list:
        return list(by.stream(paths, args.batch_size, args.workers))

    def with_shift_test(paths: list[Path]) -> None:
        stream = monitored.stream(paths, args.batch_size, args.workers)
        assert all(a.ood_score is not None for a in stream)
        assert stream.shift_report() is not None

    transform = ImageTransform(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = write_inputs(medx_data, Path(tmp), args.images)
        n = len(inputs["jpeg"])
        batches = -(-n // args.batch_size)
        sides = {
            "model only": lambda: [classify_batch(model, x) for _ in range(batches)],
            "decode only, JPEG": lambda: [transform(read_image(p)) for p in inputs["jpeg"]],
            "decode only, DICOM": lambda: [transform(read_image(p)) for p in inputs["dicom"]],
            "end to end, JPEG": lambda: end_to_end(inputs["jpeg"]),
            "end to end, DICOM": lambda: end_to_end(inputs["dicom"]),
            "end to end, JPEG, shift monitor": lambda: with_shift_test(inputs["jpeg"]),
            "Grad-CAM": lambda: [grad_cam(model, x) for _ in range(batches)],
            "TTA": lambda: [tta_logits_no_grad(model, x) for _ in range(batches)],
        }
        for fn in sides.values():  # warm-up: threads, allocator, page cache
            fn()
        times: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(args.repeats):
            for name, fn in sides.items():
                times[name].append(timed(fn))
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    print(
        f"{n} images 1024x1024 -> {args.size} px, resnet18, batch {args.batch_size}, "
        f"{args.workers} workers, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"{'measure':<32} {'images/s':>9}")
    for name, value in rate.items():
        print(f"{name:<32} {value:9.1f}")
    for kind in ("JPEG", "DICOM"):
        ratio = rate[f"end to end, {kind}"] / rate["model only"]
        verdict = "meets" if ratio >= GOAL else "misses"
        print(f"end-to-end / model-only, {kind}: {ratio:.2f} ({verdict} the goal >= {GOAL})")
    print(f"Grad-CAM cost: {rate['model only'] / rate['Grad-CAM']:.1f}x a plain prediction")
    print(f"TTA cost: {rate['model only'] / rate['TTA']:.1f}x a plain prediction")
    cost = rate["end to end, JPEG"] / rate["end to end, JPEG, shift monitor"]
    print(f"shift monitor cost (OOD scores and the folder's set test): {cost:.2f}x end to end")


def with_reference(model: ClassificationModule, size: int) -> ClassificationModule:
    """A second module with the same weights whose card keeps a shift reference (of random
    images: the cost is the same as of a validation set's)."""
    twin = ClassificationModule("resnet18", 2).eval()
    twin.load_state_dict(model.state_dict())
    with torch.inference_mode():
        features, logits = twin.embed(torch.rand(200, 3, size, size))
    reference = ShiftReference.fit(features.numpy(), torch.softmax(logits, 1)[:, 1].numpy())
    twin.card = {**model.card, "shift_reference": reference.to_dict()}
    return twin


def classify_batch(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.softmax(model(x), 1)


def tta_logits_no_grad(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return tta_logits(model, x)


if __name__ == "__main__":
    main()
