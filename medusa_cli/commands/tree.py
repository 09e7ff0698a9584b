"""`medusa tree`: a tree's Medusa buffers and summary, its expected acceptance length under an
accuracy table, and its picture.

    from medusa_cli.commands.tree import TreeRequest, describe_tree
    result = describe_tree(TreeRequest("mc_sim_7b_63", accuracy=Path("accuracy.json")))
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import InputError
from ..outputs import write_together
from ..plots import tree_svg
from ..tree_search import RankCounts, expected_acceptance, path_probability
from ..trees import DEFAULT_TOPK, MedusaTree, build_buffers, describe, load_tree
from ..verify.accuracy import load_accuracy, load_ranks


@dataclasses.dataclass
class TreeRequest:
    # a shipped tree's name or a JSON file of paths
    choices: str
    topk: int = DEFAULT_TOPK
    # refuse trees deeper than this many heads
    num_heads: int | None = None
    # .npz of the buffers
    output: Path | None = None
    # `medusa eval`'s JSON or heads_accuracy.pt: add the expected acceptance length
    accuracy: Path | None = None
    # .svg of the tree
    plot: Path | None = None
    # `medusa eval`'s NAME.ranks.npy: add the acceptance measured on that data
    ranks: Path | None = None


@dataclasses.dataclass
class TreeResult:
    tree: MedusaTree
    topk: int
    # trees.describe's summary
    summary: dict
    expected_acceptance_length: float | None
    output: Path | None
    plot: Path | None
    # with ranks: the mean accepted length on the data, over that many positions
    measured_acceptance_length: float | None = None
    positions: int | None = None

    def to_dict(self) -> dict:
        extra = {"expected_acceptance_length": self.expected_acceptance_length,
                 "measured_acceptance_length": self.measured_acceptance_length,
                 "positions": self.positions}
        if self.output is not None:
            extra["output"] = str(self.output)
        if self.plot is not None:
            extra["plot"] = str(self.plot)
        return {**self.summary, **extra}


def describe_tree(request: TreeRequest) -> TreeResult:
    if request.plot is not None and Path(request.plot).suffix != ".svg":
        raise InputError(f"--plot {request.plot}: give a file name ending in .svg")
    tree = load_tree(request.choices, topk=request.topk, num_heads=request.num_heads)
    buffers = build_buffers(tree, request.topk)
    expected = probability = None
    if request.accuracy is not None:
        table = load_accuracy(request.accuracy)
        expected = expected_acceptance(tree.paths, table, what=f"tree '{tree.name}'")
        probability = {p: path_probability(p, table.accuracy) for p in tree.paths}
    measured = counts = None
    if request.ranks is not None:
        counts = RankCounts(load_ranks(request.ranks), tree.depth, source=f"--ranks {request.ranks}")
        measured = counts.measured_acceptance(tree.paths)
    if request.plot is not None:
        title = f"tree {tree.name}: {len(tree.paths)} paths"
        if expected is not None:
            title += f", expected acceptance length {expected:.3f}"
        svg = tree_svg(tree.paths, probability, title)
        try:
            write_together([(Path(request.plot), lambda path: path.write_text(svg))])
        except OSError as exc:
            raise InputError(f"--plot {request.plot}: cannot write it ({exc.strerror or exc})") from None
    output = buffers.to_npz(request.output) if request.output is not None else None
    return TreeResult(tree=tree, topk=request.topk, summary=describe(tree, request.topk),
                      expected_acceptance_length=expected, output=output, plot=request.plot,
                      measured_acceptance_length=measured,
                      positions=None if counts is None else counts.rows)
