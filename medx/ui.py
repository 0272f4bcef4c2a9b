"""`python -m medx.ui`: the link to medx's runs table in the MLflow UI (`make ui` prints it).

MLflow 3's UI opens on a home page made for GenAI apps (traces, prompts, agents); a medx user
wants the experiment's runs table. This prints that page's address, and marks the experiment as
model training (`mlflow.experimentKind`, as medx.train does for every run) when it was created
before medx did so, so that the UI shows it as a "Machine learning" experiment.
"""

from __future__ import annotations

import argparse
import contextlib
import socket

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from medx.cli import user_errors
from medx.tracking import runs, store


def base_url(host: str, port: int) -> str:
    """The UI's address; a server on every interface is reached by this machine's name."""
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    return f"http://{shown}:{port}"


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table (the UI routes in the URL fragment)."""
    return f"{base}/#/experiments/{experiment_id}/runs"


def link(uri: str, experiment: str, base: str) -> str:
    """The line to print: the runs table of `experiment` in the store `uri`, or why not."""
    path = store.sqlite_path(uri)
    if path is not None and not path.is_file():  # reading must not create the database
        return f"MLflow UI: {base}  (no runs yet in {uri}: train with `make train`)"
    client = MlflowClient(tracking_uri=uri)
    with store.reading(uri):
        found = client.get_experiment_by_name(experiment)
    if found is None:
        return f"MLflow UI: {base}  (no experiment {experiment!r} in {uri} yet)"
    with contextlib.suppress(MlflowException):  # a read-only store: the link still works
        runs.tag_training_experiment(client, found.experiment_id)
    return f"MLflow UI, experiment {experiment!r}: {runs_url(base, found.experiment_id)}"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m medx.ui", description=__doc__)
    p.add_argument("--backend-store-uri", default=None, help="default: medx's own store")
    p.add_argument("--experiment", default="medx", help="logger.experiment_name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    args = p.parse_args(argv)
    with user_errors("medx.ui"):
        uri = args.backend_store_uri or store.default_uri()
        line = link(uri, args.experiment, base_url(args.host, args.port))
        print(line, flush=True)
        return line


if __name__ == "__main__":
    main()
