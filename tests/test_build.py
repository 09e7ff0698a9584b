"""build_heads: convert + compile + verify into one directory, published only when it passes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from medusa_cli.commands import verify
from medusa_cli.verify.thresholds import Bounds, Thresholds
from medusa_cli.commands.build import REPORT_FILE, BuildRequest, build_heads
from medusa_cli.errors import InputError, ToolchainError
from medusa_cli.runtime.heads import load_heads
from tests._verify_helpers import Workshop

from .conftest import leftovers


@pytest.fixture(scope="session")
def workshop(tmp_path_factory) -> Workshop:
    return Workshop(tmp_path_factory.mktemp("build"))


def _contents(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_build_writes_params_library_and_report(workshop, tmp_path):
    out = tmp_path / "out"
    stages = []
    report = build_heads(BuildRequest(source=workshop.checkpoint(layout="trtllm"), output=out,
                                      quantization="q4f16_1"), stage=stages.append)
    assert stages == ["convert", "compile", "verify"]
    assert report.verdict == "pass" and report.published and report.skipped is None
    assert report.library == out / "medusa-llvm-q4f16_1.so" and report.params_dir == out / "params"
    assert {"build-report.json", "medusa-llvm-q4f16_1.so", "params", "params/tensor-cache.json"} <= set(_contents(out))
    assert leftovers(tmp_path) == []

    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert saved["verify"]["verdict"] == "pass" and len(saved["verify"]["heads"]) == 3
    # paths in the report point into OUT_DIR, not into the staging directory
    assert ".partial-" not in json.dumps(saved)
    assert saved["verify"]["library"]["path"] == str(out / "medusa-llvm-q4f16_1.so")
    assert saved["convert"]["output"] == str(out / "params")
    assert saved["verify"]["source"]["layout"] == "trtllm"
    # the published library loads from its final place
    assert len(load_heads(report.library, report.params_dir).get_logits([[0.0] * 64])) == 3


def test_failed_verification_publishes_nothing(workshop, tmp_path, monkeypatch):
    def impossible(scheme, overrides=None):
        strict = Bounds(rtol=0.0, min_cosine=1.0, min_top1=1.0)
        return Thresholds(scheme, strict, strict)

    monkeypatch.setattr(verify, "load_thresholds", impossible)
    out = tmp_path / "out"
    report = build_heads(BuildRequest(source=workshop.checkpoint(), output=out, quantization="q0f16"))
    assert report.verdict == "fail" and not report.published
    assert report.failure.startswith("verification failed for 3 of 3 heads")
    assert not out.exists() and leftovers(tmp_path) == []


def test_target_without_a_local_device_skips_verification(workshop, tmp_path):
    out = tmp_path / "out"
    report = build_heads(BuildRequest(source=workshop.checkpoint(), output=out, target="opencl",
                                      quantization="q0f32"))
    assert report.verdict == "skipped" and report.published and report.verify is None
    assert "no opencl device on this machine" in report.skipped
    assert "--device opencl:0" in report.skipped
    assert (out / "medusa-opencl-q0f32.so").is_file()
    assert json.loads((out / REPORT_FILE).read_text())["verification_skipped"] == report.skipped


def test_force_replaces_an_old_output(workshop, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(InputError, match="not empty; pass --force"):
        build_heads(BuildRequest(source=workshop.checkpoint(), output=out))
    assert _contents(out) == ["stale.txt"]
    report = build_heads(BuildRequest(source=workshop.checkpoint(), output=out, force=True))
    assert report.verdict == "pass" and "stale.txt" not in _contents(out)
    # the source is float32: q0f32 chosen as `medusa convert` does
    assert report.library.name == "medusa-llvm-q0f32.so"


@pytest.mark.parametrize(
    "change,error,words",
    [
        (dict(target="bogus"), InputError, "unknown target 'bogus'"),
        (dict(target="metal"), ToolchainError, "--target metal"),
        (dict(quantization="q8"), InputError, "unknown quantization 'q8'"),
        (dict(max_batch_size=0), InputError, "--max-batch-size 0"),
        (dict(batch=0), InputError, "--batch 0"),
        (dict(source="missing"), InputError, "no such file or directory"),
    ],
)
def test_errors_leave_nothing(workshop, tmp_path, change, error, words):
    out = tmp_path / "out"
    request = BuildRequest(source=workshop.checkpoint(), output=out)
    if change.get("source") == "missing":
        change = {"source": tmp_path / "missing"}
    request = dataclasses.replace(request, **change)
    with pytest.raises(error, match=words):
        build_heads(request)
    assert not out.exists() and leftovers(tmp_path) == []
