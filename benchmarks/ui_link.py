"""`python -m medx.ui` answers in under 2 s: the link to the MLflow UI, before `mlflow ui` starts.

Measured side by side in one run, each the best of 3 fresh processes: `python -m medx.ui` on a
real sqlite store (one logged run with medx's saved view), with the default store (composing
the Hydra config) and with `--backend-store-uri`; and, for scale, `import mlflow` alone (what
medx.ui took before it read the store with sqlite3).

    python benchmarks/ui_link.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import best_of

GOAL_S = 2.0


def run(*args: str, cwd: Path, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, *args], check=True, capture_output=True, cwd=cwd, env=env)


def main() -> None:
    from mlflow import MlflowClient

    from medx.tracking import store, views

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        client = MlflowClient(uri)
        experiment = store.ensure_experiment(client, "medx")
        run_id = client.create_run(experiment, run_name="resnet18-phantom-full").info.run_id
        client.log_metric(run_id, "val/auroc_best", 0.9)
        name, state = views.experiment_view({}, "val/auroc", "max", ["model.backbone"])
        views.save_view(client, experiment, views.EXPERIMENT_VIEW, name, state)
        repo = Path(__file__).resolve().parent.parent
        env = {**os.environ, "MEDX_HOME": tmp, "PYTHONPATH": str(repo)}
        env.pop("MLFLOW_TRACKING_URI", None)
        default = best_of(lambda: run("-m", "medx.ui", cwd=root, env=env))
        given = best_of(lambda: run("-m", "medx.ui", "--backend-store-uri", uri, cwd=root, env=env))
        mlflow = best_of(lambda: run("-c", "import mlflow", cwd=root, env=env))
    print(f"python -m medx.ui (default store)      {default:5.2f} s   goal < {GOAL_S} s")
    print(f"python -m medx.ui --backend-store-uri  {given:5.2f} s")
    ratio = mlflow / default
    print(f"python -c 'import mlflow' (for scale)  {mlflow:5.2f} s   {ratio:.1f}x medx.ui")


if __name__ == "__main__":
    main()
