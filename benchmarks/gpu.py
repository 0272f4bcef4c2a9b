"""The GPU path: training images/s and peak GPU memory, fp32 vs bf16 vs bf16 + torch.compile.

resnet18, densenet121 and efficientnet_b0 classifiers at 224 px (batch 64) and a U-Net
(resnet34 encoder) at 256 px (batch 16), each the medx LightningModule that `medx.train` builds
(normalisation inside forward), in channels-last layout as `trainer=gpu` trains them, AdamW.
Batches are made on the GPU, so this measures the model, not the input pipeline. bf16 is
`torch.autocast(bfloat16)`, what Lightning's bf16-mixed does (fp16 on GPUs without native
bf16, as `trainer=gpu` chooses); compile is `nn.Module.compile`,
what `model.compile=true` does (the first steps, which compile, are timed apart). Evaluation
runs at twice the batch under `inference_mode`, as medx evaluates. Then one real
`medx.train trainer=gpu model.compile=true` run on the phantom checks the whole path.
Without a CUDA GPU it says so and exits 0.
Usage: python benchmarks/gpu.py [--steps 30] [--models resnet18 unet ...] [--no-run]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from medx.config import compose
from medx.models.classifier import ClassificationModule
from medx.models.segmentation import SegmentationModule
from medx.train import train
from medx.training.precision import mixed_precision


@dataclass(frozen=True)
class Case:
    name: str
    size: int
    batch: int
    build: Callable[[], torch.nn.Module]
    segmentation: bool = False


CASES = {
    "resnet18": Case("resnet18", 224, 64, lambda: ClassificationModule("resnet18", 2)),
    "densenet121": Case("densenet121", 224, 64, lambda: ClassificationModule("densenet121", 2)),
    "efficientnet_b0": Case(
        "efficientnet_b0", 224, 64, lambda: ClassificationModule("efficientnet_b0", 2)
    ),
    "unet": Case("unet", 256, 16, lambda: SegmentationModule("unet", "resnet34"), True),
}


def measure(
    case: Case, mixed: torch.dtype | None, compiled: bool, steps: int, warmup: int
) -> dict[str, float]:
    """Training and evaluation images/s, peak memory and warm-up (compile) seconds; `mixed`:
    the autocast dtype (None: fp32)."""
    torch.manual_seed(0)
    module = case.build().cuda().to(memory_format=torch.channels_last)
    if compiled:
        module.net.compile()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    x = torch.rand(case.batch, 3, case.size, case.size, device="cuda")
    if case.segmentation:
        y = (torch.rand(case.batch, 1, case.size, case.size, device="cuda") > 0.5).float()
    else:
        y = torch.randint(0, 2, (case.batch,), device="cuda")
    autocast = torch.autocast("cuda", dtype=mixed or torch.float32, enabled=mixed is not None)

    def step() -> None:
        with autocast:
            out = module(x)
            loss = (
                F.binary_cross_entropy_with_logits(out.float(), y)
                if case.segmentation
                else F.cross_entropy(out.float(), y)
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    module.train()
    first = _seconds(step, warmup)
    torch.cuda.reset_peak_memory_stats()
    train_s = _seconds(step, steps)
    peak = torch.cuda.max_memory_allocated() / 2**30
    module.eval()
    x2 = torch.cat([x, x])  # evaluation batch: twice the training batch

    def evaluate() -> None:
        with torch.inference_mode(), autocast:
            module(x2)

    _seconds(evaluate, warmup)
    eval_s = _seconds(evaluate, steps)
    return {
        "train": case.batch * steps / train_s,
        "eval": 2 * case.batch * steps / eval_s,
        "peak_gib": peak,
        "warmup_s": first,
    }


def _seconds(function: Callable[[], None], repeats: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def real_run() -> None:
    """`medx.train trainer=gpu model.compile=true` on the phantom: 2 epochs, test, MLflow."""
    with tempfile.TemporaryDirectory() as home:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home}/mlflow.db"
        cfg = compose(
            [
                f"paths.root_dir={home}",
                "trainer=gpu",
                "model.compile=true",
                "trainer.max_epochs=2",
                "data.num_workers=4",
                "callbacks.rich_progress_bar=null",
                "trainer.enable_progress_bar=false",
            ]
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(Path(home) / "run")
        HydraConfig().set_config(cfg)
        start = time.perf_counter()
        metrics = train(cfg)
        seconds = time.perf_counter() - start
    print(
        f"\nmedx.train trainer=gpu model.compile=true (phantom, resnet18, 2 epochs + test): "
        f"{seconds:.0f} s, precision {cfg.trainer.precision}, val/auroc "
        f"{metrics['val/auroc']:.3f}, test/auroc {metrics['test/auroc']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before (compile)")
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--no-run", action="store_true", help="skip the real medx.train run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA GPU on this machine: nothing to measure. Run this on a GPU machine.")
        return
    name = torch.cuda.get_device_name()
    print(
        f"{name}, torch {torch.__version__}; trainer=gpu chooses {mixed_precision()}; "
        f"{args.steps} timed steps after {args.warmup} warm-up steps"
    )
    header = f"{'model':<16}{'px':>5}{'batch':>6}  {'variant':<13}"
    print(f"{header}{'train img/s':>12}{'eval img/s':>12}{'peak GiB':>10}{'warm-up s':>11}")
    half = "bf16" if mixed_precision() == "bf16-mixed" else "fp16"
    dtype = torch.bfloat16 if half == "bf16" else torch.float16
    variants = (("fp32", None, False), (half, dtype, False), (f"{half}+compile", dtype, True))
    for model in args.models:
        case = CASES[model]
        for variant, mixed, compiled in variants:
            found = measure(case, mixed, compiled, args.steps, args.warmup)
            print(
                f"{case.name:<16}{case.size:>5}{case.batch:>6}  {variant:<13}"
                f"{found['train']:>12.0f}{found['eval']:>12.0f}{found['peak_gib']:>10.2f}"
                f"{found['warmup_s']:>11.1f}",
                flush=True,
            )
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    if not args.no_run:
        real_run()


if __name__ == "__main__":
    main()
