"""Reporting callbacks: what an MLflow run shows beyond the metrics Lightning logs.

`RunReport` (conf/callbacks/default.yaml, `run_report`) logs the data set as the run's dataset
input when fitting starts; when it ends, the selected checkpoint's monitored value and epoch
(`val/auroc_best`, `val/auroc_best_epoch`: the checkpoint medx tests and keeps, not the last
epoch's), tags naming the selection metric, and the experiment's saved view, sorted by it
(medx.tracking.views). `EpochLearningRateMonitor` logs the learning rate by epoch, as every
other metric of medx's runs is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from mlflow.exceptions import MlflowException

from medx.tracking import datasets, runs, views

log = logging.getLogger(__name__)


class RunReport(Callback):
    """The run's data set (dataset input) and selected checkpoint (score, epoch) in MLflow.

    When fitting starts: the data module as the run's dataset input (`medx.tracking.datasets`:
    name, digest of the file list and pixels, source, split sizes as context; the runs
    table's Dataset column) and tags naming the selection metric and mode. When it ends: the
    selected checkpoint's monitored value and epoch as `<monitor>_best` and
    `<monitor>_best_epoch` (`val/auroc_best`, `val/auroc_best_epoch`; logged at that epoch),
    and the experiment's saved view re-sorted by it (`medx.tracking.views`). Nothing without
    an MLflow logger (`logger=csv|none`), on other DDP ranks, or without a monitored
    checkpoint (`fast_dev_run`). No arguments: `conf/callbacks/default.yaml`, `run_report`.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = runs.mlflow_loggers(trainer.loggers)
        checkpoint = trainer.checkpoint_callback
        for logger in loggers:
            if checkpoint is not None and checkpoint.monitor:
                logger.experiment.set_tag(logger.run_id, views.SELECTION_TAG, checkpoint.monitor)
                logger.experiment.set_tag(logger.run_id, views.SELECTION_MODE_TAG, checkpoint.mode)
        datamodule = trainer.datamodule
        if not loggers or datamodule is None or not hasattr(datamodule, "summary"):
            return
        for logger in loggers:
            found = datasets.log_dataset(logger.experiment, logger.run_id, datamodule)
            log.info("Data set %s (digest %s) logged as the run's input", found.name, found.digest)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        loggers = runs.mlflow_loggers(trainer.loggers)  # none on other DDP ranks
        if not loggers or checkpoint is None or checkpoint.best_model_score is None:
            return  # no MLflow, no checkpoint callback, fast_dev_run or nothing monitored
        monitor, score = checkpoint.monitor, float(checkpoint.best_model_score)
        epoch = selected_epoch(checkpoint.best_model_path)
        metrics = {views.selected_metric(monitor): score}
        if epoch is not None:
            metrics[views.selected_epoch_metric(monitor)] = float(epoch)
        for logger in loggers:
            # at the selected epoch: a point on the epoch charts where the checkpoint was taken
            logger.log_metrics(metrics, step=epoch if epoch is not None else None)
            update_experiment_view(logger, monitor, checkpoint.mode)
        where = f" (epoch {epoch})" if epoch is not None else ""
        log.info("Selected checkpoint: %s %.4f%s", monitor, score, where)


def selected_epoch(path: str | Path) -> int | None:
    """The epoch a checkpoint file was saved at (its `epoch` entry, read memory-mapped), or None
    when there is no such local file.

    Args:
        path: the checkpoint (Lightning's `best_model_path`).
    """
    if not path or "://" in str(path) or not Path(path).is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError) as err:
        log.warning("Could not read the epoch of %s: %s", path, err)
        return None
    epoch = saved.get("epoch") if isinstance(saved, dict) else None
    return int(epoch) if epoch is not None else None


def update_experiment_view(logger: Any, monitor: str, mode: str) -> None:
    """The experiment's saved view, now sorted by this run's selection metric (best first),
    with the key params the run has as columns.

    Args:
        logger: the run's MLflow logger (its client, run and experiment).
        monitor: the selection metric, e.g. "val/auroc".
        mode: "max" or "min": which way is better.
    """
    client = logger.experiment
    run = client.get_run(logger.run_id)
    params = [p for p in views.KEY_PARAMS if p in run.data.params]
    tags = client.get_experiment(logger.experiment_id).tags
    name, state = views.experiment_view(tags, monitor, mode, params)
    try:
        views.save_view(client, logger.experiment_id, views.EXPERIMENT_VIEW, name, state)
    except MlflowException as err:  # a server that refuses experiment tags: the run is fine
        log.warning("Could not save the experiment's MLflow view: %s", err)


class EpochLearningRateMonitor(LearningRateMonitor):
    """Lightning's LearningRateMonitor, its values stepped by epoch (medx.tracking.runs's
    EpochMLFlowLogger takes the `epoch` entry as the step)."""

    def _extract_stats(self, trainer: L.Trainer, interval: str) -> dict[str, float]:
        stats = super()._extract_stats(trainer, interval)
        if stats and self.logging_interval == "epoch":
            return {**stats, "epoch": trainer.current_epoch}
        return stats
