"""Safetensors files, read one tensor at a time and written tensor by tensor.

The header is checked the way the reference implementation checks it before any tensor is
touched: a JSON object of at most 100 MB, no duplicate names, known dtypes, shapes of
non-negative integers, and data offsets that tile the data section exactly (sorted, contiguous,
no overlap, no gap, ending at the end of the file).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..dtypes import NUMPY_DTYPES
from ..errors import CheckpointError

# Real headers are kilobytes; the reference reader refuses more than 100 MB.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype code -> TVM/numpy dtype name
DTYPE_CODES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
               "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
               "U16": "uint16", "U32": "uint32", "BOOL": "bool"}
CODE_OF_DTYPE = {name: code for code, name in DTYPE_CODES.items()}


class FileRegion(NamedTuple):
    """Bytes [offset, offset + nbytes) of an open file: where a tensor's bytes are stored."""

    fd: int
    offset: int
    nbytes: int


def map_file_region(fd: int, offset: int, nbytes: int) -> np.ndarray:
    """uint8 view of bytes [offset, offset + nbytes) of an open file, memory-mapped read-only.

    The mapping lives exactly as long as the returned array (and views of it). Mapping one
    region at a time keeps the RSS bounded: mapped pages count in the RSS while the mapping
    lives.
    """
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    region = mmap.mmap(fd, offset + nbytes - start, offset=start, access=mmap.ACCESS_READ)
    return np.frombuffer(region, dtype=np.uint8, count=nbytes, offset=offset - start)


class _Entry(NamedTuple):
    dtype: np.dtype
    shape: tuple[int, ...]
    # absolute offset in the file, and length
    offset: int
    nbytes: int


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"tensor '{key:.200}' appears twice in the header")
        seen[key] = value
    return seen


# Dimensions, element counts and offsets must fit in int64, as numpy and torch index them: a
# shape whose count only Python's integers can hold (or one that wraps to zero in int64, such as
# [2**64, 0]) describes no array anyone wrote.
INT64_LIMIT = 1 << 63


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < INT64_LIMIT


def fits_int64(shape) -> bool:
    """The shape's non-zero dimensions multiply to an int64 (so does the element count)."""
    product = 1
    for d in shape:
        product *= max(d, 1)
        if product >= INT64_LIMIT:
            return False
    return True


def parse_header(header: dict, data_bytes: int) -> dict[str, _Entry]:
    """Validated entries of a header whose data section holds `data_bytes`; ValueError on any
    problem, naming the tensor."""
    entries: dict[str, _Entry] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise ValueError("__metadata__ is not an object")
            continue
        if not isinstance(info, dict):
            raise ValueError(f"tensor '{name:.200}': entry is a {type(info).__name__}, not an object")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(code, str) or code not in DTYPE_CODES:
            raise ValueError(f"tensor '{name:.200}': unsupported dtype {code!r:.40}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise ValueError(f"tensor '{name:.200}': shape {shape!r:.80} is not a list of non-negative "
                             "int64 integers")
        if not fits_int64(shape):
            raise ValueError(f"tensor '{name:.200}': shape {shape!r:.80} is too large (its element "
                             "count does not fit in int64)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise ValueError(f"tensor '{name:.200}': data_offsets {offsets!r:.80} are not two "
                             "non-negative int64 integers [begin, end]")
        dtype = NUMPY_DTYPES[DTYPE_CODES[code]]
        elements = 1
        for d in shape:  # Python integers: no overflow, however hostile the shape
            elements *= d
        begin, end = offsets
        if end - begin != elements * dtype.itemsize:
            raise ValueError(f"tensor '{name:.200}': data_offsets {begin}..{end} hold {end - begin} "
                             f"bytes, shape {shape} {code} needs {elements * dtype.itemsize}")
        entries[name] = _Entry(dtype, tuple(shape), begin, end - begin)
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise ValueError(f"tensor '{name:.200}': data_offsets {begin}..{end} {what} (expected to "
                             f"start at {position})")
        position = end
    if position != data_bytes:
        raise ValueError(f"the tensors hold {position} bytes but the data section has {data_bytes}")
    return entries


class SafetensorsFile:
    """A safetensors file read one tensor at a time, each mapped only while it is in use."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None
        try:
            self._file = open(self.path, "rb")
            self._entries = self._read_header()
        except (OSError, ValueError, RecursionError, UnicodeDecodeError) as exc:
            self.close()
            # the whole message: ours name the tensor, whose name may hold a newline
            reason = "the header nests too deep" if isinstance(exc, RecursionError) else \
                (str(exc).strip() or type(exc).__name__)
            raise CheckpointError(
                f"{self.path}: not a readable safetensors file ({reason}); it may be truncated "
                "or corrupt, download it again"
            ) from None

    def _read_header(self) -> dict[str, _Entry]:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise ValueError("file shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or header_len > size - 8:
            raise ValueError(f"header length {header_len} exceeds the file size {size} or "
                             f"the {MAX_HEADER_BYTES}-byte limit")
        text = self._file.read(header_len)
        if not text.startswith(b"{"):
            raise ValueError("the header is not a JSON object")
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        data_start = 8 + header_len
        entries = parse_header(header, size - data_start)
        return {name: e._replace(offset=data_start + e.offset) for name, e in entries.items()}

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name].dtype

    def get_tensor(self, name: str) -> np.ndarray:
        """A read-only array over the tensor's bytes, mapped from the file for as long as the
        array lives: no copy, and the pages leave the RSS once the caller drops it."""
        entry = self._entries[name]
        if entry.nbytes == 0:
            return np.empty(entry.shape, dtype=entry.dtype)
        mapped = map_file_region(self._file.fileno(), entry.offset, entry.nbytes)
        return mapped.view(entry.dtype).reshape(entry.shape)

    def region(self, name: str) -> FileRegion:
        """Where the tensor's bytes are in the file (open while this file is)."""
        entry = self._entries[name]
        return FileRegion(self._file.fileno(), entry.offset, entry.nbytes)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_safetensors(path: Path, specs) -> int:
    """A safetensors file written tensor by tensor: specs are (name, shape, dtype name, make),
    make() returning the array when its turn comes. Returns the file size."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in specs:
        elements = 1
        for d in shape:
            elements *= int(d)
        nbytes = elements * NUMPY_DTYPES[dtype].itemsize
        header[name] = {"dtype": CODE_OF_DTYPE[dtype], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, shape, dtype, make in specs:
            array = np.ascontiguousarray(make(), dtype=NUMPY_DTYPES[dtype]).reshape(-1)
            f.write(memoryview(array.view(np.uint8)))
    return Path(path).stat().st_size
