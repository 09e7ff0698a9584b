"""The conversion benchmark harness (bench_convert.py) on a tiny checkpoint: what it reports is
consistent with the files it converted, and it leaves no output behind."""

from __future__ import annotations

import pytest

from medusa_cli import bench_convert


def test_tiny_run_reports_consistent_numbers(tmp_path):
    row = bench_convert.run_benchmark("tiny", "float16", "medusa1", tmp_path, None, "safetensors",
                                      rounds=1)
    weights = [p for p in (tmp_path / "ckpt").iterdir() if p.name != "config.json"]
    assert row["source_bytes"] == sum(p.stat().st_size for p in weights)
    hashing = row["hashing"]
    assert hashing["md5_seconds"] > 0 and hashing["sha256_seconds"] > 0
    assert hashing["md5_method"] == "lanes"  # the kernel builds on this machine
    both = (hashing["md5_seconds"], hashing["sha256_seconds"])
    assert hashing["floor_seconds"] == pytest.approx(max(both) if hashing["cores"] > 1 else sum(both))
    assert row["hash_floor_speed_vs_cp"] == pytest.approx(row["cp_seconds"] / hashing["floor_seconds"])
    assert row["speed_vs_cp"] == pytest.approx(row["cp_seconds"] / row["convert_seconds"])
    assert row["rss_within_budget"]
    # the copies and the converted directory are removed after each round
    assert not (tmp_path / "copy").exists() and not (tmp_path / "params").exists()
    line = bench_convert.markdown([row]).splitlines()[-1]
    assert f"| {row['speed_vs_cp']:.2f}x |" in line and f"; {hashing['cores']} cores)" in line
