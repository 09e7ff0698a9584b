"""The Medusa tree that accepts the most tokens per step, and what a tree accepts.

The model (FasterDecoding's): head d's r-th ranked token is the right one with probability
a[d][r], its per-rank accuracy (from `medusa eval` or FasterDecoding's heads_accuracy.pt), and
heads are right independently. A tree path p = (r0, ..., r_{m-1}) is accepted when every one of
its tokens is right, with probability w(p) = a[0][r0] * ... * a[m-1][r_{m-1}]. A verification
step accepts the root (the base model's own token) and the longest accepted path; in a
prefix-closed tree the accepted paths are exactly the prefixes of that one, so

    expected acceptance length = 1 + sum over the tree's paths of w(p).

Search. Every accuracy is at most 1, so a child never weighs more than its parent:
w(p + (r,)) = w(p) * a[len(p)][r] <= w(p) (in floating point too: rounding is monotone). Order
all paths the limits allow by (-w, length, path). A parent comes strictly before each of its
children, so the first N paths in that order are prefix-closed; being the N heaviest paths, they
have the largest sum that any N paths have, prefix-closed or not. That is the optimal tree, for
any table, whether or not accuracies fall with rank. Best-first search lists paths in exactly
that order: start from the root's children, always take the lightest key from a heap and push
its children (each child's key is larger than its parent's, so nothing taken later can come
before). N pops of a heap that grows by C per pop, C the most children a node may have:
O(N * C * log(N * C)) time and O(N * C) memory, one run giving every smaller N at once (a
prefix of the list is the best tree of its size).

FasterDecoding's greedy (medusa/eval/gen_results.py, explore_graph) grows the tree from [0] one
path at a time, choosing among each path's next sibling and first child only. It cannot take
rank 2 before rank 1, so it falls short of the optimum when some accuracies rise with rank; it is
kept here (greedy_paths) to report what it would have given.

On data, the model's independence assumption is dropped: with ranks[t, d] the rank of the right
token in head d's logits at position t (-1 outside the top K, -2 no label), the step at t accepts
1 + the number of tree paths that are prefixes of (ranks[t, 0], ranks[t, 1], ...), so the
acceptance measured on the data is 1 + sum over paths of c(p) / rows, c(p) the rows that start
with p. c(child) <= c(parent) as well, so the same best-first search on c gives the tree that
accepts the most on the data.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import numbers
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from .errors import InputError
from .trees import TreePath

# In a ranks array (medusa eval): the right token is outside the top K
RANK_OUTSIDE = -1
# ... or the position has no right token for this head (its sequence ends first)
RANK_NO_LABEL = -2

# Per-rank accuracies of one head are disjoint events and sum to at most 1; this much more is
# rounding in a file, more is a table of cumulative (top-k) accuracies.
_SUM_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class AccuracyTable:
    """Per-rank accuracy of each head: accuracy[d, r] is how often head d's r-th ranked token
    was the right one (not cumulative)."""

    # [heads, ranks] float64 in [0, 1]
    accuracy: np.ndarray
    # what it was read from, for messages
    source: str
    # positions each head was judged on, where known
    samples: tuple[int, ...] | None = None

    @property
    def num_heads(self) -> int:
        return int(self.accuracy.shape[0])

    @property
    def num_ranks(self) -> int:
        return int(self.accuracy.shape[1])


def accuracy_table(values, source: str, samples: Sequence[int] | None = None) -> AccuracyTable:
    """An AccuracyTable from nested lists or an array [heads][ranks], validated; messages
    start with `source`."""
    try:
        table = np.array(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(
            f"{source}: \"accuracy\" must be a list of per-head lists of numbers "
            "[[rank 0, rank 1, ...], ...] of one length") from None
    if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] < 1:
        raise InputError(
            f"{source}: \"accuracy\" has shape {list(table.shape)}; expected [heads, ranks] "
            "with at least one head and one rank, e.g. [[0.6, 0.1], [0.4, 0.1]]")
    bad = np.argwhere(~np.isfinite(table) | (table < 0) | (table > 1))
    if len(bad):
        head, rank = (int(i) for i in bad[0])
        raise InputError(
            f"{source}: accuracy of head {head} at rank {rank} is {table[head, rank]}; "
            "accuracies are fractions between 0 and 1")
    sums = table.sum(axis=1)
    if (sums > 1 + _SUM_TOLERANCE).any():
        head = int(np.argmax(sums > 1 + _SUM_TOLERANCE))
        raise InputError(
            f"{source}: head {head}'s per-rank accuracies add up to {sums[head]:.4f}, more than "
            "1; \"accuracy\" holds how often each rank alone is right (not cumulative top-k), "
            "as `medusa eval` writes it")
    if samples is not None:
        if len(samples) != table.shape[0] or not all(
                isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0
                for s in samples):
            raise InputError(f"{source}: \"samples\" must give one count >= 0 per head")
        samples = tuple(int(s) for s in samples)
    table.setflags(write=False)
    return AccuracyTable(accuracy=table, source=source, samples=samples)


@dataclasses.dataclass(frozen=True)
class SearchLimits:
    """Which paths a search may use: at most max_depth long, rank < max_child[d] at depth d
    (depth 0 is head 0)."""

    max_depth: int
    max_child: tuple[int, ...]

    @property
    def capacity(self) -> int:
        """How many paths these limits allow in all."""
        total, width = 0, 1
        for depth in range(self.max_depth):
            width *= self.max_child[depth]
            total += width
        return total


def search_limits(num_heads: int, num_ranks: int, max_depth: int | None = None,
                  max_child: Sequence[int] | None = None, source: str = "the accuracy table"
                  ) -> SearchLimits:
    """Limits for a table of num_heads x num_ranks: max_depth defaults to every head; max_child
    to every rank; one max_child value holds for every depth, else one per depth."""
    depth = num_heads if max_depth is None else max_depth
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= num_heads:
        raise InputError(
            f"--max-depth {max_depth}: must be between 1 and the {num_heads} heads of {source}")
    if max_child is None or len(max_child) == 0:
        children = (num_ranks,) * depth
    elif len(max_child) == 1:
        children = (int(max_child[0]),) * depth
    elif len(max_child) >= depth:
        children = tuple(int(c) for c in max_child[:depth])
    else:
        raise InputError(
            f"--max-child {','.join(map(str, max_child))}: one value, or one per depth "
            f"({depth}; see --max-depth)")
    for d, count in enumerate(children):
        if not 1 <= count <= num_ranks:
            raise InputError(
                f"--max-child: {count} at depth {d} is outside 1..{num_ranks}, the ranks "
                f"{source} has (medusa eval --top-k sets how many)")
    return SearchLimits(max_depth=depth, max_child=children)


# --------------------------------------------------------------------------- the model


def path_probability(path: TreePath, accuracy: np.ndarray) -> float:
    """w(path): the probability that every token of the path is right."""
    weight = 1.0
    for depth, rank in enumerate(path):
        weight *= float(accuracy[depth, rank])
    return weight


def _check_paths_fit(paths: Sequence[TreePath], table: AccuracyTable, what: str) -> None:
    """Every path within the table's heads and ranks; the message names the worst path."""
    if not paths:
        return
    deepest = max(paths, key=len)
    if len(deepest) > table.num_heads:
        raise InputError(
            f"{what}: path {list(deepest)} is {len(deepest)} deep but {table.source} has "
            f"accuracies for {table.num_heads} heads; give the accuracy of every head")
    widest = max(paths, key=max)
    if max(widest) >= table.num_ranks:
        raise InputError(
            f"{what}: path {list(widest)} uses rank {max(widest)} but {table.source} has "
            f"ranks 0..{table.num_ranks - 1}; rerun `medusa eval` with --top-k "
            f"{max(widest) + 1} or more")


def expected_acceptance(paths: Iterable[TreePath], table: AccuracyTable,
                        what: str = "tree") -> float:
    """1 + the sum of w(p) over a prefix-closed tree's paths: tokens accepted per step."""
    paths = list(paths)
    _check_paths_fit(paths, table, what)
    return 1.0 + math.fsum(path_probability(p, table.accuracy) for p in paths)


# The search's frontier entry: (-weight, depth, path, state); paths are unique, so the state
# (an accuracy product or a data trie node) is never compared.
_ChildOf = Callable[[object, int, int], tuple[float, object]]


def _best_first(nodes: int, limits: SearchLimits, root_state: object,
                child_of: _ChildOf) -> list[tuple[TreePath, float]]:
    """The first `nodes` paths in (-weight, length, path) order, best first, where
    child_of(state, depth, rank) gives a child's weight (at most its parent's) and state."""
    if nodes > limits.capacity:
        raise InputError(
            f"--nodes {nodes}: only {limits.capacity} paths fit within depth "
            f"{limits.max_depth} and --max-child {','.join(map(str, limits.max_child))}; "
            "ask for fewer nodes or raise the limits")
    frontier: list = []

    def push_children(path: TreePath, state: object) -> None:
        depth = len(path)
        if depth == limits.max_depth:
            return
        for rank in range(limits.max_child[depth]):
            weight, child_state = child_of(state, depth, rank)
            heapq.heappush(frontier, (-weight, depth + 1, path + (rank,), child_state))

    push_children((), root_state)
    chosen = []
    while len(chosen) < nodes:
        negative, _, path, state = heapq.heappop(frontier)
        chosen.append((path, -negative))
        push_children(path, state)
    return chosen


def optimal_paths(table: AccuracyTable, nodes: int,
                  limits: SearchLimits) -> list[tuple[TreePath, float]]:
    """The tree of `nodes` paths with the largest expected acceptance, as (path, w(path)) best
    first: its first n entries are the best tree of n paths."""
    if nodes < 1:
        raise InputError(f"--nodes {nodes}: a tree needs at least one path")
    accuracy = table.accuracy

    def child_of(weight, depth, rank):
        product = weight * float(accuracy[depth, rank])
        return product, product

    return _best_first(nodes, limits, 1.0, child_of)


def greedy_paths(table: AccuracyTable, nodes: int, limits: SearchLimits) -> list[TreePath]:
    """FasterDecoding's explore_graph: from [0], repeatedly add the heaviest of the accepted
    paths' next siblings and first children, the first in its scan order (accepted paths in
    order, each's sibling before its child) winning a tie; in the order it adds them. Each
    candidate arises from one path only, so a heap keyed by (-weight, scan position) gives the
    same choices in O(N log N). Where explore_graph would stop (no candidate above zero) this
    goes on with zero-weight candidates."""
    if nodes < 1:
        raise InputError(f"--nodes {nodes}: a tree needs at least one path")
    if nodes > limits.capacity:
        raise InputError(f"--nodes {nodes}: only {limits.capacity} paths fit these limits")
    accuracy = table.accuracy
    chosen: list[TreePath] = []
    # (-weight, scan position, path): the k-th accepted path's sibling is scanned at 2k, its
    # child at 2k + 1
    candidates: list[tuple[float, int, TreePath]] = []
    path: TreePath = (0,)
    while True:
        position = 2 * len(chosen)
        chosen.append(path)
        if len(chosen) == nodes:
            return chosen
        if path[-1] + 1 < limits.max_child[len(path) - 1]:
            sibling = path[:-1] + (path[-1] + 1,)
            heapq.heappush(candidates, (-path_probability(sibling, accuracy), position, sibling))
        if len(path) < limits.max_depth:
            child = path + (0,)
            heapq.heappush(candidates, (-path_probability(child, accuracy), position + 1, child))
        path = heapq.heappop(candidates)[2]


# --------------------------------------------------------------------------- on data


class RankCounts:
    """How many positions of a ranks array start with each path: c(p), as a trie built once.

    Only rows whose first max_depth heads all have a right token are counted (a row cut short
    by the end of its sequence cannot say how far it would have gone)."""

    def __init__(self, ranks: np.ndarray, max_depth: int, source: str = "--ranks"):
        ranks = np.asarray(ranks)
        if ranks.ndim != 2 or ranks.shape[1] < max_depth:
            raise InputError(
                f"{source}: ranks have shape {list(ranks.shape)}; expected [positions, heads] "
                f"with at least {max_depth} heads, as `medusa eval` writes them")
        columns = ranks[:, :max_depth].astype(np.int64)  # [positions, max_depth]
        if (columns < RANK_NO_LABEL).any():
            raise InputError(f"{source}: ranks below {RANK_NO_LABEL}; they are not ranks "
                             "written by `medusa eval`")
        labelled = (columns != RANK_NO_LABEL).all(axis=1)
        columns = columns[labelled]
        self.rows = int(columns.shape[0])
        self.max_depth = max_depth
        self.max_rank = int(columns.max()) if columns.size else -1
        # per depth d: (parent node id, rank) -> (node id, count) for every path of length
        # d + 1 that some row starts with; node ids count from 0 at each depth
        self._levels: list[dict[tuple[int, int], tuple[int, int]]] = []
        parent = np.zeros(self.rows, dtype=np.int64)  # [rows]: each row's node so far
        alive = np.ones(self.rows, dtype=bool)  # rows still inside the top K
        for depth in range(max_depth):
            alive &= columns[:, depth] >= 0
            keys = np.stack([parent[alive], columns[alive, depth]], axis=1)  # [alive rows, 2]
            if keys.shape[0] == 0:
                self._levels.append({})
                continue
            unique, inverse, counts = np.unique(keys, axis=0, return_inverse=True,
                                                return_counts=True)
            self._levels.append({(int(p), int(r)): (i, int(c))
                                 for i, ((p, r), c) in enumerate(zip(unique.tolist(), counts))})
            parent = np.zeros(self.rows, dtype=np.int64)
            parent[alive] = inverse.reshape(-1)

    def child(self, node: int | None, depth: int, rank: int) -> tuple[int, int | None]:
        """(count, node id) of the path that extends trie node `node` (a path of length
        `depth`; 0 is the root) by `rank`; (0, None) when no row starts with it."""
        found = None if node is None else self._levels[depth].get((node, rank))
        return (0, None) if found is None else (found[1], found[0])

    def count(self, path: TreePath) -> int:
        """c(path): the counted rows that start with `path`."""
        if len(path) > self.max_depth:
            return 0
        count, node = 0, 0
        for depth, rank in enumerate(path):
            count, node = self.child(node, depth, rank)
        return count

    def measured_acceptance(self, paths: Iterable[TreePath]) -> float:
        """1 + the mean over counted rows of the tree paths each row starts with: the
        longest accepted path, measured."""
        if self.rows == 0:
            raise InputError("no position has a right token for every head of the tree; "
                             "evaluate longer sequences with `medusa eval`")
        return 1.0 + sum(self.count(p) for p in paths) / self.rows


def optimal_paths_on_data(counts: RankCounts, nodes: int,
                          limits: SearchLimits) -> list[tuple[TreePath, int]]:
    """The tree of `nodes` paths that accepts the most on the data, as (path, c(path)) best
    first (paths no row reaches come last, shallow and low ranks first)."""
    if nodes < 1:
        raise InputError(f"--nodes {nodes}: a tree needs at least one path")
    if counts.max_depth < limits.max_depth:
        raise InputError(f"ranks were counted to depth {counts.max_depth}, the search goes to "
                         f"{limits.max_depth}")
    return [(path, int(weight)) for path, weight in _best_first(nodes, limits, 0, counts.child)]
