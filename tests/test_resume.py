"""Runs that survive: a crashed fit resumes in its own MLflow run; a dead server fails fast."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import lightning as L
import pytest
from mlflow import MlflowClient
from omegaconf import open_dict

from medx.errors import MedxError
from medx.train import train


class CrashAfterFirstEpoch(L.Callback):
    """Stands for a crash (OOM, preemption) once the first epoch's checkpoint is written."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


def _cfg(make_cfg, output_dir: Path, *overrides: str):
    cfg = make_cfg("trainer.deterministic=true", "test=false", *overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def test_ckpt_path_last_resumes_the_crashed_run_and_matches_an_uninterrupted_one(
    make_cfg, mlflow_client: MlflowClient, tmp_path: Path
):
    straight = train(_cfg(make_cfg, tmp_path / "straight", "logger.experiment_name=straight"))

    crashing = _cfg(make_cfg, tmp_path / "crashed", "logger.experiment_name=resume")
    with open_dict(crashing):
        crashing.callbacks.crash = {"_target_": f"{__name__}.CrashAfterFirstEpoch"}
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashing)
    experiment = mlflow_client.get_experiment_by_name("resume").experiment_id
    (crashed,) = mlflow_client.search_runs([experiment])
    assert crashed.info.status == "FAILED"

    resumed = train(
        _cfg(make_cfg, tmp_path / "resumed", "logger.experiment_name=resume", "ckpt_path=last")
    )

    (run,) = mlflow_client.search_runs([experiment])
    assert run.info.run_id == crashed.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["medx.resumed_from"].endswith("crashed/checkpoints/last.ckpt")
    history = mlflow_client.get_metric_history(run.info.run_id, "val/loss")
    assert sorted(m.step for m in history) == sorted(
        m.step
        for m in mlflow_client.get_metric_history(
            mlflow_client.search_runs(
                [mlflow_client.get_experiment_by_name("straight").experiment_id]
            )[0].info.run_id,
            "val/loss",
        )
    )
    for key in ("val/loss", "val/auroc", "val/acc"):
        assert resumed[key] == pytest.approx(straight[key], abs=1e-6), key


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
