"""`--target` names -> TVM targets, and whether this machine can build for them.

TVM 0.27 accepts only JSON-dict targets ({"kind": "cuda", "arch": "sm_90"}); the old string
form ("cuda -arch=sm_90") is rejected, so short names are translated here. Every target whose
toolchain is missing fails up front with a ToolchainError naming what to install, before any
compile time is spent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Callable

import tvm
from tvm.target import Target

from ..devices import device_visible
from ..errors import InputError, MedusaError, ToolchainError, error_gist

# --arch for cuda when no GPU is visible: Ampere, the oldest arch of current data-centre GPUs.
DEFAULT_CUDA_ARCH = "sm_80"
# --arch for rocm when none is given: MI200.
DEFAULT_ROCM_ARCH = "gfx90a"

# Limits TVM otherwise guesses with a warning on stderr (CUDA: any sm_70+ GPU).
_CUDA_LIMITS = {"max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
                "thread_warp_size": 32}

_CUDA_ARCH = re.compile(r"^sm_\d{2,3}[a-z]?$")
_ROCM_ARCH = re.compile(r"^gfx[0-9a-f]{3,4}$")


@dataclasses.dataclass(frozen=True)
class ResolvedTarget:
    # short name for file names and messages: llvm, cpu, cuda, rocm, metal, opencl, webgpu, ...
    name: str
    # TVM target kind
    kind: str
    target: Target
    # one line for humans: "CUDA sm_90 (fatbin compiled by nvcc)"
    description: str
    # how device code travels in the library: "host" (none), "fatbin", "hsaco", "source"
    # (OpenCL C, compiled by the driver when loaded), "metallib", "wgsl"
    device_code: str
    # default output suffix: ".so" or ".wasm"
    suffix: str
    # CUDA arches compiled into the fatbin, lowest first (codegen targets the lowest)
    cuda_arches: tuple[str, ...] = ()

    @property
    def is_gpu(self) -> bool:
        return self.kind != "llvm"

    @property
    def json(self) -> str:
        return str(self.target)  # TVM prints a target as its JSON dict


def _host_cpu() -> Target:
    # {"kind": "llvm", "mcpu": "native"} is ignored by TVM 0.27; from_device reads the host's mcpu
    return Target.from_device("cpu")


def _generic_host() -> dict:
    return {"kind": "llvm"}


def _require_build_function(kind: str, need: str) -> None:
    if tvm.get_global_func(f"target.build.{kind}", True) is None:
        raise ToolchainError(f"--target {kind}: this TVM build has no {kind} code generator; {need}")


def _require_program(program: str, kind: str, need: str) -> None:
    if shutil.which(program) is None:
        raise ToolchainError(f"--target {kind}: `{program}` not found on PATH; {need}")


def _parse_cuda_arches(arch: str | None) -> tuple[str, ...]:
    if arch is None:
        if device_visible("cuda"):
            return ("sm_" + tvm.cuda(0).compute_version.replace(".", ""),)
        return (DEFAULT_CUDA_ARCH,)
    arches = tuple(a.strip() for a in arch.split(",") if a.strip())
    bad = [a for a in arches if not _CUDA_ARCH.match(a)]
    if not arches or bad:
        raise InputError(
            f"--arch {arch!r}: expected CUDA arches like sm_80 or sm_80,sm_90"
        )
    return tuple(sorted(set(arches), key=lambda a: int(re.sub(r"\D", "", a))))


def _cuda(arch: str | None, extra: dict | None = None) -> ResolvedTarget:
    _require_build_function("cuda", "install an apache-tvm wheel built with CUDA")
    _require_program("nvcc", "cuda", "install the CUDA toolkit: medusa compiles the device code "
                     "to a fatbin at build time so the library needs no compiler where it runs")
    arches = _parse_cuda_arches(arch)
    spec = {"kind": "cuda", **_CUDA_LIMITS, **(extra or {}), "arch": arches[0],
            "host": _generic_host()}
    return ResolvedTarget(
        name="cuda",
        kind="cuda",
        target=Target(spec),
        description=f"CUDA {','.join(arches)} (fatbin compiled by nvcc)",
        device_code="fatbin",
        suffix=".so",
        cuda_arches=arches,
    )


def _rocm_home() -> str | None:
    for candidate in (os.environ.get("ROCM_PATH"), "/opt/rocm"):
        if candidate and os.path.isdir(os.path.join(candidate, "amdgcn", "bitcode")):
            return candidate
    return None


def _rocm(arch: str | None, extra: dict | None = None) -> ResolvedTarget:
    _require_build_function("rocm", "install an apache-tvm wheel built with ROCm")
    if _rocm_home() is None:
        raise ToolchainError(
            "--target rocm: no ROCm install found (looked for $ROCM_PATH and /opt/rocm with "
            "amdgcn/bitcode); install ROCm, which provides the device libraries and ld.lld"
        )
    _require_program("ld.lld", "rocm", "install ROCm's LLVM (ld.lld links the GPU code object)")
    mcpu = arch or DEFAULT_ROCM_ARCH
    if not _ROCM_ARCH.match(mcpu):
        raise InputError(f"--arch {arch!r}: expected a ROCm arch like gfx90a or gfx1100")
    spec = {"kind": "rocm", **(extra or {}), "mcpu": mcpu, "host": _generic_host()}
    return ResolvedTarget("rocm", "rocm", Target(spec), f"ROCm {mcpu}", "hsaco", ".so")


def _vulkan(arch: str | None, extra: dict | None = None) -> ResolvedTarget:
    _require_build_function(
        "vulkan", "the apache-tvm wheel ships without Vulkan (SPIR-V); build TVM from source "
        "with USE_VULKAN=ON"
    )
    spec = {"kind": "vulkan", **(extra or {}), "host": _generic_host()}
    return ResolvedTarget("vulkan", "vulkan", Target(spec), "Vulkan (SPIR-V)", "spirv", ".so")


def _metal(arch: str | None, extra: dict | None = None) -> ResolvedTarget:
    if sys.platform != "darwin":
        raise ToolchainError(
            "--target metal: needs macOS with Xcode's command-line tools (xcrun metal and the "
            "macOS linker); run `medusa compile` on a Mac"
        )
    _require_program("xcrun", "metal", "install Xcode's command-line tools (xcode-select --install)")
    spec = {"kind": "metal", **(extra or {}), "host": {"kind": "llvm", "mtriple": "arm64-apple-macos"}}
    return ResolvedTarget("metal", "metal", Target(spec), "Apple Metal", "metallib", ".dylib")


def _opencl(arch: str | None, extra: dict | None = None) -> ResolvedTarget:
    _require_build_function("opencl", "install an apache-tvm wheel built with OpenCL")
    spec = {"kind": "opencl", **(extra or {}), "host": _generic_host()}
    return ResolvedTarget(
        "opencl", "opencl", Target(spec),
        "OpenCL (kernels compiled by the OpenCL driver when the library loads)", "source", ".so",
    )


def _webgpu(arch: str | None, extra: dict | None = None) -> ResolvedTarget:
    _require_build_function("webgpu", "install an apache-tvm wheel built with WebGPU")
    _require_program("emcc", "webgpu", "install Emscripten (emsdk) to link the WebAssembly library")
    spec = {"kind": "webgpu", **(extra or {}),
            "host": {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"}}
    return ResolvedTarget("webgpu", "webgpu", Target(spec), "WebGPU (WGSL + WebAssembly)", "wgsl", ".wasm")


def _llvm(arch: str | None, extra: dict | None = None) -> ResolvedTarget:
    spec = {"kind": "llvm", **(extra or {})}
    target = Target(spec)
    return ResolvedTarget("llvm", "llvm", target, f"CPU ({_cpu_words(target)})", "host", ".so")


def _cpu(arch: str | None, extra: dict | None = None) -> ResolvedTarget:
    target = _host_cpu()
    return ResolvedTarget("cpu", "llvm", target, f"this CPU ({_cpu_words(target)})", "host", ".so")


def _cpu_words(target: Target) -> str:
    attrs = json.loads(str(target))
    return ", ".join(f"{k} {attrs[k]}" for k in ("mtriple", "mcpu") if attrs.get(k)) or "generic"


def _auto(arch: str | None, extra: dict | None = None) -> ResolvedTarget:
    """The best device visible here: a CUDA GPU, then ROCm, then Metal, else this CPU."""
    for kind, resolve in (("cuda", _cuda), ("rocm", _rocm), ("metal", _metal)):
        if device_visible(kind):
            return resolve(arch)
    return _cpu(arch)


# --target NAME -> how to build its TVM target. Kinds that take --arch read it; others reject it.
TARGETS: dict[str, Callable[[str | None, dict | None], ResolvedTarget]] = {
    "llvm": _llvm,
    "cpu": _cpu,
    "cuda": _cuda,
    "rocm": _rocm,
    "vulkan": _vulkan,
    "metal": _metal,
    "opencl": _opencl,
    "webgpu": _webgpu,
    "auto": _auto,
}
_TAKES_ARCH = {"cuda", "rocm", "auto"}


def _parse_legacy(name: str) -> dict:
    """'cuda -arch=sm_90 -max_num_threads=1024' -> {"kind": "cuda", "arch": "sm_90", ...}."""
    kind, *options = name.split()
    spec: dict = {"kind": kind}
    for option in options:
        key, eq, value = option.lstrip("-").partition("=")
        if not eq or not key:
            raise InputError(
                f"--target {name!r}: cannot read option {option!r}; use a JSON dict such as "
                '\'{"kind": "cuda", "arch": "sm_90"}\''
            )
        spec[key] = int(value) if value.isdigit() else value
    return spec


def _from_dict(spec: dict, arch: str | None, text: str) -> ResolvedTarget:
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in TARGETS or kind in ("cpu", "auto"):
        known = ", ".join(k for k in TARGETS if k not in ("cpu", "auto"))
        raise InputError(f"--target {text!r}: \"kind\" must be one of {known}")
    spec.pop("host", None)  # the host is chosen per kind
    if kind == "cuda" and "arch" in spec:
        arch = arch or str(spec.pop("arch"))
    if kind == "rocm" and "mcpu" in spec:
        arch = arch or str(spec.pop("mcpu"))
    try:
        return TARGETS[kind](arch, spec)
    except MedusaError:
        raise
    except Exception as exc:  # TVM's target parser rejects an attribute
        raise InputError(f"--target {text!r}: TVM rejects it ({error_gist(exc)})") from None


def resolve_target(name: str, arch: str | None = None) -> ResolvedTarget:
    """A --target value (short name, JSON dict or legacy 'kind -key=value' string) -> ResolvedTarget."""
    text = name.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"--target: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(spec, dict):
            raise InputError("--target: a JSON target must be an object with a \"kind\"")
        return _from_dict(spec, arch, text)
    if " " in text:
        return _from_dict(_parse_legacy(text), arch, text)
    resolve = TARGETS.get(text)
    if resolve is None:
        raise InputError(
            f"unknown target '{name}'; choose one of: {', '.join(TARGETS)}, or a TVM target "
            "JSON dict (--target)"
        )
    if arch is not None and text not in _TAKES_ARCH:
        raise InputError(f"--arch applies to cuda and rocm targets, not '{text}'")
    return resolve(arch, None)
