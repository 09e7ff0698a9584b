"""The packed parameter format of MLC-LLM and tvm.contrib.tvmjs: tensor-cache.json + params_shard_N.bin.

Tensors are written as they arrive, one at a time; a shard is closed once the next tensor
would take it past the cap, and is then synced and hashed (md5, the schema's checksum) on a
thread while the next one is written. Every tensor is stored "raw" (never tvmjs' default
f32-to-bf16). A tensor kept exactly as the source stores it is copied file to file with
copy_file_range (in the kernel, as `cp` does), not through Python.

Everything read back from a tensor-cache.json is validated before it is used: types, signs,
sizes against the shard files, and shard names that stay inside the directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..checkpoint.safetensors import FileRegion, map_file_region
from ..dtypes import NUMPY_DTYPES, dtype_name
from ..errors import ParamsError

TENSOR_CACHE_FILE = "tensor-cache.json"
SHARD_CAP_BYTES = 32 * 1024 * 1024
# bytes per mapped window when hashing or copying through Python: a call per window costs
# nothing, and the RSS stays bounded
_WINDOW = 1 << 24
_MAX_MANIFEST_BYTES = 256 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    byte_offset: int
    shard: str


@dataclasses.dataclass(frozen=True)
class ShardRecord:
    # file name inside the params directory
    data_path: str
    nbytes: int
    # None where tensor-cache.json records none
    md5sum: str | None


@dataclasses.dataclass
class TensorCache:
    """The contents of a tensor-cache.json: its metadata and every tensor's place."""

    metadata: dict
    shards: list[ShardRecord]
    tensors: list[TensorRecord]

    @property
    def param_bytes(self) -> int:
        return sum(shard.nbytes for shard in self.shards)

    def by_name(self) -> dict[str, TensorRecord]:
        return {t.name: t for t in self.tensors}


def _windows(fd: int, offset: int, nbytes: int):
    for start in range(0, nbytes, _WINDOW):
        yield map_file_region(fd, offset + start, min(_WINDOW, nbytes - start))


def md5_file(path: Path) -> str:
    """The file's md5, hashed through mapped windows (hashlib releases the GIL: files hash side
    by side on threads)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for window in _windows(f.fileno(), 0, os.fstat(f.fileno()).st_size):
            digest.update(window)
    return digest.hexdigest()


def md5_files(paths: list[Path]) -> list[str]:
    """md5 of each file, a thread per core."""
    if len(paths) <= 1:
        return [md5_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(md5_file, paths))


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """A write may take fewer bytes than given (Linux: at most 2 GiB per call)."""
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _copy_region(source: FileRegion, fd_out: int, offset_out: int) -> None:
    """The region's bytes to fd_out at offset_out: copy_file_range where the kernel and file
    system allow it (EXDEV, ENOSYS, EINVAL...: what was copied stays), the rest through mapped
    windows. A source that ends early is an error that says so."""
    copy = getattr(os, "copy_file_range", None)
    done = 0
    try:
        while copy is not None and done < source.nbytes:
            n = copy(source.fd, fd_out, source.nbytes - done, source.offset + done, offset_out + done)
            if n == 0:
                break
            done += n
    except OSError:
        pass
    if done < source.nbytes and os.fstat(source.fd).st_size < source.offset + source.nbytes:
        raise OSError(f"source file ended at byte {os.fstat(source.fd).st_size}, inside a tensor; "
                      "was it truncated during the conversion?")
    for window in _windows(source.fd, source.offset + done, source.nbytes - done):
        _pwrite_all(fd_out, memoryview(window), offset_out + done)
        done += len(window)


def _finish_shard(path: Path, fd: int) -> str:
    """Sync a complete shard, close it and return its md5."""
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return md5_file(path)


class _ShardWriter:
    def __init__(self, out_dir: Path, index: int):
        self.name = f"params_shard_{index}.bin"
        self.path = out_dir / self.name
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self.nbytes = 0
        self.records: list[dict] = []
        self.md5: Future | None = None

    def append(self, name: str, array: np.ndarray, source: FileRegion | None) -> TensorRecord:
        """source: where the array's exact bytes are stored in an open file, copied file to
        file; None writes the array."""
        data = np.ascontiguousarray(array)
        if source is not None:
            _copy_region(source, self.fd, self.nbytes)
        else:
            _pwrite_all(self.fd, memoryview(data.reshape(-1).view(np.uint8)), self.nbytes)
        record = TensorRecord(name=name, shape=tuple(int(d) for d in data.shape),
                              dtype=dtype_name(data.dtype), nbytes=data.nbytes,
                              byte_offset=self.nbytes, shard=self.name)
        self.nbytes += data.nbytes
        self.records.append({"name": record.name, "shape": list(record.shape),
                             "dtype": record.dtype, "format": "raw", "nbytes": record.nbytes,
                             "byteOffset": record.byte_offset})
        return record

    def close(self, pool: ThreadPoolExecutor) -> None:
        fd, self.fd = self.fd, None
        self.md5 = pool.submit(_finish_shard, self.path, fd)

    def abandon(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def write_tensor_cache(
    out_dir: Path,
    tensors: Iterable[tuple],
    source_param_count: int | None = None,
    shard_cap_bytes: int = SHARD_CAP_BYTES,
    progress: Callable[[int], None] | None = None,
) -> TensorCache:
    """Write `tensors` (consumed one at a time) into out_dir, then tensor-cache.json.

    tensors: (name, array) or (name, array, source), source (a FileRegion of an open file, or
    None) holding exactly the array's bytes, copied file to file. source_param_count: parameters
    of the unquantized model, for BitsPerParam (default: the stored element count). progress
    receives the bytes of each tensor once written.
    """
    out_dir = Path(out_dir)
    writers: list[_ShardWriter] = []
    tensors_out: list[TensorRecord] = []
    stored_elements = 0
    shard: _ShardWriter | None = None
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="shard-md5") as pool:
        try:
            for name, array, *source in tensors:
                if shard is not None and shard.nbytes and shard.nbytes + array.nbytes > shard_cap_bytes:
                    shard.close(pool)
                    shard = None
                if shard is None:
                    shard = _ShardWriter(out_dir, len(writers))
                    writers.append(shard)
                tensors_out.append(shard.append(name, array, source[0] if source else None))
                stored_elements += array.size
                if progress is not None:
                    progress(array.nbytes)
                del array
            if shard is not None:
                shard.close(pool)
            digests = [writer.md5.result() for writer in writers]
        except BaseException:
            for writer in writers:
                writer.abandon()
                if writer.md5 is not None:
                    writer.md5.cancel()
            raise
    shard_records = [{"dataPath": w.name, "format": "raw-shard", "nbytes": w.nbytes,
                      "records": w.records, "md5sum": digest} for w, digest in zip(writers, digests)]
    param_bytes = sum(w.nbytes for w in writers)
    param_count = source_param_count or stored_elements
    metadata = {
        "ParamSize": len(tensors_out),
        "ParamBytes": param_bytes,
        "BitsPerParam": param_bytes * 8.0 / param_count if param_count else 0.0,
    }
    (out_dir / TENSOR_CACHE_FILE).write_text(
        json.dumps({"metadata": metadata, "records": shard_records}, indent=2) + "\n")
    return TensorCache(metadata=metadata, tensors=tensors_out,
                       shards=[ShardRecord(w.name, w.nbytes, d) for w, d in zip(writers, digests)])


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shard_name(value: object) -> bool:
    """A plain file name: nothing that leads out of the params directory."""
    return (isinstance(value, str) and value not in ("", ".", "..") and "/" not in value
            and "\\" not in value and "\0" not in value)


def _parse(manifest: object) -> TensorCache:
    """TensorCache from a parsed tensor-cache.json; ValueError naming what is wrong."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("records"), list):
        raise ValueError("expected an object with a \"records\" list of shards")
    metadata = manifest.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError("\"metadata\" is not an object")
    shards, tensors, names = [], [], set()
    for i, shard in enumerate(manifest["records"]):
        where = f"records[{i}]"
        if not isinstance(shard, dict):
            raise ValueError(f"{where} is not an object")
        path, nbytes, md5 = shard.get("dataPath"), shard.get("nbytes"), shard.get("md5sum")
        if not _shard_name(path):
            raise ValueError(f"{where}.dataPath {path!r:.80} is not a file name inside the "
                             "params directory")
        if not _count(nbytes):
            raise ValueError(f"{where}.nbytes {nbytes!r:.40} is not a non-negative integer")
        if md5 is not None and not (isinstance(md5, str) and len(md5) == 32
                                    and all(c in "0123456789abcdef" for c in md5)):
            raise ValueError(f"{where}.md5sum {md5!r:.60} is not an md5 hex digest")
        if not isinstance(shard.get("records"), list):
            raise ValueError(f"{where}.records is not a list")
        spans = []
        for j, rec in enumerate(shard["records"]):
            at = f"{where}.records[{j}]"
            if not isinstance(rec, dict):
                raise ValueError(f"{at} is not an object")
            name, shape, dtype = rec.get("name"), rec.get("shape"), rec.get("dtype")
            size, offset = rec.get("nbytes"), rec.get("byteOffset")
            if not isinstance(name, str) or not name:
                raise ValueError(f"{at}.name is not a string")
            if name in names:
                raise ValueError(f"tensor '{name:.200}' appears twice")
            names.add(name)
            if not isinstance(shape, list) or not all(_count(d) for d in shape):
                raise ValueError(f"tensor '{name:.200}': shape {shape!r:.80} is not a list of "
                                 "non-negative integers")
            if dtype not in NUMPY_DTYPES:
                raise ValueError(f"tensor '{name:.200}': unsupported dtype {dtype!r:.40}")
            if rec.get("format", "raw") != "raw":
                raise ValueError(f"tensor '{name:.200}': format {rec.get('format')!r:.40} is not "
                                 "\"raw\" (convert with medusa convert)")
            elements = 1
            for d in shape:
                elements *= d
            if not _count(size) or size != elements * NUMPY_DTYPES[dtype].itemsize:
                raise ValueError(f"tensor '{name:.200}': nbytes {size!r:.40} does not match shape "
                                 f"{shape} {dtype}")
            if not _count(offset) or offset + size > nbytes:
                raise ValueError(f"tensor '{name:.200}': byteOffset {offset!r:.40} + nbytes {size} "
                                 f"lies outside its {nbytes}-byte shard {path}")
            spans.append((offset, offset + size, name))
            tensors.append(TensorRecord(name, tuple(shape), dtype, size, offset, path))
        spans.sort()
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise ValueError(f"tensors '{first:.200}' and '{second:.200}' overlap in shard {path}")
        shards.append(ShardRecord(path, nbytes, md5))
    if len({s.data_path for s in shards}) != len(shards):
        raise ValueError("a shard file is listed twice")
    return TensorCache(metadata=metadata, shards=shards, tensors=tensors)


def read_tensor_cache(params_dir: Path) -> TensorCache:
    """tensor-cache.json of params_dir, validated (see _parse); ParamsError naming the file."""
    path = Path(params_dir) / TENSOR_CACHE_FILE
    if not path.is_file():
        raise ParamsError(f"{path}: not found; is {params_dir} a directory written by `medusa convert`?")
    try:
        if path.stat().st_size > _MAX_MANIFEST_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes is too large for a tensor cache")
        return _parse(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, RecursionError, UnicodeDecodeError) as exc:
        # the whole message: ours name the tensor, whose name may hold a newline
        reason = "it nests too deep" if isinstance(exc, RecursionError) else \
            (str(exc).strip() or type(exc).__name__)
        raise ParamsError(f"{path}: malformed tensor cache ({reason}); re-run `medusa convert`") from None


def load_array(params_dir: Path, record: TensorRecord) -> np.ndarray:
    """One tensor as a numpy array, memory-mapped from its shard."""
    dtype = NUMPY_DTYPES[record.dtype]
    if record.nbytes == 0:
        return np.empty(record.shape, dtype)
    mm = np.memmap(Path(params_dir) / record.shard, dtype=np.uint8, mode="r",
                   offset=record.byte_offset, shape=(record.nbytes,))
    return mm.view(dtype).reshape(record.shape)
