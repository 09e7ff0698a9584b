"""Devices by the names the CLI takes (cpu, cuda:0, rocm:1, ...), and whether one is visible.

The one place that asks TVM about devices: the compiler (the local GPU's arch for `--target
auto` and `cuda`), `medusa build` (whether a library can be verified here) and the runtime.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError

# Published peak memory bandwidth in GB/s (1e9 bytes/s), by the names `medusa inspect --gpu`
# takes, for the roofline of a library: the time to read its parameters once. Each from the
# vendor's datasheet or specification page:
GPU_BANDWIDTH_GBPS = {
    "h200": 4800,       # NVIDIA H200 SXM datasheet: 4.8 TB/s (HBM3e)
    "h100": 3350,       # NVIDIA H100 SXM datasheet: 3.35 TB/s (HBM3)
    "h100-pcie": 2000,  # NVIDIA H100 PCIe datasheet: 2 TB/s
    "a100": 2039,       # NVIDIA A100 80GB SXM datasheet: 2,039 GB/s (HBM2e)
    "a100-40gb": 1555,  # NVIDIA A100 40GB datasheet: 1,555 GB/s
    "l40s": 864,        # NVIDIA L40S datasheet: 864 GB/s (GDDR6)
    "a10": 600,         # NVIDIA A10 datasheet: 600 GB/s
    "l4": 300,          # NVIDIA L4 datasheet: 300 GB/s
    "rtx4090": 1008,    # NVIDIA GeForce RTX 4090 specifications: 21 Gbps GDDR6X, 384-bit bus
    "rtx3090": 936,     # NVIDIA GeForce RTX 3090 specifications: 19.5 Gbps GDDR6X, 384-bit bus
    "mi300x": 5300,     # AMD Instinct MI300X datasheet: 5.3 TB/s (HBM3)
}


def gpu_bandwidth_gbps(name: str) -> float:
    """A GPU's published memory bandwidth; InputError naming the known GPUs (--gpu)."""
    try:
        return float(GPU_BANDWIDTH_GBPS[name.lower()])
    except KeyError:
        raise InputError(f"--gpu {name!r}: unknown GPU; choose one of "
                         f"{', '.join(GPU_BANDWIDTH_GBPS)}") from None


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
