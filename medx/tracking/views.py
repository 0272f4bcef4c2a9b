"""Links that open MLflow's UI where a medx user wants to be, and the saved views they open.

MLflow 3's UI starts in its GenAI mode (traces, prompts, judges) and shows a runs table with
no result column. What its 3.17 UI honours, and medx uses:

- `?workflowType=machine_learning` in the URL: the "Model training" side bar and pages (the
  choice is then remembered by the browser);
- saved views: an experiment tag `mlflow.sharedViewState.<id>` holding a JSON envelope
  `{"name", "createdAt", "updatedAt", "state"}`, where `state` is the JSON text of the runs
  page's search facets (`searchFilter`, `orderByKey`, `orderByAsc`, ...) and UI state
  (`selectedColumns`, ...). `?viewStateShareKey=<id>` opens one; the "Views" menu lists them
  by name. The URL must carry no search facet of its own, or the view is not applied.
  The format is not documented: tests/test_mlflow_ui.py pins it in a real browser.
- `mlflow.note.content`, a run's (or experiment's) description, as Markdown.

Only the standard library here: `python -m medx.ui` prints its link in well under 2 s.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.error import HTTPError
from urllib.parse import unquote, urlencode
from urllib.request import Request, urlopen

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
EXPERIMENT_VIEW = "medx"  # the id of the experiment's own view (every trained model)
SELECTION_TAG = "medx.selection_metric"  # on each run: its monitored validation metric
SELECTION_MODE_TAG = "medx.selection_mode"  # "max" or "min"
SOURCE = "medx.train"  # tag mlflow.source.name of every training run (not of sweep parents)
DEFAULT_UI = "http://127.0.0.1:5000"  # where `make ui` serves a local store
KEY_PARAMS = (  # what tells trained models apart at a glance, when a run has them
    "model.backbone",
    "model.arch",
    "model.encoder",
    "data.name",
    "strategy.name",
)


def selected_metric(monitor: str) -> str:
    """The metric holding the selected (best) checkpoint's `monitor` value: `val/auroc_best`."""
    return f"{monitor}_best"


def selected_epoch_metric(monitor: str) -> str:
    """The metric holding the epoch of the selected checkpoint: `val/auroc_best_epoch`."""
    return f"{monitor}_best_epoch"


def column(kind: str, key: str) -> str:
    """A runs-table column id as MLflow's UI names it: metrics.`val/auroc`, params.`x.y`."""
    return f"{kind}.`{key}`"


DATASET_COLUMN = column("attributes", "Dataset")
RUN_NAME_COLUMN = column("attributes", "Run Name")


def view_state(
    order_by: str,
    ascending: bool,
    metrics: Iterable[str],
    params: Iterable[str],
    search_filter: str = "",
) -> dict[str, Any]:
    """The runs page's state: sorted by the metric `order_by`, only the runs `search_filter`
    matches (MLflow search syntax), columns in this order: run name, `metrics` (the first is
    the selection metric), `params`, the data set."""
    metric_columns = [column("metrics", m) for m in dict.fromkeys(metrics)]
    param_columns = [column("params", p) for p in dict.fromkeys(params)]
    widths = {c: 130 for c in metric_columns}
    widths.update({c: 170 for c in metric_columns if c.endswith("_epoch`")})
    return {
        "searchFilter": search_filter,
        "orderByKey": column("metrics", order_by),
        "orderByAsc": bool(ascending),
        "selectedColumns": [*metric_columns, *param_columns, DATASET_COLUMN],
        "columnOrder": [RUN_NAME_COLUMN, *metric_columns, *param_columns, DATASET_COLUMN],
        "columnWidths": {**widths, DATASET_COLUMN: 230},
    }


def envelope(name: str, state: Mapping[str, Any], created_ms: int | None = None) -> str:
    """The experiment tag value of a named saved view (MLflow 3.17's envelope)."""
    now = int(time.time() * 1000)
    created = now if created_ms is None else created_ms
    return json.dumps(
        {"name": name, "createdAt": created, "updatedAt": now, "state": json.dumps(state)}
    )


def read_envelope(value: str) -> tuple[str, int, dict[str, Any]]:
    """(name, createdAt, state) of a saved view's tag value."""
    found = json.loads(value)
    return found["name"], int(found["createdAt"]), json.loads(found["state"])


class _Client(Protocol):  # what `save_view` needs of an MlflowClient
    def get_experiment(self, experiment_id: str) -> Any: ...
    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None: ...


def save_view(client: _Client, experiment_id: str, view_id: str, name: str, state: dict) -> None:
    """Write (or replace) the saved view `view_id` of the experiment, keeping its creation time."""
    key = VIEW_TAG_PREFIX + view_id
    old = client.get_experiment(experiment_id).tags.get(key)
    created = None
    if old:
        try:
            created = read_envelope(old)[1]
        except (ValueError, KeyError, TypeError):
            created = None  # a view saved in another format: replaced
    client.set_experiment_tag(experiment_id, key, envelope(name, state, created))


def experiment_view(
    tags: Mapping[str, str], monitor: str, mode: str, params: Iterable[str]
) -> tuple[str, dict]:
    """The experiment's view after a run selected on `monitor`: every training run (no sweep
    parents), best first by that run's selection metric; the selection metrics, test
    counterparts and key params of the runs seen so far stay as columns."""
    metrics: list[str] = []
    shown: list[str] = []
    if old := tags.get(VIEW_TAG_PREFIX + EXPERIMENT_VIEW):
        try:
            for col in read_envelope(old)[2].get("selectedColumns", []):
                kind, _, key = col.partition(".")
                (metrics if kind == "metrics" else shown if kind == "params" else []).append(
                    key.strip("`")
                )
        except (ValueError, KeyError, TypeError):
            pass
    test = "test/" + monitor.split("/", 1)[1] if monitor.startswith("val/") else None
    new = [selected_metric(monitor), selected_epoch_metric(monitor), *([test] if test else [])]
    metrics = [*new, *(m for m in metrics if m not in new)]
    shown = [*shown, *(p for p in params if p not in shown)]
    state = view_state(
        selected_metric(monitor),
        mode == "min",
        metrics,
        shown,
        search_filter=f"tags.`mlflow.source.name` = '{SOURCE}'",
    )
    return f"medx: every trained model, best {monitor} first", state


def sweep_view(
    parent_id: str, parent_name: str, monitor: str, mode: str, swept: Iterable[str]
) -> tuple[str, dict]:
    """A sweep's view: its jobs only, best first by the selected checkpoint's `monitor`, with
    the swept params beside it."""
    metrics = [selected_metric(monitor), selected_epoch_metric(monitor)]
    state = view_state(
        selected_metric(monitor),
        mode == "min",
        metrics,
        swept,
        search_filter=f"tags.`mlflow.parentRunId` = '{parent_id}'",
    )
    return f"medx: {parent_name}, best {monitor} first", state


def ui_base(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000) -> str:
    """The UI's address: a tracking server serves its own; a local store is served by `make ui`
    (`mlflow ui` on host:port)."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return f"http://{host}:{port}"


def runs_url(base: str, experiment_id: str, view: str | None = None) -> str:
    """The experiment's runs table in "Model training" mode, in the saved view `view`."""
    query = {"workflowType": "machine_learning", "compareRunsMode": "TABLE"}
    if view:
        query["viewStateShareKey"] = view
    return f"{base}/#/experiments/{experiment_id}/runs?{urlencode(query)}"


# --- reading a store quickly (stdlib: sqlite3 for a local store, the REST API for a server) ---


class Found(NamedTuple):
    """An experiment as the link needs it: its id, its saved views, its latest sweep."""

    experiment_id: str
    views: dict[str, str]  # view id -> name
    latest_sweep: tuple[str, str] | None  # (parent run id, run name) with a saved view


def find(uri: str, experiment: str) -> Found | None:
    """The experiment `experiment` of the store `uri`, or None when it has none by that name.

    A sqlite store is read with sqlite3 and a tracking server over its REST API: no MLflow
    import, no database created (FileNotFoundError when a sqlite file is missing). Other
    stores (PostgreSQL, MySQL) go through MlflowClient.
    """
    if uri.startswith("sqlite:"):
        return _find_sqlite(sqlite_file(uri), experiment)
    if uri.startswith(("http://", "https://")):
        return _find_server(uri.rstrip("/"), experiment)
    return _find_client(uri, experiment)


def sqlite_file(uri: str) -> Path:
    """The database file of a `sqlite:///path` URI (relative to the working directory when
    the path is: `sqlite:///mlflow.db`; absolute with four slashes)."""
    path = unquote(uri.split(":", 1)[1].removeprefix("///").split("?", 1)[0])
    return Path(path)


def _named_views(tags: Mapping[str, str]) -> dict[str, str]:
    found = {}
    for key, value in tags.items():
        if key.startswith(VIEW_TAG_PREFIX):
            try:
                found[key.removeprefix(VIEW_TAG_PREFIX)] = read_envelope(value)[0]
            except (ValueError, KeyError, TypeError):
                continue  # a view someone shared from the UI in another format
    return found


def _latest_sweep(views: Mapping[str, str], parents: Iterable[tuple[str, str]]) -> Any:
    return next(((run_id, name) for run_id, name in parents if run_id in views), None)


def _find_sqlite(path: Path, experiment: str) -> Found | None:
    if not path.is_file():
        raise FileNotFoundError(path)
    with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
        row = db.execute(
            "SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'",
            (experiment,),
        ).fetchone()
        if row is None:
            return None
        experiment_id = str(row[0])
        tags = dict(
            db.execute("SELECT key, value FROM experiment_tags WHERE experiment_id = ?", row)
        )
        parents = db.execute(
            "SELECT r.run_uuid, r.name FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active' AND t.key = ? "
            "AND t.value = 'parent' ORDER BY r.start_time DESC",
            (row[0], "medx.sweep"),
        ).fetchall()
    found = _named_views(tags)
    return Found(experiment_id, found, _latest_sweep(found, parents))


def _find_server(base: str, experiment: str) -> Found | None:
    query = urlencode({"experiment_name": experiment})
    try:
        answer = _rest(f"{base}/api/2.0/mlflow/experiments/get-by-name?{query}")
    except HTTPError as err:
        if err.code == 404:
            return None
        raise
    got = answer["experiment"]
    tags = {t["key"]: t.get("value", "") for t in got.get("tags", [])}
    found = _named_views(tags)
    search = {
        "experiment_ids": [got["experiment_id"]],
        "filter": "tags.`medx.sweep` = 'parent'",
        "order_by": ["attributes.start_time DESC"],
        "max_results": 50,
    }
    runs = _rest(f"{base}/api/2.0/mlflow/runs/search", search).get("runs", [])
    parents = [(r["info"]["run_id"], r["info"].get("run_name", "")) for r in runs]
    return Found(str(got["experiment_id"]), found, _latest_sweep(found, parents))


def _rest(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = Request(url, data=data, headers={"Content-Type": "application/json"})
    with urlopen(request, timeout=10) as answer:
        return json.loads(answer.read() or b"{}")


def _find_client(uri: str, experiment: str) -> Found | None:
    from mlflow import MlflowClient  # a database server: MLflow's own client, slower to import

    client = MlflowClient(tracking_uri=uri)
    got = client.get_experiment_by_name(experiment)
    if got is None:
        return None
    found = _named_views(got.tags)
    parents = client.search_runs(
        [got.experiment_id],
        filter_string="tags.`medx.sweep` = 'parent'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    pairs = [(r.info.run_id, r.info.run_name) for r in parents]
    return Found(got.experiment_id, found, _latest_sweep(found, pairs))
