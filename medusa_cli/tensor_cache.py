"""The packed parameter format of MLC-LLM and tvm.contrib.tvmjs: tensor-cache.json + params_shard_N.bin.

Tensors are written as they arrive, one at a time; a shard is closed once the next tensor
would take it past the cap. Every tensor is stored "raw" (never tvmjs' default f32-to-bf16).
Threads work beside the caller's: a pool of IO_WORKERS copies and syncs the shards, and one
hashes them (md5_lanes, several shards at once).

A tensor kept as the source stores it is copied file to file. Its page-aligned middle goes
through O_DIRECT where the file system allows it: read into a page-aligned buffer, then written
straight to the device, past the page cache. Copying 1.4 GB that way and syncing took 0.65 to
0.83 s on the 2-core VM, with 0.22 to 0.25 s of CPU; copy_file_range and fdatasync took 1.1 to
2.7 s, with 1.1 to 3.6 s of CPU, most of it the kernel's page-cache work for the copy. The
unaligned ends, small copies and file systems without O_DIRECT use copy_file_range. So the
copied shards are not left in the page cache: a later read of them comes from the disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import mmap
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from .checkpoint import mapped_windows
from .config import TENSOR_CACHE_FILE
from .errors import ParamsError
from .md5_lanes import file_hasher, md5_files
from .quant import NUMPY_DTYPES

SHARD_CAP_BYTES = 32 * 1024 * 1024
# Copies run on IO_WORKERS threads in pieces of COPY_PIECE_BYTES (at multiples of it in the
# shard), so a large tensor is copied by several at once; a direct write goes through a
# BOUNCE_BYTES buffer at a time, at offsets and lengths of DIRECT_ALIGN (a page: no page is
# written both directly and through the page cache), for copies of DIRECT_MIN_BYTES or more.
IO_WORKERS = 4
COPY_PIECE_BYTES = 64 * 1024 * 1024
BOUNCE_BYTES = 8 * 1024 * 1024
DIRECT_ALIGN = 4096
DIRECT_MIN_BYTES = 1024 * 1024


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
    """One shard file. Bytes kept from the source (a FileRegion) are copied file to file by the
    disk pool, in pieces that may run side by side, and hashed from the source; other tensors
    are written from the caller's thread and hashed from the shard. So the md5 of a shard does
    not wait for its copy, and the caller goes on to the next tensor at once."""

    def __init__(self, out_dir: Path, index: int, disk: ThreadPoolExecutor, hasher, bounce: "_Bounce"):
        self.name = f"params_shard_{index}.bin"
        path = out_dir / self.name
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.read_fd = self.direct_fd = None
        try:
            self.read_fd = os.open(path, os.O_RDONLY)  # for the md5 of tensors written here
            self.direct_fd = _open_direct(path)  # for copies past the page cache, where allowed
        except BaseException:
            self.release()
            raise
        self._bounce = bounce
        self.nbytes = 0
        self.records: list[dict] = []
        self.jobs: list[Future] = []  # copies, then the sync, on the disk pool
        self.record: dict | None = None  # set by close()
        self.digest: Future | None = None  # of the md5, set by close()
        self._disk = disk
        self._digest = hasher.open()

    def append(self, name: str, array: np.ndarray, source=None) -> TensorRecord:
        """source: where the array's exact bytes are stored in an open file (fd, offset,
        nbytes; it must stay open until the shard is done), or None. Those are copied file to
        file (see the module docstring), not written from a mapping of the source: that costs
        a page fault per page inside the copy, 2.5 s of system time for a 1.4 GB checkpoint."""
        data = np.ascontiguousarray(array)
        if source is not None:
            at, end = self.nbytes, self.nbytes + source.nbytes  # in the shard
            while at < end:
                stop = min(end, (at // COPY_PIECE_BYTES + 1) * COPY_PIECE_BYTES)
                self.jobs.append(self._disk.submit(
                    self._copy, source.fd, source.offset + (at - self.nbytes), stop - at, at))
                at = stop
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

    def _copy(self, fd_in: int, offset_in: int, nbytes: int, offset_out: int) -> None:
        """One piece of a copy (on the disk pool): its page-aligned middle written directly
        where the shard allows it, the rest (and whatever the direct write refused) with
        _copy_region."""
        done = 0
        if self.direct_fd is not None and nbytes >= DIRECT_MIN_BYTES:
            head = min(-offset_out % DIRECT_ALIGN, nbytes)
            body = (nbytes - head) // DIRECT_ALIGN * DIRECT_ALIGN
            _copy_region(fd_in, offset_in, head, self.fd, offset_out)
            done = head + _direct_copy(fd_in, offset_in + head, body, self.direct_fd,
                                       offset_out + head, self._bounce)
        _copy_region(fd_in, offset_in + done, nbytes - done, self.fd, offset_out + done)

    def close(self) -> None:
        """Sets `record` (md5sum still to fill in) and `digest`, the future of its md5. Its sync
        is queued on the disk pool behind its copies, so the write-back overlaps the rest of the
        conversion (where a sync after it would wait for all of it) and a published directory
        survives a crash; `jobs` ends with it."""
        self.jobs.append(self._disk.submit(_sync_after, list(self.jobs), self.fd))
        record = {"dataPath": self.name, "format": "raw-shard", "nbytes": self.nbytes,
                  "records": self.records, "md5sum": None}
        self.record, self.digest = record, self._digest.finish()

    def release(self) -> None:
        """Close its files, once its jobs and md5 are done or cancelled."""
        for fd in (self.fd, self.read_fd, self.direct_fd):
            if fd is not None:
                os.close(fd)


def _copy_region(fd_in: int, offset_in: int, nbytes: int, fd_out: int, offset_out: int) -> None:
    """nbytes of fd_in at offset_in to fd_out at offset_out: copy_file_range where the kernel
    and file system can (EXDEV, ENOSYS, EINVAL...: what was copied stays), the rest through a
    mapped window."""
    copy = getattr(os, "copy_file_range", None)
    done = 0
    try:
        while copy is not None and done < nbytes:
            n = copy(fd_in, fd_out, nbytes - done, offset_in + done, offset_out + done)
            if n == 0:
                break
            done += n
    except OSError:
        pass
    for window in mapped_windows(fd_in, offset_in + done, nbytes - done):
        _pwrite_all(fd_out, memoryview(window), offset_out + done)
        done += len(window)


def _open_direct(path: Path) -> int | None:
    """`path` opened for writes with O_DIRECT; None where the platform or file system has no
    such thing (macOS, tmpfs on older Linux kernels...)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise


class _Bounce:
    """Page-aligned buffers (anonymous maps) for direct writes: one per disk thread at a time,
    made on first need and kept until close()."""

    def __init__(self, nbytes: int | None = None):
        self.nbytes = nbytes or BOUNCE_BYTES
        self._free: list[mmap.mmap] = []
        self._all: list[mmap.mmap] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def take(self):
        with self._lock:
            if self._free:
                buffer = self._free.pop()
            else:
                buffer = mmap.mmap(-1, self.nbytes)
                self._all.append(buffer)
        try:
            with memoryview(buffer) as view:
                yield view
        finally:
            with self._lock:
                self._free.append(buffer)

    def close(self) -> None:
        for buffer in self._all:
            buffer.close()
        self._all, self._free = [], []


def _direct_copy(fd_in: int, offset_in: int, nbytes: int, direct_fd: int, offset_out: int,
                 bounce: _Bounce) -> int:
    """Copy nbytes (a multiple of DIRECT_ALIGN, as is offset_out) of fd_in to direct_fd, an
    O_DIRECT descriptor, through a bounce buffer; the bytes copied, fewer where the file
    system refused a direct write (EINVAL) or took part of one: the caller copies the rest."""
    done = 0
    with bounce.take() as buffer:
        while done < nbytes:
            want = min(len(buffer), nbytes - done)
            _pread_exact(fd_in, buffer[:want], offset_in + done)
            try:
                wrote = os.pwritev(direct_fd, [buffer[:want]], offset_out + done)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    return done
                raise
            done += wrote
            if wrote < want:
                return done
    return done


def _sync_after(copies: list[Future], fd: int) -> None:
    """fdatasync(fd) once `copies` are done; none if one of them failed (its future says why).
    The pool runs jobs in the order queued, so every copy has started by now: this waits at
    most for the pieces still running on other threads."""
    wait(copies)
    if all(not c.cancelled() and c.exception() is None for c in copies):
        os.fdatasync(fd)


def _pread_exact(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from fd at offset; a file that ends first is an error that says so."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise OSError(errno.EIO, f"source file ended at byte {offset + got}, inside a tensor; "
                          "was it truncated during the conversion?")
        got += n


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
    disk = ThreadPoolExecutor(max_workers=IO_WORKERS, thread_name_prefix="shard-io")
    bounce = _Bounce()
    hasher = file_hasher()
    failed = True
    try:
        for name, array, *source in tensors:
            if shard is not None and shard.nbytes and shard.nbytes + array.nbytes > shard_cap_bytes:
                shard.close()
                shard = None
            if shard is None:
                shard = _ShardWriter(out_dir, len(shards), disk, hasher, bounce)
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
        bounce.close()
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
