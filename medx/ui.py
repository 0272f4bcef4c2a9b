"""`python -m medx.ui`: the links that open the MLflow UI on medx's runs (`make ui` prints them).

MLflow 3's UI opens on a home page made for GenAI apps (traces, prompts, agents); a medx user
wants the experiment's runs table, in "Model training" mode, every trained model best first by
its selected checkpoint's validation metric. The first link opens that (a saved view medx.train
keeps in the experiment); the second, after a sweep, the latest sweep's jobs alone, with the
swept params beside the metric. Reads the store without writing to it, in well under 2 s.
"""

from __future__ import annotations

import argparse


def link_lines(uri: str, experiment: str, base: str) -> list[str]:
    """The lines to print: the runs table of `experiment` in the store `uri`, or why not."""
    from medx.tracking import views

    try:
        found = views.find(uri, experiment)
    except FileNotFoundError:  # reading must not create the database
        return [f"MLflow UI: {base}  (no runs yet in {uri}: train with `make train`)"]
    if found is None:
        return [f"MLflow UI: {base}  (no experiment {experiment!r} in {uri} yet)"]
    view = views.EXPERIMENT_VIEW if views.EXPERIMENT_VIEW in found.views else None
    what = "every trained model, best first" if view else "its runs"
    lines = [
        f"MLflow UI, experiment {experiment!r} ({what}): "
        f"{views.runs_url(base, found.experiment_id, view)}"
    ]
    if found.latest_sweep:
        run_id, name = found.latest_sweep
        lines.append(
            f"Latest sweep, {name} (its jobs, best first): "
            f"{views.runs_url(base, found.experiment_id, run_id)}"
        )
    return lines


def base_url(host: str, port: int) -> str:
    """The UI's address; a server on every interface is reached by this machine's name."""
    import socket

    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    return f"http://{shown}:{port}"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m medx.ui", description=__doc__)
    p.add_argument("--backend-store-uri", default=None, help="default: medx's own store")
    p.add_argument("--experiment", default="medx", help="logger.experiment_name")
    p.add_argument("--host", default="127.0.0.1", help="where `mlflow ui` listens")
    p.add_argument("--port", type=int, default=5000)
    args = p.parse_args(argv)

    from medx.cli import user_errors

    with user_errors("medx.ui"):
        uri = args.backend_store_uri
        if uri is None:
            from medx.tracking import store

            uri = store.default_uri()
        served = uri if uri.startswith(("http://", "https://")) else None
        base = served.rstrip("/") if served else base_url(args.host, args.port)
        text = "\n".join(link_lines(uri, args.experiment, base))
        print(text, flush=True)
        return text


if __name__ == "__main__":
    main()
