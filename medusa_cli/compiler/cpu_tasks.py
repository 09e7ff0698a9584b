"""Parallel loops of CPU kernels shared out at run time instead of split evenly up front.

TVM lowers `for i in T.parallel(n)` to a launch on its thread pool in which thread t of T runs
the fixed range [t * n / T, (t + 1) * n / T). When one thread runs slower (another process on
its core, or a neighbour on a shared VM's host), the call waits for its whole half of the work
while the other thread idles. `share_out_parallel_loops` rewrites every such loop of constant
extent, at the end of the TIR pipeline, into:

    claimed[TASKS] = 0                        # a task: a contiguous run of the loop's range
    for worker in T.parallel(runtime.NumThreads()):
        own tasks [first, first + own), in order, then all tasks from the last one down:
            if not claimed[task]:
                claimed[task] = 1
                the original body for every i of the task

Each worker runs its own run of tasks first (the same rows as before, in the same order), then
steals what is still unclaimed, from the far end of the other workers' runs. A task is claimed
by a plain store: where two workers race for one task, both compute it, and since a task's
body writes the same values whoever runs it (the loop was parallel), the result does not
change. runtime.NumThreads is the pool's size, which is how many tasks TVM's launch starts.

Measured on the 2-core VM, interleaved, in one of its slow phases: one q4f16_1 32000x4096
projection 3.9 -> 3.3 ms at batch 1 and 16.4 -> 14.2 ms at batch 8; equal on one thread.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

# Tasks per parallel loop (fewer where the loop is shorter): enough for a thread to take over
# a sixty-fourth of the work from a slow one, few enough that the flags stay on the stack.
TASKS = 64


def _shared_out(loop: tirx.For) -> tirx.Stmt:
    """The statement that runs `loop` (parallel, constant extent, from 0) as TASKS claimable
    tasks over one worker per pool thread."""
    extent = int(loop.extent)
    tasks = min(TASKS, extent)
    i32 = "int32"
    claimed = tirx.decl_buffer((tasks,), i32, name="claimed")
    workers = tirx.Var("workers", i32)
    worker = tirx.Var("worker", i32)
    first = tirx.Var("first", i32)
    own = tirx.Var("own", i32)
    step = tirx.Var("step", i32)
    task = tirx.Var("task", i32)
    dtype = str(loop.loop_var.ty)
    index = tirx.Var(loop.loop_var.name, dtype)

    def const(value: int):
        return tirx.const(value, i32)

    def bound(of_task):
        """The first index of task `of_task`, in the loop variable's type (no int32 overflow
        for an int64 loop)."""
        wide = of_task if dtype == i32 else tirx.Cast(dtype, of_task)
        return wide * tirx.const(extent, dtype) // tirx.const(tasks, dtype)

    t = tirx.Var("t", i32)
    zero = tirx.For(t, const(0), const(tasks), tirx.ForKind.SERIAL,
                    tirx.BufferStore(claimed, const(0), [t]))

    body = tvm_ffi.structural_map(
        loop.body, (tvm.ir.expr.Var, lambda v: index if v.same_as(loop.loop_var) else v))
    begin, end = bound(task), bound(task + const(1))
    run_task = tirx.For(index, begin, end - begin, tirx.ForKind.SERIAL, body)
    claim = tirx.IfThenElse(
        tirx.EQ(tirx.BufferLoad(claimed, [task]), const(0)),
        tirx.SeqStmt([tirx.BufferStore(claimed, const(1), [task]), run_task]),
        None,
    )
    steps = tirx.For(step, const(0), own + const(tasks), tirx.ForKind.SERIAL, tirx.SeqStmt([
        tirx.Bind(task, tirx.Select(step < own, first + step, const(tasks - 1) - (step - own))),
        claim,
    ]))
    per_worker = tirx.SeqStmt([
        tirx.Bind(first, worker * const(tasks) // workers),
        tirx.Bind(own, (worker + const(1)) * const(tasks) // workers - first),
        steps,
    ])
    # a Bind or an AllocBuffer holds for the statements after it in the same sequence
    return tirx.SeqStmt([
        tirx.AllocBuffer(claimed),
        zero,
        tirx.Bind(workers, tirx.call_packed("runtime.NumThreads")),
        tirx.For(worker, const(0), workers, tirx.ForKind.PARALLEL, per_worker),
    ])


def _shareable(stmt) -> bool:
    return (isinstance(stmt, tirx.For) and stmt.kind == tirx.ForKind.PARALLEL
            and isinstance(stmt.extent, tirx.IntImm) and isinstance(stmt.min, tirx.IntImm)
            and int(stmt.min) == 0 and int(stmt.extent) > 1)


def share_out_func(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """`func` with each outermost parallel loop of constant extent shared out at run time."""

    def rewrite(loop):
        return _shared_out(loop) if _shareable(loop) else loop

    # after the children: TVM allows no parallel loop inside another, so a rewritten loop's body
    # has none left to rewrite
    return func.with_body(tvm_ffi.structural_map(func.body, (tirx.For, rewrite)))


@tirx.transform.prim_func_pass(opt_level=0, name="medusa.ShareOutParallelLoops")
def share_out_parallel_loops(func, mod, ctx):
    return share_out_func(func)


def cpu_pipeline():
    """TVM's default ("s_tir") TIR pipeline followed by share_out_parallel_loops, for
    tvm.relax.build(..., tir_pipeline=...) through the name registered below."""
    from tvm.tirx import compilation_pipeline

    pipeline, finalize_host, finalize_device = compilation_pipeline.get_tir_pipeline("s_tir")
    return (tvm.transform.Sequential([pipeline, share_out_parallel_loops], name="medusa_cpu_tir"),
            finalize_host, finalize_device)


PIPELINE_NAME = "medusa_cpu"


def register_pipeline() -> str:
    """Register cpu_pipeline under PIPELINE_NAME (idempotent) and return the name."""
    from tvm.tirx import compilation_pipeline

    compilation_pipeline.register_tir_pipeline(PIPELINE_NAME, cpu_pipeline)
    return PIPELINE_NAME
