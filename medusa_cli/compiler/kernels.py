"""The kernel report: for every device kernel of a library, how it is launched and what it reads.

Computed at compile time from the scheduled module (before memory planning, where the Relax
functions still call their kernels with `call_tir`) and, for CUDA, from ptxas:

  name               the __global__ function in the device source: TVM names the kernels of a
                     PrimFunc f "f_kernel", "f_kernel_1", ... in the order of their launches
  schedule           who scheduled it: "medusa GEMV: ...", "medusa top-k: ...", "dlight <Rule>"
  threads_per_block  the product of its threadIdx extents
  blocks             batch size (as a string: "1", the max batch) -> blocks launched, with the
                     kernel's extents evaluated at the shapes of its call
  registers          per thread, from ptxas (the most over the arches built); null elsewhere
  spill_bytes        bytes of spill stores and loads ptxas reports (0 for no spilling)
  weight_bytes       bytes of the library's parameters one launch reads: its arguments that are
                     parameters (the heads' weights, scales and biases)
"""

from __future__ import annotations

import dataclasses
import math

import tvm

import tvm_ffi
from tvm import relax, tirx
from tvm.sym.analyzer import Analyzer

from ..dtypes import numpy_dtype

# The function attribute naming who scheduled a kernel (gpu_schedule, gpu_topk, pipeline).
SCHEDULE_ATTR = "medusa.schedule"
# The batch dimension's name in the Relax functions' shapes (model.get_default_spec).
BATCH_VAR = "batch_size"
_CALL_TIR = "relax.call_tir"


@dataclasses.dataclass(frozen=True)
class KernelUsage:
    """What ptxas reports for one kernel (the most over the arches compiled)."""

    registers: int
    spill_bytes: int


@dataclasses.dataclass(frozen=True)
class _Launch:
    """One launch nest of a PrimFunc: its grid and block extents (PrimExprs of its shape vars)."""

    blocks: tuple
    threads: tuple


@dataclasses.dataclass(frozen=True)
class _Call:
    """How a Relax function calls a PrimFunc: its shape vars in terms of batch_size, and the
    bytes of the parameters it is passed."""

    shape_vars: dict
    weight_bytes: int


def _launches(func: tirx.PrimFunc) -> list[_Launch]:
    """The launch nests of `func` in order: each outermost thread-bound loop starts one, and
    every thread-bound loop below it adds its extent (one per thread tag)."""
    launches: list[dict[str, object]] = []

    def visit(stmt, current: dict | None) -> None:
        if isinstance(stmt, tirx.For) and stmt.kind == tirx.ForKind.THREAD_BINDING:
            tag = stmt.thread_binding.thread_tag
            if current is None:
                current = {}
                launches.append(current)
            current.setdefault(tag, stmt.extent)
        for child in _children(stmt):
            visit(child, current)

    visit(func.body, None)
    return [_Launch(blocks=tuple(e for tag, e in sorted(launch.items()) if tag.startswith("blockIdx")),
                    threads=tuple(e for tag, e in sorted(launch.items()) if tag.startswith("threadIdx")))
            for launch in launches]


def _children(stmt) -> list:
    """The statements directly inside `stmt`."""
    if isinstance(stmt, tirx.SeqStmt):
        return list(stmt.seq)
    if isinstance(stmt, tirx.IfThenElse):
        return [s for s in (stmt.then_case, stmt.else_case) if s is not None]
    if isinstance(stmt, tvm.s_tir.SBlockRealize):
        return [stmt.block]
    if isinstance(stmt, tvm.s_tir.SBlock):
        return [s for s in (stmt.init, stmt.body) if s is not None]
    body = getattr(stmt, "body", None)
    return [body] if isinstance(body, tirx.Stmt) else []


def _relax_calls(mod: tvm.IRModule, functions: tuple[str, ...]) -> dict[str, _Call]:
    """PrimFunc name -> how the first call in `functions` calls it."""
    calls: dict[str, _Call] = {}
    call_tir = tvm.ir.Op.get(_CALL_TIR)
    present = {gv.name_hint: gv for gv in mod.get_global_vars()}
    for name in functions:
        if name not in present:
            continue
        func = mod[present[name]]
        params = func.params[-1]  # the packed parameters: a tuple, the function's last input
        bound: dict = {}
        for block in func.body.blocks:
            for binding in block.bindings:
                bound[binding.var] = binding.value
                value = binding.value
                if not (isinstance(value, relax.Call) and value.op.same_as(call_tir)):
                    continue
                target = value.args[0]
                prim = mod[target]
                if target.name_hint in calls or not isinstance(prim, tirx.PrimFunc):
                    continue
                arguments = list(value.args[1].fields)
                outputs = value.ty_args[0]
                outputs = list(outputs.fields) if isinstance(outputs, relax.TupleType) else [outputs]
                shapes = [_shape(a.ty) for a in arguments] + [_shape(o) for o in outputs]
                calls[target.name_hint] = _Call(
                    shape_vars=_bind_shape_vars(prim, shapes),
                    weight_bytes=sum(_tensor_bytes(a.ty) for a in arguments
                                     if _is_parameter(a, params, bound)))
    return calls


def _is_parameter(arg, params, bound: dict) -> bool:
    value = bound.get(arg, arg) if isinstance(arg, relax.Var) else arg
    return isinstance(value, relax.TupleGetItem) and value.tuple_value.same_as(params)


def _shape(tensor_type) -> list:
    """The dims of a Relax tensor type (PrimExprs); [] where it has no known shape."""
    shape = getattr(tensor_type, "shape", None)
    return list(shape.values) if isinstance(shape, relax.ShapeExpr) else []


def _tensor_bytes(tensor_type) -> int:
    return math.prod(int(d) for d in _shape(tensor_type)) * numpy_dtype(str(tensor_type.dtype)).itemsize


def _bind_shape_vars(prim: tirx.PrimFunc, shapes: list) -> dict:
    """The PrimFunc's shape vars -> the caller's dims (PrimExprs of batch_size)."""
    bindings = {}
    for param, shape in zip(prim.params, shapes):
        for dim, value in zip(getattr(param, "shape", None) or [], shape):
            if isinstance(dim, tirx.Var) and dim not in bindings:
                bindings[dim] = value
    return bindings


def _evaluate(expr, shape_vars: dict, batch: int) -> int:
    """`expr` (of the PrimFunc's shape vars) at the call's shapes with batch_size = batch."""
    def substitute(node):
        return tvm_ffi.structural_map(node, (tirx.Var, lambda v: shape_vars.get(v, v)))

    def at_batch(node):
        return tvm_ffi.structural_map(
            node, (tirx.Var, lambda v: tirx.const(batch, v.ty.dtype) if v.name == BATCH_VAR else v))

    value = Analyzer().simplify(at_batch(substitute(expr)))
    if not isinstance(value, tirx.IntImm):
        raise ValueError(f"launch extent {expr} is not a number at batch {batch}")
    return int(value)


def kernel_report(mod: tvm.IRModule, functions: tuple[str, ...], max_batch_size: int,
                  usage: dict[str, KernelUsage] | None) -> list[dict]:
    """The report (one dict per kernel, the fields above) for the scheduled module `mod`, whose
    Relax `functions` call the kernels; `usage` from ptxas, None where the target has none."""
    calls = _relax_calls(mod, functions)
    batches = sorted({1, max_batch_size})
    report = []
    for gvar, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or gvar.name_hint not in calls:
            continue
        call = calls[gvar.name_hint]
        schedule = str(func.attrs[SCHEDULE_ATTR]) if func.attrs and SCHEDULE_ATTR in func.attrs \
            else "as written"
        for index, launch in enumerate(_launches(func)):
            name = f"{gvar.name_hint}_kernel" + (f"_{index}" if index else "")
            used = (usage or {}).get(name)
            report.append({
                "name": name,
                "schedule": schedule,
                "threads_per_block": math.prod(_evaluate(e, call.shape_vars, 1) for e in launch.threads),
                "blocks": {str(b): math.prod(_evaluate(e, call.shape_vars, b) for e in launch.blocks)
                           for b in batches},
                "registers": None if used is None else used.registers,
                "spill_bytes": None if used is None else used.spill_bytes,
                "weight_bytes": call.weight_bytes,
            })
    return sorted(report, key=lambda kernel: kernel["name"])
