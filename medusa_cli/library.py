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
import lzma
import mmap
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import InputError, error_gist
from .quantization import SCHEMES
from .spec import MedusaConfig, ParamSpec, param_specs
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


# Values the metadata repeats at its top level (MLC-LLM reads them there) from model_config.
_COPIED_FROM_MODEL_CONFIG = ("max_batch_size", "context_window_size", "prefill_chunk_size",
                             "tensor_parallel_shards")


def _same_int(value: Any, expected: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value == expected


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# What each optional field must be: (a check, its words for a message).
_OPTIONAL_FIELDS: dict[str, tuple[Any, str]] = {
    "target": (lambda v: isinstance(v, dict) and isinstance(v.get("kind", "llvm"), str),
               "a TVM target object with a string kind"),
    "target_name": (str, "a string"),
    "device_code": (str, "a string"),
    "cuda_arches": (lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v),
                    "a list of strings"),
    "memory_usage": (lambda v: isinstance(v, dict) and all(_is_count(n) for n in v.values()),
                     "an object of byte counts"),
    "kernels": (lambda v: isinstance(v, list) and all(isinstance(k, dict) for k in v),
                "a list of objects"),
    "medusa_cli_version": (str, "a string"),
}


def _is_a(value: Any, kind: Any) -> bool:
    return isinstance(value, kind) if isinstance(kind, type) else bool(kind(value))


def _params(entries: Any) -> list[ParamSpec] | None:
    """The metadata's parameter list as ParamSpecs; None where it is not a list of
    {name, shape, dtype} entries."""
    if not isinstance(entries, list):
        return None
    params = []
    for entry in entries:
        if not isinstance(entry, dict):
            return None
        name, shape, dtype = entry.get("name"), entry.get("shape"), entry.get("dtype")
        if not (isinstance(name, str) and isinstance(shape, list) and dtype in _DTYPE_BYTES
                and all(_is_count(d) for d in shape)):
            return None
        params.append(ParamSpec(name, tuple(shape), dtype))
    return params


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
        """Validated metadata; InputError naming the library and what is wrong. Everything the
        library claims is checked against everything else it claims: the parameter list must be
        spec.param_specs of its model_config and quantization, and the top-level copies of
        model_config's values must agree with it."""
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
        try:
            config = MedusaConfig.from_dict(data["model_config"], "model_config")
        except InputError as exc:
            raise fail(f"is invalid: {exc}") from None
        for key in _COPIED_FROM_MODEL_CONFIG:
            if key in data and not _same_int(data[key], getattr(config, key)):
                raise fail(f"says {key} {data[key]!r:.20} and model_config {getattr(config, key)}")
        if not isinstance(data["quantization"], str) or data["quantization"] not in SCHEMES:
            raise fail(f"names an unknown quantization {data['quantization']!r:.40}")
        scheme = SCHEMES[data["quantization"]]
        if data["dtype"] != scheme.model_dtype:
            raise fail(f"has dtype {data['dtype']!r:.20} for {scheme.name}")
        params = _params(data["params"])
        if params is None or params != param_specs(config, scheme):
            raise fail(f"lists params that are not those of its model_config under {scheme.name} "
                       f"({len(param_specs(config, scheme))} tensors)")
        tree = None
        if data.get("tree") is not None:
            entry = data["tree"]
            try:
                topk = entry["topk"]
                paths = validate_paths(entry["paths"], topk, config.medusa_num_heads,
                                       source=f"{where} (metadata)")
                if not isinstance(entry["name"], str):
                    raise TypeError("tree name")
                tree = LibraryTree(MedusaTree(name=entry["name"], paths=paths), topk)
            except (KeyError, TypeError, InputError):
                raise fail("holds a malformed tree") from None
        for key, (kind, words) in _OPTIONAL_FIELDS.items():
            if key in data and not _is_a(data[key], kind):
                raise fail(f"has {key} {data[key]!r:.60}, expected {words}")
        target = data.get("target", {"kind": "llvm"})
        return cls(
            config=config, quantization=scheme.name, dtype=data["dtype"], params=params,
            target=target, target_name=data.get("target_name", str(target.get("kind", "llvm"))),
            device_code=data.get("device_code", "host"),
            cuda_arches=list(data.get("cuda_arches", [])),
            memory_usage=dict(data.get("memory_usage", {})), tree=tree,
            medusa_cli_version=data.get("medusa_cli_version", "?"),
            kernels=list(data.get("kernels", [])))

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


_ENCODED = re.compile(rb"[A-Za-z0-9+/=\"\s]*")


def _decode_marked(data: bytes | mmap.mmap, where: Path) -> Any:
    """The JSON after the marker in a library's bytes (a string in a .so, literal pieces in the
    .c of a .tar); KeyError where there is no marker."""
    start = data.find(METADATA_MARKER)
    if start < 0:
        raise KeyError(METADATA_MARKER)
    start += len(METADATA_MARKER)
    match = _ENCODED.match(data, start, start + 2 * _MAX_METADATA_BYTES)
    encoded = re.sub(rb"[\"\s]", b"", match.group(0))
    try:
        return json.loads(base64.b64decode(encoded))
    except (ValueError, RecursionError):
        raise InputError(f"{where}: its medusa metadata is corrupted (not base64 of a JSON "
                         "text); recompile the library") from None


def _read_marked(lib_path: Path) -> Any:
    """The metadata after our marker, from the file's bytes: a shared library is mapped, not
    read into memory; a .tar's C source is read up to _MAX_METADATA_BYTES."""
    if lib_path.suffix == SYSTEM_LIBRARY_SUFFIX:
        try:
            with tarfile.open(lib_path) as tar:
                member = tar.extractfile(METADATA_SOURCE)
                data = member.read(_MAX_METADATA_BYTES) if member is not None else b""
        except (EOFError, zlib.error, lzma.LZMAError, ValueError) as exc:  # a corrupt archive
            raise tarfile.TarError(str(exc)) from None
        return _decode_marked(data, lib_path)
    with open(lib_path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise KeyError(METADATA_MARKER)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return _decode_marked(mapped, lib_path)


def read_library_metadata(lib_path: Path, load: bool = False) -> LibraryMetadata:
    """A library's metadata, read from the file without loading it. A library without our
    string (built by MLC-LLM, say) is loaded to call its `_metadata` function only with
    load=True: loading runs the library's constructors."""
    lib_path = Path(lib_path)
    if not lib_path.exists():
        raise InputError(f"{lib_path}: no such library; compile one with `medusa compile`")
    if not lib_path.is_file():
        raise InputError(f"{lib_path}: not a regular file; pass a library built by `medusa compile`")
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
