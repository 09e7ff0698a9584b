"""An evaluation set for `medusa eval`: the base model's hidden states and its tokens.

    hidden    [T, hidden_size] float16/32/64: the base model's last hidden state (after its
              final norm, the heads' input) at T consecutive positions
    tokens    [T] int: the base model's token at each position (its greedy next token)
    sequence  [T] int, optional: which generation each position belongs to

as one .npz (np.savez) or a directory holding hidden.npy, tokens.npy and sequence.npy. Head i at
position t is right at rank r when its r-th ranked token is tokens[t + i + 1] (FasterDecoding's
convention); a position pairs only with positions of its own run of equal sequence ids.

The hidden states are streamed a batch of rows at a time, from a file or from the archive
member, compressed or not; only tokens and sequence ids are held whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import InputError, first_line
from ..tree_search import RANK_NO_LABEL

# array name -> required
ARRAYS = {"hidden": True, "tokens": True, "sequence": False}
_HIDDEN_DTYPES = ("float16", "float32", "float64")
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}
_FIX = ("save hidden [T, hidden_size] (float16/32), tokens [T] and optionally sequence [T] "
        "with np.savez(FILE.npz, hidden=..., tokens=..., sequence=...)")


@dataclasses.dataclass(frozen=True)
class _Member:
    """One .npy array of the set: a file, or a member of the .npz archive."""

    # what messages call it: "eval.npz:hidden" or "data/hidden.npy"
    name: str
    # opens a fresh stream at the first byte of the .npy
    open: Callable[[], contextlib.AbstractContextManager[BinaryIO]]


def _read_header(stream: BinaryIO, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(stream)
        reader = _HEADER_READERS.get(version)
        if reader is None:
            raise ValueError(f".npy format version {version}, which is not read here")
        return reader(stream)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"--data {name}: not a .npy array ({first_line(exc)}); {_FIX}") from None


def _read_whole(member: _Member) -> np.ndarray:
    try:
        with member.open() as stream:
            return np.lib.format.read_array(stream, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"--data {member.name}: cannot read it ({first_line(exc)}); {_FIX}") from None


def _members(path: Path) -> dict[str, _Member]:
    """The set's arrays by name, from an .npz or a directory of .npy files."""
    if not path.exists():
        raise InputError(f"--data {path}: no such file or directory; {_FIX}")
    if path.is_dir():
        found = {}
        for name in ARRAYS:
            file = path / f"{name}.npy"
            if file.is_file():
                found[name] = _Member(str(file), lambda file=file: open(file, "rb"))
        return found
    if path.suffix != ".npz" or not path.is_file():
        raise InputError(
            f"--data {path}: expected an .npz file or a directory of hidden.npy and tokens.npy; {_FIX}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"--data {path}: not an .npz archive ({first_line(exc)}); {_FIX}") from None

    def opener(member: str):
        @contextlib.contextmanager
        def open_member():
            with zipfile.ZipFile(path) as archive, archive.open(member) as stream:
                yield stream
        return open_member

    return {name: _Member(f"{path}:{name}", opener(f"{name}.npy"))
            for name in ARRAYS if f"{name}.npy" in names}


class EvalData:
    """An evaluation set, checked against the heads' hidden and vocab sizes."""

    def __init__(self, path: Path, hidden_size: int, vocab_size: int):
        self.path = Path(path)
        members = _members(self.path)
        missing = [name for name, required in ARRAYS.items() if required and name not in members]
        if missing:
            raise InputError(f"--data {self.path}: has no {' or '.join(missing)} array; {_FIX}")
        self._hidden = members["hidden"]
        with self._hidden.open() as stream:
            shape, fortran, dtype = _read_header(stream, self._hidden.name)
        if len(shape) != 2 or shape[1] != hidden_size or shape[0] < 1:
            raise InputError(
                f"--data {self._hidden.name}: hidden states have shape {list(shape)}, expected "
                f"[positions, {hidden_size}] (the library's hidden_size)")
        if dtype.name not in _HIDDEN_DTYPES:
            raise InputError(
                f"--data {self._hidden.name}: hidden states have dtype {dtype}, expected one of "
                f"{', '.join(_HIDDEN_DTYPES)} (numpy has no bfloat16: convert with .float())")
        if fortran:
            raise InputError(f"--data {self._hidden.name}: hidden states are stored in Fortran "
                             "order; save np.ascontiguousarray(hidden) so rows can be streamed")
        self._dtype = dtype
        self.positions = int(shape[0])
        self.hidden_size = hidden_size
        self.tokens = self._integers(members["tokens"], "tokens")
        bad = np.flatnonzero((self.tokens < 0) | (self.tokens >= vocab_size))
        if bad.size:
            raise InputError(
                f"--data {members['tokens'].name}: token {int(self.tokens[bad[0]])} at position "
                f"{int(bad[0])} is outside the vocabulary 0..{vocab_size - 1}; these are not "
                "this model's tokens")
        sequence = self._integers(members["sequence"], "sequence") if "sequence" in members else \
            np.zeros(self.positions, np.int64)
        # run id of each position: a new run wherever the sequence id changes
        self._run = np.concatenate([[0], np.cumsum(sequence[1:] != sequence[:-1])])  # [T]
        self.sequences = int(self._run[-1]) + 1

    def _integers(self, member: _Member, what: str) -> np.ndarray:
        array = _read_whole(member)
        if array.shape != (self.positions,) or not np.issubdtype(array.dtype, np.integer):
            raise InputError(
                f"--data {member.name}: {what} is {array.dtype} {list(array.shape)}, expected "
                f"integers [{self.positions}], one per row of hidden")
        return array.astype(np.int64)

    def labels(self, head: int) -> np.ndarray:
        """int64 [T]: the token head `head` should rank first at each position,
        tokens[t + head + 1], or RANK_NO_LABEL where that position is in another run."""
        labels = np.full(self.positions, RANK_NO_LABEL, dtype=np.int64)
        ahead = head + 1
        if ahead < self.positions:
            same = self._run[ahead:] == self._run[:-ahead]  # [T - ahead]
            positions = np.flatnonzero(same)
            labels[positions] = self.tokens[positions + ahead]
        return labels

    def hidden_batches(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first position, hidden [<= rows, hidden_size] in the file's dtype), in order."""
        row_bytes = self.hidden_size * self._dtype.itemsize
        with self._hidden.open() as stream:
            _read_header(stream, self._hidden.name)
            for start in range(0, self.positions, rows):
                count = min(rows, self.positions - start)
                data = stream.read(count * row_bytes)
                if len(data) != count * row_bytes:
                    raise InputError(f"--data {self._hidden.name}: ends after row "
                                     f"{start + len(data) // row_bytes}; the file is truncated")
                batch = np.frombuffer(data, dtype=self._dtype).reshape(count, self.hidden_size)
                finite = np.isfinite(batch)
                if not finite.all():
                    row = start + int(np.argwhere(~finite)[0][0])
                    raise InputError(f"--data {self._hidden.name}: row {row} holds NaN or Inf; "
                                     "hidden states must be finite")
                yield start, batch

    def describe(self) -> dict:
        return {"path": str(self.path), "positions": self.positions, "sequences": self.sequences,
                "dtype": self._dtype.name}
