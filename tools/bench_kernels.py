"""Time the scheduled CPU GEMV kernels of one head (ResBlock + vocab projection) per scheme,
against numpy float32 and a streaming read of the same bytes, all in one run.

    python tools/bench_kernels.py [--schemes q0f32,q0f16,q4f16_1,q4f32_1] [--batch 1,8]
                                  [--hidden 4096] [--vocab 32000] [--unscheduled]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medusa_cli.compiler.cpu_schedule import (  # noqa: E402
    PLAIN_LANES,
    head_prim_funcs,
    schedule_gemv_func,
)
from medusa_cli.runtime.heads import configure_cpu_threads  # noqa: E402




@dataclasses.dataclass
class KernelBenchRow:
    scheme: str
    batch: int
    # bytes of weights, scales and biases one head reads
    weight_bytes: int
    # median seconds per call, all measured in one run, round-robin
    scheduled_s: float
    numpy_s: float
    floor_s: float
    # None when not measured (--unscheduled not given)
    unscheduled_s: float | None = None

    @property
    def gbytes_per_s(self) -> float:
        return self.weight_bytes / self.scheduled_s / 1e9

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "gbytes_per_s": self.gbytes_per_s,
                "vs_floor": self.scheduled_s / self.floor_s,
                "vs_numpy": self.scheduled_s / self.numpy_s}


@dataclasses.dataclass
class KernelBenchReport:
    rows: list[KernelBenchRow]
    # read bandwidth that defines the floor: the best of a parallel TVM streaming sum and
    # numpy's a.sum() over the same buffer
    read_gbytes_per_s: float
    threads: int
    target: str
    # schedule + build seconds for one head's kernels, per scheme
    compile_s: dict[str, float]


# Idle time before each timed block: numpy's OpenBLAS workers, like TVM's, spin for a while
# after a call and would take a core from the next one. Back to back, each pool halved the other.
_POOL_SETTLE_S = 0.25
# Calls per timed block; the first one after a switch is not counted.
_BLOCK_CALLS = 3


def _median_times(calls: dict[str, Callable[[], object]], rounds: int,
                  block: int = _BLOCK_CALLS) -> dict[str, float]:
    """Median seconds per call. Every round runs each call in a block of `block` calls, after a
    pause that lets the other thread pool go idle, so a drifting machine load hits all alike."""
    for call in calls.values():
        call()  # warm-up: page in weights, first-call setup
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            time.sleep(_POOL_SETTLE_S)
            for n in range(block):
                start = time.perf_counter()
                call()
                if n or block == 1:
                    samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def _streaming_sum(nbytes: int, target: tvm.target.Target):
    """A compiled parallel float32 sum over [chunks, n], reading the buffer once: per chunk,
    four vectors of independent partial sums, so that memory, not the add latency, limits it."""
    lanes, chunks = 4 * PLAIN_LANES, 64
    per_chunk = nbytes // 4 // chunks // lanes
    data = te.placeholder((chunks, per_chunk * lanes), "float32", name="data")
    m = te.reduce_axis((0, per_chunk), name="m")
    total = te.compute((chunks, lanes), lambda c, l: te.sum(data[c, m * lanes + l], axis=m),
                       name="total")
    sch = Schedule(te.create_prim_func([data, total]))
    block = sch.get_sblock("total")
    c, lane, m = sch.get_loops(block)
    sch.reorder(c, m, lane)
    sch.parallel(c)
    sch.vectorize(lane)
    sch.decompose_reduction(block, m)
    return tvm.compile(sch.mod, target)["main"], (chunks, per_chunk * lanes)


def _random_args(func: tirx.PrimFunc, batch: int, rng: np.random.Generator) -> list:
    args = []
    for param in func.params:
        shape = [int(d) if isinstance(d, tirx.IntImm) else batch for d in param.shape]
        dtype = str(param.dtype)
        if dtype.startswith("uint"):
            value = rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype, endpoint=True)
        else:
            value = (rng.standard_normal(shape) * 0.02).astype(np.float32).astype(dtype)
        args.append(tvm.runtime.tensor(value))
    return args


def _build(func: tirx.PrimFunc, target: tvm.target.Target):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target)["main"]


def bench_kernels(schemes: Sequence[str] = ("q0f32", "q0f16", "q4f16_1", "q4f32_1"),
                batches: Sequence[int] = (1, 8), hidden: int = 4096, vocab: int = 32000,
                rounds: int = 7, target: tvm.target.Target | None = None,
                unscheduled: bool = False, threads: int | None = None,
                floor_bytes: int = 1 << 30) -> KernelBenchReport:
    """Time one head's kernels per scheme and batch against numpy float32 and the read floor.

    The head is the ResBlock kernel then the vocab projection, called back to back on the same
    input as `get_logits` does; numpy computes the same head in float32 (x @ W.T with BLAS).
    """
    target = target or tvm.target.Target.from_device("cpu")
    threads = configure_cpu_threads(threads)
    rng = np.random.default_rng(0)

    read_sum, read_shape = _streaming_sum(floor_bytes, target)
    stream = rng.standard_normal(read_shape, dtype=np.float32)
    stream_tvm = tvm.runtime.tensor(stream)
    stream_out = tvm.runtime.tensor(np.zeros((read_shape[0], 4 * PLAIN_LANES), np.float32))

    w1 = (rng.standard_normal((hidden, hidden)) * 0.02).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.02).astype(np.float32)
    w2 = (rng.standard_normal((vocab, hidden)) * 0.02).astype(np.float32)

    def numpy_head(x: np.ndarray) -> np.ndarray:
        h = x @ w1.T + b1
        return (x + h / (1 + np.exp(-h))) @ w2.T

    rows, compile_s, bandwidths = [], {}, []
    for scheme in schemes:
        resblock, projection = head_prim_funcs(scheme, hidden, vocab)
        start = time.perf_counter()
        kernels = [_build(schedule_gemv_func(f), target) for f in (resblock, projection)]
        compile_s[scheme] = time.perf_counter() - start
        plain = [_build(f, target) for f in (resblock, projection)] if unscheduled else None
        for batch in batches:
            res_args = _random_args(resblock, batch, rng)
            proj_args = _random_args(projection, batch, rng)
            proj_args[0] = res_args[-1]  # the projection reads the ResBlock's output
            weight_bytes = sum(a.numpy().nbytes for a in res_args[1:-1] + proj_args[1:-1])
            x = rng.standard_normal((batch, hidden)).astype(np.float32)

            def head(fns=kernels):
                fns[0](*res_args)
                fns[1](*proj_args)

            calls = {"scheduled": head, "numpy": lambda: numpy_head(x),
                     "read": lambda: read_sum(stream_tvm, stream_out), "numpy_read": stream.sum}
            times = _median_times(calls, rounds)
            if plain is not None:
                times["unscheduled"] = _median_times({"u": lambda: head(plain)}, 1)["u"]
            bandwidths.append(stream.nbytes / min(times["read"], times["numpy_read"]))
            rows.append(KernelBenchRow(scheme, batch, weight_bytes, times["scheduled"],
                                       times["numpy"], weight_bytes / bandwidths[-1],
                                       times.get("unscheduled")))
    return KernelBenchReport(rows, statistics.median(bandwidths) / 1e9, threads, str(target),
                             compile_s)


def format_markdown(report: KernelBenchReport) -> str:
    """The report as a Markdown table (times in ms, ratios to the floor and to numpy)."""
    lines = [
        f"Read bandwidth {report.read_gbytes_per_s:.1f} GB/s, {report.threads} threads, "
        f"target `{report.target}`.",
        "",
        "| scheme | batch | weight MB | scheduled ms | unscheduled ms | numpy f32 ms | floor ms "
        "| GB/s | vs floor | vs numpy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report.rows:
        unscheduled = f"{row.unscheduled_s * 1e3:.1f}" if row.unscheduled_s is not None else "-"
        lines.append(
            f"| {row.scheme} | {row.batch} | {row.weight_bytes / 1e6:.0f} | "
            f"{row.scheduled_s * 1e3:.2f} | {unscheduled} | {row.numpy_s * 1e3:.2f} | "
            f"{row.floor_s * 1e3:.2f} | {row.gbytes_per_s:.1f} | "
            f"{row.scheduled_s / row.floor_s:.2f}x | {row.scheduled_s / row.numpy_s:.2f}x |")
    lines.append("")
    lines.append("Schedule + build of one head's two kernels: " + ", ".join(
        f"{name} {seconds:.2f} s" for name, seconds in report.compile_s.items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/bench_kernels.py",
                                     description="Benchmark the scheduled CPU GEMV kernels.")
    parser.add_argument("--schemes", default="q0f32,q0f16,q4f16_1,q4f32_1")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--unscheduled", action="store_true",
                        help="also time the kernels without a schedule (slow)")
    args = parser.parse_args(argv)
    report = bench_kernels(args.schemes.split(","), [int(b) for b in args.batch.split(",")],
                         args.hidden, args.vocab, args.rounds, unscheduled=args.unscheduled,
                         threads=args.threads)
    print(format_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
