"""The `medusa` CLI: flags, exit codes, --json on stdout, one-line errors on stderr."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medusa_cli.cli import app

from .conftest import leftovers

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_example_inspect_convert_inspect_json(tmp_path: Path):
    ckpt, params = tmp_path / "ckpt", tmp_path / "params"
    result = run("example", ckpt, "--layout", "trtllm", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["layout"] == "trtllm"

    result = run("inspect", ckpt, "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert (report["kind"], report["layout"], report["num_heads"], report["vocab_size"]) == ("checkpoint", "trtllm", 3, 256)

    result = run("convert", ckpt, "-o", params, "--dtype", "float16", "--json")
    assert result.exit_code == 0, result.stderr
    converted = json.loads(result.stdout)
    assert converted["quantization"] == "q0f16" and converted["num_tensors"] == 9

    result = run("inspect", params, "--json")
    packed = json.loads(result.stdout)
    assert (packed["kind"], packed["quantization"], packed["dtype"]) == ("packed", "q0f16", "float16")
    assert packed["param_bytes"] == 3 * (64 * 64 + 64 + 256 * 64) * 2


def test_human_output_goes_to_stderr(tmp_path: Path):
    ckpt = tmp_path / "ckpt"
    run("example", ckpt, "--layout", "vllm")
    result = run("convert", ckpt, "-o", tmp_path / "p")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "converted" in result.stderr and "vllm" in result.stderr


def test_config_disagreement_warning_is_shown(tmp_path: Path):
    ckpt = tmp_path / "ckpt"
    run("example", ckpt, "--layout", "medusa2")
    config = json.loads((ckpt / "config.json").read_text())
    config["medusa_num_heads"] = 2
    (ckpt / "config.json").write_text(json.dumps(config))
    result = run("convert", ckpt, "-o", tmp_path / "p", "--json")
    assert result.exit_code == 0
    assert "warning:" in result.stderr and "medusa_num_heads is 2 but the tensors say 3" in result.stderr
    assert json.loads(result.stdout)["config"]["medusa_num_heads"] == 3


@pytest.mark.parametrize(
    "args,message",
    [
        (["--layout", "bogus"], "unknown layout 'bogus'"),
        (["--dtype", "int8"], "unknown dtype 'int8'"),
        (["--num-heads", "9"], "--num-heads 9"),
        (["--quantization", "q8"], "unknown quantization 'q8'"),
    ],
)
def test_bad_flags_exit_2_with_one_line_and_no_output(tmp_path: Path, args, message):
    ckpt = tmp_path / "ckpt"
    run("example", ckpt, "--layout", "medusa2")
    out = tmp_path / "out"
    result = run("convert", ckpt, "-o", out, *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.strip().startswith("error:")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not out.exists() and leftovers(tmp_path) == []


def test_verbose_shows_the_traceback(tmp_path: Path):
    result = run("convert", tmp_path / "missing", "-o", tmp_path / "o", "--verbose")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "no such file or directory" in result.stderr


def test_example_refuses_a_non_empty_output(tmp_path: Path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "x").write_text("x")
    result = run("example", out)
    assert result.exit_code == 2 and "--force" in result.stderr


def test_help_has_examples():
    for command in ("convert", "inspect", "example"):
        result = run(command, "--help")
        assert result.exit_code == 0
        assert "Examples" in result.stdout and f"medusa {command}" in result.stdout


def test_tree_command_writes_buffers_and_json(tmp_path: Path):
    import numpy as np

    out = tmp_path / "b.npz"
    result = run("tree", "mc_sim_7b_63", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["nodes"], summary["depth"], summary["leaves"]) == (64, 4, 42)
    with np.load(out) as buffers:
        assert buffers["medusa_attn_mask"].shape == (64, 64)
        assert buffers["retrieve_indices"].shape == (42, 5)


def test_tree_command_rejects_an_invalid_tree(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text("[[0], [0, 1], [2, 0]]")
    out = tmp_path / "b.npz"
    result = run("tree", bad, "-o", out)
    assert result.exit_code == 2
    assert "[2, 0]" in result.stderr and "[2]" in result.stderr
    assert not out.exists()


def test_progress_bars_render_on_a_terminal(monkeypatch):
    """Under the test runner stderr is no terminal and the bars are skipped; on one they must
    render, also before the total is known (a count column once failed on total None)."""
    import io

    from rich.console import Console

    from medusa_cli import cli

    screen = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=screen, force_terminal=True, width=100))
    with cli._byte_progress("converting") as update:
        update(0, 0)
        update(512, 1024)
    with cli._count_progress("evaluating", "positions") as update:
        update(3, 10)
        update(10, 10)
    with cli._status("compiling") as status:
        status.update("still compiling")
    assert "positions" in screen.getvalue() and "converting" in screen.getvalue()
