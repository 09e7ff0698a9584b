"""The kernel report and the code behind a library: `medusa compile --save-source` and
`medusa inspect --kernels / --gpu` (its fields on CUDA builds: tests/test_gpu_build.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medusa_cli.cli import app
from medusa_cli.commands.compile import CompileRequest, compile_heads
from medusa_cli.commands.inspect import inspect_path
from medusa_cli.compiler.cuda import parse_ptxas_usage
from medusa_cli.compiler.kernels import KernelUsage
from medusa_cli.devices import GPU_BANDWIDTH_GBPS
from medusa_cli.errors import InputError
from tests._params import make_params_dir

from .conftest import leftovers

runner = CliRunner()

# nvcc -Xptxas -v for two arches, as CUDA 13 prints it
PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'linear1_kernel' for 'sm_80'
ptxas info    : Function properties for linear1_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 72 registers, used 1 barriers, 1024 bytes smem
ptxas info    : Compiling entry function 'topk_chunks_kernel' for 'sm_80'
ptxas info    : Function properties for topk_chunks_kernel
    8 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 324 bytes smem
ptxas info    : Compiling entry function 'linear1_kernel' for 'sm_90'
ptxas info    : Function properties for linear1_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 1024 bytes smem
"""


def test_ptxas_usage_takes_the_most_over_the_arches():
    assert parse_ptxas_usage(PTXAS_LOG) == {
        "linear1_kernel": KernelUsage(registers=80, spill_bytes=0),
        "topk_chunks_kernel": KernelUsage(registers=255, spill_bytes=20),
    }
    assert parse_ptxas_usage("") == {}


@pytest.fixture(scope="module")
def params_dir(tmp_path_factory) -> Path:
    return make_params_dir(tmp_path_factory.mktemp("report") / "q4f16_1", "q4f16_1").path


def test_a_cpu_library_saves_its_llvm_ir_and_reports_no_device_kernels(params_dir, tmp_path):
    result = compile_heads(CompileRequest(params_dir, target="llvm", output=tmp_path / "h.so",
                                          save_source=tmp_path / "src"))
    (source,) = (tmp_path / "src").iterdir()
    assert source.name == "h.ll" and "define" in source.read_text()
    assert result.metadata.kernels == [] and result.save_source == tmp_path / "src"
    report = inspect_path(result.output, kernels=True, gpu="h200")
    assert report.kernels == []
    # every parameter once per call at the H200's 4.8 TB/s
    assert report.roofline["bytes_per_call"] == report.param_bytes
    assert report.roofline["predicted_ms"] == pytest.approx(report.param_bytes / 4.8e12 * 1e3)


def test_save_source_into_a_non_empty_directory_writes_nothing(params_dir, tmp_path):
    taken = tmp_path / "src"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match=r"--save-source .*src: directory exists and is not empty"):
        compile_heads(CompileRequest(params_dir, target="llvm", output=tmp_path / "h.so",
                                     save_source=taken))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no library either
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]


def test_a_failed_compile_leaves_no_source_directory(params_dir, tmp_path, monkeypatch):
    from medusa_cli.compiler import pipeline

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "_export", fail)
    with pytest.raises(InputError, match="--save-source .*: cannot write there"):
        compile_heads(CompileRequest(params_dir, target="llvm", output=tmp_path / "h.so",
                                     save_source=tmp_path / "src"))
    assert list(tmp_path.iterdir()) == [] and leftovers(tmp_path) == []


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")
def test_inspect_kernels_json_and_table(params_dir, tmp_path):
    library = tmp_path / "cuda.so"
    result = runner.invoke(app, ["compile", str(params_dir), "--target", "cuda", "--arch",
                                 "sm_90", "-o", str(library), "--save-source", str(tmp_path / "cu")])
    assert result.exit_code == 0, result.stderr
    (cu,) = (tmp_path / "cu").iterdir()
    assert cu.suffix == ".cu" and "__global__" in cu.read_text()

    result = runner.invoke(app, ["inspect", str(library), "--kernels", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    names = {k["name"] for k in report["kernels"]}
    assert {"dequantize_linear1_kernel", "fused_dequantize_linear_silu_add_kernel"} <= names
    for kernel in report["kernels"]:
        assert kernel["name"] in cu.read_text()
        assert isinstance(kernel["registers"], int) and kernel["spill_bytes"] == 0
    assert report["roofline"]["gpu"] == "h100"  # the default
    assert report["roofline"]["bandwidth_gbps"] == GPU_BANDWIDTH_GBPS["h100"]

    result = runner.invoke(app, ["inspect", str(library), "--kernels", "--gpu", "rtx4090"])
    assert result.exit_code == 0 and result.stdout == ""
    assert "kernels" in result.stderr and "GEMV" in result.stderr
    assert "roofline:" in result.stderr and "rtx4090" in result.stderr


def test_inspect_kernel_flag_errors(params_dir, tmp_path):
    library = compile_heads(CompileRequest(params_dir, target="llvm", output=tmp_path / "h.so")).output
    result = runner.invoke(app, ["inspect", str(library), "--kernels", "--gpu", "h1000"])
    assert result.exit_code == 2
    assert "--gpu 'h1000': unknown GPU" in result.stderr and "h200" in result.stderr
    result = runner.invoke(app, ["inspect", str(params_dir), "--kernels"])
    assert result.exit_code == 2
    assert "--kernels:" in result.stderr and "is not a compiled library" in result.stderr
