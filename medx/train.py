"""`python -m medx.train`: fit, then test with the best checkpoint, tracked in MLflow."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from medx import tracking
from medx.config import config_dir
from medx.errors import MedxError

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one experiment from a composed config; return the final metrics."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    loggers = _loggers(cfg)
    with tracking.run_status(loggers):
        for logger in tracking.mlflow_loggers(loggers):
            tracking.start_run(logger, cfg, output_dir, _overrides())
        datamodule = instantiate(cfg.data, _convert_="object")
        datamodule.setup("fit")
        model = instantiate(
            cfg.model,
            num_classes=datamodule.num_classes,
            class_counts=datamodule.class_counts["train"],
            strategy=cfg.strategy,
            optimizer=cfg.optimizer,
            scheduler=cfg.get("scheduler"),
            _convert_="object",  # plain lists/dicts: checkpoints load with weights_only
        )
        datamodule.mean, datamodule.std = model.mean, model.std
        tracking.log_params(loggers, _data_summary(datamodule))
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics = dict(trainer.callback_metrics)
        if cfg.get("test", True):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            log.info("Testing %s", best or "the final weights (no checkpoint was saved)")
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
            metrics.update(trainer.callback_metrics)
    return {k: float(v) for k, v in metrics.items()}


def _loggers(cfg: DictConfig) -> list[Logger]:
    return [instantiate(cfg.logger)] if cfg.get("logger") else []


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _data_summary(datamodule: L.LightningDataModule) -> dict:
    counts = datamodule.class_counts
    return {
        "dataset.classes": ",".join(datamodule.classes),
        "dataset.counts": {s: dict(zip(datamodule.classes, c, strict=True)) for s, c in counts.items()},
    }


def user_error(err: BaseException) -> MedxError | None:
    """The MedxError behind `err` (Hydra wraps errors raised while instantiating)."""
    while err is not None:
        if isinstance(err, MedxError):
            return err
        err = err.__cause__ or err.__context__
    return None


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the monitored metric for sweepers (e.g. Optuna)."""
    try:
        metrics = train(cfg)
    except Exception as err:
        if (medx_err := user_error(err)) is None:
            raise
        log.error("%s", medx_err)
        sys.exit(f"medx: {medx_err}")
    return metrics.get(cfg.monitor)


if __name__ == "__main__":
    main()
