"""Arrays a user hands the runtime: hidden states and base-model logits in .npy files, checked
and rounded to the library's dtype with errors that name the flag, the file and what is expected."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError, first_line
from ..quantization import cast_to

# dtypes a hidden-states file may hold; anything else (ints, bools, objects) is refused.
_HIDDEN_DTYPES = ("float64", "float32", "float16", "bfloat16")


_NPY_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}
_ZIP_MAGIC = b"PK\x03\x04"


def _npy_header(path: Path) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, bytes of data) the .npy header declares; ValueError when it is not one."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in _NPY_READERS:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, _, dtype = _NPY_READERS[version](f)
        data_bytes = os.fstat(f.fileno()).st_size - f.tell()
    return shape, dtype, data_bytes


def _load_float_array(path: Path, flag: str, what: str, expected: str) -> np.ndarray:
    """One float array from a .npy file; InputErrors name the flag, the file and `expected`.

    The header is checked before anything is allocated: a float dtype, a shape of non-negative
    dimensions whose bytes are exactly the file's data (a header may claim any shape)."""
    path = Path(path)
    fix = f"save {what} {expected} with numpy.save"
    if not path.exists():
        raise InputError(f"{flag} {path}: no such file; {fix}")
    if not path.is_file():
        raise InputError(f"{flag} {path}: not a regular file; {fix}")
    try:
        with open(path, "rb") as f:
            if f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC:
                raise InputError(f"{flag} {path}: an .npz archive; save one array {expected} "
                                 "with numpy.save")
        shape, dtype, data_bytes = _npy_header(path)
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        raise InputError(f"{flag} {path}: not a .npy array ({first_line(exc):.200}); {fix}") from None
    if dtype.hasobject or str(dtype) not in _HIDDEN_DTYPES:
        raise InputError(
            f"{flag} {path}: {what} have dtype {dtype}, expected one of {', '.join(_HIDDEN_DTYPES)}"
        )
    count = 1
    for d in shape:
        count *= d
    if any(d < 0 for d in shape) or count * dtype.itemsize != data_bytes:
        raise InputError(f"{flag} {path}: its header declares shape {list(shape)} of "
                         f"{dtype}, but the file holds {data_bytes:,} bytes of data; it is "
                         f"truncated or corrupt, {fix}")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{flag} {path}: not a .npy array ({first_line(exc):.200}); {fix}") from None


def load_hidden_states(path: Path, hidden_size: int, dtype: str, flag: str = "--inputs") -> np.ndarray:
    """Hidden states [batch, hidden_size] from a .npy file, rounded to the library's `dtype`.

    Every problem is an InputError naming the file, what it holds and what is expected.
    """
    expected = f"[batch, {hidden_size}] floats"
    loaded = _load_float_array(path, flag, "hidden states", expected)
    if loaded.ndim != 2 or loaded.shape[1] != hidden_size or loaded.shape[0] < 1:
        raise InputError(
            f"{flag} {path}: hidden states have shape {list(loaded.shape)}, expected {expected} "
            f"(the library's hidden_size is {hidden_size})"
        )
    with np.errstate(over="ignore"):  # values beyond the dtype's range become inf, refused below
        rounded = cast_to(loaded, dtype)
    finite = np.isfinite(rounded.astype(np.float32))
    if not finite.all():
        row = int(np.argwhere(~finite)[0][0])
        raise InputError(
            f"{flag} {path}: row {row} holds NaN or Inf once rounded to the library's {dtype}; "
            "hidden states must be finite and within the dtype's range"
        )
    return rounded


def load_base_logits(path: Path, batch: int, vocab_size: int) -> np.ndarray:
    """Base-model logits [batch, vocab] float32 from a .npy file, one row per hidden-state row."""
    expected = f"[{batch}, {vocab_size}] floats (one row per row of hidden states)"
    loaded = _load_float_array(path, "--base-logits", "base logits", expected)
    if loaded.shape != (batch, vocab_size):
        raise InputError(f"--base-logits {path}: base logits have shape {list(loaded.shape)}, expected {expected}")
    return cast_to(loaded, "float32")


