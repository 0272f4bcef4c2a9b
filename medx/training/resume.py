"""Resuming a crashed run: `ckpt_path=last` finds its checkpoint and MLflow run, and continues both.

The run of the same `logger.experiment_name` and run name that started last and whose output
directory (tag `medx.output_dir`) holds `checkpoints/last.ckpt` (or, when the process that last
continued it died within its first epoch, the checkpoint that one resumed from, tag
`medx.resumed_from`) is the one continued: metrics
go on in that MLflow run, which ends FINISHED instead of staying FAILED. `ResumableCheckpoint`
keeps `last.ckpt` at the last completed epoch; `RandomState` puts the random generators into
every checkpoint, so a resumed fit draws the batches and augmentations the uninterrupted one
would have drawn.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from mlflow import MlflowClient
from omegaconf import DictConfig, open_dict

from medx.errors import ConfigError
from medx.tracking.runs import RUN_NAME_ENV

log = logging.getLogger(__name__)


def resolve_last(cfg: DictConfig) -> str | None:
    """For `ckpt_path=last`: set cfg.ckpt_path to the checkpoint; return its MLflow run id."""
    if cfg.get("ckpt_path") != "last":
        return None
    logger = cfg.get("logger") or {}
    if not str(logger.get("_target_", "")).endswith("MLFlowLogger"):
        raise ConfigError(
            "ckpt_path=last finds the previous run through MLflow (logger=mlflow); with "
            f"logger={logger.get('_target_', 'none')} give the file: ckpt_path=/path/last.ckpt."
        )
    # a sweep's job is named by the values it sweeps (medx.tracking.sweep.ParentRun), not by
    # the configured run name its siblings share
    name = os.environ.get(RUN_NAME_ENV) or str(logger.run_name)
    client = MlflowClient(tracking_uri=str(logger.tracking_uri))
    experiment = client.get_experiment_by_name(logger.experiment_name)
    runs = (
        client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`mlflow.runName` = '{name}'",
            order_by=["attributes.start_time DESC"],
        )
        if experiment
        else []
    )
    for run in runs:
        if (checkpoint := _last_checkpoint(run.data.tags)) is not None:
            with open_dict(cfg):
                cfg.ckpt_path = str(checkpoint)
            client.update_run(run.info.run_id, status="RUNNING")
            client.set_tag(run.info.run_id, "medx.resumed_from", str(checkpoint))
            log.info("Resuming MLflow run %s from %s", run.info.run_id, checkpoint)
            return run.info.run_id
    raise ConfigError(
        f"ckpt_path=last: no run named {name!r} in MLflow experiment "
        f"{logger.experiment_name!r} ({logger.tracking_uri}) has checkpoints/last.ckpt in its "
        "output directory (tag medx.output_dir). Give the file: ckpt_path=/path/last.ckpt."
    )


def _last_checkpoint(tags: dict[str, str]) -> Path | None:
    """The run's newest last.ckpt: in its latest output directory, else (that process died
    before finishing an epoch) the one that process resumed from."""
    candidates = []
    if output_dir := tags.get("medx.output_dir"):
        candidates.append(Path(output_dir) / "checkpoints" / "last.ckpt")
    if resumed_from := tags.get("medx.resumed_from"):
        candidates.append(Path(resumed_from))
    return next((c for c in candidates if c.is_file()), None)


class RandomState(L.Callback):
    """Saves and restores the Python, NumPy and torch generators with each checkpoint.

    Lightning restores weights, optimizer and loop state but not the generators, so without
    this a resumed run would shuffle and augment differently from an uninterrupted one.
    Stored as plain lists and tensors, so checkpoints still load with weights_only.
    """

    def state_dict(self) -> dict[str, Any]:
        version, keys, gauss = random.getstate()
        name, np_keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": [version, list(keys), gauss],
            "numpy": [name, np_keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version, keys, gauss = state_dict["python"]
        random.setstate((version, tuple(keys), gauss))
        name, np_keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, np.asarray(np_keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class ResumableCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (top-k by the monitored metric, once per validation) whose
    `last.ckpt` is always the last completed epoch.

    Lightning 2.6 rewrites `last.ckpt` (save_last=True) only when a top-k checkpoint is written,
    i.e. when the metric improves: once it plateaus, `ckpt_path=last` would silently repeat
    every epoch since. Here `last.ckpt` is written after every epoch's validation (so the
    epoch's metrics, early-stopping and random state are in it) and, with
    `every_n_train_steps=N`, also every N optimizer steps inside an epoch (long epochs). Unlike
    Lightning's argument of that name, N does not move the top-k selection off epoch ends,
    where the monitored metric is fresh.

    Args:
        save_last: write `last.ckpt` (after every epoch, and every N steps with
            `every_n_train_steps`).
        every_n_train_steps: also refresh `last.ckpt` every N optimizer steps inside an epoch
            (`callbacks.model_checkpoint.every_n_train_steps`; None: once per epoch).
        **kwargs: Lightning's `ModelCheckpoint` arguments (`dirpath`, `filename`, `monitor`,
            `mode`, `save_top_k`, ...), as `conf/callbacks/default.yaml` gives them.
    """

    def __init__(
        self, *, save_last: bool = True, every_n_train_steps: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(save_last=False, **kwargs)  # last.ckpt is written here, not by Lightning
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ConfigError(
                f"callbacks.model_checkpoint.every_n_train_steps={every_n_train_steps}: give a "
                "number of optimizer steps >= 1, or null (last.ckpt once per epoch)."
            )
        self.keep_last = bool(save_last)
        self.last_every_n_train_steps = every_n_train_steps or 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        every = self.last_every_n_train_steps
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch  # epoch end follows
        if every and trainer.global_step % every == 0 and not last_batch:
            self.write_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):  # no validation: the epoch ends here
            self.write_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self.write_last(trainer)

    def write_last(self, trainer: L.Trainer) -> None:
        """`<dirpath>/last.ckpt` of the trainer's state now (written atomically), or a hard link
        to the top-k file written at this step."""
        fitting = trainer.state.fn == TrainerFn.FITTING
        if not self.keep_last or not fitting or trainer.sanity_checking or trainer.fast_dev_run:
            return
        self.last_model_path = os.path.join(
            self.dirpath, f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        )
        if self._saved_top_k_now(trainer):
            self._hard_link(trainer, self._last_checkpoint_saved, self.last_model_path)
        else:
            trainer.save_checkpoint(self.last_model_path, self.save_weights_only)
        if trainer.is_global_zero:  # MLFlowLogger(log_model="all") uploads what it is told of
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _saved_top_k_now(self, trainer: L.Trainer) -> bool:
        """The top-k file written at this very step holds the state last.ckpt would: it is
        written after validation, early stopping and the random state, like last.ckpt."""
        saved = self._last_checkpoint_saved
        local = "://" not in saved and "://" not in self.last_model_path
        return bool(saved) and local and self._last_global_step_saved == trainer.global_step

    @staticmethod
    def _hard_link(trainer: L.Trainer, target: str, link: str) -> None:
        """last.ckpt as a second name for the top-k file, not a second 134 MB write (resnet18 +
        AdamW: a tenth of a second an epoch). A hard link, made under a temporary name and
        renamed over: removing the top-k file later, or rewriting either name (written to a
        new file and renamed, medx.training.checkpoint_io), never touches the other."""
        if trainer.is_global_zero:
            partial = f"{link}.{os.getpid()}.partial"
            try:
                os.link(target, partial)
                os.replace(partial, link)
            except OSError:  # a file system without hard links
                Path(partial).unlink(missing_ok=True)
                shutil.copyfile(target, link)
        trainer.strategy.barrier()
