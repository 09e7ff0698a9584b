"""`medusa compile`, `verify`, `run` and `build` through the CLI: exit codes, --json on stdout,
one-line errors naming the head or file, nothing left behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from medusa_cli.cli import app
from tests._verify_helpers import Workshop, flip_byte, lm_head_name, perturb_element, swap_heads

from .conftest import leftovers

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def workshop(tmp_path_factory) -> Workshop:
    return Workshop(tmp_path_factory.mktemp("cli-verify"))


def _error_line(result) -> str:
    """The single error line on stderr (after any warnings)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_convert_compile_then_verify_json(workshop, tmp_path):
    """The max batch flows from convert (mlc-chat-config.json) to compile (the library)."""
    params = tmp_path / "params"
    result = run("convert", workshop.checkpoint(), "-o", params, "-q", "q0f16",
                 "--max-batch-size", "4", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads((params / "mlc-chat-config.json").read_text())["max_batch_size"] == 4
    library = tmp_path / "heads.so"
    result = run("compile", params, "-o", library, "--json")
    assert result.exit_code == 0, result.stderr
    compiled = json.loads(result.stdout)
    assert compiled["output"] == str(library) and compiled["metadata"]["max_batch_size"] == 4

    result = run("verify", library, params, "--json", "--batch", "6")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)  # stdout holds exactly one JSON object
    assert report["verdict"] == "pass" and report["failed_heads"] == []
    assert report["inputs"]["batch"] == 6 and report["library"]["max_batch_size"] == 4
    assert report["thresholds"]["scheme"] == "q0f16"


def test_verify_human_output_is_a_table_on_stderr(workshop):
    built = workshop.build("q4f16_1")
    result = run("verify", built.library, built.params)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "ref err" in result.stderr and "src cos" in result.stderr
    assert "verified 3 heads against checkpoint" in result.stderr


def test_swapped_heads_exit_1_naming_the_heads(workshop):
    broken = workshop.copy(workshop.build("q0f32"))
    swap_heads(broken.params, 0, 2)
    result = run("verify", broken.library, broken.params)
    assert result.exit_code == 1
    line = _error_line(result)
    assert "verification failed for 2 of 3 heads" in line and "head 0:" in line and "head 2:" in line
    assert "head 1:" not in line


def test_perturbed_weight_exit_1_and_json_holds_the_verdict(workshop):
    broken = workshop.copy(workshop.build("q0f32"))
    perturb_element(broken.params, lm_head_name(1), (100, 7), 0.5)
    result = run("verify", broken.library, broken.params, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["verdict"] == "fail" and report["failed_heads"] == [1]
    assert report["heads"][1]["reasons"][0].startswith("max error vs reference")
    assert "head 1:" in _error_line(result)


def test_params_of_another_checkpoint_exit_1(workshop):
    built = workshop.build("q0f32")
    other = workshop.build("q0f32", seed=1)
    result = run("verify", built.library, other.params, "--source", built.ckpt)
    assert result.exit_code == 1
    assert "verification failed for 3 of 3 heads" in _error_line(result)


def test_corrupted_shard_exit_1_naming_the_file(workshop):
    broken = workshop.copy(workshop.build("q4f16_1"))
    flip_byte(broken.params / "params_shard_0.bin", offset=500)
    result = run("verify", broken.library, broken.params, "--json")
    assert result.exit_code == 1
    line = _error_line(result)
    assert str(broken.params / "params_shard_0.bin") in line and "md5 mismatch" in line
    report = json.loads(result.stdout)
    assert report["verdict"] == "fail" and report["integrity"]["ok"] is False


def test_wrong_shape_inputs_exit_2_naming_file_and_shape(workshop, tmp_path):
    built = workshop.build("q0f32")
    inputs = tmp_path / "hidden.npy"
    np.save(inputs, np.zeros((3, 32), np.float32))
    result = run("verify", built.library, built.params, "--inputs", inputs, "--json")
    assert result.exit_code == 2 and result.stdout == ""
    line = _error_line(result)
    assert str(inputs) in line and "[3, 32]" in line and "[batch, 64]" in line


def test_missing_source_warns_and_verifies_the_packed_weights(workshop, tmp_path):
    src = tmp_path / "ckpt"
    assert run("example", src).exit_code == 0
    params = tmp_path / "params"
    assert run("convert", src, "-o", params, "-q", "q3f16_1").exit_code == 0
    assert run("compile", params).exit_code == 0
    for f in src.iterdir():
        f.unlink()
    src.rmdir()
    result = run("verify", params / "medusa-llvm-q3f16_1.so", params, "--json")
    assert result.exit_code == 0, result.stderr
    assert "warning:" in result.stderr and "no longer exists" in result.stderr
    report = json.loads(result.stdout)
    assert report["source"]["kind"] == "packed" and report["heads"][0]["vs_source"] is None


def _deep(tmp_path, length: int = 400):
    """A folder whose path is longer than any terminal is wide, with no spaces to wrap at."""
    folder = tmp_path
    while len(str(folder)) < length:
        folder = folder / "a-long-folder-name-without-any-spaces"
    folder.mkdir(parents=True)
    return folder


def test_messages_with_long_paths_keep_every_word(tmp_path):
    """A warning or error wider than the console is printed whole, on one line, wherever the
    clone lives (under the test runner rich sees an 80-column console that is no terminal)."""
    deep = _deep(tmp_path)
    src = deep / "ckpt"
    assert run("example", src).exit_code == 0
    params = deep / "params"
    assert run("convert", src, "-o", params).exit_code == 0
    assert run("compile", params).exit_code == 0
    for f in src.iterdir():
        f.unlink()
    src.rmdir()
    result = run("verify", params / "medusa-llvm-q0f32.so", params)
    assert result.exit_code == 0, result.stderr
    warning = (f"warning: the source recorded in {params / 'mlc-chat-config.json'} ({src}) no "
               "longer exists; verifying against the packed weights themselves, which cannot "
               "reveal conversion or quantization errors (pass --source CKPT)")
    assert warning in result.stderr.splitlines()

    missing = deep / "no-such-checkpoint"
    result = run("convert", missing, "-o", deep / "out")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: {missing}: no such file or directory"]


def test_threshold_flags(workshop):
    built = workshop.build("q0bf16")
    result = run("verify", built.library, built.params, "--rtol", "1e-9")
    assert result.exit_code == 1 and "rtol 1e-09" in _error_line(result)
    result = run("verify", built.library, built.params, "--min-cosine", "2")
    assert result.exit_code == 2 and "--min-cosine 2.0: must be between -1 and 1" in _error_line(result)


def test_run_writes_npz_and_refuses_bad_output(workshop, tmp_path):
    built = workshop.build("q0f32")
    inputs = tmp_path / "hidden.npy"
    np.save(inputs, np.ones((2, 64), np.float32))
    out = tmp_path / "logits.npz"
    result = run("run", built.library, built.params, "--inputs", inputs, "-o", out, "--top-k", "3", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["arrays"][:2] == ["head_0", "head_0_topk"]
    with np.load(out) as saved:
        assert saved["head_2"].shape == (2, 256) and saved["head_2_topk"].shape == (2, 3)

    bad = tmp_path / "logits.txt"
    result = run("run", built.library, built.params, "--inputs", inputs, "-o", bad)
    assert result.exit_code == 2 and "*.npz" in _error_line(result)
    assert not bad.exists()


def test_build_json_and_exit_codes(workshop, tmp_path):
    out = tmp_path / "out"
    result = run("build", workshop.checkpoint(layout="vllm"), "-q", "q4f32_1", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["verdict"] == "pass" and report["verify"]["verdict"] == "pass"
    assert (out / "medusa-llvm-q4f32_1.so").is_file()

    result = run("build", workshop.checkpoint(), "-o", out)
    assert result.exit_code == 2 and "--force" in _error_line(result)
    result = run("build", workshop.checkpoint(), "-o", tmp_path / "b", "--target", "vulkan")
    assert result.exit_code == 2 and "--target vulkan" in _error_line(result)
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []


def test_build_human_output_says_when_verification_was_skipped(workshop, tmp_path):
    result = run("build", workshop.checkpoint(), "-o", tmp_path / "cl", "--target", "opencl")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "skipped" in result.stderr and "no opencl device" in result.stderr


def test_compile_errors_exit_2(workshop, tmp_path):
    params = workshop.build("q0f32").params
    result = run("compile", params, "-q", "q4f16_1", "-o", tmp_path / "x.so")
    assert result.exit_code == 2
    assert "q4f16_1" in _error_line(result) and "q0f32" in _error_line(result)
    assert not (tmp_path / "x.so").exists()


def test_new_commands_have_help_with_examples():
    for command in ("compile", "verify", "run", "build"):
        result = run(command, "--help")
        assert result.exit_code == 0
        assert "Examples" in result.stdout and f"medusa {command}" in result.stdout
    assert "Exit codes" in run("verify", "--help").stdout


def test_python_api_is_importable_without_loading_tvm_up_front():
    import subprocess
    import sys

    code = (
        "import sys, medusa_cli, medusa_cli.cli\n"
        "assert 'tvm' not in sys.modules, 'importing the CLI loaded TVM'\n"
        "assert 'numpy' not in sys.modules, 'importing the CLI loaded numpy (medusa --help waits)'\n"
        "from medusa_cli import load_heads, verify_heads, convert_checkpoint, compile_heads, "
        "build_heads, run_heads, VerifyRequest\n"
        "from medusa_cli.runtime.heads import load_heads as direct\n"
        "assert load_heads is direct and 'tvm' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    import medusa_cli

    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        medusa_cli.nothing  # noqa: B018
