"""The tree search against independent implementations: the expected acceptance by enumerating
every outcome of the heads, FasterDecoding's greedy written another way, and optimality by
exhaustive search over every prefix-closed tree of small inputs; the same on data (ranks)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from medusa_cli.errors import InputError
from medusa_cli.tree_search import (
    RANK_NO_LABEL,
    RANK_OUTSIDE,
    RankCounts,
    accuracy_table,
    expected_acceptance,
    greedy_paths,
    optimal_paths,
    optimal_paths_on_data,
    search_limits,
)
from medusa_cli.trees import load_tree, validate_paths


def random_table(rng, heads, ranks, monotone=False):
    """Per-rank accuracies summing to at most 1 per head; rising with rank unless monotone."""
    rows = []
    for _ in range(heads):
        row = rng.dirichlet(np.ones(ranks + 1))[:ranks]  # the last share: outside the top K
        rows.append(np.sort(row)[::-1] if monotone else row)
    return accuracy_table(rows, "test table")


# --------------------------------------------------------------------------- independent references


def acceptance_by_outcomes(paths, accuracy):
    """E[1 + longest accepted path] by enumerating every outcome: head d's right token is at
    rank r (probability accuracy[d][r]) or outside the top K (the rest), independently."""
    heads, ranks = accuracy.shape
    tree = set(map(tuple, paths))
    outcomes = list(range(ranks)) + [None]
    total = 0.0
    for outcome in itertools.product(outcomes, repeat=heads):
        probability = 1.0
        for d, r in enumerate(outcome):
            probability *= accuracy[d][r] if r is not None else 1.0 - accuracy[d].sum()
        accepted = 0
        while accepted < heads and outcome[accepted] is not None and \
                tuple(outcome[:accepted + 1]) in tree:
            accepted += 1
        total += probability * (1 + accepted)
    return total


def medusa_greedy(accuracy, nodes, max_depth, max_child):
    """FasterDecoding's explore_graph restated: the candidates of the accepted list are each
    node's next sibling then its first child, scanned in list order; the first of the largest
    expectation wins."""
    def expectation(node):
        return math.prod(accuracy[d][r] for d, r in enumerate(node))

    accepted = [(0,)]
    while len(accepted) < nodes:
        scanned = []
        for node in accepted:
            sibling = node[:-1] + (node[-1] + 1,)
            if node[-1] < max_child[len(node) - 1] - 1 and sibling not in accepted:
                scanned.append(sibling)
            child = node + (0,)
            if len(node) < max_depth and child not in accepted:
                scanned.append(child)
        best = max(expectation(n) for n in scanned)
        accepted.append(next(n for n in scanned if expectation(n) == best))
    return accepted


def all_paths(max_depth, max_child):
    out = []
    for depth in range(1, max_depth + 1):
        out += list(itertools.product(*[range(c) for c in max_child[:depth]]))
    return out


def best_by_exhaustion(value_of, nodes, max_depth, max_child):
    """The largest total value of any prefix-closed set of `nodes` paths: every such set is
    visited, deciding path by path (parents first) whether it is in."""
    order = sorted(all_paths(max_depth, max_child), key=lambda p: (len(p), p))

    def best_from(index, chosen, total):
        if len(chosen) == nodes:
            return total
        if len(order) - index < nodes - len(chosen):
            return -1.0
        path = order[index]
        without = best_from(index + 1, chosen, total)
        if len(path) > 1 and path[:-1] not in chosen:
            return without
        return max(without, best_from(index + 1, chosen | {path}, total + value_of(path)))

    return best_from(0, frozenset(), 0.0)


def prefix_closed(paths):
    chosen = set(paths)
    return len(chosen) == len(paths) and all(len(p) == 1 or p[:-1] in chosen for p in paths)


# --------------------------------------------------------------------------- the expectation


def test_expected_acceptance_matches_enumerating_outcomes():
    rng = np.random.default_rng(0)
    for trial in range(20):
        table = random_table(rng, heads=3, ranks=3, monotone=trial % 2 == 0)
        candidates = all_paths(3, (3, 3, 3))
        size = int(rng.integers(1, 12))
        # a random prefix-closed tree: grow from random leaves' ancestors
        picked = set()
        for index in rng.permutation(len(candidates))[:size]:
            path = candidates[index]
            picked |= {path[:k] for k in range(1, len(path) + 1)}
        paths = sorted(picked)
        assert expected_acceptance(paths, table) == pytest.approx(
            acceptance_by_outcomes(paths, table.accuracy), abs=1e-12)


def test_expected_acceptance_by_hand():
    table = accuracy_table([[0.5, 0.25], [0.4, 0.1]], "t")
    # [0]: 0.5, [1]: 0.25, [0, 0]: 0.2, [0, 1]: 0.05
    assert expected_acceptance([(0,), (1,), (0, 0), (0, 1)], table) == pytest.approx(2.0)
    assert expected_acceptance([(0,)], table) == pytest.approx(1.5)


def test_expected_acceptance_of_a_shipped_tree_needs_enough_ranks_and_heads():
    tree = load_tree("mc_sim_7b_63")  # ranks up to 9, depth 4
    narrow = accuracy_table(np.full((5, 5), 0.1), "narrow.json")
    with pytest.raises(InputError, match=r"rank 9 but narrow.json has ranks 0\.\.4.*--top-k 10"):
        expected_acceptance(tree.paths, narrow)
    shallow = accuracy_table(np.full((3, 10), 0.05), "shallow.json")
    with pytest.raises(InputError, match=r"4 deep but shallow.json has accuracies for 3 heads"):
        expected_acceptance(tree.paths, shallow)


# --------------------------------------------------------------------------- the model's search


@pytest.mark.parametrize("monotone", [False, True])
def test_search_is_optimal_by_exhaustion(monotone):
    rng = np.random.default_rng(1 + monotone)
    for _ in range(12):
        heads, ranks = int(rng.integers(1, 4)), int(rng.integers(2, 4))
        table = random_table(rng, heads, ranks, monotone)
        limits = search_limits(heads, ranks)
        most = min(6, limits.capacity)
        found = optimal_paths(table, most, limits)
        paths = [p for p, _ in found]
        for n in range(1, most + 1):  # every prefix is the best tree of its size
            assert prefix_closed(paths[:n])
            best = best_by_exhaustion(lambda p: math.prod(table.accuracy[d][r] for d, r in enumerate(p)),
                                      n, limits.max_depth, limits.max_child)
            assert expected_acceptance(paths[:n], table) == pytest.approx(1 + best, abs=1e-12)


def test_search_respects_depth_and_children_limits_by_exhaustion():
    rng = np.random.default_rng(3)
    table = random_table(rng, heads=3, ranks=4)
    limits = search_limits(3, 4, max_depth=2, max_child=(3, 2))
    for n in (1, 3, 5, 7):
        paths = [p for p, _ in optimal_paths(table, n, limits)]
        assert all(len(p) <= 2 and p[0] < 3 and (len(p) == 1 or p[1] < 2) for p in paths)
        best = best_by_exhaustion(lambda p: math.prod(table.accuracy[d][r] for d, r in enumerate(p)),
                                  n, 2, (3, 2))
        assert expected_acceptance(paths, table) == pytest.approx(1 + best, abs=1e-12)


def test_greedy_matches_medusas_explore_graph():
    rng = np.random.default_rng(4)
    for trial in range(30):
        heads, ranks = int(rng.integers(1, 5)), int(rng.integers(2, 8))
        table = random_table(rng, heads, ranks, monotone=trial % 3 == 0)
        max_child = tuple(int(c) for c in rng.integers(1, ranks + 1, size=heads))
        limits = search_limits(heads, ranks, max_child=max_child)
        nodes = int(rng.integers(1, min(limits.capacity, 40) + 1))
        assert greedy_paths(table, nodes, limits) == medusa_greedy(
            table.accuracy, nodes, limits.max_depth, limits.max_child)


def test_search_is_never_worse_than_greedy_and_equal_when_accuracy_falls_with_rank():
    rng = np.random.default_rng(5)
    beaten = 0
    for trial in range(60):
        monotone = trial % 2 == 0
        table = random_table(rng, heads=4, ranks=6, monotone=monotone)
        limits = search_limits(4, 6)
        for nodes in (1, 5, 16, 40):
            ours = expected_acceptance([p for p, _ in optimal_paths(table, nodes, limits)], table)
            theirs = expected_acceptance(medusa_greedy(table.accuracy, nodes, 4, (6,) * 4), table)
            assert ours >= theirs - 1e-12
            if monotone:
                assert ours == pytest.approx(theirs, abs=1e-12)
            beaten += ours > theirs + 1e-9
    assert beaten > 0  # rising accuracies do cost the greedy search


def test_a_likelier_later_rank_is_taken_first():
    """Greedy must take rank 0 before rank 1; the best single path is rank 1."""
    table = accuracy_table([[0.1, 0.5]], "t")
    limits = search_limits(1, 2)
    assert optimal_paths(table, 1, limits) == [((1,), 0.5)]
    assert greedy_paths(table, 1, limits) == [(0,)]
    assert expected_acceptance([(1,)], table) == pytest.approx(1.5)


def test_the_search_scales_to_large_trees_and_tables():
    rng = np.random.default_rng(6)
    table = random_table(rng, heads=5, ranks=20)
    paths = [p for p, _ in optimal_paths(table, 1000, search_limits(5, 20))]
    assert len(paths) == 1000 and prefix_closed(paths)
    validate_paths(paths, topk=20)
    weights = [math.prod(table.accuracy[d][r] for d, r in enumerate(p)) for p in paths]
    assert weights == sorted(weights, reverse=True)  # best first


def test_limits_and_sizes_are_checked():
    table = accuracy_table([[0.5, 0.2], [0.3, 0.1]], "acc.json")
    with pytest.raises(InputError, match=r"--nodes 7: only 6 paths fit within depth 2"):
        optimal_paths(table, 7, search_limits(2, 2))
    with pytest.raises(InputError, match=r"--nodes 0"):
        optimal_paths(table, 0, search_limits(2, 2))
    with pytest.raises(InputError, match=r"--max-depth 3: must be between 1 and the 2 heads of acc.json"):
        search_limits(2, 2, max_depth=3, source="acc.json")
    with pytest.raises(InputError, match=r"--max-child: 3 at depth 0 is outside 1\.\.2.*--top-k"):
        search_limits(2, 2, max_child=(3,))
    with pytest.raises(InputError, match=r"--max-child 2,2,2: one value, or one per depth"):
        search_limits(4, 2, max_depth=4, max_child=(2, 2, 2))
    assert search_limits(2, 2, max_child=(1,)).max_child == (1, 1)


@pytest.mark.parametrize("values, message", [
    ([[0.6, 0.8]], r"head 0's per-rank accuracies add up to 1\.4000.*not cumulative"),
    ([[0.2, 1.5]], r"head 0 at rank 1 is 1\.5"),
    ([[0.2, float("nan")]], r"head 0 at rank 1 is nan"),
    ([[0.2, 0.1], [0.3]], r"list of per-head lists"),
    ([], r"shape \[0\]"),
    ([0.5, 0.2], r"shape \[2\]"),
])
def test_accuracy_tables_are_validated(values, message):
    with pytest.raises(InputError, match=r"^acc\.json: .*" + message):
        accuracy_table(values, "acc.json")


# --------------------------------------------------------------------------- on data


def random_ranks(rng, rows, heads, ranks, no_label=0.05):
    """Ranks with a favourite per depth, -1 outside the top K, some -2 rows."""
    values = rng.choice(np.arange(-1, ranks), size=(rows, heads),
                        p=rng.dirichlet(np.ones(ranks + 1)))
    values[rng.random((rows, heads)) < no_label] = RANK_NO_LABEL
    return values


def measured_by_rows(paths, ranks, depth):
    """1 + the mean longest path matched, row by row, over rows labelled to `depth`."""
    tree = set(map(tuple, paths))
    total = count = 0
    for row in ranks.tolist():
        if RANK_NO_LABEL in row[:depth]:
            continue
        length = 0
        while length < depth and row[length] >= 0 and tuple(row[:length + 1]) in tree:
            length += 1
        total += 1 + length
        count += 1
    return total / count


def test_measured_acceptance_matches_row_by_row():
    rng = np.random.default_rng(7)
    ranks = random_ranks(rng, 300, heads=4, ranks=4)
    counts = RankCounts(ranks, max_depth=3)
    assert counts.rows == int((ranks[:, :3] != RANK_NO_LABEL).all(axis=1).sum())
    table = accuracy_table(np.full((4, 4), 0.2), "t")
    for nodes in (1, 4, 9, 20):
        paths = [p for p, _ in optimal_paths(table, nodes, search_limits(4, 4, max_depth=3))]
        assert counts.measured_acceptance(paths) == pytest.approx(measured_by_rows(paths, ranks, 3))


def test_search_on_data_is_optimal_by_exhaustion():
    rng = np.random.default_rng(8)
    for _ in range(8):
        ranks = random_ranks(rng, 60, heads=2, ranks=3)
        counts = RankCounts(ranks, max_depth=2)
        limits = search_limits(2, 3)
        found = optimal_paths_on_data(counts, 6, limits)
        paths = [p for p, _ in found]
        for n in range(1, 7):
            assert prefix_closed(paths[:n])
            best = best_by_exhaustion(counts.count, n, 2, (3, 3))
            assert counts.measured_acceptance(paths[:n]) == pytest.approx(1 + best / counts.rows)
            assert measured_by_rows(paths[:n], ranks, 2) == pytest.approx(1 + best / counts.rows)


def test_search_on_data_needs_no_independence():
    """Head 1's rank 0 is right only after head 0's rank 1: multiplying per-rank accuracies,
    the model prefers [1, 1]; the data never accepts it, accepts [1, 0], and its search knows."""
    ranks = np.array([[0, 1]] * 30 + [[1, 0]] * 30 + [[RANK_OUTSIDE, 1]] * 40)
    table = accuracy_table([[0.3, 0.3], [0.3, 0.7]], "t")  # the per-rank rates of these rows
    counts = RankCounts(ranks, max_depth=2)
    limits = search_limits(2, 2)
    by_model = [p for p, _ in optimal_paths(table, 4, limits)]
    by_data = [p for p, _ in optimal_paths_on_data(counts, 4, limits)]
    assert by_model == [(0,), (1,), (0, 1), (1, 1)]
    assert by_data == [(0,), (1,), (0, 1), (1, 0)]
    assert counts.measured_acceptance(by_model) == pytest.approx(1.9)
    assert counts.measured_acceptance(by_data) == pytest.approx(2.2)
    assert expected_acceptance(by_model, table) == pytest.approx(1 + 0.3 + 0.3 + 0.21 + 0.21)


def test_paths_no_row_reaches_fill_the_tree_last():
    ranks = np.array([[0, 0]] * 5)
    counts = RankCounts(ranks, max_depth=2)
    found = optimal_paths_on_data(counts, 4, search_limits(2, 3))
    assert found == [((0,), 5), ((0, 0), 5), ((1,), 0), ((2,), 0)]


def test_rank_arrays_are_checked():
    with pytest.raises(InputError, match=r"shape \[5\]"):
        RankCounts(np.zeros(5, int), max_depth=1)
    with pytest.raises(InputError, match=r"at least 3 heads"):
        RankCounts(np.zeros((5, 2), int), max_depth=3)
    with pytest.raises(InputError, match=r"below -2"):
        RankCounts(np.full((5, 2), -3), max_depth=2)
    empty = RankCounts(np.full((4, 2), RANK_NO_LABEL), max_depth=2)
    with pytest.raises(InputError, match=r"no position has a right token"):
        empty.measured_acceptance([(0,)])
