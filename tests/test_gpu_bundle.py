"""tools/gpu_bundle.py, short of a GPU: the report's fractions and target verdicts from given
numbers; the bundle's contents and size; a CUDA library loading on TVM's runtime alone (the
CUDA driver stubbed); and (slow) the whole run orchestrated on the CPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tools import gpu_bundle

REPO = Path(gpu_bundle.__file__).parents[1]
FATBIN_MAGIC = b"\x50\xed\x55\xba"
MIB = 1 << 20


def _results() -> dict:
    """Run results as `measure` writes them, benchmarks left to fill: q0f16 (1 GiB of weights)
    and q4f16_1 (300 MiB), copy bandwidth 4000 GB/s, one tree timing each."""
    results = {"copy_gbps": 4000.0, "device": "NVIDIA H200", "schemes": {}, "skipped": [],
               "manifest": {"preset": "vicuna-7b", "arch": "sm_90", "tree": "mc_sim_7b_63"}}
    for scheme, weight_bytes in (("q0f16", 1 << 30), ("q4f16_1", 300 * MIB)):
        results["schemes"][scheme] = {
            "weight_bytes": weight_bytes,
            "verify": {str(b): {"passed": True, "max_rel_err": 1e-4} for b in (1, 4, 8)},
            "bench": {},
            "tree": {"1": {"get_logits_ms": 0.3, "get_tree_candidates_ms": 0.26,
                           "candidates_ms": 0.02 if scheme == "q0f16" else 0.03}},
        }
    return results


def _verdicts(checks) -> dict[str, tuple[str, bool | None]]:
    return {c.target: (c.measured, c.passed) for c in checks}


def test_targets_met():
    # q0f16 batch 1: 1 GiB in 0.3 ms = 3579 GB/s = 89% of 4000; q4f16_1 3.16x faster
    bench = {("q0f16", 1): 0.3, ("q0f16", 4): 0.31, ("q0f16", 8): 0.36,
             ("q4f16_1", 1): 0.095, ("q4f16_1", 4): 0.1, ("q4f16_1", 8): 0.12}
    results = _results()
    for (scheme, batch), ms in bench.items():
        results["schemes"][scheme]["bench"][str(batch)] = ms
    verdicts = _verdicts(gpu_bundle.check_targets(results))
    assert verdicts["q0f16 batch 1 at >= 80% of the copy bandwidth"] == ("89.5%", True)
    assert verdicts["q4f16_1 batch 1 >= 3x faster than q0f16 batch 1"] == ("3.16x", True)
    assert verdicts["q0f16: batch 8 <= 1.3x batch 1"] == ("1.20x", True)
    assert verdicts["q4f16_1: batch 8 <= 1.3x batch 1"] == ("1.26x", True)
    assert verdicts["q0f16 batch 1: tree candidates <= 5% of get_logits"] == ("6.7%", False)
    assert verdicts["q4f16_1 batch 1: tree candidates <= 5% of get_logits"] == ("10.0%", False)
    assert gpu_bundle.fraction_of_copy(results, "q4f16_1", 1) == pytest.approx(
        300 * MIB / 0.095e-3 / 1e9 / 4000)


def test_targets_missed_and_unknown():
    results = _results()
    for (scheme, batch), ms in {("q0f16", 1): 0.5, ("q0f16", 8): 0.7, ("q4f16_1", 1): 0.2}.items():
        results["schemes"][scheme]["bench"][str(batch)] = ms
    verdicts = _verdicts(gpu_bundle.check_targets(results))
    assert verdicts["q0f16 batch 1 at >= 80% of the copy bandwidth"] == ("53.7%", False)
    assert verdicts["q4f16_1 batch 1 >= 3x faster than q0f16 batch 1"] == ("2.50x", False)
    assert verdicts["q0f16: batch 8 <= 1.3x batch 1"] == ("1.40x", False)
    assert verdicts["q4f16_1: batch 8 <= 1.3x batch 1"] == ("-", None)  # batch 8 not measured
    results["copy_gbps"] = None  # no bandwidth: no fraction, no verdict
    assert _verdicts(gpu_bundle.check_targets(results))[
        "q0f16 batch 1 at >= 80% of the copy bandwidth"] == ("-", None)


def test_the_report_shows_fractions_verdicts_and_what_was_not_run():
    results = _results()
    for (scheme, batch), ms in {("q0f16", 1): 0.3, ("q4f16_1", 1): 0.095}.items():
        results["schemes"][scheme]["bench"][str(batch)] = ms
    results["schemes"]["q4f16_1"]["verify"]["8"] = {"passed": False, "max_rel_err": 0.5}
    results["skipped"] = ["bench of q3f16_1: out of time"]
    text = gpu_bundle.render(results, gpu_bundle.check_targets(results))
    q0f16 = next(line for line in text.splitlines() if line.startswith("| q0f16 |"))
    assert "| 0.300 | 89% |" in q0f16 and "pass (1.0e-04)" in q0f16
    q4 = next(line for line in text.splitlines() if line.startswith("| q4f16_1 |"))
    assert "FAIL (5.0e-01)" in q4
    assert "| q0f16 batch 1 at >= 80% of the copy bandwidth | 89.5% | met |" in text
    assert "| q4f16_1 batch 1 >= 3x faster than q0f16 batch 1 | 3.16x | met |" in text
    assert "4000 GB/s" in text and "- bench of q3f16_1: out of time" in text
    assert "set for H100" not in text  # the device is an H200
    results["device"] = "NVIDIA A10"
    assert "(set for H100 / H200; this is NVIDIA A10)" in gpu_bundle.render(results, [])


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")


@pytest.fixture(scope="module")
def cuda_bundle(tmp_path_factory) -> Path:
    """Every scheme, compiled for sm_90 at the tiny shape (the vicuna-7b libraries are built
    and checked by tests/test_gpu_build.py), without the Python 3.12 wheels (a download)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc (CUDA toolkit) not on PATH")
    bundle = tmp_path_factory.mktemp("bundle") / ".gpu"
    gpu_bundle.build(bundle, "sm_90", wheels=False, preset="tiny", tree="vicuna_33b_stage1")
    return bundle


@needs_nvcc
def test_the_bundle_holds_every_scheme_the_runtime_and_a_manifest(cuda_bundle):
    manifest = json.loads((cuda_bundle / "manifest.json").read_text())
    assert manifest["schemes"] == list(gpu_bundle.SCHEMES) and manifest["batches"] == [1, 4, 8]
    assert manifest["arch"] == "sm_90" and manifest["tree"] == "vicuna_33b_stage1"
    for scheme in gpu_bundle.SCHEMES:
        library = cuda_bundle / "libs" / gpu_bundle.library_name(scheme)
        data = library.read_bytes()
        assert FATBIN_MAGIC in data and b"__global__" not in data
        assert len(data) < 2 * MIB  # about 0.3 MiB at the vicuna-7b shape
    with tarfile.open(cuda_bundle / "tvm-runtime.tar.xz") as tar:
        names = tar.getnames()
    assert {"tvm/lib/libtvm_runtime.so", "tvm/lib/libtvm_runtime_cuda.so"} <= set(names)
    assert not [n for n in names if "libtvm_compiler" in n or "__pycache__" in n]
    # with the three wheels (about 4 MiB) the bundle stays far below what the machine is given
    assert gpu_bundle.bundle_bytes(cuda_bundle) + 8 * MIB < gpu_bundle.BUNDLE_LIMIT


def test_run_refuses_a_missing_bundle(tmp_path, capsys):
    assert gpu_bundle.run(tmp_path / ".gpu", "cuda:0", tmp_path / "out") == 2
    assert "build the bundle first (make gpu-bundle)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (shutil.which("nvcc") and shutil.which("gcc") and gpu_bundle._cuda_runtime_dirs()),
                    reason="needs nvcc, gcc and CUDA 13's libcudart")
def test_a_cuda_library_loads_on_the_runtime_alone(cuda_bundle, tmp_path):
    """What run does on a GPU machine, short of a GPU: TVM without its compiler loads CUDA's
    runtime sidecar (devices.load_device_runtime) and with it a library compiled for sm_90. The
    CUDA driver is a stub whose every call fails, as without a GPU."""
    drivers = subprocess.run(["nm", "-D", "--undefined-only", str(_tvm_lib_dir() / "libtvm_runtime_cuda.so")],
                             capture_output=True, text=True, check=True).stdout.split()
    stub = tmp_path / "stub"
    stub.mkdir()
    calls = sorted({name for name in drivers if re.fullmatch(r"cu[A-Z]\w*", name)})
    (stub / "cuda.c").write_text("".join(f"int {name}(void) {{ return 100; }}\n" for name in calls))
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o",
                    str(stub / "libcuda.so.1"), str(stub / "cuda.c")], check=True)
    site = tmp_path / "site"
    gpu_bundle._unpack(cuda_bundle, site)
    library = cuda_bundle / "libs" / gpu_bundle.library_name("q4f16_1")
    code = ("import tvm; from medusa_cli.devices import load_device_runtime; "
            "load_device_runtime('cuda'); "
            f"tvm.runtime.load_module({str(library)!r}); "
            "print(tvm.base._RUNTIME_ONLY, sorted(tvm.base._LOADED_LIBS))")
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1", PYTHONPATH=f"{site}{os.pathsep}{REPO}",
               LD_LIBRARY_PATH=os.pathsep.join([str(stub), *gpu_bundle._cuda_runtime_dirs()]))
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split("\n")[0] == "True ['tvm_runtime', 'tvm_runtime_cuda']"


@pytest.mark.slow
def test_the_whole_run_orchestrated_on_the_cpu(tmp_path):
    """build --target llvm and run --device cpu: the steps (checkpoint, conversions and
    verifications in spawned processes, benchmarks, report) on TVM's runtime alone, which the
    GPU run does with CUDA libraries."""
    bundle = tmp_path / ".gpu"
    gpu_bundle.build(bundle, "", ("q0f32", "q4f16_1"), wheels=False, preset="tiny",
                     target_name="llvm", tree="vicuna_33b_stage1")
    child = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_bundle.py"), "run", "--bundle",
                            str(bundle), "--device", "cpu", "--output", str(tmp_path / "out")],
                           cwd=tmp_path, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["tvm"].endswith(tuple("0123456789")) and results["skipped"] == []
    for scheme in ("q0f32", "q4f16_1"):
        entry = results["schemes"][scheme]
        assert sorted(entry["verify"]) == ["1", "4", "8"] and all(v["passed"] for v in entry["verify"].values())
        assert sorted(entry["bench"]) == ["1", "4", "8"] and sorted(entry["tree"]) == ["1", "4", "8"]
    text = (tmp_path / "out" / "BENCHMARKS-GPU.md").read_text()
    assert "runtime only" in text and "## Targets" in text


def _tvm_lib_dir() -> Path:
    import tvm

    return Path(tvm.__file__).parent / "lib"
