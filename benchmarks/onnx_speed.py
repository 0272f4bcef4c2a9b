"""Issue 13: onnxruntime ÷ PyTorch eager throughput at batch 1, resnet18 at 224 px, on this CPU.

The model is a medx ClassificationModule (normalisation inside, as exported), random weights
(speed does not depend on them), exported by `medx.export.export_model` and so verified first
(on real chest X-rays when $MEDX_DATA is set, else on synthetic phantom images). Then both
sides predict one [0, 1] image at a time: PyTorch eager under `inference_mode`, and
`medx.inference.OnnxModel` (what the service runs). Each repeat times `--iterations` calls of one
side, then of the other, alternating which goes first, so a noisy neighbour on a shared CPU
slows both alike; the figures are medians over repeats. Both sides use `--threads` threads
(default 1: on an oversubscribed CPU, eager PyTorch's OpenMP threads stall each other and the
ratio measures the neighbours, not the runtimes).
Goal: ratio ≥ 1.5.

Usage: [MEDX_DATA=/path] python benchmarks/onnx_speed.py [--threads 1] [--repeats 7]
       [--iterations 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medx.export import as_batch, check_images, export_model
from medx.inference import OnnxModel
from medx.models.classifier import ClassificationModule

GOAL = 1.5


def per_second(fn, x, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        fn(x)
    return iterations / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads, both sides")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--iterations", type=int, default=30, help="batch-1 calls per side, repeat")
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ClassificationModule("resnet18", num_classes=2).eval()
    data = os.environ.get("MEDX_DATA")
    folder = Path(data) / "chest_xray" / "train" if data else None
    images, described = check_images(folder)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet18.onnx"
        check = export_model(model, path, images, described, size=args.size)
        print(
            f"export verified on {described}: largest |logit difference| {check.max_abs_diff:.2g}"
        )
        runtime = OnnxModel(path, threads=args.threads)
        x = as_batch(images, 1, args.size, args.size)

        def eager(batch: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model(batch)

        for fn in (eager, runtime):  # warm-up: allocations, ORT's first-run planning
            per_second(fn, x, 5)
        sides: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        ratios = []
        for r in range(args.repeats):
            order = [("torch", eager), ("onnxruntime", runtime)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                sides[name].append(per_second(fn, x, args.iterations))
            ratios.append(sides["onnxruntime"][-1] / sides["torch"][-1])
    torch_ips, ort_ips = (statistics.median(sides[k]) for k in ("torch", "onnxruntime"))
    ratio = statistics.median(ratios)
    print(
        f"resnet18 {args.size} px, batch 1, {args.threads} thread(s), torch "
        f"{torch.__version__}, {args.repeats} repeats x {args.iterations} calls (medians)"
    )
    print(f"PyTorch eager   {torch_ips:8.1f} images/s")
    print(f"onnxruntime     {ort_ips:8.1f} images/s")
    print(
        f"ratio           {ratio:8.2f}  (goal >= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'})"
    )
    print(f"ratio per repeat: {', '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
