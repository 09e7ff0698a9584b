"""Devices by the names the CLI takes (cpu, cuda:0, rocm:1, ...), and whether one is visible.

The one place that asks TVM about devices: the compiler (the local GPU's arch for `--target
auto` and `cuda`), `medusa build` (whether a library can be verified here) and the runtime.
"""

from __future__ import annotations

from pathlib import Path


def load_device_runtime(kind: str) -> None:
    """TVM without its compiler library (runtime-only mode, as on a serving machine given only
    libtvm_runtime) does not load its device runtimes at import: load libtvm_runtime_<kind>
    (CUDA's device API and module loader) where it exists. Elsewhere TVM has already done it,
    or has none to load; a device that stays unusable is reported as not visible."""
    import tvm

    loaded = getattr(tvm.base, "_LOADED_LIBS", {})
    name = f"tvm_runtime_{kind}"
    if not getattr(tvm.base, "_RUNTIME_ONLY", False) or name in loaded:
        return
    from tvm_ffi.libinfo import load_lib_ctypes

    try:
        loaded[name] = load_lib_ctypes(package="tvm", target_name=name, mode="RTLD_LOCAL",
                                       extra_lib_paths=[Path(loaded["tvm_runtime"]._name).resolve().parent])
    except (OSError, RuntimeError, KeyError):  # no such library, or its CUDA libraries are missing
        pass


def device_visible(kind: str, index: int = 0) -> bool:
    """Whether TVM sees device `index` of `kind` ("cuda", "rocm", "metal", "cpu", ...); a device
    API that cannot even be queried counts as absent."""
    import tvm

    if kind not in ("cpu", "llvm"):
        load_device_runtime(kind)
    try:
        return bool(tvm.device(kind, index).exist)
    except Exception:
        return False
