"""`medusa run`: compiled heads on given hidden states -> one .npz of logits (and top-k ids).

    from medusa_cli.run import RunRequest, run_heads
    run_heads(RunRequest("heads.so", "params", inputs=Path("hidden.npy"), output=Path("logits.npz")))

The output holds `head_0` ... `head_{n-1}` (float32 [batch, vocab]) and, with top_k, also
`head_i_topk` (int32 [batch, top_k], best first, ties to the lower token id). With base_logits
(and a library compiled with a tree) also `tree_candidates` [batch, nodes] and
`cart_candidates` [batch, leaves, depth + 1], int32. It is written to a
temporary file beside the output and renamed, so a failure never leaves a partial file.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from .config import MedusaConfig
from .atomic import staged_file
from .errors import InputError
from .quant import NUMPY_DTYPES, cast_to

# dtypes a hidden-states file may hold; anything else (ints, bools, objects) is refused.
_HIDDEN_DTYPES = ("float64", "float32", "float16", "bfloat16")
# metadata fields `medusa compile` writes that running and verifying rely on
_LIBRARY_KEYS = ("model_config", "quantization", "dtype", "max_batch_size", "params")


@dataclasses.dataclass
class RunRequest:
    library: Path
    params_dir: Path
    # .npy of hidden states [batch, hidden_size]
    inputs: Path
    # .npz to write
    output: Path
    device: str = "cpu"
    # also write each head's top-k token ids; None writes logits only
    top_k: int | None = None
    # .npy of the base model's logits [batch, vocab]: also write the tree candidates
    # (needs a library compiled with --tree)
    base_logits: Path | None = None


@dataclasses.dataclass
class RunResult:
    output: Path
    batch: int
    num_heads: int
    vocab_size: int
    top_k: int | None
    device: str
    # arrays in the .npz, in order
    arrays: list[str]
    seconds: float

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "batch": self.batch,
            "num_heads": self.num_heads,
            "vocab_size": self.vocab_size,
            "top_k": self.top_k,
            "device": self.device,
            "arrays": self.arrays,
            "seconds": round(self.seconds, 3),
        }


def read_library(library: Path) -> tuple[dict, MedusaConfig]:
    """A library's metadata and head config, read from the file without loading it."""
    from .compile import read_library_metadata

    metadata = read_library_metadata(library)
    if metadata.get("model_type") != "medusa":
        raise InputError(
            f"{library}: model_type is {metadata.get('model_type')!r}, not 'medusa'; pass a "
            "library built by `medusa compile`"
        )
    missing = [key for key in _LIBRARY_KEYS if key not in metadata]
    if missing:
        raise InputError(
            f"{library}: its metadata lacks {', '.join(missing)}; rebuild it with `medusa compile`"
        )
    return metadata, MedusaConfig.from_dict(metadata["model_config"])


def _load_float_array(path: Path, flag: str, what: str, expected: str) -> np.ndarray:
    """One float array from a .npy file; InputErrors name the flag, the file and `expected`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{flag} {path}: no such file; save {what} {expected} with numpy.save")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(
            f"{flag} {path}: not a .npy array ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
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


def to_float64(array: np.ndarray) -> np.ndarray:
    """float64 copy of a float array, bfloat16 included (exact)."""
    if array.dtype == NUMPY_DTYPES["bfloat16"]:
        array = array.astype(np.float32)
    return array.astype(np.float64)


def logits_in_batches(heads, hidden: np.ndarray) -> list[np.ndarray]:
    """heads.get_logits over hidden [batch, hidden] in slices of the library's max batch size;
    per head float32 [batch, vocab]."""
    step = heads.max_batch_size
    parts = [heads.get_logits(hidden[start:start + step]) for start in range(0, hidden.shape[0], step)]
    return [np.concatenate([part[h] for part in parts]) for h in range(len(parts[0]))]


def top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """int32 [batch, k]: the k largest logits' token ids per row, best first, ties to the lower id."""
    order = np.argsort(-logits, axis=1, kind="stable")  # (batch, vocab)
    return np.ascontiguousarray(order[:, :k]).astype(np.int32)


def load_base_logits(path: Path, batch: int, vocab_size: int) -> np.ndarray:
    """Base-model logits [batch, vocab] float32 from a .npy file, one row per hidden-state row."""
    expected = f"[{batch}, {vocab_size}] floats (one row per row of hidden states)"
    loaded = _load_float_array(path, "--base-logits", "base logits", expected)
    if loaded.shape != (batch, vocab_size):
        raise InputError(f"--base-logits {path}: base logits have shape {list(loaded.shape)}, expected {expected}")
    return cast_to(loaded, "float32")


def candidates_in_batches(heads, base_logits: np.ndarray, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """heads.get_tree_candidates in slices of the library's max batch size."""
    step = heads.max_batch_size
    parts = [heads.get_tree_candidates(base_logits[i:i + step], hidden[i:i + step])
             for i in range(0, hidden.shape[0], step)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def write_npz_atomically(output: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez into a temporary file beside `output`, renamed into place once complete."""
    output = Path(output)
    try:
        with staged_file(output) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    except OSError as exc:
        raise InputError(f"-o {output}: writing failed ({exc.strerror or exc}); nothing was written") from None


def run_heads(request: RunRequest) -> RunResult:
    """Run the library on request.inputs and write request.output."""
    from .runtime import load_heads

    started = time.perf_counter()
    output = Path(request.output)
    if output.suffix != ".npz":
        raise InputError(f"-o {output}: logits are written as a numpy .npz archive; name it *.npz")
    if output.is_dir():
        raise InputError(f"-o {output}: is a directory; give a file name ending in .npz")
    # Inputs are checked against the metadata before the parameters are loaded.
    metadata, config = read_library(request.library)
    if request.top_k is not None and not 1 <= request.top_k <= config.vocab_size:
        raise InputError(
            f"--top-k {request.top_k}: must be between 1 and the vocab size {config.vocab_size}"
        )
    hidden = load_hidden_states(request.inputs, config.hidden_size, metadata["dtype"])
    base_logits = None
    if request.base_logits is not None:
        if not metadata.get("tree"):
            raise InputError(
                f"--base-logits: {request.library} was compiled without a tree; recompile with "
                "`medusa compile --tree CHOICES` to get tree candidates"
            )
        base_logits = load_base_logits(request.base_logits, int(hidden.shape[0]), config.vocab_size)
    heads = load_heads(request.library, request.params_dir, device=request.device)
    vocab = heads.config.vocab_size

    arrays: dict[str, np.ndarray] = {}
    for h, logits in enumerate(logits_in_batches(heads, hidden)):
        arrays[f"head_{h}"] = logits
        if request.top_k is not None:
            arrays[f"head_{h}_topk"] = top_k_ids(logits, request.top_k)
    if base_logits is not None:
        arrays["tree_candidates"], arrays["cart_candidates"] = candidates_in_batches(heads, base_logits, hidden)
    write_npz_atomically(output, arrays)
    return RunResult(
        output=output,
        batch=int(hidden.shape[0]),
        num_heads=heads.config.medusa_num_heads,
        vocab_size=vocab,
        top_k=request.top_k,
        device=request.device,
        arrays=list(arrays),
        seconds=time.perf_counter() - started,
    )
