"""benchmarks/common.py's results writer: append_csv keeps every row under the right header."""
from __future__ import annotations

import csv

from .common import append_csv


def _read(path):
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return r.fieldnames, list(r)


def test_append_csv_keeps_old_rows_and_widens_the_header(tmp_path):
    """Rows with the file's columns are appended; rows bringing a new column rewrite the file with the union of
    the columns (old rows get an empty cell); a file whose last line lacks its newline still gets whole rows."""
    path = str(tmp_path / "sub" / "r.csv")
    append_csv(path, [{"model": "a", "ms": 1.5}])
    append_csv(path, [{"model": "b", "ms": 2.0}, {"model": "c", "ms": 3.0}])
    assert _read(path) == (["model", "ms"], [{"model": "a", "ms": "1.5"}, {"model": "b", "ms": "2.0"},
                                             {"model": "c", "ms": "3.0"}])
    append_csv(path, [{"model": "d", "MB": 7}])                          # a new column, one column missing
    fields, rows = _read(path)
    assert fields == ["model", "ms", "MB"]
    assert rows == [{"model": "a", "ms": "1.5", "MB": ""}, {"model": "b", "ms": "2.0", "MB": ""},
                    {"model": "c", "ms": "3.0", "MB": ""}, {"model": "d", "ms": "", "MB": "7"}]
    with open(path, "rb+") as f:                                         # a hand edit dropped the last newline
        f.seek(-1, 2)
        while f.read(1) in (b"\n", b"\r"):
            f.seek(-2, 1)
        f.truncate()
    append_csv(path, [{"model": "e", "ms": 5, "MB": 6}])
    assert [r["model"] for r in _read(path)[1]] == ["a", "b", "c", "d", "e"]


def test_append_csv_with_no_path_writes_nothing_and_a_bare_name_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    append_csv("", [{"model": "a"}])
    assert list(tmp_path.iterdir()) == []
    append_csv("rows.csv", [{"model": "a"}])
    assert (tmp_path / "rows.csv").read_text().splitlines() == ["model", "a"]
