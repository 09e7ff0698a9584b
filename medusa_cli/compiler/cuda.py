"""CUDA device code as a fatbin compiled by nvcc at build time, stored in the library in place of
the CUDA source TVM 0.27 would otherwise embed (and compile with NVRTC or nvcc each time the
library loads). The library then needs only the CUDA driver where it runs. ptxas reports each
kernel's registers and spills as it compiles (-v), for the kernel report (kernels.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

from ..errors import CompileError, ToolchainError
from .kernels import KernelUsage


@contextlib.contextmanager
def cuda_source_modules() -> Iterator[None]:
    """Make TVM's CUDA codegen keep the kernel source instead of compiling it itself.

    With the CUDA runtime loaded, TVM 0.27 compiles generated CUDA at build time through
    tvm_callback_cuda_compile (NVRTC by default, which needs the cuda-bindings package); without
    it the module keeps the source. TVM_COMPILE_FORCE_FALLBACK selects the second path on every
    machine, and medusa compiles that source with nvcc itself.
    """
    key = "TVM_COMPILE_FORCE_FALLBACK"
    previous = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


# nvcc flags TVM's generated CUDA relies on (half/bfloat16 operators, constexpr in device code).
_NVCC_FLAGS = [
    "-O3",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
]


def _gencode_flags(arches: tuple[str, ...]) -> list[str]:
    """SASS for every arch, plus PTX of the newest so later GPUs can JIT it in the driver."""
    flags = []
    for arch in arches:
        number = arch.removeprefix("sm_")
        flags += ["-gencode", f"arch=compute_{number},code=sm_{number}"]
    newest = arches[-1].removeprefix("sm_")
    flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return flags


@dataclasses.dataclass(frozen=True)
class CudaBinary:
    fatbin: bytes
    # __global__ function name -> what ptxas reported for it
    usage: dict[str, KernelUsage]


# ptxas -v, per kernel and arch: "Compiling entry function 'f' for 'sm_90'", then
# "N bytes stack frame, N bytes spill stores, N bytes spill loads", then "Used N registers".
_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def parse_ptxas_usage(log: str) -> dict[str, KernelUsage]:
    """Kernel name -> registers and spill bytes from ptxas -v output, the most over the arches."""
    usage: dict[str, KernelUsage] = {}
    name, spills = None, 0
    for line in log.splitlines():
        if entry := _PTXAS_ENTRY.search(line):
            name, spills = entry.group(1), 0
        elif name and (spill := _PTXAS_SPILLS.search(line)):
            spills = int(spill.group(1)) + int(spill.group(2))
        elif name and (registers := _PTXAS_REGISTERS.search(line)):
            seen = usage.get(name, KernelUsage(0, 0))
            usage[name] = KernelUsage(max(seen.registers, int(registers.group(1))),
                                      max(seen.spill_bytes, spills))
            name = None
    return usage


def compile_cuda_fatbin(source: str, arches: tuple[str, ...], workdir: Path) -> CudaBinary:
    """CUDA C++ source -> fatbin bytes and ptxas's report of each kernel, with nvcc."""
    src = workdir / "medusa_kernels.cu"
    out = workdir / "medusa_kernels.fatbin"
    src.write_text(source)
    cmd = ["nvcc", "--fatbin", *_gencode_flags(arches), *_NVCC_FLAGS, "-Xptxas", "-v",
           "-o", str(out), str(src)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ToolchainError("--target cuda: `nvcc` not found on PATH; install the CUDA toolkit") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "")
        raise CompileError(
            f"nvcc failed to compile the CUDA kernels for {','.join(arches)}: {detail.strip()} "
            "(is --arch supported by this CUDA toolkit?)"
        )
    return CudaBinary(out.read_bytes(), parse_ptxas_usage(proc.stdout + proc.stderr))


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value)


class _Reader:
    """Reads TVM's little-endian serialization: u64, and byte strings as u64 length + bytes."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def u64(self) -> int:
        (value,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return value

    def blob(self) -> bytes:
        size = self.u64()
        value = self.data[self.pos:self.pos + size]
        if len(value) != size:
            raise CompileError("TVM's packed library is shorter than it says; cannot embed the fatbin")
        self.pos += size
        return value


def _cuda_payload_with_binary(payload: bytes, binaries: dict[bytes, bytes]) -> bytes:
    """A serialized CUDA module [fmt][function map][code] with code = fatbin, fmt = "fatbin"."""
    reader = _Reader(payload)
    fmt = reader.blob()
    if fmt != b"cuda":  # already compiled by TVM
        return payload
    for source, fatbin in binaries.items():
        tail = _u64(len(source)) + source
        if payload.endswith(tail):
            function_map = payload[reader.pos:len(payload) - len(tail)]
            return _u64(len(b"fatbin")) + b"fatbin" + function_map + _u64(len(fatbin)) + fatbin
    raise CompileError(
        "TVM's serialized CUDA module does not end with its source as expected (TVM version "
        "mismatch?); cannot embed the fatbin"
    )


def patch_cuda_library_bin(blob: bytes, binaries: dict[bytes, bytes]) -> bytes:
    """TVM's library blob with every CUDA source module replaced by its compiled fatbin.

    Layout (tvm-ffi library_module.cc): <nbytes u64> <indptr vec<u64>> <children vec<u64>>,
    then per module <kind str> and, unless kind is "_lib", <payload bytes>.
    """
    reader = _Reader(blob)
    if reader.u64() != len(blob) - 8:
        raise CompileError("TVM's packed library has an unexpected header; cannot embed the fatbin")
    num_modules = reader.u64() - 1
    reader.pos += 8 * (num_modules + 1)  # import tree indptr
    num_children = reader.u64()
    reader.pos += 8 * num_children  # import tree child indices
    parts = [blob[8:reader.pos]]
    for _ in range(num_modules):
        kind = reader.blob()
        parts.append(_u64(len(kind)) + kind)
        if kind == b"_lib":
            continue
        payload = reader.blob()
        if kind == b"cuda":
            payload = _cuda_payload_with_binary(payload, binaries)
        parts.append(_u64(len(payload)) + payload)
    body = b"".join(parts)
    return _u64(len(body)) + body


def cuda_sources(module) -> list[str]:
    """The CUDA source of every CUDA module `module` imports (a built library: one, usually)."""
    return [cuda_module.inspect_source("cuda") for cuda_module in _cuda_modules(module)]


def _cuda_modules(module) -> list:
    found, stack, seen = [], [module], set()
    while stack:
        current = stack.pop()
        for child in current.imports:
            if id(child) in seen:
                continue
            seen.add(id(child))
            if child.kind == "cuda":
                found.append(child)
            stack.append(child)
    return found


def _c_byte_array(data: bytes) -> str:
    hex_bytes = [f"0x{b:02x}" for b in data]
    return ",\n".join(",".join(hex_bytes[i:i + 24]) for i in range(0, len(hex_bytes), 24))


def fatbin_pack_imports(arches: tuple[str, ...], compiled: dict[bytes, bytes] | None = None):
    """An export_library fpack_imports that packs the imports as TVM does, CUDA as fatbin.
    compiled: CUDA source -> fatbin already compiled (compile_cuda_fatbin); others are compiled."""
    import tvm

    def pack(module, is_system_lib: bool, symbol_prefix: str, workspace_dir: str) -> str:
        workdir = Path(workspace_dir)
        binaries = dict(compiled or {})
        for source in cuda_sources(module):
            if source.encode() not in binaries:
                binaries[source.encode()] = compile_cuda_fatbin(source, arches, workdir).fatbin
        blob = bytes(tvm.get_global_func("runtime.ModulePackImportsToTensor")(module).numpy())
        patched = patch_cuda_library_bin(blob, binaries)
        # TVM's own C text gives the symbol name and the system-lib registration; swap its array.
        c_text = tvm.get_global_func("runtime.ModulePackImportsToC")(module, is_system_lib, symbol_prefix)
        c_text, count = re.subn(
            r"(__tvm_ffi__library_bin)\[\d+\] = \{.*?\};",
            lambda m: f"{m.group(1)}[{len(patched)}] = {{\n{_c_byte_array(patched)}\n}};",
            c_text,
            count=1,
            flags=re.DOTALL,
        )
        if count != 1:
            raise CompileError("TVM's packed-imports C source has an unexpected form; cannot embed the fatbin")
        path = workdir / f"{symbol_prefix}devc.c"
        path.write_text(c_text)
        return str(path)

    return pack
