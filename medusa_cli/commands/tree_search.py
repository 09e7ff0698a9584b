"""`medusa tree-search`: the Medusa tree of N paths that accepts the most tokens per step.

    from medusa_cli.commands.tree_search import TreeSearchRequest, search_tree
    result = search_tree(TreeSearchRequest(accuracy=Path("accuracy.json"), nodes=(64,),
                                           output=Path("tree.json")))

Under the model (tree_search.py: heads right independently with their per-rank accuracies) the
tree maximises the expected acceptance length; with ranks from `medusa eval` it maximises the
acceptance measured on that data instead, and both figures are reported either way there is
data. FasterDecoding's greedy search is run beside it for comparison. The written tree is a
medusa_choices JSON (`medusa tree` and `medusa compile --tree` load it) whose paths are listed
best first: its first n paths are the best tree of n paths.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import InputError
from ..outputs import write_together
from ..plots import tree_svg
from ..tree_search import (
    AccuracyTable,
    RankCounts,
    SearchLimits,
    expected_acceptance,
    greedy_paths,
    optimal_paths,
    optimal_paths_on_data,
    path_probability,
    search_limits,
)
from ..trees import DEFAULT_TOPK, TreePath
from ..verify.accuracy import load_accuracy, load_ranks

# the objective searched: the model's expectation, or what the data accepts
MODEL, DATA = "model", "data"


@dataclasses.dataclass
class TreeSearchRequest:
    # `medusa eval`'s JSON or FasterDecoding's heads_accuracy.pt
    accuracy: Path
    # tree sizes (paths, the root not counted); several give the curve
    nodes: tuple[int, ...]
    # None: every head of the table
    max_depth: int | None = None
    # ranks allowed per depth: one value for all, or one per depth; None: every rank
    max_child: tuple[int, ...] | None = None
    # the .ranks.npy `medusa eval -o` wrote: search what the data accepts
    ranks: Path | None = None
    # medusa_choices JSON to write (one --nodes value)
    output: Path | None = None
    # SVG of the tree (one --nodes value)
    plot: Path | None = None


@dataclasses.dataclass
class CurvePoint:
    nodes: int
    # under the model, of the tree found
    expected_acceptance_length: float
    # of FasterDecoding's greedy tree of this size, under the model
    greedy_expected_acceptance_length: float
    # on the data (with ranks), of the tree found
    measured_acceptance_length: float | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TreeSearchResult:
    accuracy: str
    objective: str
    limits: SearchLimits
    # the tree of the largest size, best first (its first n paths: the tree of n paths)
    paths: list[TreePath]
    curve: list[CurvePoint]
    # positions the measured figures count (with ranks)
    positions: int | None
    output: Path | None
    plot: Path | None

    @property
    def topk(self) -> int:
        """The --topk `medusa compile --tree` needs for this tree: its highest rank + 1."""
        return max(DEFAULT_TOPK, 1 + max(max(p) for p in self.paths))

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "objective": self.objective,
            "max_depth": self.limits.max_depth,
            "max_child": list(self.limits.max_child),
            "nodes": self.curve[-1].nodes,
            "expected_acceptance_length": self.curve[-1].expected_acceptance_length,
            "measured_acceptance_length": self.curve[-1].measured_acceptance_length,
            "greedy_expected_acceptance_length": self.curve[-1].greedy_expected_acceptance_length,
            "positions": self.positions,
            "topk": self.topk,
            "paths": [list(p) for p in self.paths],
            "curve": [point.to_dict() for point in self.curve],
            "output": None if self.output is None else str(self.output),
            "plot": None if self.plot is None else str(self.plot),
        }


def _check_request(request: TreeSearchRequest) -> tuple[int, ...]:
    sizes = tuple(request.nodes)
    if not sizes:
        raise InputError("--nodes: give a tree size such as 64, or sizes such as 16,32,64,128")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InputError(f"--nodes {size}: a tree needs at least one path")
    if len(sizes) > 1 and (request.output is not None or request.plot is not None):
        raise InputError(
            f"--nodes {','.join(map(str, sizes))}: -o and --plot write one tree; pass the one "
            "size you chose from the curve")
    for flag, path, suffix in (("-o", request.output, ".json"), ("--plot", request.plot, ".svg")):
        if path is not None and (Path(path).suffix != suffix or Path(path).is_dir()):
            raise InputError(f"{flag} {path}: give a file name ending in {suffix}")
    return tuple(sorted(set(sizes)))


def search_tree(request: TreeSearchRequest) -> TreeSearchResult:
    """Search, score the curve, write the tree (and its picture)."""
    sizes = _check_request(request)
    table = load_accuracy(request.accuracy)
    limits = search_limits(table.num_heads, table.num_ranks, request.max_depth,
                           request.max_child, source=table.source)
    largest = sizes[-1]
    counts = None
    if request.ranks is not None:
        ranks = load_ranks(request.ranks)
        counts = RankCounts(ranks, limits.max_depth, source=f"--ranks {request.ranks}")
        if counts.max_rank >= table.num_ranks:
            raise InputError(
                f"--ranks {request.ranks}: holds rank {counts.max_rank} but {table.source} has "
                f"ranks 0..{table.num_ranks - 1}; pass the files one `medusa eval` wrote")
        if counts.rows == 0:
            raise InputError(
                f"--ranks {request.ranks}: no position has a right token for all "
                f"{limits.max_depth} heads; evaluate longer sequences or lower --max-depth")
        paths = [p for p, _ in optimal_paths_on_data(counts, largest, limits)]
    else:
        paths = [p for p, _ in optimal_paths(table, largest, limits)]
    greedy = greedy_paths(table, largest, limits)

    curve = []
    for size in sizes:
        curve.append(CurvePoint(
            nodes=size,
            expected_acceptance_length=expected_acceptance(paths[:size], table),
            greedy_expected_acceptance_length=expected_acceptance(greedy[:size], table),
            measured_acceptance_length=None if counts is None else
            counts.measured_acceptance(paths[:size]),
        ))
    result = TreeSearchResult(
        accuracy=str(request.accuracy), objective=MODEL if counts is None else DATA,
        limits=limits, paths=paths, curve=curve,
        positions=None if counts is None else counts.rows,
        output=request.output, plot=request.plot,
    )
    _write_outputs(result, table)
    return result


def tree_file_text(name: str, source: str, paths: list[TreePath], **figures) -> str:
    """A medusa_choices JSON as configs/trees holds them: one path per line."""
    head = {"name": name, "source": source, **figures}
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}," for key, value in head.items()]
    body = ",\n".join(f"    {json.dumps(list(p))}" for p in paths)
    return "{\n" + "\n".join(lines) + '\n  "paths": [\n' + body + "\n  ]\n}\n"


def _write_outputs(result: TreeSearchResult, table: AccuracyTable) -> None:
    writes = []
    point = result.curve[-1]
    if result.output is not None:
        text = tree_file_text(
            Path(result.output).stem,
            f"medusa tree-search --accuracy {result.accuracy} (objective: {result.objective}); "
            "paths best first",
            result.paths,
            expected_acceptance_length=point.expected_acceptance_length,
            measured_acceptance_length=point.measured_acceptance_length,
            topk=result.topk,
        )
        writes.append((Path(result.output), lambda path: path.write_text(text)))
    if result.plot is not None:
        probability = {p: path_probability(p, table.accuracy) for p in result.paths}
        title = (f"{len(result.paths)} paths: expected acceptance length "
                 f"{point.expected_acceptance_length:.3f}")
        if point.measured_acceptance_length is not None:
            title += f", {point.measured_acceptance_length:.3f} measured on the data"
        svg = tree_svg(result.paths, probability, title)
        writes.append((Path(result.plot), lambda path: path.write_text(svg)))
    try:
        write_together(writes)
    except OSError as exc:
        raise InputError(f"cannot write the outputs ({exc.strerror or exc}); nothing was "
                         "written") from None
