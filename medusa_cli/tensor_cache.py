"""The packed parameter format of MLC-LLM and tvm.contrib.tvmjs: tensor-cache.json + params_shard_N.bin.

Tensors are written as they arrive, one at a time; a shard is closed once the next tensor
would take it past the cap. Every tensor is stored "raw" (never tvmjs' default f32-to-bf16).
Two threads work beside the caller's: one copies and syncs the shards, the other hashes them
(md5_lanes, several shards at once).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .checkpoint import mapped_windows
from .config import TENSOR_CACHE_FILE
from .errors import ParamsError
from .md5_lanes import file_hasher, md5_files
from .quant import NUMPY_DTYPES

SHARD_CAP_BYTES = 32 * 1024 * 1024


def dtype_name(array: np.ndarray) -> str:
    """TVM's name for a numpy dtype (ml_dtypes' bfloat16 included)."""
    return str(array.dtype)


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype of a TVM dtype name: the model dtypes (bfloat16 from ml_dtypes) and plain
    numpy names such as uint32."""
    if name in NUMPY_DTYPES:
        return NUMPY_DTYPES[name]
    return np.dtype(name)


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    byte_offset: int
    shard: str


@dataclasses.dataclass
class TensorCache:
    """The contents of a tensor-cache.json: its metadata and every tensor's place."""

    metadata: dict
    shards: list[dict]  # {"dataPath", "nbytes", "md5sum"}
    tensors: list[TensorRecord]

    @property
    def param_bytes(self) -> int:
        return sum(shard["nbytes"] for shard in self.shards)

    def by_name(self) -> dict[str, TensorRecord]:
        return {t.name: t for t in self.tensors}


class _ShardWriter:
    """One shard file. Bytes kept from the source (a FileRegion) are copied file to file on the
    disk thread, in the order given, and hashed from the source; other tensors are written
    from the caller's thread and hashed from the shard. So the md5 of a shard does not wait
    for its copy, and the caller goes on to the next tensor at once."""

    def __init__(self, out_dir: Path, index: int, disk: ThreadPoolExecutor, hasher):
        self.name = f"params_shard_{index}.bin"
        path = out_dir / self.name
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.read_fd = os.open(path, os.O_RDONLY)  # for the md5 of tensors written here
        self.nbytes = 0
        self.records: list[dict] = []
        self.jobs: list[Future] = []  # copies, then the sync, on the disk thread
        self.record: dict | None = None  # set by close()
        self.digest: Future | None = None  # of the md5, set by close()
        self._disk = disk
        self._digest = hasher.open()

    def append(self, name: str, array: np.ndarray, source=None) -> TensorRecord:
        """source: where the array's exact bytes are stored in an open file (fd, offset,
        nbytes; it must stay open until the shard is done), or None. Those are copied file to
        file in the kernel (copy_file_range, as cp does), not through this process: writing
        from a mapped source costs a page fault per page inside the copy, 2.5 s of system
        time for a 1.4 GB checkpoint."""
        data = np.ascontiguousarray(array)
        if source is not None:
            self.jobs.append(self._disk.submit(_copy_region, source, self.fd, self.nbytes))
            self._digest.add(source.fd, source.offset, source.nbytes)
        else:
            _pwrite_all(self.fd, memoryview(data.reshape(-1).view(np.uint8)), self.nbytes)
            self._digest.add(self.read_fd, self.nbytes, data.nbytes)
        record = TensorRecord(
            name=name,
            shape=tuple(int(d) for d in data.shape),
            dtype=dtype_name(data),
            nbytes=data.nbytes,
            byte_offset=self.nbytes,
            shard=self.name,
        )
        self.nbytes += data.nbytes
        self.records.append(
            {
                "name": record.name,
                "shape": list(record.shape),
                "dtype": record.dtype,
                "format": "raw",
                "nbytes": record.nbytes,
                "byteOffset": record.byte_offset,
            }
        )
        return record

    def close(self) -> None:
        """Sets `record` (md5sum still to fill in) and `digest`, the future of its md5. Its sync
        starts on the disk thread once its copies are done, so the write-back overlaps the rest
        of the conversion (where a sync after it would wait for all of it) and a published
        directory survives a crash; `jobs` ends with it."""
        self.jobs.append(self._disk.submit(os.fdatasync, self.fd))
        record = {"dataPath": self.name, "format": "raw-shard", "nbytes": self.nbytes,
                  "records": self.records, "md5sum": None}
        self.record, self.digest = record, self._digest.finish()

    def release(self) -> None:
        """Close its files, once its jobs and md5 are done or cancelled."""
        os.close(self.fd)
        os.close(self.read_fd)


def _copy_region(source, fd_out: int, offset_out: int) -> None:
    """Bytes of `source` (fd, offset, nbytes) to fd_out at offset_out: copy_file_range where
    the kernel and file system can (EXDEV, ENOSYS, EINVAL...: what was copied stays), the rest
    through a mapped window."""
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
    for window in mapped_windows(source.fd, source.offset + done, source.nbytes - done):
        _pwrite_all(fd_out, memoryview(window), offset_out + done)
        done += len(window)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """A write may take fewer bytes than given (Linux: at most 2 GiB per call)."""
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_tensor_cache(
    out_dir: Path,
    tensors: Iterable[tuple],
    source_param_count: int | None = None,
    shard_cap_bytes: int = SHARD_CAP_BYTES,
    progress: Callable[[int], None] | None = None,
) -> TensorCache:
    """Write `tensors` (consumed one at a time) into out_dir, then tensor-cache.json.

    tensors: (name, array) or (name, array, source): source, where not None, is a region of an
    open file (fd, offset, nbytes, such as checkpoint.FileRegion) holding exactly the array's
    bytes, copied file to file; the file must stay open until this returns. source_param_count:
    parameters of the unquantized model, for BitsPerParam (defaults to the stored element
    count). progress receives the bytes of each tensor once handed over (its copy may still be
    under way); this returns once every shard is copied, synced and hashed.
    """
    out_dir = Path(out_dir)
    shards: list[_ShardWriter] = []  # the last one open, the others closed
    tensors_out: list[TensorRecord] = []
    stored_elements = 0
    shard: _ShardWriter | None = None
    # copies and syncs, in order (I/O: one thread is enough)
    disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-io")
    hasher = file_hasher()
    failed = True
    try:
        for name, array, *source in tensors:
            if shard is not None and shard.nbytes and shard.nbytes + array.nbytes > shard_cap_bytes:
                shard.close()
                shard = None
            if shard is None:
                shard = _ShardWriter(out_dir, len(shards), disk, hasher)
                shards.append(shard)
            tensors_out.append(shard.append(name, array, source[0] if source else None))
            stored_elements += array.size
            if progress is not None:
                progress(array.nbytes)
            del array
        if shard is not None:
            shard.close()
        for writer in shards:
            for job in writer.jobs:
                job.result()
            writer.record["md5sum"] = writer.digest.result()
        failed = False
    finally:
        # on failure: stop hashing, drop the copies not started, wait for the rest
        hasher.close(cancel=failed)
        disk.shutdown(wait=True, cancel_futures=failed)
        for writer in shards:
            writer.release()
    shard_records = [writer.record for writer in shards]

    param_bytes = sum(s["nbytes"] for s in shard_records)
    param_count = source_param_count or stored_elements
    metadata = {
        "ParamSize": len(tensors_out),
        "ParamBytes": param_bytes,
        "BitsPerParam": param_bytes * 8.0 / param_count if param_count else 0.0,
    }
    manifest = {"metadata": metadata, "records": shard_records}
    (out_dir / TENSOR_CACHE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    shards = [{k: s[k] for k in ("dataPath", "nbytes", "md5sum")} for s in shard_records]
    return TensorCache(metadata=metadata, shards=shards, tensors=tensors_out)


def read_tensor_cache(params_dir: Path) -> TensorCache:
    path = Path(params_dir) / TENSOR_CACHE_FILE
    if not path.is_file():
        raise ParamsError(f"{path}: not found; is {params_dir} a directory written by `medusa convert`?")
    try:
        manifest = json.loads(path.read_text())
        tensors = []
        shards = []
        for shard in manifest["records"]:
            shards.append({k: shard[k] for k in ("dataPath", "nbytes", "md5sum")})
            for rec in shard["records"]:
                tensors.append(
                    TensorRecord(
                        name=rec["name"],
                        shape=tuple(rec["shape"]),
                        dtype=rec["dtype"],
                        nbytes=rec["nbytes"],
                        byte_offset=rec["byteOffset"],
                        shard=shard["dataPath"],
                    )
                )
        return TensorCache(metadata=manifest["metadata"], shards=shards, tensors=tensors)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ParamsError(f"{path}: malformed tensor cache ({exc!r}); re-run `medusa convert`") from None


def check_integrity(params_dir: Path, cache: TensorCache | None = None) -> TensorCache:
    """Check every shard's size and md5 against tensor-cache.json; raise ParamsError naming the file."""
    params_dir = Path(params_dir)
    cache = cache or read_tensor_cache(params_dir)
    for shard in cache.shards:
        path = params_dir / shard["dataPath"]
        if not path.is_file():
            raise ParamsError(f"{path}: shard listed in {TENSOR_CACHE_FILE} is missing")
        size = path.stat().st_size
        if size != shard["nbytes"]:
            raise ParamsError(
                f"{path}: shard is {size} bytes, {TENSOR_CACHE_FILE} says {shard['nbytes']}; "
                "the directory is corrupted, re-run `medusa convert`"
            )
    recorded = [shard for shard in cache.shards if shard.get("md5sum")]
    digests = md5_files([params_dir / shard["dataPath"] for shard in recorded])
    for shard, digest in zip(recorded, digests):
        if digest != shard["md5sum"]:
            raise ParamsError(
                f"{params_dir / shard['dataPath']}: md5 mismatch against {TENSOR_CACHE_FILE}; "
                "the shard is corrupted, re-run `medusa convert`"
            )
    return cache


def load_array(params_dir: Path, record: TensorRecord) -> np.ndarray:
    """One tensor as a numpy array, memory-mapped from its shard."""
    mm = np.memmap(Path(params_dir) / record.shard, dtype=np.uint8, mode="r",
                   offset=record.byte_offset, shape=(record.nbytes,))
    return mm.view(numpy_dtype(record.dtype)).reshape(record.shape)
