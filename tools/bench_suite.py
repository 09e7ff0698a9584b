"""`make bench`: the whole pipeline at a published shape, written to BENCHMARKS.md.

    python tools/bench_suite.py [--preset vicuna-7b] [--schemes q0f32,q0f16,q4f16_1,q4f32_1]
                                [--batches 1,8] [--repeat 10] [--output BENCHMARKS.md]
                                [--target cpu] [--device cpu] [--verify] [--libraries DIR]

One seeded example checkpoint (float16, as published); for each scheme: convert and compile for
--target (both timed; the host CPU by default), optionally `medusa verify` on --device, then
`medusa bench` there at each batch: the library against the memory bandwidth floor and numpy
float32, measured side by side in the same run.

--libraries benches prebuilt libraries (heads-SCHEME.so) instead of compiling, on --device (on a
GPU the floor comes from a device-to-device copy). The GPU run itself is gpu_bundle.py's.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medusa_cli.commands.bench import BenchRequest, bench_heads  # noqa: E402
from medusa_cli.commands.convert import ConvertRequest, convert_checkpoint  # noqa: E402
from medusa_cli.commands.example import ExampleRequest, write_example  # noqa: E402
from medusa_cli.commands.verify import VerifyRequest, verify_heads  # noqa: E402


def _ms(seconds: float) -> str:
    """Milliseconds with the digits that matter from a GPU's 0.1 ms to a CPU's 100 ms."""
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def _row(scheme: str, convert_s: str, compile_s: str, report, verified: str | None) -> list[str]:
    """Table rows of one scheme; `verified`: the verify cell, None without that column."""
    lines = []
    for r in report.rows:
        numpy_ms = _ms(r.numpy.median_s) if r.numpy else "-"
        vs_numpy = f"{r.vs_numpy:.2f}x" if r.vs_numpy is not None else "-"
        lines.append(
            f"| {scheme} | {r.batch} | {_ms(r.library.median_s)} "
            f"({_ms(r.library.p10_s)}-{_ms(r.library.p90_s)}) | {numpy_ms} | {vs_numpy} "
            f"| {r.weight_bytes / 2**20:.0f} | {r.gbps:.1f} | {_ms(r.floor_s)} | {r.vs_floor:.2f}x "
            f"| {convert_s} | {compile_s} |" + ("" if verified is None else f" {verified} |")
        )
    return lines


def _tvm_build() -> str:
    """TVM's version, and whether it runs without its compiler library (gpu_bundle's runtime)."""
    import tvm

    runtime_only = getattr(tvm.base, "_RUNTIME_ONLY", False)
    return f"{tvm.__version__}{' (runtime only)' if runtime_only else ''}"


def _verified(library: Path, params: Path, device: str) -> str:
    """`medusa verify` of a library, in a cell: pass or FAIL and the largest relative error."""
    report = verify_heads(VerifyRequest(library, params, device=device))
    worst = max((h.vs_reference.metrics.max_rel_err for h in report.heads), default=float("nan"))
    return f"{'pass' if report.passed else 'FAIL'} ({worst:.1e})"


def packed_schemes(preset: str, schemes: list[str], max_batch_size: int, workdir: Path):
    """The suite's seeded float16 example checkpoint, then (scheme, packed directory, convert
    seconds) for each scheme in turn, each directory removed once the next is asked for. Yields
    the example's config first."""
    example = write_example(ExampleRequest(output=workdir / "ckpt", layout="medusa1", preset=preset,
                                           dtype="float16", file_format="safetensors", force=True))
    yield example.config
    for scheme in schemes:
        params = workdir / f"params-{scheme}"
        converted = convert_checkpoint(ConvertRequest(example.output, params, quantization=scheme,
                                                      force=True, max_batch_size=max_batch_size))
        yield scheme, params, converted.seconds
        shutil.rmtree(params, ignore_errors=True)


def library_name(scheme: str) -> str:
    """A prebuilt library's file name in --libraries (gpu_bundle writes them)."""
    return f"heads-{scheme}.so"


def run_suite(preset: str, schemes: list[str], batches: tuple[int, ...], repeat: int, target: str,
              workdir: Path, device: str = "cpu", verify: bool = False,
              libraries: Path | None = None) -> str:
    """libraries: a folder of prebuilt libraries (library_name(scheme)) to bench instead of
    compiling for `target`; the target is then the one they were built for."""
    started = time.perf_counter()
    packed = packed_schemes(preset, schemes, max(batches), workdir)
    c = next(packed)
    columns = ["scheme", "batch", "library ms (p10-p90)", "numpy fp32 ms", "time vs numpy",
               "weights MiB", "GB/s", "floor ms", "time vs floor", "convert s", "compile s"]
    columns += ["verify (max rel. error)"] if verify else []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    bandwidths = []
    report = None
    for scheme, params, convert_s in packed:
        if libraries is None:
            # imported here: on a GPU machine given TVM's runtime alone (gpu_bundle's run) the
            # compiler does not import
            from medusa_cli.commands.compile import CompileRequest, compile_heads

            t = time.perf_counter()
            library = compile_heads(CompileRequest(params, target=target,
                                                   output=workdir / library_name(scheme))).output
            compile_s = f"{time.perf_counter() - t:.1f}"
        else:
            library, compile_s = Path(libraries) / library_name(scheme), "prebuilt"
        verified = _verified(library, params, device) if verify else None
        report = bench_heads(BenchRequest(library, params, batches=batches, repeat=repeat,
                                          device=device))
        bandwidths.append(report.bandwidth_gbps)
        lines += _row(scheme, f"{convert_s:.1f}", compile_s, report, verified)

    tail = [""]
    target_name = target if libraries is None else f"{report.target} (prebuilt, {libraries})"
    header = [
        "# Benchmarks",
        "",
        f"Written by `{'make bench' if libraries is None else 'gpu_bundle run'}` on "
        f"{datetime.date.today().isoformat()}; "
        f"{time.perf_counter() - started:.0f} s in all.",
        "",
        f"- Machine: {report.machine}"
        + (f"; TVM CPU threads: {report.num_threads}." if report.num_threads else "."),
        f"- TVM {_tvm_build()}.",
        f"- Shape: preset `{preset}`: {c.medusa_num_heads} heads x {c.medusa_num_layers} ResBlock, "
        f"hidden {c.hidden_size}, vocab {c.vocab_size}; target `{target_name}`; device `{device}`.",
        f"- Bandwidth measured in the same run ({report.bandwidth_method}): "
        f"{min(bandwidths):.1f} to {max(bandwidths):.1f} GB/s (floor = weight bytes / bandwidth).",
        "- Each repeat times the library (inputs on the device, up to its completion) and numpy "
        "(float32 BLAS on the host, same heads) one after the other, each in a block of calls "
        "after a short pause; medians of the repeats. Ratios < 1 mean the library is faster.",
        "",
        "## get_logits",
        "",
    ]
    return "\n".join(header + lines + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vicuna-7b")
    parser.add_argument("--schemes", default="q0f32,q0f16,q4f16_1,q4f32_1")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--device", default="cpu", help="where the libraries run: cpu, cuda:0, ...")
    parser.add_argument("--verify", action="store_true", help="also `medusa verify` each library")
    parser.add_argument("--libraries", type=Path, default=None,
                        help="bench the prebuilt heads-SCHEME.so in this folder (gpu_bundle.py) "
                             "instead of compiling")
    parser.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="medusa-bench-"))
    try:
        text = run_suite(args.preset, args.schemes.split(","),
                         tuple(int(b) for b in args.batches.split(",")), args.repeat, args.target, workdir,
                         device=args.device, verify=args.verify, libraries=args.libraries)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
