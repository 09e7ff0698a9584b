"""md5 of several messages at once, one vector lane each, for the shards' md5sum.

MLC's tensor-cache.json records each shard's md5, and `medusa convert` computes them. hashlib's
md5 runs at about 0.7 GB/s on one core and cannot go faster: every 64-byte block of a message
depends on the one before. A packed directory has many shards, though, and nothing links one
shard's md5 to another's, so a vector of LANES uint32 lanes can run the MD5 rounds (RFC 1321)
of LANES shards side by side, at the cost of about one.

The kernel is written in TIR and compiled by TVM for the host CPU:
    md5_lanes(state uint32[4, LANES], table uint32[64], blocks int32, data_0 .. data_{LANES-1})
runs `blocks` 64-byte blocks of each lane's bytes (data_l: the address of lane l's next block)
through MD5's compression function, updating state in place: row j holds the word j (A, B, C,
D) of every lane. Per block it loads 64 bytes of each lane, transposes them (one vector per
message word, a lane per message: log2(LANES) rounds of two-vector shuffles), and runs the 64
steps on vectors. The additive constants come from `table`, not the code: TVM 0.27's simplifier
rewrites (x + c) >> s for a uint32 c near 2**32 as if the sum could not wrap.

It is built once per CPU, TVM version and KERNEL_VERSION into the user's cache folder
($MEDUSA_CACHE_DIR, else $XDG_CACHE_HOME/medusa-cli, else ~/.cache/medusa-cli; a temporary one
when that is not writable), about 1 s with `import tvm`. It is a plain C function, without
TVM's packed-call wrapper, so later runs load it with ctypes, without TVM (0.05 s), and a call
lets other threads run (ctypes releases the GIL). Every load checks it against hashlib on
messages of every padding case; if building, loading or that check fails, or MEDUSA_MD5=hashlib
is set, hashlib does the work on a thread per core instead. The digests are the same either way.

A message is a sequence of regions of open files (or arrays), which the writer may add while it
is hashed: convert gives the source's bytes for tensors it copies file to file, so a shard's
md5 does not wait for its copy.

Measured on the 2-core Zen 4 VM, 16 MiB per lane, one core: 8 lanes 4.4 GB/s in all
(0.55 GB/s per lane), 16 lanes 6.1, 4 lanes 2.4; hashlib 0.71. LANES is 8: a call costs about
the same with 1 to 8 lanes busy, and each lane runs at most 20 % slower than hashlib.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import math
import os
import platform
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .checkpoint import map_file_region, mapped_windows

LANES = 8
# bump when the kernel's code or calling convention changes: the cache key includes it
KERNEL_VERSION = 2
# blocks per lane and call (4 MiB): bounds the mapped pages a lane holds in memory
_CALL_BLOCKS = 1 << 16

_SHIFTS = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
# T[i] of RFC 1321: the integer part of 2**32 * |sin(i + 1)|
_TABLE = np.array([int(abs(math.sin(i + 1)) * 2**32) for i in range(64)], dtype=np.uint32)
_INITIAL = np.array([0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476], dtype=np.uint32)


def _message_word(step: int) -> int:
    """Which of the block's 16 words step 0..63 adds."""
    return (step, 5 * step + 1, 3 * step + 5, 7 * step)[step // 16] % 16


def kernel_func(lanes: int = LANES):
    """The md5_lanes PrimFunc (see the module docstring), for `lanes` lanes (a power of 2, at
    most 16)."""
    from tvm import ir
    from tvm import tirx as tir

    vec = f"uint32x{lanes}"
    vectors = 16 // lanes  # vectors of one lane's 64-byte block
    blocks = tir.Var("blocks", "int32")

    def pointer(name, dtype):
        return tir.Var(name, ir.PointerType(ir.PrimType(dtype)))

    state_ptr, table_ptr = pointer("state", "uint32"), pointer("table", "uint32")
    data_ptrs = [pointer(f"data_{l}", "uint8") for l in range(lanes)]
    state = tir.decl_buffer((4 * lanes,), "uint32", name="state_buf")
    table = tir.decl_buffer((64,), "uint32", name="table_buf")
    data = [tir.decl_buffer((blocks * 64,), "uint8", name=f"data_buf_{l}") for l in range(lanes)]
    # Scratch vectors, each buffer at most 8 of them (512 bytes): TVM keeps a buffer of up to
    # 1 KiB on the stack, where LLVM turns it into registers; a larger one becomes heap
    # workspace, loaded and stored at every use. Stage 0 holds the loaded vectors, stage k the
    # transpose after k rounds of shuffles; `regs` holds A..D as they rotate.
    stages = int(math.log2(lanes)) + 1
    scratch = [[tir.decl_buffer((8 * lanes,), "uint32", name=f"stage{s}_{h}") for h in range(2)]
               for s in range(stages)]
    regs = tir.decl_buffer((4 * lanes,), "uint32", name="regs")
    block = tir.Var("block", "int32")
    body = []

    def load(buffer, index):
        return tir.BufferLoad(buffer, [tir.Ramp(index * lanes, 1, lanes)])

    def store(buffer, index, value):
        body.append(tir.BufferStore(buffer, value, [tir.Ramp(index * lanes, 1, lanes)]))

    def load_stage(s, index):
        return load(scratch[s][index // 8], index % 8)

    def store_stage(s, index, value):
        store(scratch[s][index // 8], index % 8, value)

    # stage 0, vector v * lanes + l: words v * lanes .. v * lanes + lanes - 1 of lane l's block
    for v in range(vectors):
        for l in range(lanes):
            store_stage(0, v * lanes + l, tir.reinterpret(vec, tir.BufferLoad(
                data[l], [tir.Ramp(block * 64 + v * 4 * lanes, 1, 4 * lanes)])))
    # transpose each lanes x lanes square: round k swaps bit k of the lane with bit k of the
    # word, so vector v * lanes + w ends up holding word v * lanes + w of every lane
    for k in range(stages - 1):
        bit = 1 << k
        low = [c if not c & bit else lanes + (c ^ bit) for c in range(lanes)]
        high = [c ^ bit if not c & bit else lanes + c for c in range(lanes)]
        for v in range(vectors):
            for r in range(lanes):
                if r & bit:
                    continue
                pair = [load_stage(k, v * lanes + r), load_stage(k, v * lanes + (r | bit))]
                store_stage(k + 1, v * lanes + r, tir.Shuffle(pair, low))
                store_stage(k + 1, v * lanes + (r | bit), tir.Shuffle(pair, high))

    def word(w):
        return load_stage(stages - 1, w)

    for j in range(4):
        store(regs, j, load(state, j))
    slot = [0, 1, 2, 3]  # where A, B, C, D are in regs
    for step in range(64):
        a, b, c, d = (load(regs, s) for s in slot)
        mix = ((b & c) | (~b & d), (d & b) | (~d & c), b ^ c ^ d, c ^ (b | ~d))[step // 16]
        total = (a + word(_message_word(step))
                 + tir.Broadcast(tir.BufferLoad(table, [step]), lanes)) + mix
        shift = _SHIFTS[step]
        rotated = ((total << tir.Broadcast(tir.const(shift, "uint32"), lanes))
                   | (total >> tir.Broadcast(tir.const(32 - shift, "uint32"), lanes)))
        # the new B takes A's slot; A, C, D become the old D, B, C
        store(regs, slot[0], b + rotated)
        slot = [slot[3], slot[0], slot[1], slot[2]]
    for j in range(4):
        store(state, j, load(state, j) + load(regs, slot[j]))

    loop = tir.For(block, 0, blocks, tir.ForKind.SERIAL, tir.SeqStmt(body))
    bindings = [tir.DeclBuffer(buf, data=ptr) for buf, ptr in
                zip([state, table, *data], [state_ptr, table_ptr, *data_ptrs])]
    allocations = [tir.AllocBuffer(buf) for pair in scratch for buf in pair] + [tir.AllocBuffer(regs)]
    func = tir.PrimFunc([state_ptr, table_ptr, blocks, *data_ptrs],
                        tir.SeqStmt(bindings + allocations + [loop]))
    return func.with_attr({"global_symbol": "md5_lanes", "tirx.noalias": True})


_PIPELINE = "medusa_md5"


def _pipeline():
    """The least of TVM's TIR pipeline a host kernel needs: the simplifier is left out (the
    wrap-around rewrite above), and so is MakePackedAPI, which would wrap the function in TVM's
    calling convention: it stays a C function of its parameters."""
    import tvm
    from tvm import tirx
    from tvm.tirx import compilation_pipeline

    return (tvm.transform.Sequential([tirx.transform.AnnotateEntryFunc()]),
            lambda: tvm.transform.Sequential([]), compilation_pipeline.finalize_device_passes)


def build_library(path: Path, lanes: int = LANES) -> Path:
    """Compile the kernel for this CPU and export it to `path` (written beside, then renamed)."""
    import tvm
    from tvm.tirx import compilation_pipeline

    from .targets import resolve_target

    compilation_pipeline.register_tir_pipeline(_PIPELINE, _pipeline)
    module = tvm.tirx.build(tvm.IRModule({"md5_lanes": kernel_func(lanes)}),
                            target=resolve_target("cpu").target, pipeline=_PIPELINE)
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        module.export_library(str(partial))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def cache_dir() -> Path:
    if os.environ.get("MEDUSA_CACHE_DIR"):
        return Path(os.environ["MEDUSA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medusa-cli"


def _cpu_identity() -> str:
    """What the compiled code depends on: the machine, its CPU flags, TVM's version."""
    from importlib import metadata

    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    try:
        tvm_version = metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:
        tvm_version = "unknown"
    return f"{platform.machine()}|{tvm_version}|{flags}"


def library_path(lanes: int = LANES) -> Path:
    key = hashlib.sha256(_cpu_identity().encode()).hexdigest()[:16]
    return cache_dir() / f"md5-lanes-v{KERNEL_VERSION}-{lanes}-{key}.so"


class _Kernel:
    """The loaded md5_lanes function, with the buffers each call needs."""

    def __init__(self, function, lanes: int):
        self.function = function
        self.lanes = lanes
        self.table = _TABLE.copy()
        # lanes without a file read these zeros (their results are dropped)
        self.idle = np.zeros(_CALL_BLOCKS * 64, dtype=np.uint8)

    def __call__(self, state: np.ndarray, blocks: int, addresses: list[int]) -> None:
        """Run `blocks` blocks of each lane (state uint32[4, lanes], updated in place)."""
        assert state.dtype == np.uint32 and state.flags.c_contiguous and state.shape == (4, self.lanes)
        self.function(state.ctypes.data, self.table.ctypes.data, blocks, *addresses)


def _c_function(path: Path, lanes: int):
    """md5_lanes from the library at `path`, typed for ctypes (addresses as ints)."""
    function = ctypes.CDLL(str(path)).md5_lanes
    function.restype = None
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32] + [ctypes.c_void_p] * lanes
    return function


_loaded: dict[int, _Kernel | None] = {}
_load_lock = threading.Lock()


def load_kernel(lanes: int = LANES) -> _Kernel | None:
    """The kernel, from the cache or built into it, once per process; None where it cannot be
    built or loaded here or fails the check against hashlib."""
    with _load_lock:
        if lanes not in _loaded:
            _loaded[lanes] = _load_checked(lanes)
        return _loaded[lanes]


def _load_checked(lanes: int) -> _Kernel | None:
    if os.environ.get("MEDUSA_MD5") == "hashlib":
        return None
    path = library_path(lanes)
    try:
        if path.is_file():
            kernel = _load_file(path, lanes)
            if kernel is not None:
                return kernel
            path.unlink(missing_ok=True)  # a truncated or wrong cached build: build it again
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            build_library(path, lanes)
        except OSError:
            # cache not writable: a private copy, unlinked once loaded
            with tempfile.TemporaryDirectory(prefix="medusa-md5-") as tmp:
                return _load_file(build_library(Path(tmp) / path.name, lanes), lanes)
        return _load_file(path, lanes)
    except Exception:  # no compiler, a TVM without LLVM: use hashlib
        return None


def _load_file(path: Path, lanes: int) -> _Kernel | None:
    """The checked kernel from a built library; None where it does not load or check."""
    try:
        return _checked(_Kernel(_c_function(path, lanes), lanes))
    except (OSError, AttributeError):  # not a loadable library, or no md5_lanes in it
        return None


_CHECK_LENGTHS = (0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 1000, 4099)


def _checked(kernel: _Kernel) -> _Kernel | None:
    """kernel if it agrees with hashlib on messages of every padding case, else None."""
    rng = np.random.default_rng(KERNEL_VERSION)
    messages = [rng.integers(0, 256, size=n, dtype=np.uint8) for n in _CHECK_LENGTHS]
    lanes = _Lanes(kernel)
    streams = []
    for message in messages:
        stream = _Stream()
        # two regions, so a block straddles them
        half = len(message) // 2
        stream.regions = [(message, 0, half), (message, half, len(message) - half)]
        stream.written = (2, True)
        streams.append(stream)
        lanes.queue.append(stream)
    while lanes.busy():
        lanes.step()
    expected = [hashlib.md5(m.tobytes(), usedforsecurity=False).hexdigest() for m in messages]
    return kernel if [s.future.result() for s in streams] == expected else None


class _Stream:
    """One message hashed in a lane: a sequence of byte regions, each of an open file (fd) or
    an array, appended while it is hashed (a writer reports each region once its bytes can be
    read), then marked complete. A file region is read through a mapped window per call, so a
    lane holds at most one call's worth of a file in memory. A block that straddles two
    regions is copied into a 64-byte buffer."""

    def __init__(self):
        self.future: Future = Future()
        self.regions: list[tuple[int | np.ndarray, int, int]] = []  # (fd or array, offset, nbytes)
        # (regions that may be read, whether no more will come): one tuple, which the writer's
        # thread replaces whole, so the hashing thread never sees half an update
        self.written: tuple[int, bool] = (0, False)
        self.region = 0  # the region being hashed
        self.at = 0  # bytes of it hashed
        self.done = 0  # bytes hashed in all
        self.staged: np.ndarray | None = None  # the next block, gathered from several regions
        self.tail: np.ndarray | None = None  # the last one or two blocks, padded
        self.tail_done = 0  # of its blocks, hashed
        self.owned_fds: list[int] = []  # closed with the stream
        self._window: np.ndarray | None = None

    def ready(self) -> int:
        """Blocks that can be hashed now (0: waiting for the writer, or finished)."""
        if self.tail is not None:
            return len(self.tail) // 64 - self.tail_done
        count, complete = self.written
        length = sum(r[2] for r in self.regions[:count])
        self._skip_empty(count)
        if self.region < count and self.regions[self.region][2] - self.at >= 64:
            return (self.regions[self.region][2] - self.at) // 64
        if length - self.done >= 64:
            self.staged = self._gather(64, count)
            return 1
        if not complete:
            return 0
        self.tail = _padded_tail(self._gather(length - self.done, count), length)
        return len(self.tail) // 64

    def window(self, blocks: int) -> int:
        """The address of the next `blocks` blocks (valid until advance)."""
        if self.tail is not None:
            return self.tail.ctypes.data + 64 * self.tail_done
        if self.staged is not None:
            return self.staged.ctypes.data
        source, offset, _ = self.regions[self.region]
        self._window = _region_bytes(source, offset + self.at, 64 * blocks)
        return self._window.ctypes.data

    def advance(self, blocks: int) -> None:
        self._window = None  # the last reference to a mapped window: unmapped now
        if self.tail is not None:
            self.tail_done += blocks
        elif self.staged is not None:
            self.staged = None
            self._consume(64)
        else:
            self._consume(64 * blocks)

    @property
    def finished(self) -> bool:
        return self.tail is not None and 64 * self.tail_done == len(self.tail)

    def close(self) -> None:
        self._window = None
        while self.owned_fds:
            os.close(self.owned_fds.pop())

    def _skip_empty(self, count: int) -> None:
        while self.region < count and self.at == self.regions[self.region][2]:
            self.region += 1
            self.at = 0

    def _consume(self, nbytes: int) -> None:
        self.done += nbytes
        while nbytes:
            step = min(nbytes, self.regions[self.region][2] - self.at)
            self.at += step
            nbytes -= step
            if self.at == self.regions[self.region][2]:
                self.region += 1
                self.at = 0

    def _gather(self, nbytes: int, count: int) -> np.ndarray:
        """The next `nbytes` bytes, from as many regions as they span."""
        parts, region, at = [], self.region, self.at
        while nbytes:
            source, offset, size = self.regions[region]
            take = min(nbytes, size - at)
            parts.append(_region_bytes(source, offset + at, take).tobytes())
            nbytes -= take
            region, at = region + 1, 0
        return np.frombuffer(b"".join(parts), dtype=np.uint8).copy()


def _region_bytes(source: int | np.ndarray, offset: int, nbytes: int) -> np.ndarray:
    """uint8 view of bytes [offset, offset + nbytes) of an open file (mapped) or an array."""
    if isinstance(source, np.ndarray):
        return source[offset:offset + nbytes]
    if nbytes == 0:
        return np.zeros(0, dtype=np.uint8)
    return map_file_region(source, offset, nbytes)


def _padded_tail(rest: np.ndarray, length: int) -> np.ndarray:
    """The bytes after the last full block, then 0x80, zeros up to 56 mod 64, and the message
    length in bits as a little-endian uint64 (RFC 1321, 3.1 and 3.2)."""
    zeros = (55 - len(rest)) % 64
    return np.frombuffer(rest.tobytes() + b"\x80" + bytes(zeros)
                         + ((8 * length) % 2**64).to_bytes(8, "little"), dtype=np.uint8).copy()


class _Lanes:
    """The kernel's lanes and the streams in them, advanced one call at a time."""

    def __init__(self, kernel: _Kernel):
        self.kernel = kernel
        self.queue: collections.deque[_Stream] = collections.deque()
        self.streams: list[_Stream | None] = [None] * kernel.lanes
        self.state = np.zeros((4, kernel.lanes), dtype=np.uint32)  # word j of lane l

    def busy(self) -> bool:
        return bool(self.queue) or any(self.streams)

    def step(self) -> bool:
        """Fill free lanes from the queue, then one kernel call over every lane with blocks
        ready, as many as all of them have. False if no lane had any (all wait for writers)."""
        for l, stream in enumerate(self.streams):
            while stream is None and self.queue:
                stream = self.queue.popleft()
                if stream.future.set_running_or_notify_cancel():
                    self.streams[l] = stream
                    self.state[:, l] = _INITIAL
                else:
                    stream.close()
                    stream = None
        ready = [s.ready() if s is not None else 0 for s in self.streams]
        if not any(ready):
            return False
        blocks = min([n for n in ready if n] + [_CALL_BLOCKS])
        waiting = [l for l, s in enumerate(self.streams) if s is not None and not ready[l]]
        kept = self.state[:, waiting].copy()  # a waiting lane's state must survive the call
        try:
            addresses = [s.window(blocks) if n else self.kernel.idle.ctypes.data
                         for s, n in zip(self.streams, ready)]
            self.kernel(self.state, blocks, addresses)
        finally:
            for s, n in zip(self.streams, ready):
                if n:
                    s.advance(blocks)
        self.state[:, waiting] = kept
        for l, s in enumerate(self.streams):
            if s is not None and s.finished:
                s.close()
                self.streams[l] = None
                s.future.set_result(self.state[:, l].astype("<u4").tobytes().hex())
        return True

    def fail(self, exc: BaseException) -> None:
        for s in [*self.streams, *self.queue]:
            if s is not None:
                s.close()
                if not s.future.done():
                    s.future.set_exception(exc)
        self.streams = [None] * len(self.streams)
        self.queue.clear()


class StreamHandle:
    """A message given region by region: add(fd, offset, nbytes) once those bytes of a file
    open for reading can be read (an array instead of an fd: bytes of it), then finish() for
    the future of its hex md5. The fds must stay open until that future is done."""

    def __init__(self, hasher: "LaneHasher", stream: _Stream):
        self._hasher, self._stream = hasher, stream

    def add(self, source: int | np.ndarray, offset: int, nbytes: int) -> None:
        self._stream.regions.append((source, offset, nbytes))
        self._hasher._update(self._stream, complete=False)

    def finish(self) -> Future:
        self._hasher._update(self._stream, complete=True)
        return self._stream.future


class LaneHasher:
    """Hashes messages on one thread, up to LANES at a time in the kernel's lanes. submit(path)
    for a file, open() for a message given region by region; both give a future of the hex
    digest (or of the error that stopped it)."""

    def __init__(self, kernel: _Kernel):
        self._lanes = _Lanes(kernel)
        self._wake = threading.Condition()
        self._closed = False
        self._cancel = False
        self._changes = 0  # counts writers' reports, messages queued and close()
        self._thread = threading.Thread(target=self._run, name="md5-lanes", daemon=True)
        self._thread.start()

    def open(self) -> StreamHandle:
        stream = _Stream()
        with self._wake:
            if self._closed:
                raise RuntimeError("LaneHasher is closed")
            self._lanes.queue.append(stream)
            self._changed()
        return StreamHandle(self, stream)

    def submit(self, path: Path) -> Future:
        fd = os.open(path, os.O_RDONLY)
        try:
            handle = self.open()
        except BaseException:
            os.close(fd)
            raise
        handle._stream.owned_fds.append(fd)
        handle.add(fd, 0, os.fstat(fd).st_size)
        return handle.finish()

    def close(self, cancel: bool = False) -> None:
        """Stop once every message is hashed; cancel: now, failing the unfinished ones."""
        with self._wake:
            self._closed = True
            self._cancel = cancel
            self._changed()
        self._thread.join()

    def _update(self, stream: _Stream, complete: bool) -> None:
        with self._wake:
            stream.written = (len(stream.regions), complete)
            self._changed()

    def _changed(self) -> None:
        self._changes += 1
        self._wake.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    seen = self._changes
                    if self._closed and (self._cancel or not self._lanes.busy()):
                        break
                # the kernel runs unlocked: writers report meanwhile
                if not self._lanes.step():
                    # every busy lane waits for its writer, or none is busy: sleep until a
                    # writer reports, a file is queued or close(), unless one already did
                    with self._wake:
                        while self._changes == seen:
                            self._wake.wait()
        except BaseException as exc:  # a failure here must reach the futures, not hang them
            with self._wake:
                self._lanes.fail(exc)
            return
        with self._wake:
            self._lanes.fail(RuntimeError("hashing cancelled"))


def file_md5(path: Path) -> str:
    with open(path, "rb") as f:
        return _regions_md5([(f.fileno(), 0, os.fstat(f.fileno()).st_size)])


class ThreadHasher:
    """The same interface over hashlib, a thread per core: where the kernel is unavailable. A
    message given region by region is hashed once finished."""

    def __init__(self):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self._pool = ThreadPoolExecutor(max_workers=cores or 1, thread_name_prefix="md5")

    def submit(self, path: Path) -> Future:
        return self._pool.submit(file_md5, Path(path))

    def open(self) -> "_Regions":
        return _Regions(self._pool)

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel)


class _Regions:
    def __init__(self, pool: ThreadPoolExecutor):
        self._pool = pool
        self._regions: list[tuple[int | np.ndarray, int, int]] = []

    def add(self, source: int | np.ndarray, offset: int, nbytes: int) -> None:
        self._regions.append((source, offset, nbytes))

    def finish(self) -> Future:
        return self._pool.submit(_regions_md5, list(self._regions))


def _regions_md5(regions: list[tuple[int | np.ndarray, int, int]]) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    for source, offset, nbytes in regions:
        if isinstance(source, np.ndarray):
            digest.update(source[offset:offset + nbytes])
        else:
            for window in mapped_windows(source, offset, nbytes):
                digest.update(window)
    return digest.hexdigest()


def file_hasher() -> LaneHasher | ThreadHasher:
    """The fastest hasher available here; close() it when done."""
    kernel = load_kernel()
    return LaneHasher(kernel) if kernel is not None else ThreadHasher()


def md5_files(paths: list[Path]) -> list[str]:
    """Hex md5 of each file, in order."""
    hasher = file_hasher()
    try:
        futures = [hasher.submit(p) for p in paths]
        return [f.result() for f in futures]
    finally:
        hasher.close(cancel=True)
