"""Conversion benchmark: throughput against `cp` and peak RSS, at a published shape.

    python -m medusa_cli.bench_convert --preset vicuna-7b --dtype float16 [--workdir DIR]

Writes a seeded example checkpoint, then in one run and side by side: copies its files with
`cp`, converts it in a child process that reports its own peak RSS, and prints a Markdown
table. Memory budget from the convert issue: 3x the largest tensor + 400 MB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, sys, time
from pathlib import Path
from medusa_cli.convert import ConvertRequest, convert_checkpoint
src, out, quantization = sys.argv[1], sys.argv[2], sys.argv[3] or None
t = time.perf_counter()
result = convert_checkpoint(ConvertRequest(Path(src), Path(out), quantization=quantization, force=True))
seconds = time.perf_counter() - t
# VmHWM belongs to this process image; ru_maxrss would carry the parent's size over fork+exec.
peak_kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak_kib * 1024, "param_bytes": result.param_bytes}))
"""


def _drop_copy(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def run_benchmark(preset: str, dtype: str, layout: str, workdir: Path, quantization: str | None,
                  file_format: str) -> dict:
    from .example import ExampleRequest, write_example

    ckpt = workdir / "ckpt"
    example = write_example(ExampleRequest(output=ckpt, layout=layout, preset=preset, dtype=dtype,
                                           file_format=file_format, force=True))
    weights = [p for p in example.files if p.name != "config.json"]
    source_bytes = sum(p.stat().st_size for p in weights)
    c = example.config
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    largest = c.vocab_size * c.hidden_size * itemsize

    # Warm the page cache once so neither side pays the first read.
    subprocess.run(["cat", *map(str, weights)], stdout=subprocess.DEVNULL, check=True)

    copy_dir = workdir / "copy"
    copy_dir.mkdir(exist_ok=True)
    t = time.perf_counter()
    subprocess.run(["cp", *map(str, weights), str(copy_dir)], check=True)
    subprocess.run(["sync"], check=True)
    cp_seconds = time.perf_counter() - t
    _drop_copy(copy_dir)

    t = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ckpt), str(workdir / "params"), quantization or ""],
        check=True, capture_output=True, text=True,
    )
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - t
    stats = json.loads(child.stdout.strip().splitlines()[-1])
    budget = 3 * largest + 400 * 1024 * 1024
    return {
        "preset": preset,
        "dtype": dtype,
        "layout": layout,
        "format": file_format,
        "quantization": quantization or f"q0 ({dtype})",
        "source_bytes": source_bytes,
        "cp_seconds": cp_seconds,
        "convert_seconds": stats["seconds"],
        "convert_wall_seconds": wall,
        "speed_vs_cp": cp_seconds / stats["seconds"],
        "peak_rss_bytes": stats["peak_rss_bytes"],
        "largest_tensor_bytes": largest,
        "rss_budget_bytes": budget,
        "rss_within_budget": stats["peak_rss_bytes"] <= budget,
    }


def markdown(rows: list[dict]) -> str:
    mb = 1024 * 1024
    lines = [
        "| checkpoint | output | size | cp | convert | speed vs cp | peak RSS | RSS budget |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} {r['dtype']} {r['layout']} ({r['format']}) | {r['quantization']} "
            f"| {r['source_bytes'] / mb:.0f} MiB | {r['cp_seconds']:.2f} s | {r['convert_seconds']:.2f} s "
            f"| {r['speed_vs_cp']:.2f}x | {r['peak_rss_bytes'] / mb:.0f} MiB "
            f"| {r['rss_budget_bytes'] / mb:.0f} MiB ({'ok' if r['rss_within_budget'] else 'OVER'}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vicuna-7b")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--layout", default="medusa1")
    parser.add_argument("--format", dest="file_format", default="safetensors")
    parser.add_argument("--quantization", action="append", default=None,
                        help="Also convert with this scheme (repeatable); plain conversion always runs.")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="medusa-bench-convert-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        rows = [run_benchmark(args.preset, args.dtype, args.layout, workdir, q, args.file_format)
                for q in [None, *(args.quantization or [])]]
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(rows, indent=2) if args.json else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
