"""The compiled library as a file: its metadata, written once by the compiler and read and
validated here for everyone else, and its default name.

The metadata is JSON. It is compiled into the library twice: as MLC-LLM's `_metadata` Relax
function (so an MLC-LLM runtime reads it), and as a plain string after METADATA_MARKER (so it is
read from the file without loading it: no constructor of an unknown library runs, and a CUDA
library is inspected on a machine without CUDA).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import tarfile
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import InputError, error_gist
from .quantization import SCHEMES
from .spec import MedusaConfig, ParamSpec
from .trees import MedusaTree, describe, validate_paths

METADATA_FUNCTION = "_metadata"
# The metadata JSON, base64-encoded after this marker, is a NUL-terminated string in the library.
METADATA_MARKER = b"MEDUSA_CLI_METADATA_V1:"
# In a .tar system library, the C source holding that string.
METADATA_SOURCE = "medusa_cli_metadata.c"
SHARED_LIBRARY_SUFFIXES = (".so", ".dylib", ".dll")
SYSTEM_LIBRARY_SUFFIX = ".tar"
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "uint32": 4}
# A library's metadata is kilobytes to a few megabytes (a kernel report, a tree's paths).
_MAX_METADATA_BYTES = 64 * 1024 * 1024


def library_file_name(target_name: str, quantization: str, suffix: str = ".so") -> str:
    """The default library name: medusa-<target>-<quantization><suffix>."""
    return f"medusa-{target_name}-{quantization}{suffix}"


@dataclasses.dataclass(frozen=True)
class LibraryTree:
    """The tree get_tree_candidates was compiled for."""

    tree: MedusaTree
    # ranks kept per head; the stride between heads in tree_indices
    topk: int


@dataclasses.dataclass
class LibraryMetadata:
    """What a library holds and was built for."""

    # the heads, with max_batch_size the library's
    config: MedusaConfig
    quantization: str
    # the model (compute) dtype
    dtype: str
    # every parameter, in the order get_logits takes them
    params: list[ParamSpec]
    # the TVM target as its JSON dict, and the short name given to --target
    target: dict
    target_name: str
    # how device code travels: "host", "fatbin", "hsaco", "source", "metallib", "wgsl"
    device_code: str
    cuda_arches: list[str]
    # bytes StaticPlanBlockMemory planned per batched function, at max_batch_size
    memory_usage: dict[str, int]
    tree: LibraryTree | None = None
    medusa_cli_version: str = __version__
    # per kernel: {name, schedule, threads_per_block, blocks, registers, spill_bytes,
    # weight_bytes}; empty where the compiler made no report
    kernels: list[dict] = dataclasses.field(default_factory=list)

    @property
    def max_batch_size(self) -> int:
        return self.config.max_batch_size

    @property
    def params_bytes(self) -> int:
        total = 0
        for _, shape, dtype in self.params:
            count = 1
            for d in shape:
                count *= d
            total += count * _DTYPE_BYTES[dtype]
        return total

    def to_json(self) -> dict[str, Any]:
        c = self.config
        return {
            # MLC-LLM's fields
            "model_type": "medusa",
            "quantization": self.quantization,
            "context_window_size": c.context_window_size,
            "sliding_window_size": -1,
            "attention_sink_size": -1,
            "prefill_chunk_size": c.prefill_chunk_size,
            "tensor_parallel_shards": c.tensor_parallel_shards,
            "pipeline_parallel_stages": 1,
            "disaggregation": False,
            "kv_state_kind": "none",
            "max_batch_size": c.max_batch_size,
            "active_vocab_size": None,
            "params": [{"name": name, "shape": list(shape), "dtype": dtype, "preprocs": [],
                        "pipeline_stages": [0]} for name, shape, dtype in self.params],
            "memory_usage": self.memory_usage,
            # ours
            "dtype": self.dtype,
            "params_bytes": self.params_bytes,
            "model_config": c.to_dict(),
            "target": self.target,
            "target_name": self.target_name,
            "device_code": self.device_code,
            "cuda_arches": list(self.cuda_arches),
            "medusa_cli_version": self.medusa_cli_version,
            "tree": None if self.tree is None else {
                **describe(self.tree.tree, self.tree.topk),
                "paths": [list(path) for path in self.tree.tree.paths]},
            "kernels": self.kernels,
        }

    @classmethod
    def from_json(cls, data: Any, where: Path) -> "LibraryMetadata":
        """Validated metadata; InputError naming the library and what is wrong."""
        def fail(what: str) -> InputError:
            return InputError(f"{where}: its metadata {what}; rebuild it with `medusa compile`")

        if not isinstance(data, dict):
            raise fail("is not a JSON object")
        if data.get("model_type") != "medusa":
            raise InputError(f"{where}: model_type is {data.get('model_type')!r:.60}, not "
                             "'medusa'; pass a library built by `medusa compile`")
        missing = [k for k in ("model_config", "quantization", "dtype", "max_batch_size", "params")
                   if k not in data]
        if missing:
            raise fail(f"lacks {', '.join(missing)}")
        config = MedusaConfig.from_dict(data["model_config"], f"{where}: metadata model_config")
        if data["max_batch_size"] != config.max_batch_size:
            raise fail(f"says max_batch_size {data['max_batch_size']!r:.20} and model_config "
                       f"{config.max_batch_size}")
        if data["quantization"] not in SCHEMES:
            raise fail(f"names an unknown quantization {data['quantization']!r:.40}")
        if data["dtype"] != SCHEMES[data["quantization"]].model_dtype:
            raise fail(f"has dtype {data['dtype']!r:.20} for {data['quantization']}")
        params = []
        if not isinstance(data["params"], list):
            raise fail("has no list of params")
        for entry in data["params"]:
            try:
                name, shape, dtype = entry["name"], entry["shape"], entry["dtype"]
                ok = (isinstance(name, str) and isinstance(shape, list) and dtype in _DTYPE_BYTES
                      and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape))
            except (TypeError, KeyError):
                ok = False
            if not ok:
                raise fail(f"has a malformed parameter entry {entry!r:.80}")
            params.append(ParamSpec(name, tuple(shape), dtype))
        tree = None
        if data.get("tree") is not None:
            entry = data["tree"]
            try:
                topk = entry["topk"]
                paths = validate_paths(entry["paths"], topk, config.medusa_num_heads,
                                       source=f"{where} (metadata)")
                tree = LibraryTree(MedusaTree(name=str(entry["name"]), paths=paths), topk)
            except (KeyError, TypeError, InputError):
                raise fail("holds a malformed tree") from None
        target = data.get("target") if isinstance(data.get("target"), dict) else {"kind": "llvm"}
        memory = data.get("memory_usage") if isinstance(data.get("memory_usage"), dict) else {}
        kernels = data.get("kernels") if isinstance(data.get("kernels"), list) else []
        return cls(
            config=config, quantization=data["quantization"], dtype=data["dtype"], params=params,
            target=target, target_name=str(data.get("target_name", target.get("kind", "llvm"))),
            device_code=str(data.get("device_code", "host")),
            cuda_arches=[str(a) for a in data.get("cuda_arches") or []],
            memory_usage=memory, tree=tree,
            medusa_cli_version=str(data.get("medusa_cli_version", "?")), kernels=kernels)

    @property
    def target_kind(self) -> str:
        return str(self.target.get("kind", "llvm"))


def metadata_c_source(metadata: LibraryMetadata) -> str:
    """C source of the metadata string, linked into the library beside TVM's code."""
    encoded = (METADATA_MARKER + base64.b64encode(json.dumps(metadata.to_json()).encode())).decode()
    # short literal pieces: some compilers cap the length of a single string literal
    pieces = "\n".join(f'    "{encoded[i:i + 2000]}"' for i in range(0, len(encoded), 2000))
    return (
        "/* medusa-cli: the library's metadata, readable without loading it. */\n"
        "#ifdef __cplusplus\nextern \"C\" {\n#endif\n"
        "__attribute__((used)) extern const char medusa_cli_metadata[];\n"
        f"__attribute__((used)) const char medusa_cli_metadata[] =\n{pieces};\n"
        "#ifdef __cplusplus\n}\n#endif\n"
    )


def _decode_marked(data: bytes, where: Path) -> Any:
    """The JSON after the marker in a library's bytes (a string in a .so, literal pieces in the
    .c of a .tar); KeyError where there is no marker."""
    start = data.find(METADATA_MARKER)
    if start < 0:
        raise KeyError(METADATA_MARKER)
    start += len(METADATA_MARKER)
    match = re.compile(rb"[A-Za-z0-9+/=\"\s]*").match(data, start)
    encoded = re.sub(rb"[\"\s]", b"", match.group(0))
    try:
        return json.loads(base64.b64decode(encoded))
    except (ValueError, RecursionError):
        raise InputError(f"{where}: medusa metadata is corrupted; recompile the library") from None


def _read_marked(lib_path: Path) -> Any:
    if lib_path.suffix == SYSTEM_LIBRARY_SUFFIX:
        with tarfile.open(lib_path) as tar:
            member = tar.extractfile(METADATA_SOURCE)
            data = member.read(_MAX_METADATA_BYTES) if member is not None else b""
    else:
        data = lib_path.read_bytes()
    return _decode_marked(data, lib_path)


def read_library_metadata(lib_path: Path, load: bool = False) -> LibraryMetadata:
    """A library's metadata, read from the file without loading it. A library without our
    string (built by MLC-LLM, say) is loaded to call its `_metadata` function only with
    load=True: loading runs the library's constructors."""
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise InputError(f"{lib_path}: no such library; compile one with `medusa compile`")
    try:
        data = _read_marked(lib_path)
    except (KeyError, tarfile.TarError, OSError):
        if not load:
            raise InputError(
                f"{lib_path}: holds no medusa-cli metadata, so it was not built by `medusa "
                "compile`; it was not loaded (loading runs its code). Pass --load to load it and "
                "ask its _metadata function, if you trust it") from None
        data = _metadata_from_vm(lib_path)
    return LibraryMetadata.from_json(data, lib_path)


def _metadata_from_vm(lib_path: Path) -> Any:
    import tvm
    from tvm.runtime.vm import VirtualMachine

    try:
        module = tvm.runtime.load_module(str(lib_path))
        vm = VirtualMachine(module, tvm.cpu())
        return json.loads(str(vm[METADATA_FUNCTION]()))
    except Exception as exc:
        raise InputError(
            f"{lib_path}: cannot read its metadata ({error_gist(exc)}); is it a library from "
            "`medusa compile`?"
        ) from None
