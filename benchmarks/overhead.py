"""Framework overhead: `medx.train` against a hand-written PyTorch loop doing the same work.

Both sides train the default composition (phantom, resnet18, batch 32, AdamW, cosine LR, the
same data module and DataLoader settings), training epochs only (no validation, no test), one
warm-up epoch, then `--epochs` timed epochs. The medx side is `medx.train.train` with its
default callbacks (checkpoints, early stopping, progress bar, LR monitor) and MLflow on (a
sqlite store in a temporary folder); it monitors train/loss, as there is no validation. The
hand loop is what a user writes without a framework: forward (normalising inputs, as the medx
model does), loss, backward, step, a detached running loss, the LR scheduler per epoch.

The two sides alternate in one process (`--pairs` times) because a shared machine's speed
drifts. Each epoch is timed on its own, its end-of-epoch work included; other people's load
only ever slows an epoch down, so the ratio of the two sides' fastest epochs is the least
disturbed figure, printed with the medians. `--cpu-time` compares the work instead (one
thread, loader in-process, CPU seconds), which load hardly moves. Goal (issue 14): >= 0.98.
Usage: python benchmarks/overhead.py [--pairs 3] [--epochs 3] [--cpu-time] [override ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, open_dict
from timing import best_of  # benchmarks/timing.py

from medx.config import compose
from medx.train import train

GOAL = 0.98
CLOCK = {"clock": time.perf_counter}  # --cpu-time: time.process_time


class Epochs:
    """Images/s of each timed epoch, from its start to the next one's (or the end of training):
    each epoch carries its own end-of-epoch work (checkpoints, MLflow, LR monitor)."""

    def __init__(self) -> None:
        self.speeds: list[float] = []
        self.images, self.start = 0, 0.0
        self.running = False

    def begin(self) -> None:
        self.images, self.start, self.running = 0, CLOCK["clock"](), True

    def end(self) -> None:
        if self.running:
            self.speeds.append(self.images / (CLOCK["clock"]() - self.start))
            self.running = False


class EpochClock(L.Callback):
    """Times medx.train's epochs after the warm-up ones (see `Epochs`)."""

    last: EpochClock | None = None

    def __init__(self, warmup: int = 1) -> None:
        self.warmup, self.epochs = warmup, Epochs()
        EpochClock.last = self

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.end()
        if trainer.current_epoch >= self.warmup:
            self.epochs.begin()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if self.epochs.running:
            self.epochs.images += trainer.datamodule.batch_size

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.end()


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
        cfg.callbacks = cfg.callbacks or {}  # callbacks=none: the clock alone
        cfg.callbacks.epoch_clock = {"_target_": f"{__name__}.EpochClock", "warmup": 1}
    HydraConfig().set_config(cfg)
    return cfg


def medx_side(cfg: DictConfig) -> list[float]:
    train(cfg)
    assert EpochClock.last is not None
    return EpochClock.last.epochs.speeds


def hand_side(cfg: DictConfig) -> list[float]:
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
    epochs = Epochs()
    for epoch in range(cfg.trainer.max_epochs):
        if epoch >= 1:
            epochs.begin()
        net.train()
        total = torch.zeros(())
        for x, y in loader:
            loss = F.cross_entropy(net((x - mean) / std), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            epochs.images += len(y)
        scheduler.step()
        epochs.end()
    del loader  # ends the persistent workers
    return epochs.speeds


PROBES = 5  # calls timed per item of the per-epoch accounting


class EpochExtras(L.Callback):
    """At the end of a short medx.train run, the seconds of what it does each epoch beyond the
    training steps, each the best of several calls: where the framework's time goes."""

    found: ClassVar[dict[str, float]] = {}
    redraws: ClassVar[float] = 0.0  # the progress bar's redraws a second

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(trainer.default_root_dir) / "probe.ckpt"
        found = EpochExtras.found
        found["checkpoint write (medx)"] = best_of(lambda: trainer.save_checkpoint(path), PROBES)
        medx_writer = trainer.strategy.checkpoint_io
        trainer.strategy.checkpoint_io = TorchCheckpointIO()
        found["checkpoint write (Lightning)"] = best_of(
            lambda: trainer.save_checkpoint(path), PROBES
        )
        trainer.strategy.checkpoint_io = medx_writer
        logger = trainer.loggers[0]
        found["MLflow write"] = best_of(lambda: logger.log_metrics({"probe": 1.0}, step=0), PROBES)
        for callback in trainer.callbacks:
            if isinstance(callback, LearningRateMonitor):
                found["LR monitor"] = best_of(
                    lambda c=callback: c.on_train_epoch_start(trainer, pl_module), PROBES
                )
            if isinstance(callback, RichProgressBar):
                found["progress bar, a batch"] = best_of(
                    lambda c=callback: c.on_train_batch_end(trainer, pl_module, None, None, 0), 50
                )
                if callback.progress is not None:  # redrawn by a thread, refresh_rate a second
                    found["progress bar, a redraw"] = best_of(callback.progress.refresh, 20)
                    EpochExtras.redraws = callback.refresh_rate


def epoch_extras(home: Path, overrides: list[str]) -> dict[str, float]:
    cfg = config(home, 0, ["+trainer.limit_train_batches=2", *overrides], run=999)
    with open_dict(cfg):
        cfg.callbacks.epoch_extras = {"_target_": f"{__name__}.EpochExtras"}
    train(cfg)
    return EpochExtras.found


def report_extras(found: dict[str, float], epoch: float, batches: int, norm: float) -> None:
    """Per-epoch extras now and before medx.training.checkpoint_io (two Lightning writes an
    epoch: the top-k file and last.ckpt), and the ratio they leave of an
    `epoch` of training steps."""
    common = found["MLflow write"] + found.get("LR monitor", 0.0)
    common += batches * found.get("progress bar, a batch", 0.0)
    common += epoch * EpochExtras.redraws * found.get("progress bar, a redraw", 0.0)
    now = found["checkpoint write (medx)"] + common
    before = 2 * found["checkpoint write (Lightning)"] + common
    print(f"\nwhere medx.train's time goes, per epoch of {batches} batches (best of 5 calls)")
    for name, seconds in found.items():
        print(f"  {name:<30} {seconds * 1e3:7.1f} ms")
    print(f"  input normalisation, a batch   {norm * 1e3:7.1f} ms   (in the model: both sides)")
    for name, extra in (("before: 2 Lightning writes", before), ("now: 1 medx write", now)):
        print(
            f"  {name:<30} {extra * 1e3:7.1f} ms an epoch -> ratio {epoch / (epoch + extra):.3f} "
            f"of a {epoch:.1f} s epoch"
        )


def normalise_cost(cfg: DictConfig, repeats: int = 50) -> float:
    """Seconds per batch of the (x - mean) / std the medx model applies in forward."""
    size, batch = cfg.data.image_size, cfg.data.batch_size
    x = torch.rand(batch, 3, size, size)
    mean, std = torch.rand(1, 3, 1, 1), torch.rand(1, 3, 1, 1) + 0.5
    return best_of(lambda: (x - mean) / std, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="hand/medx alternations")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per side and pair")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="one thread, loader in-process (data.num_workers=0), images per CPU second: the "
        "work each side does, which other people's load does not change",
    )
    parser.add_argument("overrides", nargs="*", help="medx.train overrides for both sides")
    args = parser.parse_args()
    unit = "images/s"
    if args.cpu_time:
        torch.set_num_threads(1)
        CLOCK["clock"] = time.process_time
        args.overrides = ["data.num_workers=0", *args.overrides]
        unit = "images/CPU s"
    speeds: dict[str, list[list[float]]] = {"hand": [], "medx": []}  # images/s, per run
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home}/mlflow.db"
        for pair in range(args.pairs):
            # alternate which side goes first, so neither always meets a warmer machine
            order = ("hand", "medx") if pair % 2 == 0 else ("medx", "hand")
            for side in order:
                cfg = config(home, args.epochs, args.overrides, run=len(loads))
                speeds[side].append((hand_side if side == "hand" else medx_side)(cfg))
                loads.append(os.getloadavg()[0])
                epochs = ", ".join(f"{v:.2f}" for v in speeds[side][-1])
                print(f"pair {pair + 1} {side}: {epochs} {unit} (load {loads[-1]:.1f})")
        images = EpochClock.last.epochs.images if EpochClock.last else 0  # an epoch's
        norm = normalise_cost(cfg)
        extras = epoch_extras(home, args.overrides)
    cpus = os.cpu_count() or 1
    every = {side: [v for run in runs for v in run] for side, runs in speeds.items()}
    best = {side: max(v) for side, v in every.items()}
    median = {side: statistics.median(v) for side, v in every.items()}
    pairs = [
        statistics.median(m) / statistics.median(h)
        for h, m in zip(speeds["hand"], speeds["medx"], strict=True)
    ]
    print(
        f"\nframework overhead: {args.pairs} alternations x {args.epochs} timed epochs per side "
        f"({cpus} CPUs, load average {min(loads):.1f}-{max(loads):.1f} during the run)"
        + (", CPU time of one thread" if args.cpu_time else "")
    )
    print(f"  {'':<26}{'hand loop':>10}{'medx.train':>12}{'ratio':>8}")
    print(
        f"  {'fastest epoch, ' + unit:<26}{best['hand']:>10.2f}{best['medx']:>12.2f}"
        f"{best['medx'] / best['hand']:>8.3f}   (others' load only slows: the least disturbed)"
    )
    print(
        f"  {'median epoch, ' + unit:<26}{median['hand']:>10.2f}{median['medx']:>12.2f}"
        f"{median['medx'] / median['hand']:>8.3f}"
    )
    print(f"  median of the pairs' ratios: {statistics.median(pairs):.3f}   goal >= {GOAL}")
    if max(loads) > cpus:
        print(
            "  measured under load (load average above the CPU count): epochs scatter by more "
            "than the goal's 2 %; the fastest epochs and the per-epoch accounting below are "
            "the figures to trust"
        )
    report_extras(extras, images / best["hand"], images // cfg.data.batch_size, norm)


if __name__ == "__main__":
    main()
