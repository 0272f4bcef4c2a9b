"""`python -m medx.train` as a user runs it: a subprocess, tiny settings, a tmp MLflow store.

For the tests of command-line features that only exist in a real Hydra process (sweepers,
launchers); imported by the test modules next to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run

TINY = [  # a tiny network on 40 phantom patients for one epoch: seconds per job
    "model.backbone=test_resnet",
    "data.n_patients=40",
    "data.image_size=48",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "eval.bootstrap=20",
    "callbacks.rich_progress_bar=null",
    "trainer.enable_progress_bar=false",
]


def run_train(
    tmp_path: Path, cache: Path, *overrides: str, multirun: bool = False, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python -m medx.train [-m] <TINY> <overrides>`, everything written under tmp_path."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store(tmp_path)}
    medx = [sys.executable, "-m", "medx.train", *(["-m"] if multirun else [])]
    paths = [f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache}"]
    return subprocess.run(
        [*medx, *TINY, *overrides, *paths], capture_output=True, text=True, env=env, timeout=timeout
    )


def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def sweep_runs(tmp_path: Path, experiment: str) -> tuple[Run, list[Run]]:
    """The sweep's parent run and its jobs' runs, as the MLflow store holds them."""
    client = MlflowClient(store(tmp_path))
    every = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in every if r.data.tags.get("medx.sweep") == "parent"]
    return parent, [r for r in every if r is not parent]
