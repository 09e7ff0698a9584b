"""`make bench`'s driver (bench_suite.py) at the tiny preset: one row per scheme and batch whose
numbers agree with each other, and the verify column that gpu_bundle's run asks for."""

from __future__ import annotations

import re

import pytest

from tools import bench_suite


def test_tiny_suite_with_verify(tmp_path):
    text = bench_suite.run_suite("tiny", ["q4f16_1"], (1, 3), 2, "cpu", tmp_path, verify=True)
    assert "Bandwidth measured in the same run (reading a buffer (numpy sum, max, dot))" in text
    rows = [line for line in text.splitlines() if line.startswith("| q4f16_1 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "3"]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        library_ms, numpy_ms = float(cells[2].split()[0]), float(cells[3])
        assert float(cells[4].rstrip("x")) == pytest.approx(library_ms / numpy_ms, rel=0.05, abs=0.01)
        assert re.fullmatch(r"pass \(\d\.\de-\d\d\)", cells[11]), cells[11]


@pytest.mark.parametrize("seconds, text", [(0.000123, "0.123"), (0.00456, "4.56"), (0.1261, "126.1")])
def test_milliseconds_keep_their_digits(seconds, text):
    assert bench_suite._ms(seconds) == text


def test_no_verify_column_without_verify(tmp_path):
    text = bench_suite.run_suite("tiny", ["q0f32"], (1,), 1, "cpu", tmp_path)
    header = next(line for line in text.splitlines() if line.startswith("| scheme |"))
    row = next(line for line in text.splitlines() if line.startswith("| q0f32 |"))
    assert "verify" not in header and header.count("|") == row.count("|") == 12
