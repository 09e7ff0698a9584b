"""`medusa run`: compiled heads on given hidden states -> one .npz of logits (and top-k ids).

    from medusa_cli.commands.run import RunRequest, run_heads
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

from ..errors import InputError
from ..library import read_library_metadata
from ..outputs import staged_file
from ..runtime.heads import candidates_in_batches, load_heads, logits_in_batches
from ..runtime.inputs import load_base_logits, load_hidden_states


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


def top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """int32 [batch, k]: the k largest logits' token ids per row, best first, ties to the lower id."""
    order = np.argsort(-logits, axis=1, kind="stable")  # (batch, vocab)
    return np.ascontiguousarray(order[:, :k]).astype(np.int32)


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
    started = time.perf_counter()
    output = Path(request.output)
    if output.suffix != ".npz":
        raise InputError(f"-o {output}: logits are written as a numpy .npz archive; name it *.npz")
    if output.is_dir():
        raise InputError(f"-o {output}: is a directory; give a file name ending in .npz")
    # Inputs are checked against the metadata before the parameters are loaded.
    metadata = read_library_metadata(request.library, load=True)
    config = metadata.config
    if request.top_k is not None and not 1 <= request.top_k <= config.vocab_size:
        raise InputError(
            f"--top-k {request.top_k}: must be between 1 and the vocab size {config.vocab_size}"
        )
    hidden = load_hidden_states(request.inputs, config.hidden_size, metadata.dtype)
    base_logits = None
    if request.base_logits is not None:
        if metadata.tree is None:
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
