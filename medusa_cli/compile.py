"""`medusa compile`: a packed parameter directory -> a TVM library of the Medusa heads.

The build runs in two explicit stages:
  1. _optimize: FuseTransposeMatmul first, then legalize, fuse, (GPU) dlight schedules and static
     memory planning with batch_size bounded by --max-batch-size;
  2. tvm.relax.build with relax_pipeline=_finalize_pipeline(): the VM lowering passes; for CPU
     targets, TVM's TIR pipeline then cpu_tasks.share_out_parallel_loops.
Between them the planned memory is measured and a `_metadata` Relax function returning JSON is
added, as MLC-LLM's compile does, so an MLC-LLM runtime and `medusa inspect` can read what the
library holds. The same JSON is also stored as a plain string in the file, so it can be read
without loading the library (a CUDA library on a machine without CUDA).

With --tree, the library also exports get_tree_candidates and get_tree_buffers (model.py), and
the metadata's "tree" holds the tree's name, paths and top-k.

CUDA device code is compiled to a fatbin by nvcc at build time and stored in the library in
place of the CUDA source TVM 0.27 would otherwise embed (and compile with NVRTC or nvcc each time
the library loads). The library then needs only the CUDA driver where it runs.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import re
import struct
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .atomic import staged_file
from .config import CONFIG_FILE, TENSOR_CACHE_FILE, MedusaConfig, read_packed_config
from .errors import CompileError, InputError, MedusaError, ParamsError, ToolchainError
from .quant import QuantScheme, get_scheme
from .targets import (
    SHARED_LIBRARY_SUFFIXES,
    SYSTEM_LIBRARY_SUFFIX,
    ResolvedTarget,
    error_gist,
    resolve_target,
)
from .tensor_cache import TensorCache, read_tensor_cache
from .tree import DEFAULT_TOPK, describe, load_tree

if TYPE_CHECKING:
    from .model import TreeSpec

DEFAULT_MAX_BATCH_SIZE = 8
METADATA_FUNCTION = "_metadata"
# Relax functions taking [batch_size, ...] inputs; memory is planned for --max-batch-size.
BATCHED_FUNCTIONS = ("get_logits", "get_tree_candidates")
# The metadata JSON, base64-encoded after this marker, is a NUL-terminated string in the library.
METADATA_MARKER = b"MEDUSA_CLI_METADATA_V1:"
_METADATA_SOURCE = "medusa_cli_metadata.c"
# Params spec: (name, shape, dtype)
ParamSpec = tuple[str, tuple[int, ...], str]


@dataclasses.dataclass
class CompileRequest:
    params_dir: Path
    # short name (llvm, cpu, cuda, ..., auto), TVM target JSON dict, or "cuda -arch=sm_90"
    target: str = "llvm"
    # CUDA arch(es) "sm_90" or "sm_80,sm_90"; ROCm gfx arch. None: local GPU, else a default
    arch: str | None = None
    # None: the params dir's scheme; anything else must equal it
    quantization: str | None = None
    # largest batch get_logits accepts; intermediate memory is planned for it
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    # .so/.dylib/.dll (shared library), .tar (system library) or .wasm (webgpu);
    # None: PARAMS_DIR/medusa-<target>-<quantization>.so
    output: Path | None = None
    # a shipped tree name (configs/trees) or a JSON file of paths; None: no tree functions
    tree: str | Path | None = None
    # ranks kept per head for the tree's candidates (Medusa's TOPK)
    topk: int = DEFAULT_TOPK


@dataclasses.dataclass
class CompileResult:
    output: Path
    # the TVM target as JSON
    target: str
    quantization: str
    seconds: float
    metadata: dict

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "target": json.loads(self.target),
            "quantization": self.quantization,
            "seconds": round(self.seconds, 3),
            "metadata": self.metadata,
        }


# ---------------------------------------------------------------------------------------------
# Checking the parameter directory


def check_params(params_dir: Path, expected: list[ParamSpec]) -> TensorCache:
    """Names, shapes and dtypes of tensor-cache.json against `expected`; shard files exist with
    the recorded sizes. Raises ParamsError naming the first mismatching tensor or file."""
    params_dir = Path(params_dir)
    cache = read_tensor_cache(params_dir)
    manifest = params_dir / TENSOR_CACHE_FILE
    found = cache.by_name()
    for name, shape, dtype in expected:
        record = found.get(name)
        if record is None:
            raise ParamsError(
                f"{manifest}: tensor '{name}' is missing; the directory does not hold these heads, "
                "re-run `medusa convert`"
            )
        if tuple(record.shape) != tuple(shape) or record.dtype != dtype:
            raise ParamsError(
                f"{manifest}: tensor '{name}' is {list(record.shape)} {record.dtype}, expected "
                f"{list(shape)} {dtype} from {CONFIG_FILE}; re-run `medusa convert`"
            )
    names = {name for name, _, _ in expected}
    unexpected = [t.name for t in cache.tensors if t.name not in names]
    if unexpected:
        raise ParamsError(
            f"{manifest}: unexpected tensor '{unexpected[0]}' ({len(unexpected)} in all) for the "
            f"heads described by {CONFIG_FILE}; re-run `medusa convert`"
        )
    for shard in cache.shards:
        path = params_dir / shard["dataPath"]
        if not path.is_file():
            raise ParamsError(f"{path}: shard listed in {TENSOR_CACHE_FILE} is missing")
        if path.stat().st_size != shard["nbytes"]:
            raise ParamsError(
                f"{path}: shard is {path.stat().st_size} bytes, {TENSOR_CACHE_FILE} says "
                f"{shard['nbytes']}; the directory is corrupted, re-run `medusa convert`"
            )
    return cache


def _resolve_scheme(requested: str | None, packed: str, params_dir: Path) -> QuantScheme:
    try:
        scheme = get_scheme(packed)
    except InputError:
        raise ParamsError(
            f"{params_dir / CONFIG_FILE}: unknown quantization {packed!r}; re-run `medusa convert`"
        ) from None
    if requested is None:
        return scheme
    get_scheme(requested)  # an unknown name is its own error
    if requested != packed:
        raise InputError(
            f"--quantization {requested} does not match {params_dir / CONFIG_FILE}, which holds "
            f"{packed}; drop --quantization or re-run `medusa convert --quantization {requested}`"
        )
    return scheme


def _default_output(request: CompileRequest, target: ResolvedTarget, scheme: QuantScheme) -> Path:
    return Path(request.params_dir) / f"medusa-{target.name}-{scheme.name}{target.suffix}"


def _check_output_suffix(output: Path, target: ResolvedTarget) -> None:
    if target.suffix == ".wasm":
        allowed: tuple[str, ...] = (".wasm",)
    else:
        allowed = SHARED_LIBRARY_SUFFIXES + (SYSTEM_LIBRARY_SUFFIX,)
    if output.suffix not in allowed:
        raise InputError(
            f"-o {output}: a {target.name} library must end in {' or '.join(allowed)}"
        )


# ---------------------------------------------------------------------------------------------
# The pipeline


def _optimize(mod, target: ResolvedTarget, max_batch_size: int):
    """Relax optimizations up to static memory planning (stage 1 of the build)."""
    from tvm import relax, transform
    from tvm.s_tir import dlight as dl

    for name in _functions_in(mod, BATCHED_FUNCTIONS):
        mod[name] = mod[name].with_attr("tir_var_upper_bound", {"batch_size": max_batch_size})
    passes = [
        # Our Linear layers already read W in [out, in] layout; this keeps any other
        # matmul(x, permute_dims(w)) from transposing a weight on every call.
        relax.transform.FuseTransposeMatmul(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    if not target.is_gpu:
        # Hand schedules for the GEMV kernels: parallel rows, vectorised k, W read once per
        # call up to batch 8 (cpu_schedule.py). Other targets' kernels are left alone.
        from .cpu_schedule import schedule_cpu_kernels_pass

        passes.append(schedule_cpu_kernels_pass)
    else:
        # dl.gpu.Matmul is left out: it segfaults in MatmulTensorization on CUDA float16 with a
        # dynamic batch (TVM 0.27). Fallback binds threads for whatever the others decline.
        passes.append(
            dl.ApplyDefaultSchedule(
                dl.gpu.GEMV(),
                dl.gpu.LowBatchGEMV(),
                dl.gpu.Reduction(),
                dl.gpu.GeneralReduction(),
                dl.gpu.Fallback(),
            )
        )
    passes += [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
    ]
    with target.target:
        return transform.Sequential(passes, name="medusa_optimize")(mod)


def _functions_in(mod, names: tuple[str, ...]) -> list[str]:
    present = {gv.name_hint for gv in mod.get_global_vars()}
    return [name for name in names if name in present]


def _finalize_pipeline():
    """VM lowering after memory planning (stage 2, passed to tvm.relax.build)."""
    from tvm import relax, transform

    return transform.Sequential(
        [
            relax.transform.LowerAllocTensor(),
            relax.transform.KillAfterLastUse(),
            relax.transform.LowerRuntimeBuiltin(),
            relax.transform.ComputePrimValue(),
            relax.transform.VMShapeLower(),
            relax.transform.AttachGlobalSymbol(),
            _mark_shape_functions_noalias(),
        ],
        name="medusa_finalize",
    )


def _mark_shape_functions_noalias():
    """Give "tirx.noalias" to PrimFuncs with at most one parameter (VMShapeLower's shape_func,
    one int64 buffer), where it holds trivially.

    TVM 0.27's LLVM code generator decides whether the buffers of every function in a module
    may alias from the function it declared last (CodeGenLLVM::is_restricted_ is set per
    declaration and read while generating all of them). A shape_func without the attribute
    declared last took `noalias` away from every kernel of the library: LLVM then kept their
    accumulators in memory (measured: the q0f32 vocab projection at batch 8 took 40 ms in the
    library and 27 ms compiled alone).
    """
    from tvm import tirx

    @tirx.transform.prim_func_pass(opt_level=0, name="medusa.MarkShapeFunctionsNoAlias")
    def mark(func, mod, ctx):
        if func.attrs and "tirx.noalias" in func.attrs or len(func.params) > 1:
            return func
        return func.with_attr("tirx.noalias", True)  # one buffer (or none): nothing to alias

    return mark


def _planned_bytes(func) -> int:
    """Bytes of the storage StaticPlanBlockMemory allocated for intermediates of `func`."""
    from tvm import ir, relax, tirx

    alloc_storage = ir.Op.get("relax.memory.alloc_storage")
    sizes: list[int] = []

    def visit(expr) -> None:
        if isinstance(expr, relax.Call) and expr.op.same_as(alloc_storage):
            size = expr.args[0]  # R.shape([nbytes]), static once batch_size is bounded
            if isinstance(size, relax.ShapeExpr) and isinstance(size.values[0], tirx.IntImm):
                sizes.append(int(size.values[0]))

    relax.analysis.post_order_visit(func, visit)
    return sum(sizes)


def _with_metadata(mod, metadata: dict):
    """mod plus a `_metadata` Relax function returning the metadata JSON (MLC-LLM's convention)."""
    from tvm import ir, relax

    builder = relax.BlockBuilder()
    with builder.function(METADATA_FUNCTION, params=[]):
        builder.emit_func_output(ir.StringImm(json.dumps(metadata)))
    mod[METADATA_FUNCTION] = builder.finalize()[METADATA_FUNCTION]
    return mod


# ---------------------------------------------------------------------------------------------
# CUDA: fatbin instead of source


@contextlib.contextmanager
def _cuda_source_modules() -> Iterator[None]:
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


def compile_cuda_fatbin(source: str, arches: tuple[str, ...], workdir: Path) -> bytes:
    """CUDA C++ source -> fatbin bytes, with nvcc."""
    src = workdir / "medusa_kernels.cu"
    out = workdir / "medusa_kernels.fatbin"
    src.write_text(source)
    cmd = ["nvcc", "--fatbin", *_gencode_flags(arches), *_NVCC_FLAGS, "-o", str(out), str(src)]
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
    return out.read_bytes()


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


def _fatbin_pack_imports(arches: tuple[str, ...]):
    """An export_library fpack_imports that packs the imports as TVM does, CUDA as fatbin."""
    import tvm

    def pack(module, is_system_lib: bool, symbol_prefix: str, workspace_dir: str) -> str:
        workdir = Path(workspace_dir)
        binaries = {}
        for cuda_module in _cuda_modules(module):
            source = cuda_module.inspect_source("cuda")
            binaries[source.encode()] = compile_cuda_fatbin(source, arches, workdir)
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


# ---------------------------------------------------------------------------------------------
# Metadata stored as a plain string


def _metadata_source(metadata: dict) -> str:
    encoded = (METADATA_MARKER + base64.b64encode(json.dumps(metadata).encode())).decode()
    # short literal pieces: some compilers cap the length of a single string literal
    pieces = "\n".join(f'    "{encoded[i:i + 2000]}"' for i in range(0, len(encoded), 2000))
    return (
        "/* medusa-cli: the library's metadata, readable without loading it. */\n"
        "#ifdef __cplusplus\nextern \"C\" {\n#endif\n"
        "__attribute__((used)) extern const char medusa_cli_metadata[];\n"
        f"__attribute__((used)) const char medusa_cli_metadata[] =\n{pieces};\n"
        "#ifdef __cplusplus\n}\n#endif\n"
    )


def _decode_marked(data: bytes, where: Path) -> dict:
    start = data.find(METADATA_MARKER)
    if start < 0:
        raise KeyError(METADATA_MARKER)
    start += len(METADATA_MARKER)
    match = re.compile(rb"[A-Za-z0-9+/=\"\s]*").match(data, start)  # literal pieces in a .c
    encoded = re.sub(rb"[\"\s]", b"", match.group(0))
    try:
        return json.loads(base64.b64decode(encoded))
    except ValueError:
        raise InputError(f"{where}: medusa metadata is corrupted; recompile the library") from None


def read_library_metadata(lib_path: Path) -> dict:
    """The metadata JSON of a library built by `medusa compile` (or by MLC-LLM, via `_metadata`).

    Reads the string stored in the file, so no device runtime is needed; falls back to loading
    the library with TVM and calling its `_metadata` function.
    """
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise InputError(f"{lib_path}: no such library; compile one with `medusa compile`")
    try:
        if lib_path.suffix == SYSTEM_LIBRARY_SUFFIX:
            with tarfile.open(lib_path) as tar:
                member = tar.extractfile(_METADATA_SOURCE)
                data = member.read() if member is not None else b""
        else:
            data = lib_path.read_bytes()
        return _decode_marked(data, lib_path)
    except (KeyError, tarfile.TarError):
        pass
    return _metadata_from_vm(lib_path)


def _metadata_from_vm(lib_path: Path) -> dict:
    import tvm
    from tvm import relax

    try:
        module = tvm.runtime.load_module(str(lib_path))
        vm = relax.VirtualMachine(module, tvm.cpu())
        return json.loads(str(vm[METADATA_FUNCTION]()))
    except Exception as exc:
        raise InputError(
            f"{lib_path}: cannot read its metadata ({error_gist(exc)}); is it a library from "
            "`medusa compile`?"
        ) from None


# ---------------------------------------------------------------------------------------------
# compile_heads


def _metadata(config: MedusaConfig, scheme: QuantScheme, target: ResolvedTarget,
              max_batch_size: int, params: list[ParamSpec], planned_bytes: dict[str, int],
              tree: TreeSpec | None = None) -> dict:
    model_config = {**config.to_dict(), "max_batch_size": max_batch_size}
    return {
        # MLC-LLM's fields
        "model_type": "medusa",
        "quantization": scheme.name,
        "context_window_size": config.context_window_size,
        "sliding_window_size": -1,
        "attention_sink_size": -1,
        "prefill_chunk_size": config.prefill_chunk_size,
        "tensor_parallel_shards": config.tensor_parallel_shards,
        "pipeline_parallel_stages": 1,
        "disaggregation": False,
        "kv_state_kind": "none",
        "max_batch_size": max_batch_size,
        "active_vocab_size": None,
        "params": [
            {"name": name, "shape": list(shape), "dtype": dtype, "preprocs": [], "pipeline_stages": [0]}
            for name, shape, dtype in params
        ],
        "memory_usage": planned_bytes,
        # ours
        "dtype": scheme.model_dtype,
        "params_bytes": sum(_nbytes(shape, dtype) for _, shape, dtype in params),
        "model_config": model_config,
        "target": json.loads(target.json),
        "target_name": target.name,
        "device_code": target.device_code,
        "cuda_arches": list(target.cuda_arches),
        "medusa_cli_version": __version__,
        # null, or the tree get_tree_candidates / get_tree_buffers were built for
        "tree": None if tree is None else {
            **describe(tree.tree, tree.topk),
            "paths": [list(path) for path in tree.tree.paths],
        },
    }


def _nbytes(shape, dtype: str) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * {"float32": 4, "float16": 2, "bfloat16": 2, "uint32": 4}[dtype]


def _export(executable, target: ResolvedTarget, output: Path, metadata: dict) -> None:
    """Write the library to a temporary file beside `output`, then rename it into place."""
    kwargs = {}
    if target.device_code == "fatbin":
        kwargs["fpack_imports"] = _fatbin_pack_imports(target.cuda_arches)
    try:
        with staged_file(output) as tmp, tempfile.TemporaryDirectory(prefix="medusa-export-") as workdir:
            addons = []
            if output.suffix != ".wasm":
                source = Path(workdir) / _METADATA_SOURCE
                source.write_text(_metadata_source(metadata))
                addons.append(str(source))
            try:
                executable.export_library(str(tmp), addons=addons, workspace_dir=workdir, **kwargs)
            except MedusaError:
                raise
            except Exception as exc:
                raise CompileError(
                    f"-o {output}: exporting the {target.name} library failed ({error_gist(exc)})"
                ) from exc
    except OSError as exc:
        raise InputError(f"-o {output}: cannot write there ({exc.strerror or exc})") from None


def _resolve_tree(request: CompileRequest, config: MedusaConfig,
                  target: ResolvedTarget) -> TreeSpec | None:
    """The request's tree, validated against the heads; None without --tree."""
    from .model import TreeSpec
    from .topk import MAX_TOPK, TopkLayout

    topk = request.topk
    if request.tree is None:
        if topk != DEFAULT_TOPK:
            raise InputError(f"--topk {topk} only applies with --tree; add --tree CHOICES or drop --topk")
        return None
    most = min(MAX_TOPK, config.vocab_size)
    if isinstance(topk, int) and not isinstance(topk, bool) and topk > most:
        limit = "the vocabulary size" if most == config.vocab_size else "the most the top-k kernel keeps"
        raise InputError(
            f"--topk {topk}: at most {most} ({limit}); "
            "lower --topk and use a tree whose ranks fit"
        )
    tree = load_tree(request.tree, topk, config.medusa_num_heads)  # --tree / --topk errors
    return TreeSpec(tree=tree, topk=topk, layout=TopkLayout.for_target(config.vocab_size, target.is_gpu))


def compile_heads(request: CompileRequest) -> CompileResult:
    """Build the heads in request.params_dir for request.target and write the library."""
    start = time.perf_counter()
    params_dir = Path(request.params_dir)
    if request.max_batch_size < 1:
        raise InputError(f"--max-batch-size must be at least 1, got {request.max_batch_size}")
    if not params_dir.is_dir():
        raise ParamsError(f"{params_dir}: not a directory; pass a PARAMS_DIR written by `medusa convert`")
    packed = read_packed_config(params_dir)
    scheme = _resolve_scheme(request.quantization, packed.quantization, params_dir)
    target = resolve_target(request.target, request.arch)
    output = Path(request.output) if request.output is not None else _default_output(request, target, scheme)
    _check_output_suffix(output, target)

    from .model import MedusaModel

    tree = _resolve_tree(request, packed.model, target)
    model = MedusaModel(packed.model, scheme, tree, cpu_target=None if target.is_gpu else target.target)
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    params = [(name, tuple(int(d) for d in p.shape), str(p.dtype)) for name, p in named_params]
    check_params(params_dir, params)

    import tvm

    from . import cpu_tasks

    try:
        with _cuda_source_modules() if target.kind == "cuda" else contextlib.nullcontext():
            optimized = _optimize(mod, target, request.max_batch_size)
            planned = {name: _planned_bytes(optimized[name])
                       for name in _functions_in(optimized, BATCHED_FUNCTIONS)}
            metadata = _metadata(packed.model, scheme, target, request.max_batch_size, params,
                                 planned, tree)
            executable = tvm.relax.build(
                _with_metadata(optimized, metadata),
                target.target,
                relax_pipeline=_finalize_pipeline(),
                # CPU: parallel loops shared out among the threads at run time (cpu_tasks.py)
                tir_pipeline="default" if target.is_gpu else cpu_tasks.register_pipeline(),
                system_lib=output.suffix == SYSTEM_LIBRARY_SUFFIX,
            )
    except MedusaError:
        raise
    except Exception as exc:
        raise CompileError(
            f"--target {target.name}: TVM failed to build the {scheme.name} heads "
            f"({error_gist(exc)})"
        ) from exc
    _export(executable, target, output, metadata)
    return CompileResult(
        output=output,
        target=target.json,
        quantization=scheme.name,
        seconds=time.perf_counter() - start,
        metadata=metadata,
    )
