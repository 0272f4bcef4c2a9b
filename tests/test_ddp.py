"""`trainer=ddp` from the command line: two CPU processes (gloo), one output dir, one MLflow run."""

from __future__ import annotations

from pathlib import Path

import pytest
from medx_cli import run_train, store
from mlflow import MlflowClient

from medx.errors import ConfigError
from medx.train import train


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_gives_one_run_and_one_output_dir(
    tmp_path: Path, phantom_cache: Path
):
    out = run_train(
        tmp_path,
        phantom_cache,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "data.batch_size=8",  # 28 training images per rank: a few batches each
        "eval.bootstrap=100",
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MEMBER: 2/2" in out.stderr  # Lightning's word that rank 1 joined the process group

    client = MlflowClient(store(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("medx").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.strategy"] == "ddp_spawn"
    assert run.data.params["trainer.devices"] == "2"
    assert {"val/auroc", "test/auroc", "test/sensitivity_at_op"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "evaluation"} <= artifacts

    (output_dir,) = (tmp_path / "outputs").glob("*/*")
    assert run.data.tags["medx.output_dir"] == str(output_dir)
    assert len(list((output_dir / "checkpoints").glob("epoch*.ckpt"))) == 1
    assert not (tmp_path / "multirun").exists()


def test_sync_batchnorm_on_cpu_is_a_config_error(make_cfg, tracked_runs):
    cfg = make_cfg("trainer=ddp", "trainer.accelerator=cpu", "trainer.sync_batchnorm=true")
    with pytest.raises(ConfigError, match=r"trainer\.sync_batchnorm=false"):
        train(cfg)
    (run,) = tracked_runs()
    assert run.info.status == "FAILED"
