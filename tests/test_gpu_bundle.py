"""gpu_bundle.py, dry-run on the CPU: `build` packs prebuilt libraries and TVM's runtime without
its compiler; `run` verifies and benches them in a child Python that has only that runtime."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

from tools import gpu_bundle


def test_build_then_run_on_the_runtime_alone(tmp_path):
    bundle = tmp_path / "bundle"
    built = gpu_bundle.build(bundle, "tiny", ["q4f16_1"], "cpu", None)
    assert [p.name for p in built] == ["heads-q4f16_1.so", "tvm-runtime.tar.xz"]
    with tarfile.open(bundle / "tvm-runtime.tar.xz") as tar:
        names = tar.getnames()
    assert "tvm/lib/libtvm_runtime.so" in names
    assert not [n for n in names if "libtvm_compiler" in n or "__pycache__" in n]

    # as on the GPU machine: a Python where medusa-cli is not installed (the base interpreter,
    # its dependencies through PYTHONPATH, which runs no .pth file such as the editable
    # install's), run from the checkout
    base_python = Path(sys.base_prefix) / "bin" / "python3"
    env = dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"])
    child = subprocess.run([str(base_python), str(Path(gpu_bundle.__file__)), "run", "--bundle",
                            str(bundle), "--device", "cpu", "--preset", "tiny", "--batches", "1,2",
                            "--output", str(tmp_path / "out")],
                           cwd=Path(gpu_bundle.__file__).parents[1], env=env, capture_output=True,
                           text=True)
    assert child.returncode == 0, child.stderr[-3000:]
    text = (tmp_path / "out" / "BENCHMARKS-GPU.md").read_text()
    assert re.search(r"- TVM [\d.]+\S* \(runtime only\)\.", text), text
    rows = [line for line in text.splitlines() if line.startswith("| q4f16_1 |")]
    assert len(rows) == 2
    assert all("| prebuilt | pass (" in row for row in rows), rows


@pytest.mark.skipif(not (shutil.which("nvcc") and shutil.which("gcc") and gpu_bundle._cuda_runtime_dirs()),
                    reason="needs nvcc, gcc and CUDA 13's libcudart")
def test_a_cuda_library_loads_on_the_runtime_alone(tmp_path):
    """What gpu_bundle's run does on a GPU machine, short of a GPU: TVM without its compiler
    loads CUDA's runtime sidecar (runtime._load_device_runtime) and with it a library compiled
    for sm_90. The CUDA driver is a stub here whose every call fails, as without a GPU."""
    drivers = subprocess.run(["nm", "-D", "--undefined-only",
                              str(_tvm_lib_dir() / "libtvm_runtime_cuda.so")],
                             capture_output=True, text=True, check=True).stdout.split()
    stub = tmp_path / "stub"
    stub.mkdir()
    calls = sorted({name for name in drivers if re.fullmatch(r"cu[A-Z]\w*", name)})
    (stub / "cuda.c").write_text("".join(f"int {name}(void) {{ return 100; }}\n" for name in calls))
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o",
                    str(stub / "libcuda.so.1"), str(stub / "cuda.c")], check=True)

    bundle = tmp_path / "bundle"
    gpu_bundle.build(bundle, "tiny", ["q4f16_1"], "cuda", "sm_90")
    site = tmp_path / "site"
    with tarfile.open(bundle / "tvm-runtime.tar.xz") as tar:
        tar.extractall(site, filter="data")
    code = ("import tvm; from medusa_cli.devices import load_device_runtime; "
            "load_device_runtime('cuda'); "
            f"tvm.runtime.load_module({str(bundle / 'libs' / 'heads-q4f16_1.so')!r}); "
            "print(tvm.base._RUNTIME_ONLY, sorted(tvm.base._LOADED_LIBS))")
    repo = Path(gpu_bundle.__file__).parents[1]
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1", PYTHONPATH=f"{site}{os.pathsep}{repo}",
               LD_LIBRARY_PATH=os.pathsep.join([str(stub), *gpu_bundle._cuda_runtime_dirs()]))
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split("\n")[0] == "True ['tvm_runtime', 'tvm_runtime_cuda']"


def _tvm_lib_dir() -> Path:
    import tvm

    return Path(tvm.__file__).parent / "lib"
