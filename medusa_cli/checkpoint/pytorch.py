"""Read and write ``torch.save`` checkpoints without torch and without running their pickle.

Since torch 1.6, ``torch.save`` writes a zip archive whose members share one prefix folder:

  <prefix>/data.pkl    protocol-2 pickle of the state dict. A tensor is a call
                       ``torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, ...)``;
                       a storage is a persistent id
                       ``('storage', torch.FloatStorage, key, 'cpu', numel)``.
  <prefix>/data/<key>  the raw bytes of one storage, uncompressed, 64-byte aligned.
  <prefix>/byteorder   'little' or 'big' (absent before torch 1.10, which meant little).
  <prefix>/version     archive format version, '3'.

The reader unpickles data.pkl against an allowlist (``_ALLOWED_GLOBALS``). Any other global is
refused with UnsafePickleError at its GLOBAL opcode, before a REDUCE could call it. The opcodes
that mutate an object (BUILD, SETITEM(S), APPEND(S), ADDITEMS) apply only to containers this
unpickling made, so no pickle can change an allowed object for the next file read in the process;
the opcodes that construct arbitrary classes (NEWOBJ, INST, OBJ) and out-of-band buffers are
refused. data.pkl is capped in bytes (before it is decompressed) and in opcodes. Tensors unpickle
to small records, each checked against its storage (no overlapping strides, nothing past its
end); their bytes are read one tensor at a time by ``get_tensor``.

The writer emits the same pickle opcode by opcode, so no torch class has to exist here.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import ml_dtypes
import numpy as np

from ..outputs import staged_file
from ..errors import CheckpointError, UnsafePickleError, first_line
from .safetensors import INT64_LIMIT, fits_int64

# Typed storage classes torch names in persistent ids, and the element each holds.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}

# Untyped storages hold bytes. torch >= 2.1 saves dtypes that lack a typed storage class
# (float8, uint16, ...) on one, passing the dtype to _rebuild_tensor_v3 as a torch.<dtype> global.
_UNTYPED_STORAGE_DTYPE = np.dtype(np.uint8)

# torch.<name> dtype globals that _rebuild_tensor_v3 may receive.
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint64": np.dtype(np.uint64),
    "uint32": np.dtype(np.uint32),
    "uint16": np.dtype(np.uint16),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
}

# Keys under which training scripts nest the state dict, tried in order when the top level
# holds no tensors: Lightning 'state_dict', DeepSpeed and timm 'module' / 'model'.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")

# Our archives always use torch's prefix for in-memory saves: the file is written under a
# temporary name and renamed, so a prefix taken from the file name would be wrong.
_PREFIX = "archive"
_ALIGNMENT = 64
# Zip extra field that pads a local header so member data starts aligned; torch uses 'FB'.
_PAD_FIELD_ID = 0x4246
# A fixed timestamp makes equal tensors give byte-identical files.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_LOCAL_HEADER_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # magic, ..., file name length, extra field length

# data.pkl is read into memory: a state dict's pickle takes about 150 bytes and 30 opcodes per
# tensor (a 70B model's 723 tensors: about 110 KB), so these caps sit far above any real one. The
# byte cap is checked against the size the archive declares, before anything is decompressed;
# the opcode cap bounds the objects a pickle can make (each opcode makes at most one: a million
# empty lists, the worst case, hold about 140 MB).
_MAX_PICKLE_BYTES = 32 << 20
_MAX_PICKLE_OPCODES = 1_000_000
# The byteorder record holds 'little' or 'big'.
_MAX_BYTEORDER_BYTES = 16
# The most deflate can expand: 1032 bytes out per byte in.
_MAX_DEFLATE_RATIO = 1032
_READABLE_COMPRESSION = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError)


def _zip_problem(exc: BaseException) -> str:
    """What a zip read error means, never empty (zipfile raises a bare EOFError where a
    compressed member ends early)."""
    if isinstance(exc, EOFError) and not str(exc):
        return "its compressed data ends early"
    return first_line(exc)


# Records are frozen and slotted: a pickle BUILD opcode can neither set their attributes nor
# fill a __dict__, so what the checks below validate is what get_tensor reads.
@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    """What a torch.<X>Storage global unpickles to: a name, never a callable."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True, slots=True)
class _TorchDtype:
    """What a torch.<dtype> global unpickles to."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageRef:
    # member name under <prefix>/data/
    key: str
    # element type of the storage; uint8 for untyped storages
    dtype: np.dtype
    # elements in the storage
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclasses.dataclass(frozen=True, slots=True)
class _TensorRecord:
    storage: _StorageRef
    # element type of the tensor; differs from the storage's only for _rebuild_tensor_v3
    dtype: np.dtype
    # first element, counted in elements of dtype
    offset: int
    shape: tuple[int, ...]
    # counted in elements of dtype, as torch does
    stride: tuple[int, ...]


def _is_index(value: object) -> bool:
    """A non-negative int64, as torch stores sizes, strides and offsets."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < INT64_LIMIT


def _check_ints(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(_is_index(v) for v in value):
        raise ValueError(f"tensor {what} is not a tuple of non-negative int64 integers")
    return tuple(value)


def _rebuild_tensor(storage: object, offset: object, size: object, stride: object) -> _TensorRecord:
    if not isinstance(storage, _StorageRef):
        raise ValueError(f"tensor storage is a {type(storage).__name__}, not a storage id")
    if not _is_index(offset):
        raise ValueError("tensor storage offset is not a non-negative int64 integer")
    shape = _check_ints(size, "shape")
    strides = _check_ints(stride, "stride")
    if len(shape) != len(strides):
        raise ValueError(f"tensor shape {shape} and stride {strides} differ in length")
    return _TensorRecord(storage, storage.dtype, offset, shape, strides)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(
    storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
    if not isinstance(dtype, _TorchDtype):
        raise ValueError(f"_rebuild_tensor_v3 got dtype {dtype!r:.80}, not a torch dtype")
    record = _rebuild_tensor(storage, offset, size, stride)
    return dataclasses.replace(record, dtype=dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, _TensorRecord):
        raise ValueError(f"nn.Parameter wraps a {type(data).__name__}, not a tensor")
    return data


# Everything a state dict pickle may name, keyed by (module, name) as the GLOBAL opcode spells it.
_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("torch", "UntypedStorage"): _StorageType("UntypedStorage", _UNTYPED_STORAGE_DTYPE),
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", _UNTYPED_STORAGE_DTYPE),
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
    **{("torch", name): _TorchDtype(name, dtype) for name, dtype in _TORCH_DTYPES.items()},
}


def _opcode_name(code: int) -> str:
    return next((name for name in dir(pickle) if name.isupper()
                 and getattr(pickle, name) == bytes([code])), f"opcode {code}")


def _refuse_opcode(code: int):
    def refuse(self: _StateDictUnpickler) -> None:
        raise self.unsafe(f"uses the {_opcode_name(code)} opcode")
    return refuse


class _StateDictUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, whose opcodes are methods (the C unpickler's cannot be
    replaced), closed to what a state dict needs: allowed globals only, fresh records from
    find_class, mutation only of containers it made, at most _MAX_PICKLE_OPCODES opcodes."""

    dispatch: dict = {}

    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data))
        self._path = path
        self._opcodes = 0
        # the containers this unpickling made, by id; holding them keeps their ids from being
        # reused by another object while the unpickling runs
        self._fresh: dict[int, object] = {}

    def unsafe(self, what: str) -> UnsafePickleError:
        return UnsafePickleError(
            f"refusing to unpickle {self._path}: its data.pkl {what}, which a plain state dict "
            "never does; nothing in it was run. If you trust the file, load it with torch and "
            "re-save only the state dict (torch.save(model.state_dict(), path)) or convert it "
            "to safetensors"
        )

    def find_class(self, module: str, name: str) -> object:
        try:
            value = _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise self.unsafe(f"asks for '{module}.{name}'") from None
        if isinstance(value, (_StorageType, _TorchDtype)):
            return dataclasses.replace(value)  # a record of its own: nothing shared is handed out
        return value

    def persistent_load(self, pid: object) -> _StorageRef:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and _is_index(pid[4])
        ):
            raise ValueError(f"unexpected persistent id of a {type(pid).__name__}")
        # pid[3] is the device the storage lived on ('cpu', 'cuda:0'); the bytes are the same
        return _StorageRef(key=pid[2], dtype=pid[1].dtype, numel=pid[4])

    # --- the opcodes that make containers: remember what they made

    def _made(self, obj: object) -> None:
        self._fresh[id(obj)] = obj

    def _is_fresh(self, obj: object, kinds: tuple[type, ...]) -> bool:
        return isinstance(obj, kinds) and self._fresh.get(id(obj)) is obj

    def _build(self) -> None:
        """BUILD: torch.save sets `_metadata` on the state dict's OrderedDict this way. Allowed on
        an OrderedDict this unpickling made, with a dict of str keys as its state, which is
        dropped (nothing here reads it)."""
        if len(self.stack) < 2:
            raise ValueError("BUILD with nothing to build")
        target, state = self.stack[-2], self.stack[-1]
        if not self._is_fresh(target, (collections.OrderedDict,)):
            raise self.unsafe(f"uses BUILD on a {type(target).__name__} it did not create")
        if not (isinstance(state, dict) and all(isinstance(k, str) for k in state)):
            raise self.unsafe(f"uses BUILD with a {type(state).__name__} as state")
        self.stack.pop()

    def _reduce(self) -> None:
        func = self.stack[-2] if len(self.stack) >= 2 else None
        pickle._Unpickler.load_reduce(self)
        if func is collections.OrderedDict:
            self._made(self.stack[-1])


def _making(base):
    def run(self: _StateDictUnpickler) -> None:
        base(self)
        self._made(self.stack[-1])
    return run


def _mutating(base, kinds: tuple[type, ...], operands: int | None):
    """An opcode that mutates its target, allowed only on a container of `kinds` this unpickling
    made. operands: the stack items it consumes above its target (None: all those above the
    mark, the target being the top of the stack below it)."""
    name = base.__name__.removeprefix("load_").upper()

    def run(self: _StateDictUnpickler) -> None:
        if operands is None:
            below = self.metastack[-1] if self.metastack else []
            target = below[-1] if below else None
        else:
            target = self.stack[-1 - operands] if len(self.stack) > operands else None
        if not self._is_fresh(target, kinds):
            raise self.unsafe(f"uses {name} on a {type(target).__name__} it did not create")
        base(self)
    return run


def _counted(method):
    def run(self: _StateDictUnpickler) -> None:
        self._opcodes += 1
        if self._opcodes > _MAX_PICKLE_OPCODES:
            raise CheckpointError(f"{self._path}: data.pkl runs more than {_MAX_PICKLE_OPCODES:,} "
                                  "pickle opcodes, far beyond any state dict's; it is not one")
        method(self)
    return run


def _dispatch_table() -> dict:
    base = pickle._Unpickler
    table = dict(base.dispatch)
    for op in (pickle.EMPTY_DICT, pickle.EMPTY_LIST, pickle.LIST, pickle.DICT, pickle.EMPTY_SET):
        table[op[0]] = _making(table[op[0]])
    table[pickle.REDUCE[0]] = _StateDictUnpickler._reduce
    table[pickle.BUILD[0]] = _StateDictUnpickler._build
    table[pickle.SETITEM[0]] = _mutating(base.load_setitem, (dict,), 2)
    table[pickle.SETITEMS[0]] = _mutating(base.load_setitems, (dict,), None)
    table[pickle.APPEND[0]] = _mutating(base.load_append, (list,), 1)
    table[pickle.APPENDS[0]] = _mutating(base.load_appends, (list,), None)
    table[pickle.ADDITEMS[0]] = _mutating(base.load_additems, (set,), None)
    for op in (pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.INST, pickle.OBJ, pickle.PERSID,
               pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
        table[op[0]] = _refuse_opcode(op[0])
    return {code: _counted(method) for code, method in table.items()}


_StateDictUnpickler.dispatch = _dispatch_table()


def _tensors_in(mapping: dict) -> dict[str, _TensorRecord]:
    return {k: v for k, v in mapping.items() if isinstance(k, str) and isinstance(v, _TensorRecord)}


def _find_state_dict(root: object, path: Path) -> dict[str, _TensorRecord]:
    """The tensors of the top-level dict, else of the dict nested under a wrapper key."""
    if not isinstance(root, dict):
        raise CheckpointError(
            f"{path} holds a pickled {type(root).__name__}, not a state dict "
            "(a dict from tensor names to tensors)"
        )
    tensors = _tensors_in(root)
    if tensors:
        return tensors
    for key in _WRAPPER_KEYS:
        inner = root.get(key)
        if isinstance(inner, dict) and (tensors := _tensors_in(inner)):
            return tensors
    candidates = [k for k, v in root.items() if isinstance(v, dict) and _tensors_in(v)]
    if len(candidates) == 1:
        return _tensors_in(root[candidates[0]])
    found = ", ".join(repr(k) for k in candidates) or "none"
    raise CheckpointError(
        f"{path} holds no tensors at its top level or under "
        f"{', '.join(repr(k) for k in _WRAPPER_KEYS)}; nested dicts with tensors: {found}. "
        "Re-save just the model's state dict with torch.save(model.state_dict(), path)"
    )


def _find_tensor_list(root: object, path: Path) -> dict[str, _TensorRecord]:
    """A top-level list of tensors (FasterDecoding's heads_accuracy.pt), keyed "0", "1", ..."""
    if not isinstance(root, list) or not all(isinstance(v, _TensorRecord) for v in root):
        kind = type(root).__name__ if not isinstance(root, list) else "list of other things"
        raise CheckpointError(
            f"{path} holds a pickled {kind}, not a list of tensors; save one with "
            "torch.save([tensor, ...], path)"
        )
    return {str(i): record for i, record in enumerate(root)}


# What a file's top-level object must be: the unpickled root -> its tensors by name
_ROOTS = {"state_dict": _find_state_dict, "tensor_list": _find_tensor_list}


def _extent(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements from a tensor's first element to one past its last, in storage order."""
    if any(d == 0 for d in shape):
        return 0
    return 1 + sum((d - 1) * s for d, s in zip(shape, stride))


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    if any(d == 0 for d in shape):
        return True
    expected = 1
    for d, s in zip(reversed(shape), reversed(stride)):
        if d != 1 and s != expected:
            return False
        expected *= d
    return True


def _pread_into(fd: int, buffer: np.ndarray, offset: int) -> int:
    """Fill the uint8 `buffer` from fd at `offset`, past the file object's buffer (what the file
    holds now); the bytes read, fewer where the file ends."""
    view = memoryview(buffer)
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _describe_unreadable(path: Path, head: bytes) -> str:
    """Why a file that zipfile rejects is not a torch.save checkpoint, judged by its first bytes."""
    if not head:
        return f"{path} is empty; it is not a PyTorch checkpoint"
    if head[:1] == b"\x80" or head[257:262] == b"ustar":
        return (
            f"{path} is in PyTorch's legacy (pre-1.6) pickle/tar format, which medusa-cli does "
            "not read; re-save it with a recent torch (torch.save(torch.load(path), path)) or "
            "convert it to safetensors"
        )
    if head.startswith(b"PK"):
        return f"{path} is a truncated or corrupt zip archive; download or copy it again"
    return f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive)"


class TorchCheckpoint:
    """A ``torch.save`` state dict, opened lazily: tensors are read one at a time. With
    root="tensor_list" the file holds a list of tensors instead, named "0", "1", ..."""

    def __init__(self, path: str | os.PathLike, root: str = "state_dict"):
        self.path = Path(path)
        find_tensors = _ROOTS[root]
        try:
            self._file: BinaryIO = open(self.path, "rb")
        except OSError as exc:
            raise CheckpointError(f"cannot open checkpoint {self.path}: {exc.strerror}") from None
        # data offset of each member, filled as members are checked
        self._data_offsets: dict[str, int] = {}
        try:
            self._size = os.fstat(self._file.fileno()).st_size
            self._zip = self._open_zip()
            self._infos = {info.filename: info for info in self._zip.infolist()}
            self._prefix = self._find_prefix()
            self._check_byteorder()
            root = self._unpickle()
            self._records = find_tensors(root, self.path)
            self._members = self._storage_members()
        except BaseException:
            self._file.close()
            raise

    def _open_zip(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self._file)
        except Exception:  # zipfile parsing a foreign file can fail in many ways; all mean one thing
            self._file.seek(0)
            raise CheckpointError(_describe_unreadable(self.path, self._file.read(512))) from None

    def _check_member(self, info: zipfile.ZipInfo, cap: int | None = None) -> None:
        """A member is readable before any of it is: not encrypted, stored or deflated, within
        `cap` declared bytes, and its bytes (as declared) inside the file."""
        where = f"{self.path}: member {info.filename:.200}"
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{where} is encrypted; torch.save writes plain archives")
        if info.compress_type not in _READABLE_COMPRESSION:
            raise CheckpointError(
                f"{where} uses zip compression method {info.compress_type}; torch.save stores "
                f"members uncompressed (readable: {', '.join(_READABLE_COMPRESSION.values())})")
        if cap is not None and info.file_size > cap:
            raise CheckpointError(f"{where} declares {info.file_size:,} bytes, more than the "
                                  f"{cap:,} it may hold in a state dict; the file is not a plain "
                                  "state dict")
        stored = info.compress_type == zipfile.ZIP_STORED
        if not stored and info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 64:
            raise CheckpointError(f"{where} declares {info.file_size:,} bytes, more than its "
                                  f"{info.compress_size:,} compressed bytes can hold; the file is "
                                  "corrupt")
        end = self._data_offset(info) + (info.file_size if stored else info.compress_size)
        if end > self._size:
            raise CheckpointError(f"{where} declares bytes up to {end:,}, past the end of the "
                                  f"{self._size:,}-byte file; it is truncated or corrupt")

    def _find_prefix(self) -> str:
        names = list(self._infos)
        prefixes = [n.split("/")[0] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(prefixes) != 1:
            raise CheckpointError(
                f"{self.path} is a zip archive but not a torch.save checkpoint: expected one "
                f"<prefix>/data.pkl, found {len(prefixes)} among {[n[:80] for n in names[:5]]}"
            )
        prefix = prefixes[0]
        if f"{prefix}/constants.pkl" in names:
            raise CheckpointError(
                f"{self.path} is a TorchScript archive (torch.jit.save), not a state dict; "
                "save the weights with torch.save(model.state_dict(), path)"
            )
        return prefix

    def _read_member(self, name: str, cap: int) -> bytes:
        """A small member's bytes, its declared size checked against `cap` before any of it is
        read or decompressed (zipfile stops at the declared size)."""
        info = self._infos[name]
        self._check_member(info, cap)
        try:
            return self._zip.read(info)
        except _ZIP_ERRORS as exc:
            raise CheckpointError(
                f"cannot read {name} from {self.path}, which is corrupt: {_zip_problem(exc)}"
            ) from None

    def _check_byteorder(self) -> None:
        name = f"{self._prefix}/byteorder"
        order = self._read_member(name, _MAX_BYTEORDER_BYTES).strip() if name in self._infos \
            else b"little"
        if order == b"big":
            raise CheckpointError(
                f"{self.path} was saved on a big-endian machine (byteorder 'big'); medusa-cli "
                "reads little-endian checkpoints only. Load and re-save it with torch on a "
                "little-endian (x86 or ARM) machine, or convert it to safetensors"
            )
        if order != b"little":
            raise CheckpointError(
                f"{self.path} has an unknown byteorder record {order!r:.40}; expected 'little'"
            )

    def _unpickle(self) -> object:
        data = self._read_member(f"{self._prefix}/data.pkl", _MAX_PICKLE_BYTES)
        try:
            return _StateDictUnpickler(data, self.path).load()
        except CheckpointError:  # UnsafePickleError, the opcode cap
            raise
        except Exception as exc:
            # a corrupt pickle can fail in any opcode with any exception type
            raise CheckpointError(
                f"cannot unpickle data.pkl in {self.path}: it is corrupt or not a plain "
                f"state dict ({first_line(exc):.200})"
            ) from None

    def _storage_members(self) -> dict[str, zipfile.ZipInfo]:
        """Check every tensor against its storage member; returns the members by storage key."""
        members: dict[str, zipfile.ZipInfo] = {}
        for name, record in self._records.items():
            key = record.storage.key
            member_name = f"{self._prefix}/data/{key}"
            member = self._infos.get(member_name)
            if member is None:
                raise CheckpointError(
                    f"tensor '{name:.200}' in {self.path} uses storage {member_name}, which the "
                    "archive lacks; the file is truncated or corrupt"
                )
            if key not in members:
                self._check_member(member)
            if not fits_int64(record.shape):
                raise CheckpointError(f"tensor '{name:.200}' in {self.path} has shape "
                                      f"{record.shape}, too large: its element count does not "
                                      "fit in int64")
            if member.file_size < record.storage.nbytes:
                raise CheckpointError(
                    f"storage {member_name} in {self.path} holds {member.file_size} bytes, but "
                    f"tensor '{name:.200}' declares {record.storage.nbytes}; the file is corrupt"
                )
            end = (record.offset + _extent(record.shape, record.stride)) * record.dtype.itemsize
            if end > record.storage.nbytes:
                raise CheckpointError(
                    f"tensor '{name:.200}' in {self.path} (shape {record.shape}, stride "
                    f"{record.stride}, offset {record.offset}) reaches byte {end} of a "
                    f"{record.storage.nbytes}-byte storage; the file is corrupt"
                )
            self._check_view(name, record)
            members[key] = member
        return members

    def _check_view(self, name: str, record: _TensorRecord) -> None:
        """A tensor takes no more memory than its storage holds: overlapping strides (a
        broadcast) are read only while the tensor has no more bytes than the storage, so no
        file "views" 4 bytes as 4 TiB."""
        where = f"tensor '{name:.200}' in {self.path} (shape {record.shape}, stride {record.stride})"
        nbytes = record.dtype.itemsize
        for d in record.shape:
            nbytes *= d
        if nbytes > record.storage.nbytes:
            raise CheckpointError(
                f"{where} has strides that overlap: it views {nbytes:,} bytes over a "
                f"{record.storage.nbytes:,}-byte storage; re-save it with tensor.contiguous()")

    def _record(self, name: str) -> _TensorRecord:
        try:
            return self._records[name]
        except KeyError:
            raise CheckpointError(
                f"no tensor '{name:.200}' in {self.path}; it holds {len(self._records)} tensors, "
                f"e.g. {list(self._records)[:3]}"
            ) from None

    def keys(self) -> list[str]:
        return list(self._records)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._record(name).shape

    def dtype(self, name: str) -> np.dtype:
        return self._record(name).dtype

    def get_tensor(self, name: str) -> np.ndarray:
        record = self._record(name)
        if self._file.closed:
            raise CheckpointError(f"cannot read tensor '{name:.200}': {self.path} was closed")
        itemsize = record.dtype.itemsize
        start = record.offset * itemsize
        if _is_contiguous(record.shape, record.stride):
            out = np.empty(record.shape, record.dtype)
            self._read_into(name, record.storage.key, start, out)
            return out
        span = np.empty(_extent(record.shape, record.stride), record.dtype)
        self._read_into(name, record.storage.key, start, span)
        strides = tuple(s * itemsize for s in record.stride)
        # (record.shape) view over span
        view = np.lib.stride_tricks.as_strided(span, record.shape, strides)
        return np.ascontiguousarray(view)

    def _read_into(self, name: str, key: str, start: int, out: np.ndarray) -> None:
        """Fill contiguous ``out`` with the storage bytes of member ``key`` from byte ``start``."""
        member = self._members[key]
        buffer = out.reshape(-1).view(np.uint8)  # (nbytes,) over out's memory
        try:
            if member.compress_type == zipfile.ZIP_STORED:
                got = _pread_into(self._file.fileno(), buffer, self._data_offset(member) + start)
            else:
                with self._zip.open(member) as stream:
                    stream.seek(start)
                    got = stream.readinto(buffer)
        except _ZIP_ERRORS as exc:
            raise CheckpointError(
                f"cannot read tensor '{name:.200}' from {self.path}, which is corrupt: "
                f"{_zip_problem(exc)}") from None
        if got != buffer.nbytes:
            raise CheckpointError(
                f"tensor '{name:.200}' in {self.path} ends after {got} of {buffer.nbytes} bytes; "
                "the file is truncated"
            )

    def _data_offset(self, member: zipfile.ZipInfo) -> int:
        """Where a member's bytes start: after its local header, whose extra field (torch's
        alignment padding) may differ in length from the central directory's."""
        offset = self._data_offsets.get(member.filename)
        if offset is None:
            self._file.seek(member.header_offset)
            header = self._file.read(_LOCAL_HEADER.size)
            if len(header) != _LOCAL_HEADER.size or header[:4] != _LOCAL_HEADER_MAGIC:
                raise CheckpointError(
                    f"{self.path} is corrupt: bad zip header for {member.filename}"
                )
            _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
            offset = member.header_offset + _LOCAL_HEADER.size + name_length + extra_length
            self._data_offsets[member.filename] = offset
        return offset

    def close(self) -> None:
        self._zip.close()
        self._file.close()

    def __enter__(self) -> TorchCheckpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def load_tensor_list(path: str | os.PathLike) -> list[np.ndarray]:
    """The tensors of a ``torch.save``d list (as FasterDecoding's heads_accuracy.pt), read with
    the same allowlist as a state dict."""
    with TorchCheckpoint(path, root="tensor_list") as archive:
        return [archive.get_tensor(name) for name in archive.keys()]


# --- writing -------------------------------------------------------------------------------

_DTYPE_STORAGE_NAMES = {dtype: name for name, dtype in _STORAGE_DTYPES.items()}


def _emit_global(out: bytearray, module: str, name: str) -> None:
    out += pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii")


def _emit_str(out: bytearray, text: str) -> None:
    data = text.encode("utf-8")
    out += pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _emit_int(out: bytearray, value: int) -> None:
    if 0 <= value < 256:
        out += pickle.BININT1 + bytes([value])
    elif -(2**31) <= value < 2**31:
        out += pickle.BININT + struct.pack("<i", value)
    else:
        data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        out += pickle.LONG1 + bytes([len(data)]) + data


def _emit_int_tuple(out: bytearray, values: tuple[int, ...]) -> None:
    out += pickle.MARK
    for value in values:
        _emit_int(out, value)
    out += pickle.TUPLE


def _emit_empty_ordered_dict(out: bytearray) -> None:
    _emit_global(out, "collections", "OrderedDict")
    out += pickle.EMPTY_TUPLE + pickle.REDUCE


def _emit_tensor(out: bytearray, record: _TensorRecord) -> None:
    """One tensor as torch.save pickles it: a _rebuild_tensor_v2 call on its storage."""
    _emit_global(out, "torch._utils", "_rebuild_tensor_v2")
    out += pickle.MARK
    # storage: persistent id ('storage', torch.<X>Storage, key, 'cpu', numel)
    out += pickle.MARK
    _emit_str(out, "storage")
    _emit_global(out, "torch", _DTYPE_STORAGE_NAMES[record.storage.dtype])
    _emit_str(out, record.storage.key)
    _emit_str(out, "cpu")
    _emit_int(out, record.storage.numel)
    out += pickle.TUPLE + pickle.BINPERSID
    _emit_int(out, record.offset)
    _emit_int_tuple(out, record.shape)
    _emit_int_tuple(out, record.stride)
    out += pickle.NEWFALSE  # requires_grad
    _emit_empty_ordered_dict(out)  # backward_hooks
    out += pickle.TUPLE + pickle.REDUCE


def _pickle_state_dict(entries: Iterable[tuple[str, _TensorRecord]]) -> bytes:
    """Protocol-2 pickle of an OrderedDict of tensors as torch.save writes it, less memoization."""
    out = bytearray(pickle.PROTO + b"\x02")
    _emit_empty_ordered_dict(out)
    for name, record in entries:
        _emit_str(out, name)
        _emit_tensor(out, record)
        out += pickle.SETITEM
    out += pickle.STOP
    return bytes(out)


def _pickle_tensor_list(entries: Iterable[tuple[str, _TensorRecord]]) -> bytes:
    """Protocol-2 pickle of a list of tensors as torch.save writes it, less memoization."""
    out = bytearray(pickle.PROTO + b"\x02" + pickle.EMPTY_LIST + pickle.MARK)
    for _, record in entries:
        _emit_tensor(out, record)
    out += pickle.APPENDS + pickle.STOP
    return bytes(out)


class _ArchiveWriter:
    """Writes storages one at a time, then data.pkl, as a torch.save zip into an open file.

    Members go storages first so a stream of tensors never has to be held; torch finds
    members through the central directory and takes the prefix from any of them.
    Use as a context manager: leaving it writes the central directory.
    """

    def __init__(self, file: BinaryIO):
        self._file = file
        self._zip = zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._count = 0

    def __enter__(self) -> _ArchiveWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._zip.close()

    def add_storage(self, array: np.ndarray) -> _StorageRef:
        flat = np.ascontiguousarray(array).reshape(-1)  # (numel,)
        ref = _StorageRef(key=str(self._count), dtype=flat.dtype, numel=flat.size)
        self._count += 1
        self._write_member(f"{_PREFIX}/data/{ref.key}", flat.view(np.uint8))
        return ref

    def finish(self, entries: Iterable[tuple[str, _TensorRecord]], as_list: bool = False) -> None:
        """Write data.pkl (a state dict of `entries`, or a list of their tensors) and the
        records torch.load reads beside it."""
        pickled = _pickle_tensor_list(entries) if as_list else _pickle_state_dict(entries)
        self._write_member(f"{_PREFIX}/data.pkl", pickled)
        self._write_member(f"{_PREFIX}/byteorder", b"little")
        # No .format_version record: with it torch may compute storage offsets assuming its
        # own zip writer's layout instead of reading our headers.
        self._write_member(f"{_PREFIX}/version", b"3\n")

    def _write_member(self, name: str, data: bytes | np.ndarray) -> None:
        info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = len(data) if isinstance(data, bytes) else data.nbytes
        info.CRC = info.compress_size = 0  # filled in by zipfile once the data is written
        # the rule zipfile applies to add a 20-byte zip64 field to the local header
        zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT
        # the local header lands where the file stands; pad its extra field so data is aligned
        info.extra = struct.pack("<HH", _PAD_FIELD_ID, 0)
        pad = -(self._file.tell() + len(info.FileHeader(zip64))) % _ALIGNMENT
        info.extra = struct.pack("<HH", _PAD_FIELD_ID, pad) + b"Z" * pad
        with self._zip.open(info, "w", force_zip64=zip64) as member:
            member.write(data)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides in elements: (3, 1) for shape (2, 3)."""
    stride = []
    step = 1
    for d in reversed(shape):
        stride.append(step)
        step *= d
    return tuple(reversed(stride))


def _storage_array(name: object, value: object) -> np.ndarray:
    """``value`` as a little-endian array of a dtype torch has a storage class for."""
    if not isinstance(name, str):
        raise CheckpointError(f"tensor names must be strings, got {name!r:.80}")
    array = np.asarray(value)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if array.dtype not in _DTYPE_STORAGE_NAMES:
        raise CheckpointError(
            f"tensor '{name:.200}' has dtype {array.dtype}, which torch.save checkpoints written by "
            "medusa-cli do not support; use one of: "
            f"{', '.join(str(d) for d in _DTYPE_STORAGE_NAMES)}"
        )
    return array


def save_torch_checkpoint(
    tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray], path: str | os.PathLike,
    as_list: bool = False,
) -> None:
    """Write ``tensors`` as a torch.save state dict that ``torch.load(path, weights_only=True)``
    reads (with as_list, a list of the tensors in order, as heads_accuracy.pt is). Tensors are
    written one at a time into a temporary file renamed onto ``path``."""
    path = Path(path)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    try:
        with staged_file(path) as tmp, open(tmp, "wb") as file, _ArchiveWriter(file) as writer:
            entries: dict[str, _TensorRecord] = {}
            for name, value in items:
                array = _storage_array(name, value)
                if name in entries:
                    raise CheckpointError(
                        f"tensor '{name:.200}' appears twice; tensor names must be unique"
                    )
                ref = writer.add_storage(array)
                stride = _contiguous_stride(array.shape)
                entries[name] = _TensorRecord(ref, ref.dtype, 0, array.shape, stride)
            writer.finish(entries.items(), as_list=as_list)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from None
