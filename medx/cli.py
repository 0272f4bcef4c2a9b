"""What every medx command line does with a user error: one clear line, exit status 1.

A `MedxError` (possibly wrapped by Hydra's instantiate or a DataLoader worker) is a problem
with the user's input or environment: a traceback would hide the sentence that says what to
do. Anything else is a bug in medx and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from medx.errors import MedxError

log = logging.getLogger("medx")


def user_error(err: BaseException | None) -> MedxError | None:
    """The MedxError behind `err` (Hydra wraps errors raised while instantiating)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, MedxError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def user_errors(prog: str = "medx") -> Iterator[None]:
    """Turn a user error raised in the body into `prog: <message>` on stderr and exit 1."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as err:
        from medx.tracking.runs import stopped_by  # a signal: the shell's 128 + its number

        if (signum := stopped_by(err)) is None:
            raise
        sys.exit(128 + int(signum))
    except Exception as err:
        if (medx_err := user_error(err)) is None:
            raise
        log.error("%s", medx_err)
        sys.exit(f"{prog}: {medx_err}")
