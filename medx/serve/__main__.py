"""`python -m medx.serve MODEL [--port 8000] ...`: start the service (see `settings`)."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace

from medx.cli import user_errors
from medx.serve.settings import from_parsed, parser


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
    import uvicorn

    # Every worker process builds its app from the environment (uvicorn imports the factory
    # by name), so one way of passing the settings serves one worker and many.
    os.environ.update(settings.to_env())
    uvicorn.run(
        "medx.serve.app:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
    )


if __name__ == "__main__":
    sys.exit(main())
