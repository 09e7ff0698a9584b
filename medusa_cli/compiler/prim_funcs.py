"""Rewriting the PrimFuncs of a module one by one, as the CPU and GPU schedules do."""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import tirx


def rewrite_prim_funcs(mod: tvm.IRModule,
                       rewrite: Callable[[tirx.PrimFunc], tirx.PrimFunc | None]) -> tvm.IRModule:
    """`mod` with each PrimFunc replaced by rewrite(func), where that is not None; `mod` itself
    when nothing changes."""
    updates = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            rewritten = rewrite(func)
            if rewritten is not None:
                updates[gvar] = rewritten
    if not updates:
        return mod
    mod = mod.clone()
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod
