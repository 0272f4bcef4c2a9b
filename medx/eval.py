"""`python -m medx.eval ckpt_path=PATH [group=choice] [key=value ...]`: evaluate a checkpoint.

The training run's own resolved config (`<output_dir>/config.yaml`, next to `checkpoints/`) is
the starting point, so the data split, preprocessing and evaluation settings are the run's and
the test metrics come out the same. `key=value` changes a key (`data.root=...`); `data=choice`
swaps a whole group for its config file. The result is a new MLflow run (`eval-<run name>`,
tagged with the source run) holding the clinical evaluation of `medx.evaluation`.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from medx import tracking
from medx.config import compose, config_dir
from medx.errors import ConfigError
from medx.evaluation.callback import ClinicalEvaluation
from medx.train import user_error

log = logging.getLogger(__name__)

USAGE = "usage: python -m medx.eval ckpt_path=PATH [config=PATH] [group=choice] [key=value ...]"


def load_config(ckpt_path: Path, overrides: list[str], config: Path | None = None) -> DictConfig:
    """The training run's config with `overrides` applied (group swaps composed from conf/)."""
    config = config or ckpt_path.resolve().parent.parent / "config.yaml"
    if not config.is_file():
        raise ConfigError(
            f"{config} not found: medx.eval reads the training run's config.yaml from the "
            "run's output folder (the parent of checkpoints/); pass config=PATH otherwise."
        )
    cfg = OmegaConf.load(config)
    pairs = [o.split("=", 1) for o in overrides]
    groups = {k: v for k, v in pairs if "." not in k and (Path(config_dir()) / k).is_dir()}
    if groups:  # compose the new group with the run's paths, then take it resolved
        keep = [f"paths.{k}={cfg.paths[k]}" for k in ("root_dir", "data_dir", "cache_dir")]
        composed = compose([f"seed={cfg.seed}", *keep, *overrides])
        for group in groups:
            cfg[group] = OmegaConf.to_container(composed[group], resolve=True)
    dotted = [o for (k, _), o in zip(pairs, overrides, strict=True) if k not in groups]
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotted))


def check_checkpoint(ckpt_path: Path, cfg: DictConfig, num_classes: int) -> None:
    """A checkpoint of another model or data config: say which, before any shape error."""
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=False)["hyper_parameters"]
    wanted = {"backbone": cfg.model.get("backbone"), "num_classes": num_classes}
    found = {k: saved.get(k) for k in wanted}
    if found != wanted:
        raise ConfigError(
            f"{ckpt_path} holds a {found['backbone']} with {found['num_classes']} classes, but "
            f"the config asks for model.backbone={wanted['backbone']} on data={cfg.data.name} "
            f"with {num_classes} classes: evaluate a checkpoint of this config's run, or give "
            "that run's config (config=<its output dir>/config.yaml)."
        )


def evaluate(ckpt_path: Path, cfg: DictConfig) -> dict[str, float]:
    """Test the checkpoint on the config's data with the clinical evaluation; new MLflow run."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    source_dir = ckpt_path.resolve().parent.parent
    output_dir = source_dir / "eval" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.trainer.default_root_dir = str(output_dir)
        if cfg.get("logger"):
            cfg.logger.run_name = f"eval-{cfg.logger.run_name}"
            cfg.logger.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", cfg.logger.tracking_uri)
    loggers = [instantiate(cfg.logger)] if cfg.get("logger") else []
    with tracking.run_status(loggers):
        for logger in tracking.mlflow_loggers(loggers):
            tracking.start_run(logger, cfg, output_dir, [f"ckpt_path={ckpt_path}"])
            _tag_source(logger, ckpt_path, source_dir)
        datamodule = instantiate(cfg.data, _convert_="object")
        model_class = get_class(cfg.model._target_)
        datamodule.inputs = getattr(model_class, "inputs", "image")
        datamodule.setup("test")
        check_checkpoint(ckpt_path, cfg, datamodule.num_classes)
        model = model_class.load_from_checkpoint(ckpt_path, map_location="cpu")
        datamodule.mean, datamodule.std = model.mean, model.std
        # eval.* wins: the saved callback settings were resolved from the run's eval.* values
        settings = dict((cfg.get("callbacks") or {}).get("clinical_evaluation") or {})
        settings.pop("_target_", None)
        callback = ClinicalEvaluation(**{**settings, **(cfg.get("eval") or {})})
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[callback], logger=loggers or False)
        trainer.test(model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    lines = [f"{k} {v:.4f}" for k, v in sorted(metrics.items())]
    log.info("Evaluated %s in %s\n  %s", ckpt_path, output_dir, "\n  ".join(lines))
    return metrics


def _tag_source(logger: MLFlowLogger, ckpt: Path, source_dir: Path) -> None:
    client = logger.experiment
    client.set_tag(logger.run_id, "mlflow.source.name", "medx.eval")
    client.set_tag(logger.run_id, "medx.checkpoint", str(ckpt))
    runs = client.search_runs(
        [logger.experiment_id], f"tags.`medx.output_dir` = '{source_dir}'", max_results=1
    )
    if runs:
        client.set_tag(logger.run_id, "medx.source_run_id", runs[0].info.run_id)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """CLI: `key=value` arguments, `ckpt_path` required."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    args = sys.argv[1:] if argv is None else argv
    named = dict(
        a.split("=", 1) for a in args if "=" in a and a.split("=", 1)[0] in ("ckpt_path", "config")
    )
    if "ckpt_path" not in named or any("=" not in a for a in args):
        sys.exit(USAGE)
    ckpt_path = Path(named["ckpt_path"])
    overrides = [a for a in args if a.split("=", 1)[0] not in named]
    try:
        if not ckpt_path.is_file():
            raise ConfigError(f"ckpt_path={ckpt_path} does not exist.")
        config = Path(named["config"]) if "config" in named else None
        return evaluate(ckpt_path, load_config(ckpt_path, overrides, config))
    except Exception as err:
        if (medx_err := user_error(err)) is None:
            raise
        log.error("%s", medx_err)
        sys.exit(f"medx: {medx_err}")


if __name__ == "__main__":
    main()
