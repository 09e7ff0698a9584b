"""How well heads predict: the rank of the right token in a head's logits, per-rank and top-k
accuracy with 95% Wilson score intervals, and the accuracy files `medusa tree-search` and
`medusa tree --accuracy` read (ours, and FasterDecoding's heads_accuracy.pt)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..checkpoint.pytorch import load_tensor_list
from ..errors import CheckpointError, InputError, first_line
from ..tree_search import RANK_NO_LABEL, RANK_OUTSIDE, AccuracyTable, accuracy_table

# two-sided 95%: the 0.975 quantile of the standard normal
Z_95 = 1.959963984540054
INTERVAL = "wilson score, 95%"
# accuracy files are small; anything larger is not one
_MAX_ACCURACY_BYTES = 64 * 1024 * 1024


def label_ranks(logits: np.ndarray, labels: np.ndarray, top_k: int) -> np.ndarray:
    """Rank of labels[b] among logits[b] ([rows, vocab]): the tokens ranked above it are those
    with a larger logit, or an equal one and a lower id (as top-k kernels break ties). int64
    [rows]; RANK_OUTSIDE from top_k on, and where the right token's logit is not finite."""
    rows = np.arange(logits.shape[0])
    right = logits[rows, labels][:, None]  # [rows, 1]
    ids = np.arange(logits.shape[1])[None, :]  # [1, vocab]
    above = (logits > right) | ((logits == right) & (ids < labels[:, None]))  # [rows, vocab]
    ranks = above.sum(axis=1).astype(np.int64)
    ranks[(ranks >= top_k) | ~np.isfinite(right[:, 0])] = RANK_OUTSIDE
    return ranks


def wilson_interval(successes: int, samples: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion; (0, 1) without samples."""
    if samples == 0:
        return 0.0, 1.0
    p = successes / samples
    z2 = Z_95 * Z_95
    centre = (p + z2 / (2 * samples)) / (1 + z2 / samples)
    half = Z_95 / (1 + z2 / samples) * math.sqrt(p * (1 - p) / samples + z2 / (4 * samples ** 2))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclasses.dataclass
class HeadAccuracy:
    """One head's accuracy over the positions that have a right token for it."""

    head: int
    samples: int
    # positions whose right token is at rank r, r = 0..K-1
    rank_counts: list[int]

    @property
    def per_rank(self) -> list[float]:
        return [c / self.samples if self.samples else 0.0 for c in self.rank_counts]

    @property
    def top_k(self) -> list[float]:
        """Cumulative: top_k[k - 1] is how often the right token is among the first k."""
        cumulative = np.cumsum(self.rank_counts).tolist()
        return [c / self.samples if self.samples else 0.0 for c in cumulative]

    def to_dict(self) -> dict:
        cumulative = np.cumsum(self.rank_counts).tolist()
        return {
            "head": self.head,
            "samples": self.samples,
            "accuracy": self.per_rank,
            "accuracy_interval": [list(wilson_interval(c, self.samples)) for c in self.rank_counts],
            "top_k": self.top_k,
            "top_k_interval": [list(wilson_interval(c, self.samples)) for c in cumulative],
        }


def head_accuracies(ranks: np.ndarray, top_k: int) -> list[HeadAccuracy]:
    """Per head, from ranks [positions, heads] (RANK_NO_LABEL where a position has no right
    token for the head)."""
    out = []
    for head in range(ranks.shape[1]):
        column = ranks[:, head]
        labelled = column[column != RANK_NO_LABEL]
        counts = np.bincount(labelled[labelled >= 0], minlength=top_k)[:top_k]
        out.append(HeadAccuracy(head=head, samples=int(labelled.size),
                                rank_counts=[int(c) for c in counts]))
    return out


# --------------------------------------------------------------------------- reading


def _regular_file(path: Path, flag: str, what: str) -> None:
    if not path.is_file():
        raise InputError(f"{flag} {path}: no such file; pass {what}")
    if path.stat().st_size > _MAX_ACCURACY_BYTES:
        raise InputError(f"{flag} {path}: {path.stat().st_size} bytes is too large for {what}")


def _read_json_accuracy(path: Path, flag: str) -> AccuracyTable:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise InputError(f"{flag} {path}: not a JSON accuracy file ({first_line(exc)})") from None
    if not isinstance(data, dict) or "accuracy" not in data:
        raise InputError(
            f"{flag} {path}: expected an object with \"accuracy\": [[per-rank accuracy] per head], "
            "as `medusa eval -o` writes it")
    samples = data.get("samples")
    return accuracy_table(data["accuracy"], f"{flag} {path}",
                          samples if isinstance(samples, list) else None)


def _read_torch_accuracy(path: Path, flag: str) -> AccuracyTable:
    """FasterDecoding's heads_accuracy.pt: one bool tensor [positions, top-k] per head, True
    where that rank's token was the right one."""
    source = f"{flag} {path}"
    try:
        tensors = load_tensor_list(path)
    except CheckpointError as exc:
        raise InputError(f"{flag}: {exc}") from None
    if not tensors:
        raise InputError(f"{source}: holds an empty list; expected one tensor per head")
    rows = []
    samples = []
    for head, tensor in enumerate(tensors):
        if tensor.ndim != 2 or tensor.shape[1] != tensors[0].shape[1]:
            raise InputError(
                f"{source}: tensor {head} has shape {list(tensor.shape)}; heads_accuracy.pt holds "
                f"[positions, top-k] per head, every head the same top-k")
        if tensor.dtype != np.bool_ and not np.isin(tensor, (0, 1)).all():
            raise InputError(f"{source}: tensor {head} holds values other than 0 and 1; "
                             "expected the bool tensors heads_accuracy.py saves")
        hits = tensor.astype(bool)
        samples.append(int(hits.shape[0]))
        rows.append(hits.mean(axis=0) if hits.shape[0] else np.zeros(hits.shape[1]))
    return accuracy_table(np.stack(rows), source, samples)


# suffix -> reader
_ACCURACY_READERS: dict[str, Callable[[Path, str], AccuracyTable]] = {
    ".json": _read_json_accuracy,
    ".pt": _read_torch_accuracy,
    ".pth": _read_torch_accuracy,
}


def load_accuracy(path: Path, flag: str = "--accuracy") -> AccuracyTable:
    """Per-rank accuracy of each head from `medusa eval`'s JSON or FasterDecoding's
    heads_accuracy.pt."""
    path = Path(path)
    reader = _ACCURACY_READERS.get(path.suffix)
    if reader is None:
        raise InputError(
            f"{flag} {path}: expected a .json file from `medusa eval -o` or FasterDecoding's "
            f"heads_accuracy.pt ({', '.join(_ACCURACY_READERS)})")
    _regular_file(path, flag, "an accuracy file")
    return reader(path, flag)


def load_ranks(path: Path, flag: str = "--ranks") -> np.ndarray:
    """The ranks array `medusa eval` writes beside its JSON: int [positions, heads]."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{flag} {path}: no such file; pass the .ranks.npy `medusa eval -o` wrote")
    try:
        ranks = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{flag} {path}: not a .npy array ({first_line(exc)})") from None
    if not isinstance(ranks, np.ndarray):
        ranks.close()
        raise InputError(f"{flag} {path}: an .npz archive; pass the .ranks.npy `medusa eval` wrote")
    if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
        raise InputError(
            f"{flag} {path}: holds {ranks.dtype} {list(ranks.shape)}; expected integer ranks "
            "[positions, heads] as `medusa eval` writes them")
    return ranks
