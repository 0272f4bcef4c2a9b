"""Resuming a crashed run: `ckpt_path=last` finds its checkpoint and MLflow run, and continues both.

The run of the same `logger.experiment_name` and run name that started last and whose output
directory (tag `medx.output_dir`) holds `checkpoints/last.ckpt` is the one continued: metrics
go on in that MLflow run, which ends FINISHED instead of staying FAILED. `RandomState` puts the
random generators into every checkpoint, so a resumed fit draws the batches and augmentations
the uninterrupted one would have drawn.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from mlflow import MlflowClient
from omegaconf import DictConfig, open_dict

from medx.errors import ConfigError

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
    client = MlflowClient(tracking_uri=str(logger.tracking_uri))
    experiment = client.get_experiment_by_name(logger.experiment_name)
    runs = (
        client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`mlflow.runName` = '{logger.run_name}'",
            order_by=["attributes.start_time DESC"],
        )
        if experiment
        else []
    )
    for run in runs:
        checkpoint = Path(run.data.tags.get("medx.output_dir", "")) / "checkpoints" / "last.ckpt"
        if run.data.tags.get("medx.output_dir") and checkpoint.is_file():
            with open_dict(cfg):
                cfg.ckpt_path = str(checkpoint)
            client.update_run(run.info.run_id, status="RUNNING")
            client.set_tag(run.info.run_id, "medx.resumed_from", str(checkpoint))
            log.info("Resuming MLflow run %s from %s", run.info.run_id, checkpoint)
            return run.info.run_id
    raise ConfigError(
        f"ckpt_path=last: no run named {logger.run_name!r} in MLflow experiment "
        f"{logger.experiment_name!r} ({logger.tracking_uri}) has checkpoints/last.ckpt in its "
        "output directory (tag medx.output_dir). Give the file: ckpt_path=/path/last.ckpt."
    )


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
