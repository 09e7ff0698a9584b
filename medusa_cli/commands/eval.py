"""`medusa eval`: how well the compiled heads predict on real data, and what quantization cost.

    from medusa_cli.commands.eval import EvalRequest, evaluate_heads
    result = evaluate_heads(EvalRequest("heads.so", "params", data=Path("eval.npz"),
                                        output=Path("accuracy.json")))

For every position of the evaluation set (verify/eval_data.py) and every head, the rank of the
right token in the head's logits: once from the library (batches of its max batch size), once
from the float64 oracle of the ORIGINAL checkpoint (as `medusa verify` reads it; one head at a
time, each over the whole set). Neither holds more than a batch of logits. Per head and per
rank, how often that rank was right, with 95% Wilson intervals, and the cumulative top-k.

-o writes the report as JSON ({"accuracy": [[per rank] per head], ...}, what `medusa
tree-search` and `medusa tree --accuracy` read) and beside it, as NAME.ranks.npy, the library's
rank of the right token at every (position, head): int32 [positions, heads], -1 outside the top
K, -2 where the position has no right token for that head (its sequence ends first), for
`medusa tree-search --ranks`. Every output appears whole or not at all.

The oracle sees the hidden states exactly as given; the library rounds them to its dtype, which
is part of what running it costs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ..dtypes import to_float64
from ..errors import InputError
from ..library import read_library_metadata
from ..outputs import write_together
from ..packed.config import read_packed_config
from ..packed.tensor_cache import read_tensor_cache
from ..plots import accuracy_curves_svg
from ..quantization import get_scheme
from ..runtime.heads import load_heads
from ..tree_search import RANK_NO_LABEL, RANK_OUTSIDE
from ..verify.accuracy import INTERVAL, HeadAccuracy, head_accuracies, label_ranks
from ..verify.eval_data import EvalData
from ..verify.oracle import head_logits
from ..verify.report import SourceUsed
from ..verify.source import check_source_flags, open_oracle_heads

DEFAULT_TOP_K = 10
# The oracle's batches: rows whose float64 logits take about this many bytes (numpy's matrix
# products are memory-bound on a few rows; a head's weights are read once per batch).
_ORACLE_BATCH_BYTES = 64 << 20

Progress = Callable[[int, int], None]


@dataclasses.dataclass
class EvalRequest:
    library: Path
    params_dir: Path
    # .npz (hidden, tokens[, sequence]) or a directory of hidden.npy, tokens.npy[, sequence.npy]
    data: Path
    # ranks counted per head; the rest is "outside the top K"
    top_k: int = DEFAULT_TOP_K
    # accuracy JSON to write (ranks beside it as NAME.ranks.npy); None writes nothing
    output: Path | None = None
    # an .svg of each head's top-k accuracy, library against oracle
    plot: Path | None = None
    device: str = "cpu"
    # the oracle's checkpoint and base lm_head, as for `medusa verify`
    source: Path | None = None
    lm_head: Path | None = None
    # False: the library alone (the oracle costs a pass over the data per head)
    oracle: bool = True


@dataclasses.dataclass
class EvalResult:
    library: Path
    params_dir: Path
    quantization: str
    data: dict
    top_k: int
    # the library's accuracy per head
    heads: list[HeadAccuracy]
    # the oracle's, and where its weights came from; None without the oracle
    oracle: list[HeadAccuracy] | None
    source: SourceUsed | None
    # int32 [positions, heads]: the library's rank of the right token
    ranks: np.ndarray
    output: Path | None
    ranks_file: Path | None
    plot: Path | None
    warnings: list[str]
    seconds: float

    @property
    def accuracy(self) -> list[list[float]]:
        return [head.per_rank for head in self.heads]

    def to_dict(self) -> dict:
        oracle = None
        if self.oracle is not None:
            oracle = {
                "source": {**dataclasses.asdict(self.source), "path": str(self.source.path)},
                "accuracy": [head.per_rank for head in self.oracle],
                "heads": [head.to_dict() for head in self.oracle],
                # oracle minus library, per head: what quantization and compilation cost
                "top_k_lost": [[o - q for o, q in zip(oh.top_k, qh.top_k)]
                               for oh, qh in zip(self.oracle, self.heads)],
            }
        return {
            "accuracy": self.accuracy,
            "samples": [head.samples for head in self.heads],
            "top_k": self.top_k,
            "interval": INTERVAL,
            "library": str(self.library),
            "params_dir": str(self.params_dir),
            "quantization": self.quantization,
            "data": self.data,
            "heads": [head.to_dict() for head in self.heads],
            "oracle": oracle,
            "ranks": None if self.ranks_file is None else {
                "file": self.ranks_file.name, "shape": list(self.ranks.shape),
                "outside_top_k": RANK_OUTSIDE, "no_label": RANK_NO_LABEL},
            "output": None if self.output is None else str(self.output),
            "plot": None if self.plot is None else str(self.plot),
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }


def ranks_path(output: Path) -> Path:
    """Where the ranks go beside accuracy JSON `output`: accuracy.json -> accuracy.ranks.npy."""
    return output.with_suffix(".ranks.npy")


def _check_outputs(request: EvalRequest) -> None:
    for flag, path, suffix in (("-o", request.output, ".json"), ("--plot", request.plot, ".svg")):
        if path is None:
            continue
        if Path(path).suffix != suffix:
            raise InputError(f"{flag} {path}: name it *{suffix}")
        if Path(path).is_dir():
            raise InputError(f"{flag} {path}: is a directory; give a file name ending in {suffix}")


def _library_ranks(runtime, data: EvalData, labels: np.ndarray, top_k: int,
                   report: Callable[[int], None]) -> np.ndarray:
    """int32 [positions, heads]: the rank of the right token in the library's logits;
    report(positions done) after each batch."""
    ranks = np.full(labels.shape, RANK_NO_LABEL, dtype=np.int32)
    for start, hidden in data.hidden_batches(runtime.max_batch_size):
        stop = start + hidden.shape[0]
        for head, logits in enumerate(runtime.get_logits(hidden)):  # each [batch, vocab]
            wanted = labels[start:stop, head]
            rows = np.flatnonzero(wanted != RANK_NO_LABEL)
            ranks[start + rows, head] = label_ranks(logits[rows], wanted[rows], top_k)
        report(stop)
    return ranks


def _oracle_ranks(heads, data: EvalData, labels: np.ndarray, top_k: int, vocab: int,
                  report: Callable[[int], None]) -> np.ndarray:
    """The same from the oracle's float64 logits, one head at a time over the whole set;
    report(positions done, counted over every head's pass) after each batch."""
    ranks = np.full(labels.shape, RANK_NO_LABEL, dtype=np.int32)
    rows_per_batch = max(1, _ORACLE_BATCH_BYTES // (8 * vocab))
    for head, weights in enumerate(heads):
        for start, hidden in data.hidden_batches(rows_per_batch):
            wanted = labels[start:start + hidden.shape[0], head]
            rows = np.flatnonzero(wanted != RANK_NO_LABEL)
            if rows.size:
                logits = head_logits(weights, to_float64(hidden[rows]))  # [rows, vocab]
                ranks[start + rows, head] = label_ranks(logits, wanted[rows], top_k)
            report(head * data.positions + start + hidden.shape[0])
        del weights
    return ranks


def evaluate_heads(request: EvalRequest, progress: Progress | None = None) -> EvalResult:
    """Rank the right tokens with the library (and the oracle), count, write the outputs.
    progress(done, total) counts positions over every pass."""
    started = time.perf_counter()
    library, params_dir = Path(request.library), Path(request.params_dir)
    _check_outputs(request)
    check_source_flags(request.source, request.lm_head)
    metadata = read_library_metadata(library, load=True)
    config = metadata.config
    if not 1 <= request.top_k <= config.vocab_size:
        raise InputError(f"--top-k {request.top_k}: must be between 1 and the vocab size "
                         f"{config.vocab_size}")
    data = EvalData(Path(request.data), config.hidden_size, config.vocab_size)
    num_heads = config.medusa_num_heads
    labels = np.stack([data.labels(head) for head in range(num_heads)], axis=1)  # [T, heads]
    warnings = []
    if (labels == RANK_NO_LABEL).all(axis=0).any():
        head = int(np.argmax((labels == RANK_NO_LABEL).all(axis=0)))
        warnings.append(f"--data {data.path}: no position has a right token for head {head} "
                        f"(sequences shorter than {head + 2} positions); its accuracy is 0 of 0")

    total = data.positions * (1 + (num_heads if request.oracle else 0))

    def report_from(offset: int) -> Callable[[int], None]:
        if progress is None:
            return lambda done: None
        return lambda done: progress(offset + done, total)

    oracle = source = None
    with ExitStack() as stack:
        opened = None
        if request.oracle:  # the source is resolved (and its shapes checked) before any pass
            opened = open_oracle_heads(stack, params_dir, read_packed_config(params_dir), config,
                                       get_scheme(metadata.quantization),
                                       read_tensor_cache(params_dir), request.source,
                                       request.lm_head)
            source = opened.source
        runtime = load_heads(library, params_dir, device=request.device)
        ranks = _library_ranks(runtime, data, labels, request.top_k, report_from(0))
        del runtime
        if opened is not None:
            oracle_ranks = _oracle_ranks(opened.heads, data, labels, request.top_k,
                                         config.vocab_size, report_from(data.positions))
            oracle = head_accuracies(oracle_ranks, request.top_k)
            warnings += opened.finish()

    result = EvalResult(
        library=library, params_dir=params_dir, quantization=metadata.quantization,
        data=data.describe(), top_k=request.top_k, heads=head_accuracies(ranks, request.top_k),
        oracle=oracle, source=source, ranks=ranks, output=request.output,
        ranks_file=None if request.output is None else ranks_path(Path(request.output)),
        plot=request.plot, warnings=warnings, seconds=0.0,
    )
    result.seconds = time.perf_counter() - started
    _write_outputs(result)
    return result


def _write_outputs(result: EvalResult) -> None:
    """The JSON, the ranks and the plot, renamed into place only once all are written."""
    writes = []
    if result.output is not None:
        text = json.dumps(result.to_dict(), indent=2) + "\n"
        writes.append((result.ranks_file, lambda path: np.save(path, result.ranks)))
        writes.append((Path(result.output), lambda path: path.write_text(text)))
    if result.plot is not None:
        curves = [("library", [h.top_k for h in result.heads])]
        if result.oracle is not None:
            curves.append(("oracle", [h.top_k for h in result.oracle]))
        svg = accuracy_curves_svg(curves, title=f"top-k accuracy per head: {result.library.name} "
                                                f"({result.quantization}) against the oracle")
        writes.append((Path(result.plot), lambda path: path.write_text(svg)))
    try:
        write_together(writes)
    except OSError as exc:
        raise InputError(f"cannot write the outputs ({exc.strerror or exc}); nothing was "
                         "written") from None
