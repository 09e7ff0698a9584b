"""Reading Medusa head checkpoints in every published layout and file format.

Layouts are one table of name templates (LAYOUTS). A checkpoint is opened lazily: only
headers and pickles are read up front; tensor data is read one tensor at a time by
`Checkpoint.read`, so base-model tensors mixed into a Medusa-2 file are never loaded.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .config import MedusaConfig, param_count
from .errors import CheckpointError, InputError

# Roles of a head tensor. Templates use {h} for the head and {l} for the ResBlock;
# {L} is the lm_head's slot, which equals medusa_num_layers in the FasterDecoding layout.
LAYER_WEIGHT = "layer_weight"
LAYER_BIAS = "layer_bias"
LM_HEAD = "lm_head"


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    description: str
    layer_weight: str
    layer_bias: str
    lm_head: str
    # True where head tensors share the file with a base model's tensors, which are skipped
    mixed_with_base: bool = False
    # Optional prefixes some exports put before every name of this layout
    optional_prefixes: tuple[str, ...] = ()

    def templates(self) -> dict[str, str]:
        return {LAYER_WEIGHT: self.layer_weight, LAYER_BIAS: self.layer_bias, LM_HEAD: self.lm_head}


LAYOUTS: tuple[Layout, ...] = (
    # FasterDecoding/Medusa v1 heads: medusa_lm_head.pt / medusa_lm_head.safetensors
    Layout("medusa1", "FasterDecoding Medusa-1 heads (medusa_lm_head.pt/.safetensors)",
           "{h}.{l}.linear.weight", "{h}.{l}.linear.bias", "{h}.{L}.weight"),
    # FasterDecoding Medusa-2: the whole fine-tuned model with heads under medusa_head.
    Layout("medusa2", "Medusa-2 full model; heads under medusa_head., base tensors ignored",
           "medusa_head.{h}.{l}.linear.weight", "medusa_head.{h}.{l}.linear.bias",
           "medusa_head.{h}.{L}.weight", mixed_with_base=True),
    # NVIDIA TensorRT-LLM / ModelOpt Medusa export
    Layout("trtllm", "TensorRT-LLM / ModelOpt Medusa heads",
           "medusa_heads.{h}.medusa_layers.{l}.linear.weight",
           "medusa_heads.{h}.medusa_layers.{l}.linear.bias", "medusa_heads.{h}.lm_head.weight"),
    # vLLM's Medusa draft model (vllm/model_executor/models/medusa.py); its loader strips a
    # leading "medusa_heads." that some exports carry
    Layout("vllm", "vLLM Medusa draft model", "blocks.{h}.layers.{l}.weight",
           "blocks.{h}.layers.{l}.bias", "lm_heads.{h}.weight",
           optional_prefixes=("medusa_heads.",)),
    # MLC-LLM parameter names: what `medusa convert` writes
    Layout("mlc", "MLC-LLM parameter names (medusa convert's output names)",
           "medusa_head.{h}.{l}.linear.weight", "medusa_head.{h}.{l}.linear.bias",
           "medusa_head.{h}.{L}.weight"),
)
LAYOUT_NAMES = tuple(layout.name for layout in LAYOUTS)

# The base model's output projection, used for heads that have none of their own.
BASE_LM_HEAD_NAMES = ("lm_head.weight", "model.lm_head.weight")

# config.json keys under every published spelling, first match wins.
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "medusa_num_heads": ("medusa_num_heads", "num_medusa_heads", "num_heads"),
    "medusa_num_layers": ("medusa_num_layers", "num_medusa_layers", "num_hidden_layers"),
    "hidden_size": ("hidden_size",),
    "vocab_size": ("vocab_size",),
    "base_model_name_or_path": ("base_model_name_or_path", "base_model"),
    # vLLM: one lm_heads.0 shared by every head
    "original_lm_head": ("original_lm_head",),
}

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def _template_regex(template: str, optional_prefixes: tuple[str, ...] = ()) -> re.Pattern[str]:
    pattern = re.escape(template)
    pattern = pattern.replace(r"\{h\}", r"(?P<h>\d+)")
    pattern = pattern.replace(r"\{l\}", r"(?P<l>\d+)").replace(r"\{L\}", r"(?P<l>\d+)")
    prefix = "".join(f"(?:{re.escape(p)})?" for p in optional_prefixes)
    return re.compile(f"^{prefix}{pattern}$")


_LAYOUT_REGEXES: dict[str, dict[str, re.Pattern[str]]] = {
    layout.name: {role: _template_regex(t, layout.optional_prefixes) for role, t in layout.templates().items()}
    for layout in LAYOUTS
}


def get_layout(name: str) -> Layout:
    for layout in LAYOUTS:
        if layout.name == name:
            return layout
    raise InputError(f"unknown layout '{name}'; choose one of: auto, {', '.join(LAYOUT_NAMES)} (--layout)")


@dataclasses.dataclass(frozen=True)
class HeadTensor:
    role: str
    head: int
    # ResBlock index for layer tensors; the slot index (or None) for lm_head
    layer: int | None
    name: str


def match_name(layout: Layout, name: str) -> HeadTensor | None:
    for role, regex in _LAYOUT_REGEXES[layout.name].items():
        m = regex.match(name)
        if m:
            layer = m.groupdict().get("l")
            return HeadTensor(role, int(m["h"]), int(layer) if layer is not None else None, name)
    return None


# ---------------------------------------------------------------------------------------------
# Files


class FileRegion(NamedTuple):
    """Bytes [offset, offset + nbytes) of an open file: where a tensor's bytes are stored."""

    fd: int
    offset: int
    nbytes: int


def map_file_region(fd: int, offset: int, nbytes: int) -> np.ndarray:
    """uint8 view of bytes [offset, offset + nbytes) of an open file, memory-mapped read-only.

    The mapping lives exactly as long as the returned array (and views of it). Mapping one
    region at a time keeps the RSS bounded: pages of a mapped file count in the RSS while the
    mapping lives, so mapping a whole 1.5 GB checkpoint for the length of a conversion (as
    safetensors' safe_open does) grows it by 1.5 GB.
    """
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    region = mmap.mmap(fd, offset + nbytes - start, offset=start, access=mmap.ACCESS_READ)
    return np.frombuffer(region, dtype=np.uint8, count=nbytes, offset=offset - start)


# bytes per window of mapped_windows: large enough that a call per window costs nothing, small
# enough to bound the RSS
MAP_WINDOW = 1 << 24


def mapped_windows(fd: int, offset: int, nbytes: int, window: int = MAP_WINDOW) -> Iterator[np.ndarray]:
    """Bytes [offset, offset + nbytes) of an open file as consecutive mapped uint8 windows of at
    most `window` bytes, each unmapped once the caller drops it (a bounded RSS for one pass)."""
    for start in range(0, nbytes, window):
        yield map_file_region(fd, offset + start, min(window, nbytes - start))


class _SafetensorsFile:
    """A safetensors file read one tensor at a time, each mapped only while it is in use.

    A mapped tensor costs no copy into fresh memory: the kernel's page-cache pages are used as
    they are.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = open(path, "rb")
            self._entries = self._read_header()
        except CheckpointError:
            self.close()
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.close()
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({_first_line(exc)}); "
                "it may be truncated or corrupt, download it again"
            ) from None

    def _read_header(self) -> dict[str, tuple[np.dtype, tuple[int, ...], int, int]]:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise ValueError("file shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > _MAX_HEADER_BYTES:
            raise ValueError(f"header length {header_len} exceeds the file size {size}")
        header = json.loads(self._file.read(header_len))
        data_start = 8 + header_len
        entries = {}
        data_end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _safetensors_dtype(info["dtype"], self.path, name)
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise ValueError(f"tensor '{name}': data_offsets {begin}..{end} do not fit shape {list(shape)}")
            entries[name] = (dtype, shape, data_start + begin, end - begin)
            data_end = max(data_end, end)
        if data_start + data_end > size:
            raise ValueError(f"file is {size} bytes but its header needs {data_start + data_end}")
        return entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get_tensor(self, name: str) -> np.ndarray:
        """A read-only array over the tensor's bytes, mapped from the file for as long as the
        array lives: no copy, and the pages leave the RSS once the caller drops it."""
        dtype, shape, offset, nbytes = self._entries[name]
        if nbytes == 0:
            return np.empty(shape, dtype=dtype)
        return map_file_region(self._file.fileno(), offset, nbytes).view(dtype).reshape(shape)

    def region(self, name: str) -> FileRegion:
        """Where the tensor's bytes are in the file (open while this file is)."""
        _, _, offset, nbytes = self._entries[name]
        return FileRegion(self._file.fileno(), offset, nbytes)

    def close(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None


# Real headers are kilobytes; refuse absurd lengths before allocating for them.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                       "BOOL": "bool"}


def _safetensors_dtype(code: str, path: Path, name: str) -> np.dtype:
    if code not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {code}")
    from .tensor_cache import numpy_dtype

    return numpy_dtype(_SAFETENSORS_DTYPES[code])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _open_file(path: Path):
    if path.name.endswith(SAFETENSORS_SUFFIXES):
        return _SafetensorsFile(path)
    if path.name.endswith(TORCH_SUFFIXES):
        from .torch_format import TorchCheckpoint

        return TorchCheckpoint(path)
    raise CheckpointError(
        f"{path}: unsupported weights file; expected .safetensors, .pt, .pth or .bin"
    )


def _index_files(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: not a valid shard index ({_first_line(exc)})") from None
    files = []
    for shard in weight_map.values():
        path = index_path.parent / shard
        if path not in files:
            files.append(path)
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path}: lists shard {missing[0].name}, which is missing from {index_path.parent}"
        )
    return files


def discover_weight_files(src: Path) -> list[Path]:
    """The weight files of a checkpoint: a single file, an index's shards, or a directory's files.

    Safetensors are preferred over PyTorch files when a directory holds both.
    """
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or directory")
    if src.is_file():
        if src.name.endswith(".index.json"):
            return _index_files(src)
        return [src]
    for pattern in ("*.safetensors.index.json", "*.bin.index.json", "*.pt.index.json"):
        indexes = sorted(src.glob(pattern))
        if indexes:
            return _index_files(indexes[0])
    for suffixes in (SAFETENSORS_SUFFIXES, TORCH_SUFFIXES):
        files = sorted(p for p in src.iterdir() if p.is_file() and p.name.endswith(suffixes))
        if files:
            return files
    raise CheckpointError(
        f"{src}: no weights found (looked for *.safetensors, *.pt, *.pth, *.bin and shard indexes)"
    )


def read_config_hints(src: Path) -> tuple[Path | None, dict[str, Any]]:
    """config.json beside the weights, normalised to MedusaConfig names (a hint, not the truth)."""
    src = Path(src)
    folder = src if src.is_dir() else src.parent
    path = folder / "config.json"
    if not path.is_file():
        return None, {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({_first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    # Some exports nest the Medusa fields (e.g. {"medusa": {...}}); search both levels.
    scopes = [raw] + [v for v in raw.values() if isinstance(v, dict)]
    hints = {}
    for field, spellings in CONFIG_KEYS.items():
        for scope in scopes:
            value = next((scope[k] for k in spellings if k in scope), None)
            if value is not None:
                hints[field] = value
                break
    return path, hints


class Checkpoint:
    """All tensors of one checkpoint, across its files, read lazily."""

    def __init__(self, src: Path):
        self.src = Path(src)
        self.files = discover_weight_files(self.src)
        self._readers = []
        self._where: dict[str, Any] = {}
        try:
            for path in self.files:
                reader = _open_file(path)
                self._readers.append(reader)
                for name in reader.keys():
                    if name in self._where:
                        raise CheckpointError(
                            f"tensor '{name}' appears in both {self._where[name].path} and {path}"
                        )
                    self._where[name] = reader
        except BaseException:
            self.close()
            raise

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._where[name].shape(name))

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shape(name), dtype=np.int64)) * self.dtype(name).itemsize

    def file_of(self, name: str) -> Path:
        return self._where[name].path

    def read(self, name: str) -> np.ndarray:
        return self._where[name].get_tensor(name)

    def region(self, name: str) -> FileRegion | None:
        """Where the tensor's bytes lie, as stored, in its file; None where they do not lie as
        one run (PyTorch files are read through the zip reader)."""
        source = self._where[name]
        return source.region(name) if isinstance(source, _SafetensorsFile) else None

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
        self._readers = []

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Layout detection and head structure


@dataclasses.dataclass
class HeadPlan:
    """Where every tensor of the heads comes from, and the shapes inferred from them."""

    layout: Layout
    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    # per head: [(weight name, bias name or None)] * num_layers
    layers: list[list[tuple[str, str | None]]]
    # per head: (checkpoint key, tensor name); the key is "checkpoint" or "lm_head_file"
    lm_heads: list[tuple[str, str]]
    # names in the checkpoint that belong to no head (base model tensors)
    ignored: int
    source_dtype: np.dtype

    def param_count(self) -> int:
        """Parameters of the unquantized heads, zero biases included."""
        return param_count(MedusaConfig(self.num_heads, self.num_layers, self.hidden_size, self.vocab_size))

    def head_tensor_names(self) -> list[str]:
        names = []
        for h in range(self.num_heads):
            for weight, bias in self.layers[h]:
                names.append(weight)
                if bias:
                    names.append(bias)
        return names


def detect_layout(names: list[str]) -> Layout:
    """The layout whose templates match the most names; a Medusa-2 file also holds base tensors."""
    scores = []
    for layout in LAYOUTS:
        matched = sum(1 for n in names if match_name(layout, n) is not None)
        scores.append((matched, layout))
    best = max(matched for matched, _ in scores)
    if best == 0:
        shown = ", ".join(names[:5]) or "(no tensors)"
        raise CheckpointError(
            f"no Medusa head tensors recognised; first names: {shown}. "
            f"Known layouts: {', '.join(LAYOUT_NAMES)} (force one with --layout)"
        )
    candidates = [layout for matched, layout in scores if matched == best]
    has_foreign = best < len(names)
    # Identical templates (medusa2 and mlc) differ only in whether base tensors ride along.
    for layout in candidates:
        if layout.mixed_with_base == has_foreign:
            return layout
    return candidates[0]


def check_mixed_layouts(names: list[str], chosen: Layout) -> None:
    """Refuse a checkpoint that holds head tensors of two different layouts."""
    chosen_templates = chosen.templates()
    for layout in LAYOUTS:
        if layout.templates() == chosen_templates:
            continue
        other = [n for n in names if match_name(layout, n) and not match_name(chosen, n)]
        if other:
            raise CheckpointError(
                f"mixed layouts: tensors of '{chosen.name}' and of '{layout.name}' "
                f"(e.g. '{other[0]}') in one checkpoint; keep one set, or force one with --layout"
            )


def plan_heads(
    ckpt: Checkpoint,
    layout: Layout,
    lm_head_source: "Checkpoint | None" = None,
    num_heads: int | None = None,
    shared_lm_head: bool = False,
) -> HeadPlan:
    """Map every head tensor of `layout` in ckpt; shared_lm_head: heads without a vocab
    projection reuse head 0's (vLLM's original_lm_head)."""
    if "token_map" in ckpt:
        raise CheckpointError(
            f"{ckpt.file_of('token_map')}: has a 'token_map' (a vLLM truncated draft vocabulary); "
            "its heads score a subset of the vocabulary, which the Medusa model does not support. "
            "Export the heads with their full lm_heads"
        )
    found: dict[tuple[str, int, int | None], str] = {}
    ignored = 0
    for name in ckpt.names():
        tensor = match_name(layout, name)
        if tensor is None:
            ignored += 1
            continue
        found[(tensor.role, tensor.head, tensor.layer)] = name

    heads = sorted({h for (_, h, _) in found})
    if not heads:
        raise CheckpointError(
            f"{ckpt.src}: no tensors of layout '{layout.name}' "
            f"(expected names like '{layout.layer_weight.format(h=0, l=0)}'); try --layout auto"
        )
    missing_heads = sorted(set(range(heads[-1] + 1)) - set(heads))
    if missing_heads:
        raise CheckpointError(f"{ckpt.src}: heads {heads} found but head {missing_heads[0]} is missing")
    available = len(heads)
    if num_heads is not None:
        if num_heads < 1 or num_heads > available:
            raise InputError(f"--num-heads {num_heads}: the checkpoint has {available} heads (1..{available})")
    count = num_heads or available

    layer_sets = [sorted(l for (role, h, l) in found if role == LAYER_WEIGHT and h == head)
                  for head in range(available)]
    num_layers = len(layer_sets[0])
    for head, layer_ids in enumerate(layer_sets):
        if layer_ids != list(range(num_layers)):
            expected = [layout.layer_weight.format(h=head, l=i) for i in range(num_layers)]
            have = {layout.layer_weight.format(h=head, l=i) for i in layer_ids}
            gaps = [n for n in expected if n not in have] or [f"{len(layer_ids)} ResBlocks"]
            raise CheckpointError(
                f"{ckpt.src}: head {head} has ResBlocks {layer_ids}, head 0 has {num_layers}; "
                f"missing tensors: {', '.join(gaps[:3])}"
            )

    layers = []
    for head in range(count):
        row = []
        for i in range(num_layers):
            weight = found[(LAYER_WEIGHT, head, i)]
            row.append((weight, found.get((LAYER_BIAS, head, i))))
        layers.append(row)

    lm_heads = []
    base_name = next((n for n in BASE_LM_HEAD_NAMES if n in ckpt), None)
    for head in range(count):
        slot = num_layers if "{L}" in layout.lm_head else None
        own = found.get((LM_HEAD, head, slot))
        if own is None and shared_lm_head:
            own = found.get((LM_HEAD, 0, slot))
        if own is not None:
            lm_heads.append(("checkpoint", own))
        elif base_name is not None:
            lm_heads.append(("checkpoint", base_name))
        elif lm_head_source is not None:
            name = next((n for n in BASE_LM_HEAD_NAMES if n in lm_head_source), None)
            if name is None:
                raise CheckpointError(
                    f"{lm_head_source.src}: no 'lm_head.weight' in the file given by --lm-head"
                )
            lm_heads.append(("lm_head_file", name))
        else:
            expected = layout.lm_head.format(h=head, L=num_layers)
            raise CheckpointError(
                f"{ckpt.src}: head {head} has no vocab projection ('{expected}') and the checkpoint "
                "has no 'lm_head.weight'; pass the base model's weights file with --lm-head FILE"
            )

    def source_of(key: str) -> Checkpoint:
        return ckpt if key == "checkpoint" else lm_head_source  # type: ignore[return-value]

    first_lm = source_of(lm_heads[0][0]).shape(lm_heads[0][1])
    if len(first_lm) != 2:
        raise CheckpointError(f"'{lm_heads[0][1]}' has shape {list(first_lm)}, expected [vocab, hidden]")
    vocab_size, hidden_size = first_lm

    def expect(source: Checkpoint, name: str, shape: tuple[int, ...]) -> None:
        found_shape = source.shape(name)
        if found_shape != shape:
            raise CheckpointError(
                f"{source.file_of(name)}: tensor '{name}' has shape {list(found_shape)}, "
                f"expected {list(shape)} (hidden_size {hidden_size}, vocab_size {vocab_size} "
                "from head 0)"
            )

    for head in range(count):
        for weight, bias in layers[head]:
            expect(ckpt, weight, (hidden_size, hidden_size))
            if bias is not None:
                expect(ckpt, bias, (hidden_size,))
        key, name = lm_heads[head]
        expect(source_of(key), name, (vocab_size, hidden_size))

    first_tensor = layers[0][0][0] if num_layers else lm_heads[0][1]
    first_source = ckpt if num_layers else source_of(lm_heads[0][0])
    source_dtype = first_source.dtype(first_tensor)
    for head in range(count):
        for weight, bias in layers[head]:
            for name in (weight, bias):
                if name is not None and not np.issubdtype(ckpt.dtype(name), np.floating) \
                        and str(ckpt.dtype(name)) != "bfloat16":
                    raise CheckpointError(
                        f"{ckpt.file_of(name)}: tensor '{name}' has dtype {ckpt.dtype(name)}, "
                        "expected float32, float16 or bfloat16"
                    )

    return HeadPlan(
        layout=layout,
        num_heads=count,
        num_layers=num_layers,
        hidden_size=int(hidden_size),
        vocab_size=int(vocab_size),
        layers=layers,
        lm_heads=lm_heads,
        ignored=ignored,
        source_dtype=np.dtype(source_dtype),
    )


def iter_head_tensors(
    plan: HeadPlan, ckpt: Checkpoint, lm_head_source: Checkpoint | None = None
) -> Iterator[tuple[str, np.ndarray, str, FileRegion | None]]:
    """(MLC name, array, source name, where its bytes are stored or None) for every head
    tensor, one at a time, in model order.

    A missing ResBlock bias comes out as zeros in the source dtype.
    """
    for head in range(plan.num_heads):
        for i, (weight, bias) in enumerate(plan.layers[head]):
            prefix = f"medusa_head.{head}.{i}.linear"
            yield f"{prefix}.weight", ckpt.read(weight), weight, ckpt.region(weight)
            if bias is None:
                zeros = np.zeros(plan.hidden_size, dtype=plan.source_dtype)
                yield f"{prefix}.bias", zeros, "(zero bias)", None
            else:
                yield f"{prefix}.bias", ckpt.read(bias), bias, ckpt.region(bias)
        key, name = plan.lm_heads[head]
        source = ckpt if key == "checkpoint" else lm_head_source
        yield (f"medusa_head.{head}.{plan.num_layers}.weight", source.read(name), name,
               source.region(name))
