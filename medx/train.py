"""`python -m medx.train`: fit, then test with the best checkpoint, tracked in MLflow.

Only Hydra and OmegaConf are imported at the top: `--help` and `--cfg job` answer without
loading torch, Lightning or MLflow, which `train` imports when it runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from medx.cli import hydra_help, user_errors
from medx.config import config_dir
from medx.errors import ConfigError

if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch.loggers import Logger

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one experiment from a composed config; return the final metrics."""
    import lightning as L

    from medx import schema
    from medx.models.base import compile_errors, declared_inputs
    from medx.models.card import training_card
    from medx.tracking import registry, runs
    from medx.training import resume
    from medx.training.checkpoint_io import CheckpointWriter

    schema.check(cfg)  # bad values named now, before seeding or opening the MLflow run
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    loggers = _loggers(cfg)
    with runs.run_status(loggers), compile_errors():
        _check_task(cfg)
        _default_monitor(cfg)
        for logger in runs.mlflow_loggers(loggers):
            runs.start_run(logger, cfg, output_dir, _overrides())
        datamodule = instantiate(cfg.data, _convert_="object")
        # What batches carry, as the model family declares it ("image" unless it says otherwise,
        # e.g. the quality baseline's "features"): known before setup, as it shapes model_kwargs.
        datamodule.inputs = declared_inputs(cfg.model._target_)
        datamodule.setup("fit")
        model = instantiate(
            cfg.model,
            **datamodule.model_kwargs(),
            strategy=cfg.strategy,
            optimizer=cfg.optimizer,
            scheduler=cfg.get("scheduler"),
            _convert_="object",  # plain lists/dicts: checkpoints load with weights_only
        )
        job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        model.card.update(
            training_card(
                datamodule,
                OmegaConf.to_container(cfg.data, resolve=True),
                OmegaConf.to_yaml(job, resolve=True),
                runs.run_info(loggers),
            )
        )
        runs.log_params(loggers, datamodule.summary())
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
        callbacks.append(resume.RandomState())  # so that ckpt_path resumes exactly
        # medx's checkpoint writer, unless the config brings its own plugins
        io = {} if cfg.trainer.get("plugins") else {"plugins": [CheckpointWriter()]}
        trainer: L.Trainer = instantiate(
            cfg.trainer, callbacks=callbacks, logger=loggers or False, **io
        )
        _check_sync_batchnorm(cfg, trainer)
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        metrics = dict(trainer.callback_metrics)
        if cfg.get("test", True):
            best = (
                trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            )
            log.info("Testing %s", best or "the final weights (no checkpoint was saved)")
            tester = trainer if _processes(trainer) == 1 else one_device(cfg, callbacks, loggers)
            tester.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
            metrics.update(tester.callback_metrics)
        registry.register_selected(trainer, loggers)  # logger.register_as=NAME
    metrics = {k: float(v) for k, v in metrics.items()}
    best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    if best is not None:
        metrics[f"{cfg.monitor}_best"] = float(best)
    _report(cfg, metrics, trainer, loggers)
    return metrics


def one_device(cfg: DictConfig, callbacks: list[L.Callback], loggers: list[Logger]) -> L.Trainer:
    """The configured Trainer on one device in this process: the one that tests.

    DDP's DistributedSampler pads the test set with repeated images so that every rank gets
    the same number; test metrics must count each image once (Lightning's own advice).
    """
    return instantiate(
        cfg.trainer,
        devices=1,
        num_nodes=1,
        strategy="auto",
        sync_batchnorm=False,
        callbacks=callbacks,
        logger=loggers or False,
    )


def _processes(trainer: L.Trainer) -> int:
    return trainer.num_devices * trainer.num_nodes


def _check_sync_batchnorm(cfg: DictConfig, trainer: L.Trainer) -> None:
    """torch's SyncBatchNorm fails on CPU tensors deep inside a worker: say so before fit."""
    from lightning.pytorch.accelerators import CPUAccelerator

    if cfg.trainer.get("sync_batchnorm") and isinstance(trainer.accelerator, CPUAccelerator):
        raise ConfigError(
            "trainer.sync_batchnorm=true needs GPUs (torch has no CPU SyncBatchNorm): add "
            "trainer.sync_batchnorm=false to train with DDP on CPU."
        )


def _report(
    cfg: DictConfig, metrics: dict[str, float], trainer: L.Trainer, loggers: list[Logger]
) -> None:
    from medx.tracking import runs

    best = metrics.get(f"{cfg.monitor}_best")
    lines = [f"{cfg.monitor} best {best:.4f}" if best is not None else ""]
    lines += [f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("test/")]
    for logger in runs.mlflow_loggers(loggers):
        lines.append(f"MLflow run {logger.run_id} ({logger._tracking_uri})")
    log.info("Done in %s\n  %s", cfg.paths.output_dir, "\n  ".join(x for x in lines if x))


def _loggers(cfg: DictConfig) -> list[Logger]:
    """The configured logger; fails fast on an unreachable MLflow server; resumes a run."""
    from medx.tracking import store
    from medx.training import resume

    if not cfg.get("logger"):
        return []
    if cfg.logger.get("tracking_uri"):
        store.check(str(cfg.logger.tracking_uri))  # in seconds, not after MLflow's retries
    run_id = resume.resolve_last(cfg)  # ckpt_path=last: continue that checkpoint's MLflow run
    return [instantiate(cfg.logger, **({"run_id": run_id} if run_id else {}))]


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _default_monitor(cfg: DictConfig) -> None:
    """`monitor: null` means the model family's own selection metric (val/auroc, val/dice)."""
    model_class = get_class(cfg.model._target_)
    with open_dict(cfg):
        cfg.monitor = cfg.get("monitor") or model_class.monitor
        cfg.monitor_mode = cfg.get("monitor_mode") or model_class.monitor_mode


def _check_task(cfg: DictConfig) -> None:
    """model and data must be of one task family: say so now, not as a shape error later."""
    model_task = get_class(cfg.model._target_).task
    data_task = get_class(cfg.data._target_).task
    if model_task != data_task:
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        raise ConfigError(
            f"model={choices.get('model', cfg.model._target_)} is a {model_task} model but "
            f"data={choices.get('data', cfg.data._target_)} is {data_task} data: pick a "
            f"{model_task} data set or a {data_task} model."
        )


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the monitored metric for sweepers (e.g. Optuna)."""
    with user_errors():
        metrics = train(cfg)
    # the selected checkpoint's score, not the last epoch's (DDP spawn does not return it)
    return metrics.get(f"{cfg.monitor}_best", metrics.get(cfg.monitor))


if __name__ == "__main__":
    if not hydra_help("train"):  # the same page as Hydra's, without its slow group listing
        main()
