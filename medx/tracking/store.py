"""The MLflow tracking store: which one medx uses, failing fast when it cannot be used, and
where a sqlite store's artifacts go.

MLflow retries an unusable store for minutes (110 s of backoff for a sqlite path that is a
folder, then "unable to open database file" without the path) and creates a database wherever
a sqlite URI points, even when the user only meant to read one. `check` names the URI and what
is wrong with it in one line, in seconds, before any run is opened.

MLflow and SQLAlchemy are imported where they are used: `python -m medx.ui` asks this module
for the default store and must answer in well under 2 s (importing MLflow alone takes ~2 s).
"""

from __future__ import annotations

import os
import re
import sqlite3
import struct
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from medx.config import compose
from medx.errors import MedxError

if TYPE_CHECKING:
    from mlflow import MlflowClient

ARTIFACTS = "mlartifacts"  # beside the database, as `mlflow server` names its artifact folder
FIX = (
    "Fix MLFLOW_TRACKING_URI (or logger.tracking_uri), or unset it to use mlflow.db in "
    "$MEDX_HOME (else the working directory)."
)


def default_uri() -> str:
    """The store `python -m medx.train` logs to: logger.tracking_uri of the composed config
    ($MLFLOW_TRACKING_URI, else sqlite mlflow.db in $MEDX_HOME or the working directory)."""
    return str(compose(["logger=mlflow"]).logger.tracking_uri)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative to the working directory when the URI
    is), or None for other stores and in-memory sqlite."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database) if database and database != ":memory:" else None


def check(uri: str, write: bool = True) -> None:
    """Raise a MedxError naming `uri` when the store cannot be used (read, or `write` too)."""
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    elif (path := sqlite_path(uri)) is not None:
        _check_sqlite(uri, path, write)


def _check_server(uri: str) -> None:
    """One probe without MLflow's retries (with backoff, for minutes by default)."""
    from mlflow import MlflowClient

    saved = {k: os.environ.get(k) for k in _PROBE_ENV}
    os.environ.update(_PROBE_ENV)
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:
        raise MedxError(
            f"MLflow tracking server {uri} is not reachable ({type(err).__name__}). Start "
            "it (make mlflow-server), fix MLFLOW_TRACKING_URI, or unset MLFLOW_TRACKING_URI "
            "to log to the local sqlite store; logger=csv trains without MLflow."
        ) from err
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def _check_sqlite(uri: str, path: Path, write: bool) -> None:
    if path.is_dir():
        raise MedxError(
            f"MLflow store {uri}: {path} is a folder, not a database file; name a file in it, "
            f"e.g. sqlite:///{path.resolve() / 'mlflow.db'}."
        )
    if not path.exists():
        if not write:  # reading must not leave a new, empty database behind
            raise MedxError(f"MLflow store {uri}: {path} does not exist (nothing created). {FIX}")
        folder = next(p for p in path.resolve().parents if p.exists())
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            what = "is a file" if not folder.is_dir() else "is not writable"
            raise MedxError(
                f"MLflow store {uri}: {folder} {what}, so {path} cannot be created. {FIX}"
            )
        return
    if problem := _not_a_store(path, write):
        raise MedxError(f"MLflow store {uri}: {path} {problem}. {FIX}")
    # sqlite writes its journal beside the database: both must be writable
    if write and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)):
        raise MedxError(
            f"MLflow store {uri}: {path} is read-only (sqlite also writes a journal file in "
            f"{path.parent}); make both writable, or log elsewhere. {FIX}"
        )


def _not_a_store(path: Path, write: bool) -> str | None:
    """What makes the existing file `path` unusable as an MLflow store, or None."""
    try:
        with path.open("rb") as file:
            header = file.read(100)
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if header and not header.startswith(b"SQLite format 3\x00"):
        return "is not a SQLite database"
    if len(header) == 100:
        page_size = struct.unpack(">H", header[16:18])[0]
        pages = struct.unpack(">I", header[28:32])[0]
        counted = header[24:28] == header[92:96]  # the header's page count is valid
        expected = (65536 if page_size == 1 else page_size) * pages
        if counted and path.stat().st_size < expected:
            return f"is truncated ({path.stat().st_size} of {expected} bytes)"
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as err:
        return None if "locked" in str(err) else f"is not a readable SQLite database ({err})"
    if tables and "experiments" not in tables:
        return "is a SQLite database of something else (no MLflow experiments table)"
    if not tables and not write:
        return "is an empty database: nothing was logged to it"
    return None


@contextmanager
def reading(uri: str) -> Iterator[None]:
    """MLflow and SQL errors while reading the store, as one line naming it (not 500 lines
    of SQLAlchemy traceback): damage that the header checks of `check` could not see."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (MlflowException, SQLAlchemyError) as err:
        if isinstance(err, MlflowException):
            detail = err.message
        else:
            detail = str(getattr(err, "orig", None) or err)
        first = detail.strip().splitlines()[0] if detail.strip() else type(err).__name__
        raise MedxError(f"MLflow store {uri} could not be read: {first}. {FIX}") from err


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its artifacts: `mlartifacts/<experiment>`
    beside the database file. MLflow's own default, `./mlruns`, is relative to whatever folder
    the command ran from, so runs started from two folders would scatter their artifacts.
    None for a server: it stores artifacts where it was told to."""
    path = sqlite_path(uri)
    if path is None:
        return None
    folder = re.sub(r"[^\w.-]+", "_", experiment).strip("._") or "experiment"
    return str(path.resolve().parent / ARTIFACTS / folder)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created with `artifact_location` when it is new."""
    from mlflow.exceptions import MlflowException

    if (found := client.get_experiment_by_name(name)) is not None:
        return found.experiment_id
    location = artifact_location(client.tracking_uri, name)
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another job of the sweep created it meanwhile
        if (found := client.get_experiment_by_name(name)) is None:
            raise
        return found.experiment_id
