"""`medusa bench`: time compiled heads against the memory-bandwidth floor and numpy, in one run.

The heads are memory-bound at small batch: each call reads every weight once. So the floor is
weight bytes / the device's memory bandwidth, measured in the same run (reading a buffer on a
CPU, a device-to-device copy on a GPU); numpy computes the same heads in float32 (BLAS) on the
host as the practical baseline. The library is timed on inputs already on the device up to the
device's completion, without copying the logits back. Each repeat times the library and numpy one
after the other (a block of calls each, after a short pause so neither pays for the other's
spinning threads), so both see the same machine noise; medians and spreads are reported.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..packed.tensor_cache import load_array, read_tensor_cache
from ..quantization import dequantize_weight, get_scheme, quantized_names
from ..runtime.heads import load_heads
from ..spec import head_specs

_BANDWIDTH_BYTES = 1 << 30


@dataclasses.dataclass
class BenchRequest:
    library: Path
    params_dir: Path
    batches: tuple[int, ...] = (1, 8)
    device: str = "cpu"
    repeat: int = 20
    warmup: int = 3
    # compare with numpy computing the same heads in float32
    numpy_baseline: bool = True
    seed: int = 0


@dataclasses.dataclass
class Timing:
    median_s: float
    p10_s: float
    p90_s: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Timing":
        ordered = sorted(samples)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
        return cls(statistics.median(ordered), pick(0.1), pick(0.9))


@dataclasses.dataclass
class BenchRow:
    batch: int
    library: Timing
    numpy: Timing | None
    weight_bytes: int
    floor_s: float

    @property
    def gbps(self) -> float:
        return self.weight_bytes / self.library.median_s / 1e9

    @property
    def vs_floor(self) -> float:
        return self.library.median_s / self.floor_s

    @property
    def vs_numpy(self) -> float | None:
        return None if self.numpy is None else self.library.median_s / self.numpy.median_s

    def to_dict(self) -> dict:
        return {
            "batch": self.batch,
            "median_ms": self.library.median_s * 1e3,
            "p10_ms": self.library.p10_s * 1e3,
            "p90_ms": self.library.p90_s * 1e3,
            "numpy_median_ms": None if self.numpy is None else self.numpy.median_s * 1e3,
            "weight_bytes": self.weight_bytes,
            "effective_gbps": self.gbps,
            "floor_ms": self.floor_s * 1e3,
            "time_vs_floor": self.vs_floor,
            "time_vs_numpy": self.vs_numpy,
        }


@dataclasses.dataclass
class BenchReport:
    library: Path
    quantization: str
    target: str
    device: str
    num_threads: int | None
    bandwidth_gbps: float
    # how bandwidth_gbps was measured: CPU read bandwidth, or a device copy
    bandwidth_method: str
    rows: list[BenchRow]
    machine: str
    # get_logits vs get_tree_candidates per batch, for a library compiled with a tree
    tree: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "tree": [t.to_dict() for t in self.tree],
            "library": str(self.library),
            "quantization": self.quantization,
            "target": self.target,
            "device": self.device,
            "num_threads": self.num_threads,
            "bandwidth_gbps": self.bandwidth_gbps,
            "bandwidth_method": self.bandwidth_method,
            "machine": self.machine,
            "rows": [r.to_dict() for r in self.rows],
        }


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, {platform.system()} {platform.machine()}"


def measure_read_bandwidth(nbytes: int = _BANDWIDTH_BYTES, repeat: int = 5) -> float:
    """Memory read bandwidth in GB/s: the best of several reductions over one buffer, each on
    one thread per core (numpy releases the GIL in them). A float32 sum alone is no floor: its
    pairwise summation is compute-bound on some CPUs (13.9 GB/s on one core of the 2-core AMD
    EPYC VM, where max and a self dot product read 29 GB/s on two), so the heads beat it."""
    data = np.ones(nbytes // 4, dtype=np.float32)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    parts = np.array_split(data, cores)

    def on_every_core(reduce: Callable[[np.ndarray], object]) -> Callable[[], None]:
        def run() -> None:
            threads = [threading.Thread(target=reduce, args=(part,)) for part in parts]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return run

    probes = [on_every_core(np.sum), on_every_core(np.max), on_every_core(lambda p: np.dot(p, p))]
    best = float("inf")
    for _ in range(repeat):
        for run in probes:
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def measure_device_bandwidth(device, nbytes: int = _BANDWIDTH_BYTES, repeat: int = 5) -> float:
    """A device's memory bandwidth in GB/s: the best device-to-device copy of nbytes, which
    reads each byte once and writes it once (as CUDA's bandwidthTest counts it)."""
    import tvm

    source = tvm.runtime.empty((nbytes // 4,), "float32", device)
    target = tvm.runtime.empty((nbytes // 4,), "float32", device)
    best = float("inf")
    for _ in range(repeat):
        device.sync()
        start = time.perf_counter()
        source.copyto(target)
        device.sync()
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best / 1e9


def float32_heads(params_dir: Path, config, quantization: str) -> list[tuple[list, np.ndarray]]:
    """Every head's weights in float32 (dequantized where quantized): [(layers, lm_head)]."""
    scheme = get_scheme(quantization)
    records = read_tensor_cache(params_dir).by_name()

    def read(name: str, in_features: int) -> np.ndarray:
        if name.endswith(".weight") and scheme.is_quantized:
            q_weight, q_scale = (load_array(params_dir, records[n]) for n in quantized_names(name))
            return dequantize_weight(q_weight, q_scale, scheme, in_features)
        return np.asarray(load_array(params_dir, records[name]), dtype=np.float32)

    return [([(read(linear.weight, linear.in_features), read(linear.bias, linear.in_features))
              for linear in head.resblocks],
             read(head.lm_head.weight, head.lm_head.in_features))
            for head in head_specs(config)]


def numpy_logits(heads, hidden: np.ndarray) -> list[np.ndarray]:
    out = []
    for layers, lm_head in heads:
        x = hidden
        for w, b in layers:
            y = x @ w.T + b
            x = x + y / (1.0 + np.exp(-y))
        out.append(x @ lm_head.T)
    return out


# numpy's OpenBLAS threads and TVM's pool threads keep spinning for a while after a call and
# slow whichever runs next: each timed block starts after this pause.
_SETTLE_S = 0.2
# calls per timed block; a sample is the block's time / this
_CALLS_PER_SAMPLE = 3


def _time_block(run: Callable[[], object]) -> float:
    time.sleep(_SETTLE_S)
    start = time.perf_counter()
    for _ in range(_CALLS_PER_SAMPLE):
        run()
    return (time.perf_counter() - start) / _CALLS_PER_SAMPLE


def _time_pair(first: Callable[[], object], second: Callable[[], object] | None, repeat: int,
               warmup: int) -> tuple[list[float], list[float]]:
    """Per-call seconds of `first` and `second`, sampled alternately `repeat` times each."""
    for _ in range(warmup):
        first()
        if second is not None:
            second()
    a, b = [], []
    for _ in range(repeat):
        a.append(_time_block(first))
        if second is not None:
            b.append(_time_block(second))
    return a, b


def bench_heads(request: BenchRequest) -> BenchReport:
    if request.repeat < 1 or request.warmup < 0:
        raise InputError("--repeat must be at least 1 and --warmup at least 0")
    heads = load_heads(request.library, request.params_dir, device=request.device)
    if max(request.batches) > heads.max_batch_size or min(request.batches) < 1:
        raise InputError(
            f"--batch {','.join(map(str, request.batches))}: {request.library} runs batches 1.."
            f"{heads.max_batch_size}; recompile with --max-batch-size"
        )
    weight_bytes = sum(t.nbytes for t in read_tensor_cache(request.params_dir).tensors)
    on_cpu = heads.num_threads is not None  # CompiledHeads sizes a thread pool on a CPU only
    bandwidth = measure_read_bandwidth() if on_cpu else measure_device_bandwidth(heads.device)
    reference = float32_heads(request.params_dir, heads.config, heads.quantization) \
        if request.numpy_baseline else None
    rng = np.random.default_rng(request.seed)
    rows = []
    for batch in request.batches:
        hidden = rng.standard_normal((batch, heads.config.hidden_size), dtype=np.float32)
        run_numpy = (lambda: numpy_logits(reference, hidden)) if reference is not None else None
        lib_samples, np_samples = _time_pair(heads.logits_call(hidden), run_numpy,
                                             request.repeat, request.warmup)
        rows.append(BenchRow(
            batch=batch,
            library=Timing.of(lib_samples),
            numpy=Timing.of(np_samples) if np_samples else None,
            weight_bytes=weight_bytes,
            floor_s=weight_bytes / (bandwidth * 1e9),
        ))
    tree = [heads.time_tree_candidates(batch, repeat=max(3, request.repeat // 2))
            for batch in request.batches] if heads.has_tree else []
    return BenchReport(
        tree=tree,
        library=Path(request.library),
        quantization=heads.quantization,
        target=heads.metadata.target_kind,
        device=request.device,
        num_threads=heads.num_threads,
        bandwidth_gbps=bandwidth,
        bandwidth_method="reading a buffer (numpy sum, max, dot)" if on_cpu else "device-to-device copy",
        rows=rows,
        machine=machine_description() if on_cpu
        else f"{heads.device.device_name} ({request.device}); host {machine_description()}",
    )
