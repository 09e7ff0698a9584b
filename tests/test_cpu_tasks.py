"""cpu_tasks.py: parallel loops shared out at run time. Results equal the plain loop's for any
thread count, and a worker slowed down has its tasks taken over by the others."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm.script import tirx as T

from medusa_cli.compiler import cpu_tasks
from medusa_cli.runtime.heads import configure_cpu_threads

HOST = tvm.target.Target.from_device("cpu")
CORES = len(os.sched_getaffinity(0))


def _affine(n: int, dtype: str):
    @T.prim_func
    def affine(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32")):
        for i in T.parallel(T.Cast(dtype, n)):
            b[i] = a[i] * T.float32(2) + T.float32(1)

    return affine


def _build(func):
    return tvm.tirx.build(tvm.IRModule({"main": func}), target=HOST,
                          pipeline=cpu_tasks.register_pipeline())["main"]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n, dtype", [(1000, "int32"), (5, "int32"), (1, "int32"), (777, "int64")])
def test_results_equal_the_plain_loop(threads, n, dtype):
    try:
        configure_cpu_threads(threads)
        a = np.random.default_rng(n).standard_normal(n).astype(np.float32)
        b = tvm.runtime.tensor(np.full(n, np.nan, np.float32))
        _build(_affine(n, dtype))(tvm.runtime.tensor(a), b)
        np.testing.assert_array_equal(b.numpy(), a * np.float32(2) + np.float32(1))
    finally:
        configure_cpu_threads()


def test_rewrite_shape():
    """A constant-extent parallel loop becomes one parallel loop over the pool's workers, with
    TASKS claimable runs of the original range; a one-iteration loop is left alone."""
    shared = cpu_tasks.share_out_func(_affine(1000, "int32")).script()
    assert 'T.call_packed("runtime.NumThreads")' in shared
    assert "T.parallel(workers)" in shared and "T.parallel(1000)" not in shared
    assert f"claimed = T.alloc_buffer(({cpu_tasks.TASKS},)" in shared
    untouched = cpu_tasks.share_out_func(_affine(1, "int32")).script()
    assert "NumThreads" not in untouched


@pytest.mark.skipif(CORES < 2, reason="needs two cores")
def test_a_slow_worker_has_its_tasks_taken_over():
    """Task 0 (worker 0's first) sleeps: worker 1 finishes its own run of tasks and then takes
    worker 0's from the last down, so each index still runs once and worker 0 runs few."""
    runs: list[tuple[int, int]] = []
    lock = threading.Lock()

    def record(i: int) -> int:
        if i == 0:
            time.sleep(1.0)  # long enough for worker 1 to do all the rest, even on a busy machine
        with lock:
            runs.append((i, threading.get_ident()))
        return 0

    tvm_ffi.register_global_func("medusa_test.record", record, override=True)
    n = 2 * cpu_tasks.TASKS

    @T.prim_func
    def calls(out: T.Buffer((n,), "int32")):
        for i in T.parallel(n):
            out[i] = T.call_packed("medusa_test.record", i)

    try:
        configure_cpu_threads(2)
        _build(calls)(tvm.runtime.tensor(np.ones(n, np.int32)))
    finally:
        configure_cpu_threads()
    indices = sorted(i for i, _ in runs)
    assert indices == list(range(n))  # every index once: no task lost, none run twice
    slow = next(thread for i, thread in runs if i == 0)
    by_slow = [i for i, thread in runs if thread == slow]
    # worker 0 owns tasks 0-31 (indices 0-63); it ran task 0 (indices 0 and 1) and at most the
    # task it was on when worker 1 came round
    assert len(by_slow) <= 4, by_slow
