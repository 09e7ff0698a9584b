"""NaN in the weights: verify names the head it reaches (exit 1), the others still pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from medusa_cli.checkpoint.safetensors import write_safetensors
from medusa_cli.cli import app

from .conftest import reference_tensors


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_nan_weights_converted_with_allow_nonfinite_fail_their_head_by_name(tiny_config, tmp_path: Path):
    tensors = reference_tensors(tiny_config)
    poisoned = "medusa_head.1.1.weight"  # head 1's vocab projection
    tensors[poisoned] = tensors[poisoned].copy()
    tensors[poisoned][7, 3] = np.nan
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_safetensors(ckpt / "model.safetensors",
                      [(name, a.shape, str(a.dtype), lambda a=a: a) for name, a in tensors.items()])
    params, library = tmp_path / "params", tmp_path / "heads.so"
    assert _run("convert", ckpt, "-o", params).exit_code == 2  # refused without the flag
    result = _run("convert", ckpt, "-o", params, "--allow-nonfinite")
    assert result.exit_code == 0, result.stderr
    assert _run("compile", params, "-o", library).exit_code == 0

    result = _run("verify", library, params)
    assert result.exit_code == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "verification failed for 1 of 3 heads: head 1:" in errors[0]
    assert "NaN or Inf" in errors[0] and "--allow-nonfinite" in errors[0]

    result = _run("verify", library, params, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["failed_heads"] == [1]
    head = report["heads"][1]
    assert "NaN or Inf" in head["reasons"][0] and head["vs_reference"]["max_abs_err"] is None
    assert [h["passed"] for h in report["heads"]] == [True, False, True]
