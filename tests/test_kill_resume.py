"""A training killed with SIGKILL resumes with `ckpt_path=last`, in the same MLflow run, and
ends with the metrics of a run that was never interrupted (deterministic trainer, same seed)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
from medx_cli import run_train, store
from mlflow import MlflowClient

TESTS = str(Path(__file__).parent)


class SigkillAtSecondEpoch(L.Callback):
    """The process receives a real SIGKILL (no cleanup, no except, no atexit) once the first
    epoch's checkpoint is on disk: what the OOM killer or a preempted node does."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_sigkill_then_ckpt_path_last(tmp_path: Path, phantom_cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    same = ["trainer.deterministic=true", "trainer.max_epochs=3", "test=false"]
    straight = run_train(tmp_path, phantom_cache, *same, "logger.experiment_name=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]

    kill = f"+callbacks.kill._target_={__name__}.SigkillAtSecondEpoch"
    killed = run_train(tmp_path, phantom_cache, *same, "logger.experiment_name=resume", kill)
    assert killed.returncode == -signal.SIGKILL

    client = MlflowClient(store(tmp_path))
    experiment = client.get_experiment_by_name("resume").experiment_id
    (dead,) = client.search_runs([experiment])
    assert dead.info.status == "RUNNING"  # nobody was left to end it
    assert (Path(dead.data.tags["medx.output_dir"]) / "checkpoints" / "last.ckpt").is_file()

    resumed = run_train(
        tmp_path, phantom_cache, *same, "logger.experiment_name=resume", "ckpt_path=last"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    (run,) = client.search_runs([experiment])
    assert run.info.run_id == dead.info.run_id and run.info.status == "FINISHED"
    (reference,) = client.search_runs([client.get_experiment_by_name("straight").experiment_id])
    for key in ("val/loss", "val/auroc", "val/acc"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == [m.step for m in client.get_metric_history(reference.info.run_id, key)]
        assert run.data.metrics[key] == pytest.approx(reference.data.metrics[key], abs=1e-6), key
