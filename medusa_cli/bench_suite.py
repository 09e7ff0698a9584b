"""`make bench`: the whole pipeline at a published shape, written to BENCHMARKS.md.

    python -m medusa_cli.bench_suite [--preset vicuna-7b] [--schemes q0f32,q0f16,q4f16_1,q4f32_1]
                                     [--batches 1,8] [--repeat 10] [--output BENCHMARKS.md]
                                     [--target cpu] [--device cpu] [--verify] [--no-convert]
                                     [--libraries DIR]

One seeded example checkpoint (float16, as published); for each scheme: convert, compile for
--target (timed; the host CPU by default), optionally `medusa verify` on --device, then
`medusa bench` there at each batch: the library against the memory bandwidth floor and numpy
float32, measured side by side in the same run. Then the conversion benchmark (bench_convert),
unless --no-convert.

On a GPU machine without TVM's compiler, gpu_bundle.py runs it with --device cuda:0 --verify
--no-convert --libraries (built here for the GPU), the floor from a device-to-device copy.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .bench import BenchRequest, bench_heads
from .bench_convert import markdown as convert_markdown
from .bench_convert import run_benchmark as run_convert_benchmark


def _ms(seconds: float) -> str:
    """Milliseconds with the digits that matter from a GPU's 0.1 ms to a CPU's 100 ms."""
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def _row(scheme: str, compile_s: str, report, verified: str | None) -> list[str]:
    """Table rows of one scheme; `verified`: the verify cell, None without that column."""
    lines = []
    for r in report.rows:
        numpy_ms = _ms(r.numpy.median_s) if r.numpy else "-"
        vs_numpy = f"{r.vs_numpy:.2f}x" if r.vs_numpy is not None else "-"
        lines.append(
            f"| {scheme} | {r.batch} | {_ms(r.library.median_s)} "
            f"({_ms(r.library.p10_s)}-{_ms(r.library.p90_s)}) | {numpy_ms} | {vs_numpy} "
            f"| {r.weight_bytes / 2**20:.0f} | {r.gbps:.1f} | {_ms(r.floor_s)} | {r.vs_floor:.2f}x "
            f"| {compile_s} |" + ("" if verified is None else f" {verified} |")
        )
    return lines


def _tvm_build() -> str:
    """TVM's version, and whether it runs without its compiler library (gpu_bundle's runtime)."""
    import tvm

    runtime_only = getattr(tvm.base, "_RUNTIME_ONLY", False)
    return f"{tvm.__version__}{' (runtime only)' if runtime_only else ''}"


def _verified(library: Path, params: Path, device: str) -> str:
    """`medusa verify` of a library, in a cell: pass or FAIL and the largest relative error."""
    from .verify import VerifyRequest, verify_heads

    report = verify_heads(VerifyRequest(library, params, device=device))
    worst = max((h.vs_reference.metrics.max_rel_err for h in report.heads), default=float("nan"))
    return f"{'pass' if report.passed else 'FAIL'} ({worst:.1e})"


def packed_schemes(preset: str, schemes: list[str], max_batch_size: int, workdir: Path):
    """The suite's seeded float16 example checkpoint, then (scheme, packed directory) for each
    scheme in turn, each directory removed once the next is asked for. Yields the example's
    config first."""
    from .convert import ConvertRequest, convert_checkpoint
    from .example import ExampleRequest, write_example

    example = write_example(ExampleRequest(output=workdir / "ckpt", layout="medusa1", preset=preset,
                                           dtype="float16", file_format="safetensors", force=True))
    yield example.config
    for scheme in schemes:
        params = workdir / f"params-{scheme}"
        convert_checkpoint(ConvertRequest(example.output, params, quantization=scheme, force=True,
                                          max_batch_size=max_batch_size))
        yield scheme, params
        shutil.rmtree(params, ignore_errors=True)


def library_name(scheme: str) -> str:
    """A prebuilt library's file name in --libraries (gpu_bundle writes them)."""
    return f"heads-{scheme}.so"


def run_suite(preset: str, schemes: list[str], batches: tuple[int, ...], repeat: int, target: str,
              workdir: Path, device: str = "cpu", verify: bool = False, convert: bool = True,
              libraries: Path | None = None) -> str:
    """libraries: a folder of prebuilt libraries (library_name(scheme)) to bench instead of
    compiling for `target`; the target is then the one they were built for."""
    from .compile import CompileRequest, compile_heads

    started = time.perf_counter()
    packed = packed_schemes(preset, schemes, max(batches), workdir)
    c = next(packed)
    columns = ["scheme", "batch", "library ms (p10-p90)", "numpy fp32 ms", "time vs numpy",
               "weights MiB", "GB/s", "floor ms", "time vs floor", "compile s"]
    columns += ["verify (max rel. error)"] if verify else []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    bandwidths = []
    report = None
    for scheme, params in packed:
        if libraries is None:
            t = time.perf_counter()
            library = compile_heads(CompileRequest(params, target=target, max_batch_size=max(batches),
                                                   output=workdir / library_name(scheme))).output
            compile_s = f"{time.perf_counter() - t:.1f}"
        else:
            library, compile_s = Path(libraries) / library_name(scheme), "prebuilt"
        verified = _verified(library, params, device) if verify else None
        report = bench_heads(BenchRequest(library, params, batches=batches, repeat=repeat,
                                          device=device))
        bandwidths.append(report.bandwidth_gbps)
        lines += _row(scheme, compile_s, report, verified)

    tail = [""]
    if convert:
        convert_rows = [run_convert_benchmark(preset, "float16", "medusa1", workdir / "convert", None,
                                              "safetensors")]
        tail = ["", "## convert", "", convert_markdown(convert_rows), ""]
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
    parser.add_argument("--no-convert", dest="convert", action="store_false",
                        help="skip the conversion benchmark")
    parser.add_argument("--libraries", type=Path, default=None,
                        help="bench the prebuilt heads-SCHEME.so in this folder (gpu_bundle.py) "
                             "instead of compiling")
    parser.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="medusa-bench-"))
    try:
        text = run_suite(args.preset, args.schemes.split(","),
                         tuple(int(b) for b in args.batches.split(",")), args.repeat, args.target, workdir,
                         device=args.device, verify=args.verify, convert=args.convert,
                         libraries=args.libraries)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
