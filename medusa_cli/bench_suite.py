"""`make bench`: the whole pipeline at a published shape, written to BENCHMARKS.md.

    python -m medusa_cli.bench_suite [--preset vicuna-7b] [--schemes q0f32,q0f16,q4f16_1,q4f32_1]
                                     [--batches 1,8] [--repeat 10] [--output BENCHMARKS.md]

One seeded example checkpoint (float16, as published); for each scheme: convert, compile for
the host CPU (timed), then `medusa bench` at each batch: the library against the memory
bandwidth floor and numpy float32, measured side by side in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .bench import BenchRequest, bench_heads, machine_description
from .bench_convert import markdown as convert_markdown
from .bench_convert import run_benchmark as run_convert_benchmark


def _row(scheme: str, compile_s: float, report) -> list[str]:
    lines = []
    for r in report.rows:
        numpy_ms = f"{r.numpy.median_s * 1e3:.1f}" if r.numpy else "-"
        vs_numpy = f"{r.vs_numpy:.2f}x" if r.vs_numpy is not None else "-"
        lines.append(
            f"| {scheme} | {r.batch} | {r.library.median_s * 1e3:.1f} "
            f"({r.library.p10_s * 1e3:.1f}-{r.library.p90_s * 1e3:.1f}) | {numpy_ms} | {vs_numpy} "
            f"| {r.weight_bytes / 2**20:.0f} | {r.gbps:.1f} | {r.floor_s * 1e3:.1f} | {r.vs_floor:.2f}x "
            f"| {compile_s:.1f} |"
        )
    return lines


def run_suite(preset: str, schemes: list[str], batches: tuple[int, ...], repeat: int, target: str,
              workdir: Path) -> str:
    from .compile import CompileRequest, compile_heads
    from .convert import ConvertRequest, convert_checkpoint
    from .example import ExampleRequest, write_example

    started = time.perf_counter()
    example = write_example(ExampleRequest(output=workdir / "ckpt", layout="medusa1", preset=preset,
                                           dtype="float16", file_format="safetensors", force=True))
    c = example.config
    lines = [
        "| scheme | batch | library ms (p10-p90) | numpy fp32 ms | time vs numpy | weights MiB "
        "| GB/s | floor ms | time vs floor | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    bandwidths = []
    threads = None
    for scheme in schemes:
        params = workdir / f"params-{scheme}"
        convert_checkpoint(ConvertRequest(example.output, params, quantization=scheme, force=True,
                                          max_batch_size=max(batches)))
        t = time.perf_counter()
        compiled = compile_heads(CompileRequest(params, target=target, max_batch_size=max(batches),
                                                output=workdir / f"heads-{scheme}.so"))
        compile_s = time.perf_counter() - t
        report = bench_heads(BenchRequest(compiled.output, params, batches=batches, repeat=repeat))
        bandwidths.append(report.bandwidth_gbps)
        threads = report.num_threads
        lines += _row(scheme, compile_s, report)
        shutil.rmtree(params, ignore_errors=True)

    convert_rows = [run_convert_benchmark(preset, "float16", "medusa1", workdir / "convert", None,
                                          "safetensors")]
    header = [
        "# Benchmarks",
        "",
        f"Written by `make bench` on {datetime.date.today().isoformat()}; "
        f"{time.perf_counter() - started:.0f} s in all.",
        "",
        f"- Machine: {machine_description()}; TVM CPU threads: {threads}.",
        f"- Shape: preset `{preset}`: {c.medusa_num_heads} heads x {c.medusa_num_layers} ResBlock, "
        f"hidden {c.hidden_size}, vocab {c.vocab_size}; target `{target}`.",
        f"- Read bandwidth measured in the same run: "
        f"{min(bandwidths):.1f} to {max(bandwidths):.1f} GB/s (floor = weight bytes / bandwidth).",
        "- Each repeat times the library and numpy (float32 BLAS, same heads) one after "
        "the other, each in a block of calls after a short pause; medians of the repeats. Ratios < 1 mean the library is faster.",
        "",
        "## get_logits",
        "",
    ]
    return "\n".join(header + lines + ["", "## convert", "", convert_markdown(convert_rows), ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vicuna-7b")
    parser.add_argument("--schemes", default="q0f32,q0f16,q4f16_1,q4f32_1")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="medusa-bench-"))
    try:
        text = run_suite(args.preset, args.schemes.split(","),
                         tuple(int(b) for b in args.batches.split(",")), args.repeat, args.target, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
