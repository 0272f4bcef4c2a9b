"""Runs that survive: a crashed fit resumes in its own MLflow run; a dead server fails fast."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from mlflow import MlflowClient
from omegaconf import open_dict

from medx.errors import MedxError
from medx.train import train


class Plateau(L.Callback):
    """Logs `val/plateau`, a monitored metric that never improves after the first epoch: the
    best checkpoint stays epoch000 while training goes on (a val AUROC stuck at 1.0)."""

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("val/plateau", 0.0)


class CrashAt(L.Callback):
    """Stands for a crash (OOM, preemption) at the start of training step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def _cfg(make_cfg, output_dir: Path, *overrides: str, **callbacks: dict):
    cfg = make_cfg("trainer.deterministic=true", "test=false", *overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.callbacks.update(callbacks)
    return cfg


def saved_at(checkpoint: Path) -> tuple[int, int]:
    """(epoch, global step) of a Lightning checkpoint."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return state["epoch"], state["global_step"]


PLATEAU = {"plateau": {"_target_": f"{__name__}.Plateau"}}
SAME = ("trainer.max_epochs=3", "monitor=val/plateau", "monitor_mode=max")


def test_ckpt_path_last_after_a_plateau_continues_from_the_last_epoch_and_matches_a_straight_run(
    make_cfg, mlflow_client: MlflowClient, tmp_path: Path
):
    straight = train(
        _cfg(make_cfg, tmp_path / "straight", *SAME, "logger.experiment_name=straight", **PLATEAU)
    )
    steps_per_epoch = saved_at(tmp_path / "straight" / "checkpoints" / "last.ckpt")[1] // 3

    crash = {"crash": {"_target_": f"{__name__}.CrashAt", "step": 2 * steps_per_epoch}}
    crashing = _cfg(
        make_cfg, tmp_path / "crashed", *SAME, "logger.experiment_name=resume", **PLATEAU, **crash
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashing)
    experiment = mlflow_client.get_experiment_by_name("resume").experiment_id
    (crashed,) = mlflow_client.search_runs([experiment])
    assert crashed.info.status == "FAILED"
    checkpoints = tmp_path / "crashed" / "checkpoints"
    # the metric stopped improving after epoch 0; last.ckpt is still the last completed epoch
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch000.ckpt", "last.ckpt"]
    assert saved_at(checkpoints / "last.ckpt") == (1, 2 * steps_per_epoch)

    resumed = train(
        _cfg(
            make_cfg,
            tmp_path / "resumed",
            *SAME,
            "logger.experiment_name=resume",
            "ckpt_path=last",
            **PLATEAU,
        )
    )

    (run,) = mlflow_client.search_runs([experiment])
    assert run.info.run_id == crashed.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["medx.resumed_from"].endswith("crashed/checkpoints/last.ckpt")
    (reference,) = mlflow_client.search_runs(
        [mlflow_client.get_experiment_by_name("straight").experiment_id]
    )
    for key in ("val/loss", "val/auroc", "val/acc"):
        history = mlflow_client.get_metric_history
        steps = [m.step for m in history(run.info.run_id, key)]
        assert steps == [m.step for m in history(reference.info.run_id, key)], key  # no repeats
        assert resumed[key] == pytest.approx(straight[key], abs=1e-6), key
    assert saved_at(tmp_path / "resumed" / "checkpoints" / "last.ckpt") == saved_at(
        tmp_path / "straight" / "checkpoints" / "last.ckpt"
    )


def test_every_n_train_steps_refreshes_last_ckpt_inside_an_epoch_but_selects_at_epoch_ends(
    make_cfg, tmp_path: Path
):
    crash = {"crash": {"_target_": f"{__name__}.CrashAt", "step": 3}}
    cfg = _cfg(
        make_cfg,
        tmp_path / "long_epoch",
        "data.batch_size=8",  # ~10 steps per epoch
        "callbacks.model_checkpoint.every_n_train_steps=2",
        **crash,
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)

    checkpoints = tmp_path / "long_epoch" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]  # no best mid-epoch
    assert saved_at(checkpoints / "last.ckpt") == (0, 2)

    train(_cfg(make_cfg, tmp_path / "resumed", f"ckpt_path={checkpoints / 'last.ckpt'}"))
    assert saved_at(tmp_path / "resumed" / "checkpoints" / "last.ckpt")[0] == 1  # max_epochs=2


def test_ckpt_path_last_without_a_previous_run_says_what_to_do(make_cfg):
    with pytest.raises(MedxError, match=r"ckpt_path=last.*ckpt_path=/path/last\.ckpt"):
        train(make_cfg("ckpt_path=last", "logger.experiment_name=nothing"))


def test_an_unreachable_tracking_server_fails_before_data_setup(
    make_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    with socket.socket() as sock:  # a loopback port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    cfg = make_cfg("data=pneumonia", f"data.root={tmp_path / 'nowhere'}")  # setup would fail

    start = time.monotonic()
    with pytest.raises(MedxError, match=f"127.0.0.1:{port}.*MLFLOW_TRACKING_URI"):
        train(cfg)
    assert time.monotonic() - start < 30
