"""Framework overhead: `medx.train` against a hand-written PyTorch loop doing the same work.

Both sides train the default composition (phantom, resnet18, batch 32, AdamW, cosine LR, the
same data module and DataLoader settings), training epochs only (no validation, no test), one
warm-up epoch, then `--epochs` timed epochs. The medx side is `medx.train.train` with its
default callbacks (checkpoints, early stopping, progress bar, LR monitor) and MLflow on (a
sqlite store in a temporary folder); it monitors train/loss, as there is no validation. The
hand loop is what a user writes without a framework: forward (normalising inputs, as the medx
model does), loss, backward, step, a detached running loss, the LR scheduler per epoch.

The two sides alternate in one process (`--pairs` times) because a shared machine's speed
drifts: the headline is the median of the per-pair ratios. Goal (issue 14): >= 0.98.
Usage: python benchmarks/overhead.py [--pairs 3] [--epochs 2] [--profile] [override ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from medx.config import compose
from medx.train import train

GOAL = 0.98


class EpochClock(L.Callback):
    """Wall time and images from the first timed epoch's start to the end of fit: every
    callback's epoch-end work (checkpoint writes, MLflow, LR monitor) falls inside."""

    last: EpochClock | None = None

    def __init__(self, warmup: int = 1) -> None:
        self.warmup, self.images, self.start, self.seconds = warmup, 0, 0.0, 0.0
        EpochClock.last = self

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.current_epoch >= self.warmup:
            self.images += trainer.datamodule.batch_size

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.start


def config(home: Path, epochs: int, overrides: list[str], run: int) -> DictConfig:
    cfg = compose(
        [
            f"paths.root_dir={home}",
            f"trainer.max_epochs={1 + epochs}",
            "+trainer.limit_val_batches=0",
            "test=false",
            "monitor=train/loss",
            "monitor_mode=min",
            *overrides,
        ]
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(home / f"run{run}")
        cfg.callbacks.epoch_clock = {"_target_": f"{__name__}.EpochClock", "warmup": 1}
    HydraConfig().set_config(cfg)
    return cfg


def medx_side(cfg: DictConfig) -> tuple[int, float]:
    train(cfg)
    clock = EpochClock.last
    assert clock is not None
    return clock.images, clock.seconds


def hand_side(cfg: DictConfig) -> tuple[int, float]:
    """The same data module, network, optimizer and schedule in a plain PyTorch loop."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="object")
    datamodule.setup("fit")
    module = instantiate(
        cfg.model, **datamodule.model_kwargs(), strategy=cfg.strategy, _convert_="object"
    )
    net, mean, std = module.net, module.input_mean, module.input_std
    optimizer = instantiate(cfg.optimizer)(net.parameters())
    scheduler = instantiate(cfg.scheduler)(optimizer)
    loader = datamodule.train_dataloader()
    images, start = 0, 0.0
    for epoch in range(cfg.trainer.max_epochs):
        if epoch == 1:
            start = time.perf_counter()
        net.train()
        total = torch.zeros(())
        for x, y in loader:
            loss = F.cross_entropy(net((x - mean) / std), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            images += len(y) if epoch >= 1 else 0
        scheduler.step()
    seconds = time.perf_counter() - start
    del loader  # ends the persistent workers
    return images, seconds


def normalise_cost(cfg: DictConfig, repeats: int = 50) -> float:
    """Seconds per batch of the (x - mean) / std the medx model applies in forward."""
    size, batch = cfg.data.image_size, cfg.data.batch_size
    x = torch.rand(batch, 3, size, size)
    mean, std = torch.rand(1, 3, 1, 1), torch.rand(1, 3, 1, 1) + 0.5
    start = time.perf_counter()
    for _ in range(repeats):
        (x - mean) / std
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="hand/medx alternations")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per side")
    parser.add_argument("overrides", nargs="*", help="medx.train overrides for both sides")
    args = parser.parse_args()
    hand, medx, ratios = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home}/mlflow.db"
        cfg = None
        for pair in range(args.pairs):
            # alternate which side goes first, so neither always meets a warmer machine
            order = ("hand", "medx") if pair % 2 == 0 else ("medx", "hand")
            speed = {}
            for side in order:
                cfg = config(home, args.epochs, args.overrides, run=2 * pair + len(speed))
                images, seconds = (hand_side if side == "hand" else medx_side)(cfg)
                speed[side] = images / seconds
                print(
                    f"pair {pair + 1} {side:<4} {images} images in {seconds:6.1f} s: "
                    f"{speed[side]:6.1f} images/s",
                    flush=True,
                )
            hand.append(speed["hand"])
            medx.append(speed["medx"])
            ratios.append(speed["medx"] / speed["hand"])
        assert cfg is not None
        norm = normalise_cost(cfg)
    load = os.getloadavg()[0]
    print(
        f"\nframework overhead ({os.cpu_count()} CPUs, load average {load:.1f} at the end; "
        f"{args.pairs} alternations x {args.epochs} timed epochs, medians)"
    )
    print(f"  hand loop   {statistics.median(hand):7.1f} images/s")
    print(f"  medx.train  {statistics.median(medx):7.1f} images/s")
    print(
        f"  ratio       {statistics.median(ratios):7.3f}   goal >= {GOAL}   "
        f"(per pair: {', '.join(f'{r:.3f}' for r in ratios)})"
    )
    batch = cfg.data.batch_size
    per_batch = batch / statistics.median(hand)
    print(
        f"  input normalisation in forward: {norm * 1e3:.2f} ms per batch of {batch} "
        f"({norm / per_batch:.2%} of a training step)"
    )
    if load > (os.cpu_count() or 1):
        print(
            "  measured under load (load average above the CPU count): compare ratios, "
            "not throughputs",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
