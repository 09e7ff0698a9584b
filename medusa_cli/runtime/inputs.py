"""Arrays a user hands the runtime: hidden states and base-model logits in .npy files, checked
and rounded to the library's dtype with errors that name the flag, the file and what is expected."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError, first_line
from ..quantization import cast_to

# dtypes a hidden-states file may hold; anything else (ints, bools, objects) is refused.
_HIDDEN_DTYPES = ("float64", "float32", "float16", "bfloat16")


def _load_float_array(path: Path, flag: str, what: str, expected: str) -> np.ndarray:
    """One float array from a .npy file; InputErrors name the flag, the file and `expected`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{flag} {path}: no such file; save {what} {expected} with numpy.save")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(
            f"{flag} {path}: not a .npy array ({first_line(exc)}); "
            f"save {what} {expected} with numpy.save"
        ) from None
    if not isinstance(loaded, np.ndarray):
        loaded.close()
        raise InputError(f"{flag} {path}: an .npz archive; save one array {expected} with numpy.save")
    if str(loaded.dtype) not in _HIDDEN_DTYPES:
        raise InputError(
            f"{flag} {path}: {what} have dtype {loaded.dtype}, expected one of {', '.join(_HIDDEN_DTYPES)}"
        )
    return loaded


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


