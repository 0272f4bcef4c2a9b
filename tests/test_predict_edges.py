"""`medx.predict` at its edges (issue 21), as a hostile new user meets them: inputs whose names
collide, a DICOM that lies about its size, options out of range or that would do nothing, an
`--out` that cannot be written, runs where some or no image could be predicted, and labels
that do not match the model's classes.

One tiny classifier (trained once for the module on the phantom) answers every test; the
images are real chest X-rays ($MEDX_DATA) and real DICOM files written with pydicom.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from dicom_files import cxr_gray, dicom_dataset, j2k_zeros, save, size_lie, variant_dataset
from pydicom import uid
from test_serve import _train

from medx import cli
from medx.predict import main as predict_main
from medx.predict import run as predict_run

GROWTH_MB = 100  # what refusing one file may cost at most; decoding the J2K bomb costs > 300


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, phantom_cache: Path) -> Path:
    """A binary classifier (NORMAL, OPACITY) trained for one epoch on 64 px phantom images."""
    return _train(tmp_path_factory.mktemp("classifier"), phantom_cache)


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "predictions.csv").open() as f:
        return list(csv.DictReader(f))


def _png(path: Path, gray: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), gray), path
    return path


def _refused(argv: list[str], *words: str) -> str:
    """medx.predict refuses `argv` with one line (exit status 1) holding `words`."""
    with pytest.raises(SystemExit) as stop:
        predict_main(argv)
    message = str(stop.value.code)
    assert message.startswith("medx.predict: ") and "\n" not in message, message
    for word in words:
        assert word in message, (word, message)
    return message


# --- 1. per-image outputs: no two inputs share one ----------------------------------------------


def test_inputs_with_the_same_stem_get_their_own_overlays_and_rows_name_them(
    ckpt: Path, medx_data: Path, tmp_path: Path
):
    studies = tmp_path / "studies"
    names = ["a/x.png", "a/x.jpeg", "b/x.jpeg", "s1/IM0001.dcm", "s2/IM0001.dcm",
             "1.2.840.10008.3.1", "1.2.840.10008.3.2"]  # fmt: skip
    written = []
    for i, name in enumerate(names):  # each image of a size of its own: an overlay shows
        gray = cxr_gray(medx_data, i, size=80 + 24 * i)  # which image it was drawn on
        path = studies / name
        if path.suffix in (".png", ".jpeg"):
            written.append(_png(path, gray))
        else:  # DICOM, also without an extension (found by its DICM marker)
            written.append(save(dicom_dataset(gray), path))
    out = tmp_path / "out"

    predict_main([str(ckpt), str(studies), "--out", str(out), "--gradcam", "--workers", "0",
                  "--no-progress"])  # fmt: skip

    rows = {Path(r["path"]): r for r in _rows(out)}
    assert set(rows) == set(written)
    overlays = [Path(rows[p]["gradcam"]) for p in written]
    assert len(set(overlays)) == len(written)  # none shared
    for image, overlay in zip(written, overlays, strict=True):
        assert overlay.is_relative_to(out / "gradcam"), overlay
        drawn = cv2.imread(str(overlay))
        assert drawn is not None, overlay
        side = 80 + 24 * written.index(image)
        assert drawn.shape[:2] == (side, side), (image, overlay)  # drawn on its own image
    assert overlays[3].parent.name == "s1" and overlays[4].parent.name == "s2"  # tree mirrored


# --- 2. a DICOM whose codestream claims more than its header --------------------------------------

_MEASURE = """
import json, sys
from medx.predict import main

def peak_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024

ckpt, warm, lie = sys.argv[1:]
main([ckpt, warm, "--workers", "0"])  # imports, the model, the JPEG 2000 decoder: warm
before = peak_mb()
(row,) = main([ckpt, lie, "--workers", "0"])  # read in this process, as it is measured
print(json.dumps({"growth_mb": peak_mb() - before, "error": row["error"]}))
"""


def test_a_dicom_whose_codestream_declares_more_than_its_header_is_refused_with_bounded_memory(
    ckpt: Path, medx_data: Path, tmp_path: Path
):
    gray = cxr_gray(medx_data)  # 224 x 224 in the header; 8000 x 8000 in 252 bytes of J2K
    lie = size_lie(gray, j2k_zeros(8000), uid.JPEG2000Lossless, tmp_path / "lie.dcm")
    warm = save(variant_dataset("jpeg2000", gray), tmp_path / "ok.dcm")

    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(ckpt), str(warm), str(lie)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["growth_mb"] < GROWTH_MB, result
    for words in ("8000x8000 px", "JPEG 2000 codestream (SIZ marker)", "--max-pixels"):
        assert words in result["error"], result["error"]


# --- 3, 4, 8. options out of range, or that would do nothing: one line, before any work ---------


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--threshold", "nan"], ["--threshold nan", "between 0 and 1"]),
        (["--threshold", "1.5"], ["--threshold 1.5", "between 0 and 1"]),
        (["--qc", "qc.ckpt", "--qc-threshold", "-0.2"], ["--qc-threshold -0.2"]),
        (["--batch-size", "0"], ["--batch-size 0"]),
        (["--workers", "-1"], ["--workers -1"]),
        (["--max-pixels", "0"], ["--max-pixels 0"]),
        (["--gradcam"], ["--gradcam does nothing without --out"]),
        (["--qc-mode", "refuse"], ["--qc-mode does nothing without --qc"]),
        (["--qc-threshold", "0.4"], ["--qc-threshold does nothing without --qc"]),
        (["--gradcam-class", "OPACITY"], ["--gradcam-class does nothing without --gradcam"]),
    ],
)
def test_an_option_out_of_range_or_without_effect_is_refused_before_the_model_is_opened(
    tmp_path: Path, flags: list[str], words: list[str]
):
    image = _png(tmp_path / "chest.png", np.full((64, 64), 128, np.uint8))
    nowhere = tmp_path / "not-opened.ckpt"  # the options are refused before the model is read
    _refused([str(nowhere), str(image), *flags], *words)


def test_options_a_classifier_does_not_use_and_a_classifier_as_lungs_are_refused(
    ckpt: Path, tmp_path: Path
):
    image = _png(tmp_path / "chest.png", np.full((64, 64), 128, np.uint8))
    out = tmp_path / "out"
    _refused([str(ckpt), str(image), "--postprocess", "lungs"], "--postprocess is for segmenters")
    _refused(
        [str(ckpt), str(image), "--lungs", str(ckpt), "--out", str(out)],
        "--lungs needs a lung segmentation model",
        "classification model",
    )
    assert not (out / "predictions.csv").exists()  # refused before inference


def test_a_fatal_error_is_printed_once(tmp_path: Path):
    image = _png(tmp_path / "chest.png", np.full((64, 64), 128, np.uint8))
    done = subprocess.run(
        [sys.executable, "-m", "medx.predict", str(tmp_path / "none.ckpt"), str(image)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.count("none.ckpt") == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_using_a_phantom_model_warns_once_and_says_nothing_about_training(
    ckpt: Path, medx_data: Path, tmp_path: Path, caplog
):
    folder = tmp_path / "images"
    for i in range(3):
        _png(folder / f"chest{i}.png", cxr_gray(medx_data, i, size=96))
    model = str(shutil.copy(ckpt, tmp_path / "phantom.ckpt"))  # one this process has not used

    predict_main([model, str(folder), "--batch-size", "1", "--workers", "0", "--no-progress"])
    predict_main([model, str(folder / "chest0.png"), "--workers", "0"])

    assert caplog.text.count("was trained on synthetic data (data=phantom)") == 1, caplog.text
    assert "blocks trainable" not in caplog.text  # a training message, not for using a model


# --- 5. an --out that cannot be written --------------------------------------------------------


def test_an_out_folder_that_cannot_be_written_is_one_line(ckpt: Path, tmp_path: Path):
    image = _png(tmp_path / "chest.png", np.full((64, 64), 128, np.uint8))
    notes = tmp_path / "notes.txt"
    notes.write_text("a file, not a folder")
    _refused([str(ckpt), str(image), "--out", str(notes / "preds")], f"lies under the file {notes}")
    _refused([str(ckpt), str(image), "--out", str(notes)], "is a file")
    if os.geteuid() != 0:  # as root, a folder's mode does not stop writes
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        _refused([str(ckpt), str(image), "--out", str(locked)], "cannot be written")


def read_only(folder: Path, *command: str) -> subprocess.CompletedProcess:
    """`command` run with `folder` bind-mounted read-only, in a mount namespace of its own
    (unshare); the test is skipped where no such namespace can be made."""
    namespace = ["unshare", "--map-root-user", "--mount"]
    if not shutil.which("unshare") or subprocess.run([*namespace, "true"]).returncode:
        pytest.skip("no mount namespace here (unshare): a read-only file system cannot be made")
    script = f'mount --bind -o ro "{folder}" "{folder}" && exec "$@"'
    return subprocess.run(
        [*namespace, "sh", "-c", script, "sh", *command],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_an_out_folder_on_a_read_only_file_system_is_one_line(ckpt: Path, tmp_path: Path):
    image = _png(tmp_path / "chest.png", np.full((64, 64), 128, np.uint8))
    shelf = tmp_path / "shelf"
    shelf.mkdir()

    done = read_only(shelf, sys.executable, "-m", "medx.predict", str(ckpt), str(image), "--out",
                     str(shelf / "preds"))  # fmt: skip

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("medx.predict:")]
    assert f"--out {shelf / 'preds'} cannot be written (Read-only file system)" in line


# --- 6. the exit status says how much was predicted --------------------------------------------


def test_the_exit_status_says_whether_all_some_or_none_were_predicted(
    ckpt: Path, medx_data: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
):
    good = _png(tmp_path / "mixed" / "chest.png", cxr_gray(medx_data, size=96))
    empty = tmp_path / "mixed" / "empty.png"
    empty.write_bytes(b"")
    (tmp_path / "broken").mkdir()
    for i, data in enumerate((b"", b"\x89PNG\r\n\x1a\n" + bytes(40))):
        (tmp_path / "broken" / f"bad{i}.png").write_bytes(data)
    (tmp_path / "broken" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    flags = ["--workers", "0", "--no-progress"]

    assert predict_run([str(ckpt), str(good), *flags]) == 0  # all
    assert predict_run([str(ckpt), str(empty), *flags]) == 1  # one zero-byte file: none
    assert predict_run([str(ckpt), str(tmp_path / "broken"), *flags]) == 1  # every one failed
    capsys.readouterr()
    assert (
        predict_run([str(ckpt), str(tmp_path / "mixed"), "--out", str(tmp_path / "p"), *flags]) == 3
    )
    printed = capsys.readouterr().out
    assert "2 images: 1 predicted, 1 failed" in printed

    # the console script and the command line exit with it; the folder's other files counted
    monkeypatch.setattr(sys, "argv", ["medx-predict", str(ckpt), str(empty), *flags])
    with pytest.raises(SystemExit) as stop:
        cli.predict()
    assert stop.value.code == 1
    done = subprocess.run(
        [sys.executable, "-m", "medx.predict", str(ckpt), str(tmp_path / "broken"), *flags],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "2 images: 0 predicted, 2 failed; left out: 1 broken symlink" in done.stdout
    assert "could not predict any of the 2 inputs" in done.stderr


# --- 7. --labels: counts first, and no metrics on a silent subset ------------------------------


@pytest.fixture
def labelled(medx_data: Path, tmp_path: Path) -> Path:
    """A Kermany-style test folder: NORMAL/ and PNEUMONIA/ (the model's class is OPACITY),
    an image outside any class folder, and a file that cannot be read."""
    root = tmp_path / "test"
    for i in range(3):
        _png(root / "NORMAL" / f"n{i}.png", cxr_gray(medx_data, i, size=96))
        _png(root / "PNEUMONIA" / f"p{i}.png", cxr_gray(medx_data, 3 + i, size=96))
    _png(root / "loose.png", cxr_gray(medx_data, 6, size=96))
    (root / "NORMAL" / "cut.png").write_bytes(b"")
    return root


def test_labels_from_folders_that_name_no_class_are_refused_with_the_counts(
    ckpt: Path, labelled: Path, tmp_path: Path
):
    flags = ["--out", str(tmp_path / "p"), "--workers", "0", "--no-progress"]
    message = _refused(
        [str(ckpt), str(labelled), "--labels", *flags],
        "no predicted image of class OPACITY",
        "3 images matched to a class (NORMAL 3, OPACITY 0)",
        "folder 'PNEUMONIA': 3",
        "not in a class folder: 1",
        "1 failed",
    )
    assert "acc" not in message and not (tmp_path / "p" / "metrics.json").exists()


def test_labels_from_a_csv_file_give_metrics_with_the_counts(
    ckpt: Path, labelled: Path, tmp_path: Path, capsys
):
    table = labelled / "labels.csv"
    rows = [("path", "label")]
    rows += [(f"NORMAL/n{i}.png", "NORMAL") for i in range(3)]  # relative to the CSV's folder
    rows += [(str(labelled / "PNEUMONIA" / f"p{i}.png"), "OPACITY") for i in range(2)]  # absolute
    rows += [("PNEUMONIA/p2.png", "PNEUMONIA"), ("elsewhere/x.png", "NORMAL")]
    with table.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = tmp_path / "p"

    predict_main([str(ckpt), str(labelled), "--labels", str(table), "--out", str(out),
                  "--workers", "0", "--no-progress"])  # fmt: skip

    printed = capsys.readouterr().out
    assert (
        "labels (labels.csv): 5 images matched to a class (NORMAL 3, OPACITY 2); 2 unmatched "
        "(label 'PNEUMONIA': 1, not in labels.csv: 1); 1 failed; rows of labels.csv naming no "
        "input: 1"
    ) in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 5 and metrics["matched"] == {"NORMAL": 3, "OPACITY": 2}
    assert 0.0 <= metrics["auroc"] <= 1.0 and "sensitivity_ci_low" in metrics
    assert f"auroc {metrics['auroc']:.4f}" in printed

    table.write_text("file,diagnosis\nNORMAL/n0.png,NORMAL\n")
    _refused([str(ckpt), str(labelled), "--labels", str(table), "--workers", "0", "--no-progress"],
             "needs a header row with the columns path and label")  # fmt: skip
