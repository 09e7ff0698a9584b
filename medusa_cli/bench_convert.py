"""Conversion benchmark: throughput against `cp` and peak RSS, at a published shape.

    python -m medusa_cli.bench_convert --preset vicuna-7b --dtype float16 [--workdir DIR]

Writes a seeded example checkpoint, then in one run, alternating for a few rounds: copies its
files with `cp`, and converts it in a child process (the whole `medusa convert` cost, Python
start-up included) that reports its own peak RSS; each timed until its output is synced to
disk. Prints a Markdown table of the medians. Memory budget from the convert issue: 3x the largest tensor + 400 MB.

Also measured in the same run: the hashing floor. A conversion hashes every byte it writes with
md5 (the tensor-cache schema's per-shard md5sum) and every source byte with sha256 (the
provenance `medusa verify` checks); cp hashes nothing. Convert runs the two on threads of their
own, so the floor is the longer of: md5 of the converted shards, all at once, as convert hashes
them (md5_lanes: one core; hashlib on a thread per core where the kernel is unavailable), and
sha256 of the source files on one core (their sum on a single core). No conversion that keeps
both hashes can be faster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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


def hash_floor(sources: list[Path], shards: list[Path]) -> dict:
    """Seconds of convert's md5 of `shards` and of sha256 of `sources` (one core), all from the
    page cache, and the floor they set (see the module docstring)."""
    from .convert import sha256_file
    from .md5_lanes import load_kernel, md5_files

    method = "lanes" if load_kernel() is not None else "hashlib threads"
    start = time.perf_counter()
    md5_files(shards)
    md5_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for path in sources:
        sha256_file(path)
    sha256_seconds = time.perf_counter() - start
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    floor = max(md5_seconds, sha256_seconds) if cores > 1 else md5_seconds + sha256_seconds
    return {"md5_seconds": md5_seconds, "md5_method": method, "sha256_seconds": sha256_seconds,
            "cores": cores, "floor_seconds": floor}


def _convert_child(ckpt: Path, params: Path, quantization: str | None) -> dict:
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ckpt), str(params), quantization or ""],
        check=True, capture_output=True, text=True,
    )
    return json.loads(child.stdout.strip().splitlines()[-1])


def _read_into_cache(paths: list[Path]) -> None:
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)


def _drop_copy(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def run_benchmark(preset: str, dtype: str, layout: str, workdir: Path, quantization: str | None,
                  file_format: str, rounds: int = 3) -> dict:
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
    _read_into_cache(weights)
    copy_dir, params = workdir / "copy", workdir / "params"
    # One untimed conversion: it builds md5_lanes' kernel into the cache where a first run
    # would (once per machine), and gives the shards for the hashing floor.
    _convert_child(ckpt, params, quantization)
    shards = sorted(params.glob("params_shard_*.bin"))
    # convert writes its copies past the page cache: read the shards in first, as convert
    # hashes from memory (the source's pages, for tensors it copies)
    _read_into_cache(shards)
    hashing = hash_floor(weights, shards)
    _drop_copy(params)

    # cp and convert alternate, each timed until its output is on disk (sync), and each round
    # starts from a synced disk with the previous outputs removed: this VM's write speed swings
    # 3x from one write to the next, so single timings side by side mislead.
    cp_times, convert_times, walls, peaks = [], [], [], []
    for _ in range(rounds):
        copy_dir.mkdir(exist_ok=True)
        subprocess.run(["sync"], check=True)
        t = time.perf_counter()
        subprocess.run(["cp", *map(str, weights), str(copy_dir)], check=True)
        subprocess.run(["sync"], check=True)
        cp_times.append(time.perf_counter() - t)
        _drop_copy(copy_dir)

        subprocess.run(["sync"], check=True)
        t = time.perf_counter()
        stats = _convert_child(ckpt, params, quantization)
        subprocess.run(["sync"], check=True)
        walls.append(time.perf_counter() - t)
        convert_times.append(stats["seconds"])
        peaks.append(stats["peak_rss_bytes"])
        _drop_copy(params)
    cp_seconds, wall = statistics.median(cp_times), statistics.median(walls)
    budget = 3 * largest + 400 * 1024 * 1024
    return {
        "preset": preset,
        "dtype": dtype,
        "layout": layout,
        "format": file_format,
        "quantization": quantization or f"q0 ({dtype})",
        "source_bytes": source_bytes,
        "rounds": rounds,
        "cp_seconds": cp_seconds,
        "cp_seconds_all": cp_times,
        "convert_seconds": wall,
        "convert_seconds_all": walls,
        "convert_in_process_seconds": statistics.median(convert_times),
        "speed_vs_cp": cp_seconds / wall,
        "hashing": hashing,
        "hash_floor_speed_vs_cp": cp_seconds / hashing["floor_seconds"],
        "peak_rss_bytes": max(peaks),
        "largest_tensor_bytes": largest,
        "rss_budget_bytes": budget,
        "rss_within_budget": max(peaks) <= budget,
    }


def markdown(rows: list[dict]) -> str:
    mb = 1024 * 1024
    lines = [
        "| checkpoint | output | size | cp + sync (median) | convert + sync (median) | speed vs cp "
        "| hashing floor: md5 of shards, sha256 of source | floor's speed vs cp | peak RSS "
        "| RSS budget |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} {r['dtype']} {r['layout']} ({r['format']}) | {r['quantization']} "
            f"| {r['source_bytes'] / mb:.0f} MiB | {r['cp_seconds']:.2f} s | {r['convert_seconds']:.2f} s "
            f"| {r['speed_vs_cp']:.2f}x "
            f"| {r['hashing']['floor_seconds']:.2f} s (md5 {r['hashing']['md5_seconds']:.2f} s "
            f"by {r['hashing']['md5_method']}, sha256 {r['hashing']['sha256_seconds']:.2f} s; "
            f"{r['hashing']['cores']} cores) "
            f"| {r['hash_floor_speed_vs_cp']:.2f}x | {r['peak_rss_bytes'] / mb:.0f} MiB "
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
