"""Unusable MLflow stores get one line naming them, in seconds; medx.compare never creates a
store, and says when nothing matched; a sqlite store keeps its artifacts beside itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow import MlflowClient

from medx import compare
from medx.errors import MedxError
from medx.tracking import store
from medx.tracking.sweep import PARENT_TAG, SWEEP_TAG
from medx.tracking.views import SELECTION_MODE_TAG, SELECTION_TAG
from medx.train import train


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """`path` unwritable, also for root (tests run as root in CI, and root ignores mode bits):
    the immutable attribute there (chattr +i: ext4/xfs/btrfs, CAP_LINUX_IMMUTABLE), else
    chmod a-w."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)]).returncode:
        pytest.skip(f"root cannot make {path} read-only here (no chattr +i on this file system)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.fixture(scope="module")
def store_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A real sqlite store with experiment `medx`: two runs with the selected checkpoint's
    val/auroc and a test/auroc that ranks them the other way, and a sweep parent with one job
    (made once: creating MLflow's tables takes seconds)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    client = MlflowClient(f"sqlite:///{path}")
    experiment = store.ensure_experiment(client, "medx")
    ids = {}
    selected = {SELECTION_TAG: "val/auroc", SELECTION_MODE_TAG: "max"}
    for name, val, test in (("a", 0.9, 0.7), ("b", 0.7, 0.9)):
        run = client.create_run(experiment, run_name=name, tags=selected)
        client.log_metric(run.info.run_id, "val/auroc_best", val)
        client.log_metric(run.info.run_id, "test/auroc", test)
        client.set_terminated(run.info.run_id)
        ids[name] = run.info.run_id
    parent = client.create_run(experiment, run_name="sweep-x", tags={SWEEP_TAG: "parent"})
    job = client.create_run(
        experiment, run_name="job", tags={PARENT_TAG: parent.info.run_id, **selected}
    )
    client.log_metric(job.info.run_id, "val/auroc_best", 0.8)
    client.log_metric(job.info.run_id, "test/auroc", 0.8)
    ids.update(parent=parent.info.run_id, job=job.info.run_id)
    return path, ids


@pytest.fixture
def logged(store_template, tmp_path: Path) -> tuple[str, Path, dict[str, str]]:
    """A copy of the template store: (URI, database file, run ids by role)."""
    template, ids = store_template
    path = tmp_path / "logged" / "mlflow.db"
    path.parent.mkdir()
    shutil.copy(template, path)
    return f"sqlite:///{path}", path, ids


def compare_fails(*argv: str) -> str:
    """medx.compare's one-line message (it exits with status 1)."""
    with pytest.raises(SystemExit) as exited:
        compare.main(list(argv))
    message = str(exited.value.code)
    assert message.startswith("medx: ") and "\n" not in message
    return message


# --- medx.train -------------------------------------------------------------------------------


def test_a_sqlite_store_that_is_a_folder_fails_in_seconds_naming_it(
    make_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    folder = tmp_path / "runs.db"
    folder.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder}")
    cfg = make_cfg()

    start = time.monotonic()
    with pytest.raises(MedxError, match=f"sqlite:///{folder}: {folder} is a folder"):
        train(cfg)
    assert time.monotonic() - start < 10  # MLflow alone retries for 110 s
    assert list(folder.iterdir()) == []


def test_a_store_in_a_read_only_folder_fails_in_seconds_naming_it(
    make_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    folder = tmp_path / "locked"
    folder.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder}/mlflow.db")
    cfg = make_cfg()
    with read_only(folder):
        start = time.monotonic()
        with pytest.raises(MedxError, match=f"{folder} is not writable, so .*mlflow.db cannot"):
            train(cfg)
        assert time.monotonic() - start < 10


def test_a_read_only_database_fails_naming_it_before_a_run_opens(
    make_cfg, monkeypatch: pytest.MonkeyPatch, logged
):
    uri, path, _ = logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = make_cfg()
    with read_only(path), pytest.raises(MedxError, match=f"{uri}: {path} is read-only"):
        train(cfg)
    assert (
        len(MlflowClient(uri).search_runs([store.ensure_experiment(MlflowClient(uri), "medx")]))
        == 4
    )


def test_artifacts_of_a_new_experiment_go_beside_the_sqlite_store_not_into_the_cwd(
    make_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tracked_runs
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # fails in data setup, after the run and its config artifacts were created: quick
    cfg = make_cfg("data=pneumonia", f"data.root={tmp_path / 'nowhere'}")
    with pytest.raises(MedxError):
        train(cfg)

    (run,) = tracked_runs()
    artifacts = tmp_path / "mlartifacts" / "medx" / run.info.run_id / "artifacts"
    assert run.info.artifact_uri in (str(artifacts), artifacts.as_uri())
    assert (artifacts / "config.yaml").is_file()
    assert list(elsewhere.iterdir()) == []  # no ./mlruns


def test_the_default_store_is_the_one_the_logger_config_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MEDX_HOME", str(tmp_path))
    assert store.default_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.lab:5000")
    assert store.default_uri() == "http://mlflow.lab:5000"


# --- medx.compare -----------------------------------------------------------------------------


def test_compare_ranks_by_the_selected_checkpoint_never_by_a_test_metric(
    logged, capsys: pytest.CaptureFixture
):
    uri, _, _ = logged
    compare.main(["--tracking-uri", uri])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "val/auroc_best" in lines[0]
    assert [line.split()[:2] for line in lines[1:]] == [["1", "a"], ["2", "job"], ["3", "b"]]

    compare.main(["--tracking-uri", uri, "--metric", "test/auroc"])  # only when asked
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[:2] for line in lines[1:]] == [["1", "b"], ["2", "job"], ["3", "a"]]


def test_compare_on_a_missing_store_creates_nothing(tmp_path: Path):
    path = tmp_path / "typo.db"
    message = compare_fails("--tracking-uri", f"sqlite:///{path}")
    assert f"{path} does not exist" in message
    assert not path.exists()


@pytest.mark.parametrize("damage", ["truncated", "not a database", "empty"])
def test_compare_on_a_damaged_store_names_it(logged, tmp_path: Path, damage: str):
    _, path, _ = logged
    bad = tmp_path / "bad.db"
    content = path.read_bytes()
    if damage == "truncated":
        bad.write_bytes(content[: len(content) // 2])
    elif damage == "not a database":
        bad.write_text("experiment,run\nmedx,a\n")
    else:
        bad.write_bytes(b"")
    start = time.monotonic()
    message = compare_fails("--tracking-uri", f"sqlite:///{bad}")
    assert f"sqlite:///{bad}: {bad} " in message
    assert {"truncated": "is truncated", "not a database": "is not a SQLite database"}.get(
        damage, "is an empty database"
    ) in message
    assert time.monotonic() - start < 10


def test_compare_on_a_store_damaged_inside_names_it(logged, tmp_path: Path):
    """Pages zeroed behind an intact header: MLflow's SQL error, as one line."""
    _, path, _ = logged
    bad = tmp_path / "bad.db"
    content = bytearray(path.read_bytes())
    page = 4096
    for start in range(page, len(content), page):  # every page but the first (the schema)
        content[start : start + page] = bytes(page)
    bad.write_bytes(bytes(content))
    message = compare_fails("--tracking-uri", f"sqlite:///{bad}")
    assert f"sqlite:///{bad}" in message


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--metric", "test/aucroc"], "--metric test/aucroc: none of the 3 runs logged it"),
        (["--parent", "0" * 32], f"--parent {'0' * 32}: no such run"),
        (["--experiment", "nope"], "No MLflow experiment 'nope'"),
        (["--filter", "params.model.backbone = 'vgg16'"], "No runs in MLflow experiment"),
    ],
)
def test_compare_says_what_matched_nothing(logged, args: list[str], expected: str):
    uri, _, _ = logged
    assert expected in compare_fails("--tracking-uri", uri, *args)


def test_compare_parent_must_be_a_sweep_parent_with_jobs(logged):
    uri, _, ids = logged
    assert "is not a sweep's parent run" in compare_fails(
        "--tracking-uri", uri, "--parent", ids["a"]
    )
    compare.main(["--tracking-uri", uri, "--parent", ids["parent"]])  # its one job: fine


def test_compare_out_that_is_a_file_is_named(logged, tmp_path: Path):
    uri, _, _ = logged
    out = tmp_path / "compare.csv"
    out.write_text("")
    assert f"--out {out} is a file" in compare_fails("--tracking-uri", uri, "--out", str(out))
