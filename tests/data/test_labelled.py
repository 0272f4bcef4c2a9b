"""One way to read a site's labels: `medx.calibrate` and `medx.predict --labels` agree."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from medx.data.labelled import class_index, read_labelled
from medx.errors import DataError
from medx.inference.labels import from_csv

CLASSES = ["NORMAL", "PNEUMONIA"]


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((32, 32), 128, np.uint8))
    return path


def test_a_label_is_a_class_name_in_any_case_or_its_index():
    assert [class_index(x, CLASSES) for x in ("PNEUMONIA", "normal", "1", "2", "x")] == [
        1, 0, 1, None, None,
    ]  # fmt: skip
    assert class_index("1", ["0", "1"]) == 1 and class_index("0", ["1", "0"]) == 1  # names win


def test_calibrate_and_predict_read_one_csv_alike(tmp_path: Path):
    a = _image(tmp_path / "site" / "a.png")
    b = _image(tmp_path / "site" / "sub" / "b.png")
    c = _image(tmp_path / "elsewhere" / "c.png")
    table = tmp_path / "site" / "labels.csv"
    table.write_text(f"path,label\na.png,normal\nsub/b.png,1\n{c},PNEUMONIA\n")

    sample = read_labelled(table, CLASSES)  # medx.calibrate
    by_calibrate = dict(zip(map(str, sample.paths), sample.labels, strict=True))
    matching = from_csv(table, [a, b, c], CLASSES)  # medx.predict --labels
    assert matching.index == [0, 1, 1]
    assert [by_calibrate[str(p)] for p in (a, b, c)] == matching.index


def test_an_image_labelled_twice_is_refused_naming_the_line(tmp_path: Path):
    _image(tmp_path / "a.png")
    table = tmp_path / "labels.csv"
    table.write_text("path,label\na.png,NORMAL\n./a.png,PNEUMONIA\n")
    with pytest.raises(DataError, match=r"labels.csv, line 3: ./a.png is labelled both"):
        read_labelled(table, CLASSES)
