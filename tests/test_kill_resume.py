"""A training stopped by SIGTERM (SLURM, `timeout`), Ctrl-C (SIGINT) or SIGKILL (the OOM killer)
resumes with `ckpt_path=last`, in the same MLflow run, and ends with the metrics of a run that
was never interrupted (deterministic trainer, same seed): one run through all three, each sent
as a real signal to the `python -m medx.train` process in the middle of an epoch, after the
monitored metric stopped improving (so the best checkpoint is older than the last epoch).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from medx_cli import run_train, store
from mlflow import MlflowClient

TESTS = str(Path(__file__).parent)
STEPS_PER_EPOCH = 3  # the TINY phantom's training images in full batches of 16
SAME = [
    "trainer.deterministic=true",
    "trainer.max_epochs=3",
    "test=false",
    "data.batch_size=16",
    f"+callbacks.plateau._target_={__name__}.Plateau",
    "monitor=val/plateau",
    "monitor_mode=max",
]


class Plateau(L.Callback):
    """Logs `val/plateau`, a monitored metric that never improves after the first epoch."""

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("val/plateau", 0.0)


class SignalAt(L.Callback):
    """The process sends itself a real signal when training step `step` starts: no Python
    exception is raised here, what happens next is the signal's doing."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def signal_at(signum: signal.Signals, epoch: int, batch: int) -> list[str]:
    step = epoch * STEPS_PER_EPOCH + batch
    kill = "+callbacks.kill"
    return [
        f"{kill}._target_={__name__}.SignalAt",
        f"{kill}.signum={signum}",
        f"{kill}.step={step}",
    ]


def saved_at(checkpoint: Path) -> tuple[int, int]:
    """(epoch, global step) of a Lightning checkpoint."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return state["epoch"], state["global_step"]


@pytest.mark.slow
def test_sigterm_ctrl_c_and_sigkill_then_ckpt_path_last(
    tmp_path: Path, phantom_cache: Path, monkeypatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    straight = run_train(tmp_path, phantom_cache, *SAME, "logger.experiment_name=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    client = MlflowClient(store(tmp_path))

    def the_run():
        """The one MLflow run of experiment `resume`, and the last.ckpt of its latest process."""
        (run,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
        return run, Path(run.data.tags["medx.output_dir"]) / "checkpoints" / "last.ckpt"

    resume = ["logger.experiment_name=resume"]
    # SIGTERM in epoch 1: KILLED, last.ckpt = epoch 0 (the best one, too)
    stopped = run_train(tmp_path, phantom_cache, *SAME, *resume, *signal_at(signal.SIGTERM, 1, 1))
    run, last = the_run()
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert run.info.status == "KILLED"
    assert saved_at(last) == (0, STEPS_PER_EPOCH)
    first_id = run.info.run_id

    # resumed, then Ctrl-C in epoch 2: KILLED, last.ckpt = epoch 1 though val/plateau did not
    # improve (Lightning's save_last would have kept epoch 0 and repeated epoch 1)
    resume.append("ckpt_path=last")
    stopped = run_train(tmp_path, phantom_cache, *SAME, *resume, *signal_at(signal.SIGINT, 2, 1))
    run, last = the_run()
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert (run.info.run_id, run.info.status) == (first_id, "KILLED")
    assert saved_at(last) == (1, 2 * STEPS_PER_EPOCH)
    epoch_1 = last

    # resumed, then SIGKILL within epoch 2, before this process wrote any checkpoint: nobody
    # is left to end the run, and the next resume must go back to the previous process's file
    stopped = run_train(tmp_path, phantom_cache, *SAME, *resume, *signal_at(signal.SIGKILL, 2, 2))
    run, last = the_run()
    assert stopped.returncode == -signal.SIGKILL
    assert (run.info.run_id, run.info.status) == (first_id, "RUNNING")
    assert not last.exists() and run.data.tags["medx.resumed_from"] == str(epoch_1)

    resumed = run_train(tmp_path, phantom_cache, *SAME, *resume)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    run, last = the_run()
    assert (run.info.run_id, run.info.status) == (first_id, "FINISHED")
    assert run.data.tags["medx.resumed_from"] == str(epoch_1)
    (reference,) = client.search_runs([client.get_experiment_by_name("straight").experiment_id])
    for key in ("val/loss", "val/auroc", "val/acc"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == [m.step for m in client.get_metric_history(reference.info.run_id, key)]
        assert run.data.metrics[key] == pytest.approx(reference.data.metrics[key], abs=1e-6), key
    assert saved_at(last) == (2, 3 * STEPS_PER_EPOCH)
