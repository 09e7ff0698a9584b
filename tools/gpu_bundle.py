"""The GPU benchmark on a machine with a GPU but neither TVM's compiler nor a network (the device
machines lent to this project: Python 3.12 with numpy, safetensors, typer and rich, no
apache-tvm, and at most 64 MiB carried over).

Here (`make gpu-bundle`), where apache-tvm's compiler and nvcc are:

    python tools/gpu_bundle.py build [--target cuda] [--arch sm_90] [--bundle .gpu]

There, from the repository root with the bundle beside it:

    python3 tools/gpu_bundle.py run [--bundle .gpu] [--device cuda:0] [--output gpu-out]

`build` writes into the bundle:
  libs/heads-SCHEME.so   the suite's heads (bench_suite.packed_schemes) compiled here for the GPU
  tvm-runtime.tar.xz     the installed tvm package without libtvm_compiler.so: TVM then runs in
                         its runtime-only mode, which loads and runs compiled libraries (4 MB
                         packed, where the apache-tvm wheel is 100 MB)
  schemes                the schemes built, for scripts/gpu-check.sh
The Makefile adds apache-tvm-ffi's wheel for Python 3.12 under wheels/. `run` installs that
wheel and unpacks the runtime into a temporary folder, then runs bench_suite in a child Python
that imports them (--libraries: the same seeded checkpoint regenerated and converted there,
then verify and bench of each library on the device) and writes BENCHMARKS-GPU.md, with
nvidia-smi's view of the card, into --output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from bench_suite import library_name, packed_schemes  # noqa: E402

SCHEMES = ("q0f16", "q4f16_1")
MAX_BATCH_SIZE = 8


def build_libraries(output: Path, preset: str, schemes: list[str], target: str, arch: str | None,
                    max_batch_size: int = MAX_BATCH_SIZE) -> list[Path]:
    """Compile the suite's heads for each scheme into output (library_name(scheme))."""
    from medusa_cli.commands.compile import CompileRequest, compile_heads

    output.mkdir(parents=True, exist_ok=True)
    libraries = []
    with tempfile.TemporaryDirectory(prefix="medusa-gpu-bundle-") as work:
        packed = packed_schemes(preset, schemes, max_batch_size, Path(work))
        next(packed)  # the example's config
        for scheme, params, _ in packed:
            result = compile_heads(CompileRequest(params, target=target, arch=arch,
                                                  output=output / library_name(scheme)))
            libraries.append(result.output)
    return libraries


def pack_tvm_runtime(archive: Path) -> Path:
    """The installed tvm package, less its compiler library and bytecode caches, as .tar.xz."""
    import tvm

    package = Path(tvm.__file__).parent

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = Path(info.name).name
        return None if name == "__pycache__" or name.startswith("libtvm_compiler") else info

    with tarfile.open(archive, "w:xz") as tar:
        tar.add(package, arcname="tvm", filter=keep)
    return archive


def build(bundle: Path, preset: str, schemes: list[str], target: str, arch: str | None) -> list[Path]:
    """Libraries, packed runtime and scheme list into `bundle` (replaced)."""
    if bundle.exists():
        shutil.rmtree(bundle)
    libraries = build_libraries(bundle / "libs", preset, schemes, target, arch)
    runtime = pack_tvm_runtime(bundle / "tvm-runtime.tar.xz")
    (bundle / "schemes").write_text(",".join(schemes) + "\n")
    return [*libraries, runtime]


def _cuda_runtime_dirs() -> list[str]:
    """The first folder holding libcudart.so.13, which TVM's CUDA runtime links: a CUDA
    toolkit's, else a copy pip installed for PyTorch (nvidia-cuda-runtime)."""
    toolkits = [Path("/usr/local/cuda"), *sorted(Path("/usr/local").glob("cuda-13*"))]
    candidates = [d / sub / "libcudart.so.13" for d in toolkits for sub in ("lib64", "lib")]
    wheels = Path(sysconfig.get_paths()["purelib"]) / "nvidia"
    if wheels.is_dir():
        candidates += sorted(wheels.rglob("libcudart.so.13"))
    return [str(c.parent) for c in candidates if c.exists()][:1]


def run(bundle: Path, device: str, output: Path, preset: str, batches: str) -> int:
    """bench_suite on the bundle's libraries, in a child Python that imports the bundle's TVM
    runtime; its exit status."""
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medusa-gpu-run-") as site:
        wheels = sorted((bundle / "wheels").glob("*.whl"))
        if wheels:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                            "--no-compile", "--target", site, *map(str, wheels)], check=True)
        with tarfile.open(bundle / "tvm-runtime.tar.xz") as tar:
            tar.extractall(site, filter="data")
        env = dict(os.environ, TVM_USE_RUNTIME_LIB="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([site, os.getcwd(), os.environ.get("PYTHONPATH", "")]),
                   LD_LIBRARY_PATH=os.pathsep.join([*_cuda_runtime_dirs(),
                                                    os.environ.get("LD_LIBRARY_PATH", "")]))
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.memory,"
                                  "driver_version", "--format=csv"], capture_output=True, text=True)
            (output / "nvidia-smi.csv").write_text(smi.stdout + smi.stderr)
            print(smi.stdout, flush=True)
        schemes = (bundle / "schemes").read_text().strip()
        suite = Path(__file__).resolve().parent / "bench_suite.py"
        return subprocess.run([sys.executable, str(suite), "--preset", preset,
                               "--schemes", schemes, "--batches", batches, "--device", device,
                               "--verify", "--libraries", str(bundle / "libs"),
                               "--output", str(output / "BENCHMARKS-GPU.md")], env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="compile the libraries and pack TVM's runtime (here)")
    make.add_argument("--schemes", default=",".join(SCHEMES))
    make.add_argument("--target", default="cuda")
    make.add_argument("--arch", default="sm_90", help="CUDA arch (H100/H200: sm_90)")
    use = commands.add_parser("run", help="verify and bench the libraries (on the GPU machine)")
    use.add_argument("--device", default="cuda:0")
    use.add_argument("--batches", default="1,8")
    use.add_argument("--output", type=Path, default=Path("gpu-out"))
    for sub in (make, use):
        sub.add_argument("--bundle", type=Path, default=Path(".gpu"))
        sub.add_argument("--preset", default="vicuna-7b")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.bundle, args.device, args.output, args.preset, args.batches)
    arch = args.arch if args.target not in ("cpu", "llvm") else None
    for path in build(args.bundle, args.preset, args.schemes.split(","), args.target, arch):
        print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
