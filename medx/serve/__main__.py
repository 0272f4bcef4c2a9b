"""`python -m medx.serve MODEL [--port 8000] ...`: start the service (see `settings`).

Exit status (also in `--help`): 0 after Ctrl-C; 1 for a bad setting (one line) or a model
that cannot be loaded (the log says why, then the server stops within seconds of starting);
3 when uvicorn cannot start (e.g. the port is taken). SIGTERM ends it as that signal does.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from medx.cli import user_errors
from medx.serve.settings import from_parsed, parser

log = logging.getLogger("medx.serve")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with user_errors("medx.serve"):
        flags = parser()  # its defaults are MEDX_SERVE_* variables: a bad one is one line
    args = flags.parse_args(argv)  # --help answers here, before anything heavy is imported
    with user_errors("medx.serve"):
        settings = from_parsed(args)
        settings.check_files()
    if settings.workers > 1 and not settings.threads:  # N processes must share the cores
        settings = replace(settings, threads=max(1, (os.cpu_count() or 1) // settings.workers))
    if settings.exposed and settings.token is None:
        log.warning(
            "Listening on %s without a token: anyone who can reach this machine can send "
            "images and read the model card. Set MEDX_SERVE_TOKEN (or --token), or listen on "
            "127.0.0.1 behind a proxy that authenticates.",
            settings.host,
        )
    import uvicorn

    from medx.serve.app import FAILURE_FILE

    # Every worker process builds its app from the environment (uvicorn imports the factory
    # by name), so one way of passing the settings serves one worker and many.
    os.environ.update(settings.to_env())
    with tempfile.TemporaryDirectory(prefix="medx-serve-") as folder:
        failure = Path(folder) / "failed"  # written by a worker that cannot load the model
        os.environ[FAILURE_FILE] = str(failure)
        uvicorn.run(
            "medx.serve.app:app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level,
        )
        if failure.exists():  # the worker logged why; uvicorn stopped the others
            sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
