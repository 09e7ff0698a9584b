"""The GPU run, prepared here and run in one command on a machine lent with an NVIDIA GPU (H200:
Python 3.12 with numpy, safetensors, typer, rich and torch; no apache-tvm, no network; at most
64 MiB carried with the working tree; 15 minutes of device time in all, so the run itself keeps
to RUN_BUDGET_S).

Here, where apache-tvm's compiler, nvcc and a package index are (`make gpu-bundle`):

    python tools/gpu_bundle.py build [--arch sm_90] [--bundle .gpu]

There, from the repository root, with .gpu carried beside it (run tool: carry [".gpu"]):

    python3 tools/gpu_bundle.py run [--bundle .gpu] [--device cuda:0] [--output gpu-out]

`build` writes into the bundle (about 10 MiB; refused over BUNDLE_LIMIT):
  libs/heads-SCHEME.so   every scheme at the vicuna-7b shape (5 heads, max batch 8) with the
                         mc_sim_7b_63 tree, compiled here for --arch (SASS + PTX in the .so)
  tvm-runtime.tar.xz     the installed tvm package without libtvm_compiler.so: TVM then runs in
                         its runtime-only mode, which loads and runs compiled libraries
  wheels/                apache-tvm-ffi, ml_dtypes and typing_extensions for CPython 3.12
  manifest.json          what was built, for run and for BENCHMARKS-GPU.md

`run` unpacks the wheels (as zip files: no pip needed) and the runtime into a temporary folder
and runs the measurement in a child Python that imports them, with a deadline:
  1. the seeded vicuna-7b checkpoint (float16) regenerated, converted to every scheme
     (in parallel processes);
  2. `medusa verify` of every library at batch 1, 4 and 8 on the device (parallel processes);
  3. `medusa bench` of every library at batch 1, 4 and 8, one after another, against the
     device-to-device copy bandwidth measured in the same run, and the tree's candidates
     against get_logits;
  4. OUTPUT/BENCHMARKS-GPU.md (each figure as a fraction of that copy bandwidth, the target
     checks) and OUTPUT/results.json, with nvidia-smi's view of the card.
A step that would pass the deadline is skipped and said so; what was measured is written. The
exit status is 0 when every library verified, 1 when one failed, 2 when the run could not start.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESET = "vicuna-7b"
SCHEMES = ("q0f32", "q0f16", "q0bf16", "q4f16_1", "q4f32_1", "q3f16_1")
BATCHES = (1, 4, 8)
MAX_BATCH_SIZE = 8
TREE = "mc_sim_7b_63"
TOPK = 10
SEED = 0
# What the lent machine carries beside the working tree, in all; the bundle keeps well under.
BUNDLE_LIMIT = 48 << 20
# Seconds the run may take once the bundle is unpacked (the loan's 15 minutes also pay for
# starting the machine and copying the bundle).
RUN_BUDGET_S = 210
# Wheels the runtime needs on CPython 3.12 (the lent machines' Python) that such a machine may
# lack: tvm's Python package imports tvm_ffi and ml_dtypes.
WHEELS = ("apache-tvm-ffi", "ml_dtypes", "typing_extensions")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# The targets, for an H100 or H200 (other GPUs get the same checks, marked as such).
TARGET_GPUS = ("H100", "H200")
Q0F16_MIN_FRACTION = 0.80
Q4_MIN_SPEEDUP = 3.0
BATCH8_MAX_SLOWDOWN = 1.3
TREE_MAX_SHARE = 0.05


def library_name(scheme: str) -> str:
    return f"heads-{scheme}.so"


# ---------------------------------------------------------------------------------------------
# build (here)


def build_libraries(libs: Path, arch: str | None, schemes: tuple[str, ...], preset: str = PRESET,
                    target_name: str = "cuda", tree_name: str = TREE) -> list[Path]:
    """Every scheme's heads with the tree, compiled for CUDA `arch` from the preset's shape (the
    compiler needs no weights: the run converts the same seeded checkpoint there). target_name
    llvm builds CPU libraries instead, for a dry run of `run --device cpu`."""
    from medusa_cli.checkpoint.synthetic import preset_config
    from medusa_cli.compiler.gpu_topk import GpuTopkLayout
    from medusa_cli.compiler.model import TreeSpec
    from medusa_cli.compiler.pipeline import compile_library
    from medusa_cli.compiler.targets import resolve_target
    from medusa_cli.compiler.topk import TopkLayout
    from medusa_cli.quantization import get_scheme
    from medusa_cli.trees import load_tree

    config = dataclasses.replace(preset_config(preset)[0], max_batch_size=MAX_BATCH_SIZE)
    tree = load_tree(tree_name, TOPK, config.medusa_num_heads)
    target = resolve_target(target_name, arch if target_name == "cuda" else None)
    layout = GpuTopkLayout.for_rows(config.vocab_size, 1 + tree.depth, TOPK) if target.is_gpu \
        else TopkLayout.for_target(config.vocab_size, gpu=False)
    spec = TreeSpec(tree, TOPK, layout)
    libs.mkdir(parents=True, exist_ok=True)
    for scheme in schemes:
        compile_library(config, get_scheme(scheme), target, spec, libs / library_name(scheme))
    return [libs / library_name(scheme) for scheme in schemes]


def pack_tvm_runtime(archive: Path) -> Path:
    """The installed tvm package, less its compiler library and bytecode caches, as .tar.xz."""
    import tvm

    package = Path(tvm.__file__).parent

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = Path(info.name).name
        return None if name == "__pycache__" or name.startswith("libtvm_compiler") else info

    # xz's fastest preset: 4.5 MiB instead of 3.7, in a sixth of the time
    with tarfile.open(archive, "w:xz", preset=1) as tar:
        tar.add(package, arcname="tvm", filter=keep)
    return archive


def download_wheels(folder: Path) -> list[Path]:
    """WHEELS for CPython 3.12 on x86-64 Linux, at the versions installed here (pip download)."""
    from importlib import metadata

    folder.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                    *platforms, "-d", str(folder), *pins], check=True)
    return sorted(folder.glob("*.whl"))


def bundle_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())


def build(bundle: Path, arch: str, schemes: tuple[str, ...] = SCHEMES, wheels: bool = True,
          preset: str = PRESET, target_name: str = "cuda", tree: str = TREE) -> list[Path]:
    """Libraries, runtime, wheels and manifest into `bundle` (replaced); the files written."""
    import tvm

    from medusa_cli import __version__

    if bundle.exists():
        shutil.rmtree(bundle)
    files = build_libraries(bundle / "libs", arch, schemes, preset, target_name, tree)
    files.append(pack_tvm_runtime(bundle / "tvm-runtime.tar.xz"))
    if wheels:
        files += download_wheels(bundle / "wheels")
    manifest = {"preset": preset, "schemes": list(schemes), "batches": list(BATCHES),
                "max_batch_size": MAX_BATCH_SIZE, "tree": tree, "topk": TOPK, "seed": SEED,
                "arch": arch if target_name == "cuda" else target_name, "medusa_cli": __version__, "tvm": tvm.__version__,
                "built": datetime.date.today().isoformat()}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    files.append(bundle / "manifest.json")
    if bundle_bytes(bundle) > BUNDLE_LIMIT:
        raise SystemExit(f"{bundle}: {bundle_bytes(bundle) / 2**20:.1f} MiB, over the "
                         f"{BUNDLE_LIMIT >> 20} MiB the GPU machine is given; drop schemes")
    return files


# ---------------------------------------------------------------------------------------------
# The report: fractions of the copy bandwidth and the target checks (pure; tested here)


@dataclasses.dataclass
class Check:
    """One target: what was measured against its limit; passed None when it could not be told."""

    target: str
    measured: str
    passed: bool | None


def _ms(results: dict, scheme: str, batch: int) -> float | None:
    return results["schemes"].get(scheme, {}).get("bench", {}).get(str(batch))


def fraction_of_copy(results: dict, scheme: str, batch: int) -> float | None:
    """The library's effective bandwidth (its parameter bytes per call / time) over the copy
    bandwidth measured in the same run."""
    ms = _ms(results, scheme, batch)
    if ms is None or not results.get("copy_gbps"):
        return None
    weight_bytes = results["schemes"][scheme]["weight_bytes"]
    return weight_bytes / (ms * 1e-3) / 1e9 / results["copy_gbps"]


def check_targets(results: dict) -> list[Check]:
    """The issue's targets, from the numbers in `results` (run's results.json)."""
    checks = []
    fraction = fraction_of_copy(results, "q0f16", 1)
    checks.append(Check(f"q0f16 batch 1 at >= {Q0F16_MIN_FRACTION:.0%} of the copy bandwidth",
                        "-" if fraction is None else f"{fraction:.1%}",
                        None if fraction is None else fraction >= Q0F16_MIN_FRACTION))
    q0, q4 = _ms(results, "q0f16", 1), _ms(results, "q4f16_1", 1)
    speedup = None if q0 is None or q4 is None else q0 / q4
    checks.append(Check(f"q4f16_1 batch 1 >= {Q4_MIN_SPEEDUP:g}x faster than q0f16 batch 1",
                        "-" if speedup is None else f"{speedup:.2f}x",
                        None if speedup is None else speedup >= Q4_MIN_SPEEDUP))
    for scheme in results["schemes"]:
        one, eight = _ms(results, scheme, 1), _ms(results, scheme, 8)
        ratio = None if one is None or eight is None else eight / one
        checks.append(Check(f"{scheme}: batch 8 <= {BATCH8_MAX_SLOWDOWN:g}x batch 1",
                            "-" if ratio is None else f"{ratio:.2f}x",
                            None if ratio is None else ratio <= BATCH8_MAX_SLOWDOWN))
    for scheme, entry in results["schemes"].items():
        for batch, tree in sorted(entry.get("tree", {}).items(), key=lambda kv: int(kv[0])):
            share = tree["candidates_ms"] / tree["get_logits_ms"]
            checks.append(Check(f"{scheme} batch {batch}: tree candidates <= "
                                f"{TREE_MAX_SHARE:.0%} of get_logits", f"{share:.1%}",
                                share <= TREE_MAX_SHARE))
    return checks


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(results: dict, checks: list[Check]) -> str:
    """BENCHMARKS-GPU.md."""
    device = results.get("device") or "unknown GPU"
    on_target_gpu = any(name in device for name in TARGET_GPUS)
    lines = [
        "# GPU benchmarks",
        "",
        f"Written by `python3 tools/gpu_bundle.py run` on {results.get('date', '?')}, "
        f"{results.get('seconds', 0):.0f} s in all.",
        "",
        f"- Device: {device}; {results.get('nvidia_smi', '').strip() or 'nvidia-smi: -'}",
        f"- Libraries: {results.get('manifest', {}).get('preset', PRESET)} shape, built for "
        f"{results.get('manifest', {}).get('arch', '?')} with tree "
        f"{results.get('manifest', {}).get('tree', TREE)} (top-{TOPK}); "
        f"TVM {results.get('tvm', '?')} runtime only; medusa-cli "
        f"{results.get('manifest', {}).get('medusa_cli', '?')}.",
        f"- Copy bandwidth measured in this run (device-to-device, read + write): "
        f"{_cell(results.get('copy_gbps'), '.0f')} GB/s. \"of copy\" = the parameter bytes a "
        "call reads / its time / that bandwidth.",
        "",
        "## get_logits",
        "",
        "| scheme | verify b1 / b4 / b8 (max rel. error) | MiB | "
        + " | ".join(f"b{b} ms | b{b} of copy" for b in BATCHES) + " |",
        "|" + "---|" * (3 + 2 * len(BATCHES)),
    ]
    for scheme, entry in results["schemes"].items():
        verified = " / ".join(
            "-" if v is None else f"{'pass' if v['passed'] else 'FAIL'} ({v['max_rel_err']:.1e})"
            for v in (entry.get("verify", {}).get(str(b)) for b in BATCHES))
        cells = [f"{_cell(_ms(results, scheme, b), '.3f')} | "
                 f"{_cell(fraction_of_copy(results, scheme, b), '.0%')}" for b in BATCHES]
        lines.append(f"| {scheme} | {verified} | {entry['weight_bytes'] / 2**20:.0f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## Tree candidates (get_tree_candidates less its heads' share of get_logits)", "",
              "| scheme | batch | get_logits ms | get_tree_candidates ms | candidates ms | of get_logits |",
              "|---|---|---|---|---|---|"]
    for scheme, entry in results["schemes"].items():
        for batch, tree in sorted(entry.get("tree", {}).items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {scheme} | {batch} | {tree['get_logits_ms']:.3f} | "
                         f"{tree['get_tree_candidates_ms']:.3f} | {tree['candidates_ms']:.3f} | "
                         f"{tree['candidates_ms'] / tree['get_logits_ms']:.1%} |")
    lines += ["", "## Targets" + ("" if on_target_gpu else
                                  f" (set for {' / '.join(TARGET_GPUS)}; this is {device})"), "",
              "| target | measured | verdict |", "|---|---|---|"]
    for check in checks:
        verdict = "-" if check.passed is None else "met" if check.passed else "MISSED"
        lines.append(f"| {check.target} | {check.measured} | {verdict} |")
    if results.get("skipped"):
        lines += ["", "## Not run", ""] + [f"- {reason}" for reason in results["skipped"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# run (there)


def _unpack(bundle: Path, site: Path) -> None:
    """The wheels (zip files) and the runtime archive into `site`."""
    for wheel in sorted((bundle / "wheels").glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    with tarfile.open(bundle / "tvm-runtime.tar.xz") as tar:
        tar.extractall(site, filter="data")


def _cuda_runtime_dirs() -> list[str]:
    """The first folder holding libcudart.so.13, which TVM's CUDA runtime links: a CUDA
    toolkit's, else a copy pip installed for PyTorch (nvidia-cuda-runtime)."""
    import sysconfig

    toolkits = [Path("/usr/local/cuda"), *sorted(Path("/usr/local").glob("cuda-13*"))]
    candidates = [d / sub / "libcudart.so.13" for d in toolkits for sub in ("lib64", "lib")]
    wheels = Path(sysconfig.get_paths()["purelib"]) / "nvidia"
    if wheels.is_dir():
        candidates += sorted(wheels.rglob("libcudart.so.13"))
    return [str(c.parent) for c in candidates if c.exists()][:1]


def _nvidia_smi() -> str:
    if shutil.which("nvidia-smi") is None:
        return ""
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.memory,"
                          "driver_version", "--format=csv,noheader"], capture_output=True, text=True)
    return (smi.stdout or smi.stderr).strip()


def run(bundle: Path, device: str, output: Path) -> int:
    """Unpack the bundle and run the measurement in a child Python that imports it."""
    if not (bundle / "manifest.json").is_file():
        print(f"{bundle}: no manifest.json; build the bundle first (make gpu-bundle) and carry it",
              file=sys.stderr)
        return 2
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medusa-gpu-run-") as site:
        _unpack(bundle, Path(site))
        env = dict(os.environ, TVM_USE_RUNTIME_LIB="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([site, str(REPO), os.environ.get("PYTHONPATH", "")]),
                   LD_LIBRARY_PATH=os.pathsep.join([*_cuda_runtime_dirs(),
                                                    os.environ.get("LD_LIBRARY_PATH", "")]))
        return subprocess.run([sys.executable, str(Path(__file__).resolve()), "measure",
                               "--bundle", str(bundle), "--device", device, "--output", str(output),
                               "--nvidia-smi", _nvidia_smi()], env=env).returncode


def _convert(args: tuple) -> tuple[str, float]:
    checkpoint, params, scheme = args
    from medusa_cli.commands.convert import ConvertRequest, convert_checkpoint

    start = time.perf_counter()
    convert_checkpoint(ConvertRequest(Path(checkpoint), Path(params), quantization=scheme,
                                      force=True, max_batch_size=MAX_BATCH_SIZE))
    return scheme, time.perf_counter() - start


def _verify(args: tuple) -> tuple[str, int, dict]:
    library, params, scheme, batch, device = args
    from medusa_cli.commands.verify import VerifyRequest, verify_heads

    report = verify_heads(VerifyRequest(Path(library), Path(params), device=device, batch=batch))
    worst = max((h.vs_reference.metrics.max_rel_err for h in report.heads), default=float("nan"))
    return scheme, batch, {"passed": report.passed, "max_rel_err": worst,
                           "failure": None if report.passed else report.failure_message()}


class _Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def measure(bundle: Path, device: str, output: Path, nvidia_smi: str) -> int:
    """Steps 1-4 of the module's docstring, inside the child Python."""
    import tvm

    from medusa_cli.commands.bench import BenchRequest, bench_heads
    from medusa_cli.commands.example import ExampleRequest, write_example

    started = time.monotonic()
    deadline = _Deadline(RUN_BUDGET_S)
    manifest = json.loads((bundle / "manifest.json").read_text())
    schemes = [s for s in manifest["schemes"] if (bundle / "libs" / library_name(s)).is_file()]
    results = {"date": datetime.date.today().isoformat(), "manifest": manifest,
               "tvm": tvm.__version__, "nvidia_smi": nvidia_smi, "device": None,
               "copy_gbps": None, "skipped": [], "schemes": {}}
    ctx = multiprocessing.get_context("spawn")  # CUDA does not survive fork
    workers = max(1, min(len(schemes), (os.cpu_count() or 2) - 1))
    with tempfile.TemporaryDirectory(prefix="medusa-gpu-data-") as work:
        work = Path(work)
        print(f"[{time.monotonic() - started:5.0f} s] checkpoint {manifest['preset']}", flush=True)
        example = write_example(ExampleRequest(output=work / "ckpt", layout="medusa1",
                                               preset=manifest["preset"], dtype="float16",
                                               seed=manifest["seed"], file_format="safetensors"))
        params = {s: work / f"params-{s}" for s in schemes}
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for scheme, seconds in pool.map(_convert, [(example.output, params[s], s) for s in schemes]):
                print(f"[{time.monotonic() - started:5.0f} s] converted {scheme} in {seconds:.0f} s",
                      flush=True)
        for scheme in schemes:
            results["schemes"][scheme] = {"weight_bytes": sum(
                p.stat().st_size for p in params[scheme].glob("params_shard_*.bin")),
                "verify": {}, "bench": {}, "tree": {}}
        libraries = {s: bundle / "libs" / library_name(s) for s in schemes}

        # 2. verification, in parallel (the numpy oracle is the slow part), leaving the
        # benchmarks about a minute and a half
        jobs = [(libraries[s], params[s], s, b, device) for s in schemes for b in manifest["batches"]]
        # a worker holds one head in float64 at a time (1.2 GB at the vicuna-7b shape) and its
        # dequantized copy: 9 of them fit the lent machine's 128 GiB many times over
        verifiers = max(1, min(len(jobs), (os.cpu_count() or 2) - 1, 9))
        pool = concurrent.futures.ProcessPoolExecutor(verifiers, mp_context=ctx)
        futures = {pool.submit(_verify, job): job for job in jobs}
        try:
            for future in concurrent.futures.as_completed(futures, timeout=max(1.0, deadline.left() - 90)):
                scheme, batch, verdict = future.result()
                results["schemes"][scheme]["verify"][str(batch)] = verdict
                print(f"[{time.monotonic() - started:5.0f} s] verify {scheme} batch {batch}: "
                      f"{'pass' if verdict['passed'] else 'FAIL'}", flush=True)
        except concurrent.futures.TimeoutError:
            results["skipped"] += [f"verify of {job[2]} at batch {job[3]}: out of time"
                                   for future, job in futures.items() if not future.done()]
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()  # the oracle in flight: its machine time is the loan's
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

        # 3. benchmarks, one library at a time on the device
        for scheme in schemes:
            if deadline.left() < 15:
                results["skipped"].append(f"bench of {scheme}: out of time")
                continue
            report = bench_heads(BenchRequest(libraries[scheme], params[scheme],
                                              batches=tuple(manifest["batches"]), device=device,
                                              repeat=10, warmup=3, numpy_baseline=False))
            entry = results["schemes"][scheme]
            entry["bench"] = {str(r.batch): r.library.median_s * 1e3 for r in report.rows}
            entry["tree"] = {str(t.batch): {"get_logits_ms": t.get_logits * 1e3,
                                            "get_tree_candidates_ms": t.get_tree_candidates * 1e3,
                                            "candidates_ms": t.candidates_cost * 1e3}
                             for t in report.tree}
            results["copy_gbps"] = max(results["copy_gbps"] or 0.0, report.bandwidth_gbps)
            results["device"] = report.machine.split(" (")[0]
            print(f"[{time.monotonic() - started:5.0f} s] bench {scheme}: "
                  + ", ".join(f"b{b} {ms:.3f} ms" for b, ms in entry["bench"].items()), flush=True)
    results["seconds"] = time.monotonic() - started
    checks = check_targets(results)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = render(results, checks)
    (output / "BENCHMARKS-GPU.md").write_text(text)
    print(text, flush=True)
    verified = [v for e in results["schemes"].values() for v in e["verify"].values()]
    return 0 if verified and all(v["passed"] for v in verified) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="compile the libraries and pack the runtime (here)")
    make.add_argument("--arch", default="sm_90", help="CUDA arch(es): sm_90 for H100/H200")
    make.add_argument("--schemes", default=",".join(SCHEMES))
    # a dry run of `run --device cpu` here: --target llvm --preset tiny --tree vicuna_33b_stage1
    # --no-wheels
    make.add_argument("--target", default="cuda", choices=("cuda", "llvm"))
    make.add_argument("--preset", default=PRESET)
    make.add_argument("--tree", default=TREE)
    make.add_argument("--no-wheels", action="store_true", help="leave the Python 3.12 wheels out")
    use = commands.add_parser("run", help="verify and bench the libraries (on the GPU machine)")
    inside = commands.add_parser("measure", help="(run's child Python)")
    inside.add_argument("--nvidia-smi", default="")
    for sub in (use, inside):
        sub.add_argument("--device", default="cuda:0")
        sub.add_argument("--output", type=Path, default=Path("gpu-out"))
    for sub in (make, use, inside):
        sub.add_argument("--bundle", type=Path, default=Path(".gpu"))
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.bundle, args.device, args.output)
    if args.command == "measure":
        return measure(args.bundle, args.device, args.output, args.nvidia_smi)
    for path in build(args.bundle, args.arch, tuple(args.schemes.split(",")), not args.no_wheels,
                      args.preset, args.target, args.tree):
        print(f"{path}: {path.stat().st_size / 2**20:.2f} MiB")
    print(f"{args.bundle}: {bundle_bytes(args.bundle) / 2**20:.1f} MiB in all; on the GPU machine: "
          f"python3 tools/gpu_bundle.py run --bundle {args.bundle}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
