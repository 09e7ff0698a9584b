"""Medusa trees: loading, validation, buffers and candidates, checked against hand-derived cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medusa_cli.errors import InputError
from medusa_cli.trees import (
    MedusaTree,
    build_buffers,
    describe,
    generate_candidates,
    load_tree,
    shipped_trees,
    validate_paths,
)

SHIPPED = [
    "mc_sim_7b_63",
    "vicuna_7b_stage2",
    "vicuna_7b_stage1_ablation",
    "vicuna_7b_stage1",
    "vicuna_13b_stage2",
    "vicuna_13b_stage1",
    "vicuna_33b_stage2",
    "vicuna_33b_stage1",
    "zephyr_stage2",
]


def tree_of(paths, topk=10, name="t"):
    return MedusaTree(name=name, paths=validate_paths(paths, topk))


# --------------------------------------------------------------------------- hand-derived buffers

# SMALL = [[0], [1], [0, 0]], topk 2. Node order (len, path): root 0, [0] 1, [1] 2, [0, 0] 3.
# tree_indices: [0] -> 1 + 2*0 + 0 = 1, [1] -> 1 + 0 + 1 = 2, [0, 0] -> 1 + 2*1 + 0 = 3.
# Leaves, longest paths first: [0, 0] -> nodes 0, 1, 3; then [1] -> nodes 0, 2, pad.
SMALL = [[0], [1], [0, 0]]


def test_small_tree_buffers_by_hand():
    buffers = build_buffers(tree_of(SMALL, topk=2), topk=2)
    expected_mask = [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 0, 1, 0],
        [1, 1, 0, 1],
    ]
    assert buffers.medusa_attn_mask.dtype == np.float32
    np.testing.assert_array_equal(buffers.medusa_attn_mask, np.array(expected_mask, np.float32))
    np.testing.assert_array_equal(buffers.tree_indices, [0, 1, 2, 3])
    np.testing.assert_array_equal(buffers.medusa_position_ids, [0, 1, 1, 2])
    np.testing.assert_array_equal(buffers.retrieve_indices, [[0, 1, 3], [0, 2, -1]])
    for name in ("tree_indices", "medusa_position_ids", "retrieve_indices"):
        assert getattr(buffers, name).dtype == np.int32, name


# DEEP = given unsorted, topk 3. Sorted: [0] 1, [1] 2, [0, 2] 3, [1, 0] 4, [1, 0, 1] 5.
# tree_indices: [0, 2] -> 1 + 3*1 + 2 = 6; [1, 0] -> 1 + 3 + 0 = 4; [1, 0, 1] -> 1 + 3*2 + 1 = 8.
# Leaves, reverse sorted order: [1, 0, 1] (nodes 0 2 4 5), then [0, 2] (nodes 0 1 3, pad);
# [1, 0], [1] and [0] are parents and give no row.
DEEP = [[1, 0], [0], [1], [0, 2], [1, 0, 1]]
DEEP_MASK = [
    [1, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0],
    [1, 0, 1, 0, 0, 0],
    [1, 1, 0, 1, 0, 0],  # [0, 2] sees [0]
    [1, 0, 1, 0, 1, 0],  # [1, 0] sees [1]
    [1, 0, 1, 0, 1, 1],  # [1, 0, 1] sees [1] and [1, 0]
]


def test_deep_tree_buffers_by_hand():
    tree = tree_of(DEEP, topk=3)
    assert tree.paths == ((0,), (1,), (0, 2), (1, 0), (1, 0, 1))
    buffers = build_buffers(tree, topk=3)
    np.testing.assert_array_equal(buffers.medusa_attn_mask, np.array(DEEP_MASK, np.float32))
    np.testing.assert_array_equal(buffers.tree_indices, [0, 1, 2, 6, 4, 8])
    np.testing.assert_array_equal(buffers.medusa_position_ids, [0, 1, 1, 2, 2, 3])
    np.testing.assert_array_equal(buffers.retrieve_indices, [[0, 2, 4, 5], [0, 1, 3, -1]])


def test_tree_indices_follow_topk():
    # the same tree with topk 10: [0, 2] -> 1 + 10 + 2 = 13, [1, 0] -> 11, [1, 0, 1] -> 1 + 20 + 1 = 22
    buffers = build_buffers(tree_of(DEEP, topk=10), topk=10)
    np.testing.assert_array_equal(buffers.tree_indices, [0, 1, 2, 13, 11, 22])


def test_tree_properties_by_hand():
    tree = tree_of(DEEP, topk=3)
    assert tree.num_nodes == 6
    assert tree.depth == 3
    assert tree.nodes_per_depth == (2, 2, 1)
    assert tree.leaves == ((1, 0, 1), (0, 2))


def test_describe_small_tree():
    assert describe(tree_of(DEEP, topk=3), topk=3) == {
        "name": "t",
        "topk": 3,
        "nodes": 6,
        "depth": 3,
        "nodes_per_depth": [2, 2, 1],
        "leaves": 2,
        "candidates": {"tree": [6], "cartesian": [2, 4]},
    }


def test_buffers_to_npz_round_trip(tmp_path):
    buffers = build_buffers(tree_of(DEEP, topk=3), topk=3)
    out = buffers.to_npz(tmp_path / "sub" / "tree.npz")
    assert out == tmp_path / "sub" / "tree.npz"
    assert sorted(p.name for p in out.parent.iterdir()) == ["tree.npz"]  # no partial file left
    with np.load(out) as data:
        assert sorted(data.files) == sorted(buffers.as_dict())
        for name, array in buffers.as_dict().items():
            np.testing.assert_array_equal(data[name], array)
            assert data[name].dtype == array.dtype


# --------------------------------------------------------------------------- shipped trees


def test_every_published_tree_is_shipped():
    assert shipped_trees() == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_tree_file_header(name):
    tree_file = Path(__file__).resolve().parents[1] / "configs" / "trees" / f"{name}.json"
    data = json.loads(tree_file.read_text())
    assert data["name"] == name
    assert data["source"] == f"FasterDecoding/Medusa medusa/model/medusa_choices.py {name}"
    assert len(data["paths"]) == 63


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_tree_buffers_are_consistent(name):
    tree = load_tree(name, topk=10, num_heads=5)
    assert tree.name == name
    assert len(tree.paths) == 63 and tree.num_nodes == 64
    assert sum(tree.nodes_per_depth) == 63
    buffers = build_buffers(tree, topk=10)
    mask = buffers.medusa_attn_mask
    node = {path: i + 1 for i, path in enumerate(tree.paths)}
    depth_of = [0] + [len(p) for p in tree.paths]

    # mask: lower triangular, diagonal and root column set, exactly the ancestors besides
    assert mask.shape == (64, 64)
    assert not np.triu(mask, 1).any()
    assert (np.diag(mask) == 1).all() and (mask[:, 0] == 1).all()
    np.testing.assert_array_equal(mask.sum(axis=1), np.array(depth_of) + 1)
    for path, row in node.items():
        for length in range(1, len(path)):
            assert mask[row, node[path[:length]]] == 1

    np.testing.assert_array_equal(buffers.medusa_position_ids, depth_of)
    for path, row in node.items():
        assert buffers.tree_indices[row] == 1 + 10 * (len(path) - 1) + path[-1]

    # retrieve rows: root, then a chain of children down to a leaf, then -1 padding
    retrieve = buffers.retrieve_indices
    assert retrieve.shape == (len(tree.leaves), tree.depth + 1)
    path_of = {row: path for path, row in node.items()}
    ends = []
    for chain in retrieve.tolist():
        assert chain[0] == 0
        real = [n for n in chain[1:] if n != -1]
        assert chain[1:] == real + [-1] * (tree.depth - len(real))
        assert [len(path_of[n]) for n in real] == list(range(1, len(real) + 1))
        for parent, child in zip(real, real[1:]):
            assert path_of[child][:-1] == path_of[parent]
        ends.append(path_of[real[-1]])
    assert ends == list(tree.leaves)
    assert {n for chain in retrieve.tolist() for n in chain} - {-1} == set(range(64))


def test_mc_sim_7b_63_counts():
    tree = load_tree("mc_sim_7b_63")
    assert tree.depth == 4
    assert tree.nodes_per_depth == (10, 28, 23, 2)
    assert len(tree.leaves) == 42
    buffers = build_buffers(tree)
    # first row is the last path in sorted order, [0, 0, 0, 1]: [0] is node 1, [0, 0] node
    # 10 + 1, [0, 0, 0] node 10 + 28 + 1, [0, 0, 0, 1] the last node, 63
    np.testing.assert_array_equal(buffers.retrieve_indices[0], [0, 1, 11, 39, 63])
    # [0, 0, 0, 1] is head 3's rank 1: 1 + 10*3 + 1
    assert buffers.tree_indices[63] == 32


def test_vicuna_33b_stage1_is_three_deep():
    tree = load_tree("vicuna_33b_stage1", num_heads=3)
    assert tree.depth == 3
    assert build_buffers(tree).retrieve_indices.shape[1] == 4


# --------------------------------------------------------------------------- loading files


def test_load_bare_list_and_object(tmp_path):
    bare = tmp_path / "mine.json"
    bare.write_text(json.dumps(DEEP))
    tree = load_tree(bare, topk=3)
    assert tree.name == "mine"
    assert tree.paths == ((0,), (1,), (0, 2), (1, 0), (1, 0, 1))

    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"name": "custom", "source": "by hand", "paths": SMALL}))
    tree = load_tree(str(wrapped), topk=2)
    assert tree.name == "custom"
    assert tree.paths == ((0,), (1,), (0, 0))


def test_load_unknown_name_lists_shipped_trees():
    message = r"unknown tree 'mc_sim_7b_64'; choose one of: mc_sim_7b_63, .*--tree"
    with pytest.raises(InputError, match=message):
        load_tree("mc_sim_7b_64")


def test_load_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.json: tree file not found"):
        load_tree(tmp_path / "nope.json")


def test_load_invalid_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[[0], [0, 0]")
    with pytest.raises(InputError, match=r"bad\.json: not valid JSON \(line 1"):
        load_tree(bad)


def test_load_object_without_paths(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x"}))
    with pytest.raises(InputError, match=r'bad\.json: the object has no "paths" entry'):
        load_tree(bad)


def test_load_checks_heads():
    with pytest.raises(InputError, match=r"paths\[\d+\] \[0, 0, 0, 0\] is 4 deep but there are 3 heads"):
        load_tree("mc_sim_7b_63", num_heads=3)


# --------------------------------------------------------------------------- invalid trees


@pytest.mark.parametrize(
    ("paths", "kwargs", "message"),
    [
        ([], {}, r"src: the tree is empty; give at least one path such as \[\[0\]\]"),
        ({"paths": [[0]]}, {}, r"src: expected a list of paths .* found dict"),
        ([[0], 3], {}, r"src: paths\[1\] is 3; each path must be a non-empty list of integers"),
        ([[0], []], {}, r"src: paths\[1\] is \[\]; each path must be a non-empty list"),
        ([[0], [0, 1.0]], {}, r"src: paths\[1\] is \[0, 1\.0\]; each path"),
        ([[True]], {}, r"src: paths\[0\] is \[True\]; each path"),
        ([[0], [1], [0]], {}, r"src: paths\[2\] \[0\] repeats paths\[0\]; remove one"),
        ([[0], [-1]], {}, r"src: paths\[1\] \[-1\] has a negative rank"),
        (
            [[0], [0, 2]],
            {"topk": 2},
            r"src: paths\[1\] \[0, 2\] uses rank 2 but --topk is 2 \(ranks 0\.\.1\); raise --topk to 3",
        ),
        (
            [[0], [0, 0], [0, 0, 0]],
            {"num_heads": 2},
            r"src: paths\[2\] \[0, 0, 0\] is 3 deep but there are 2 heads; "
            r"choose a shallower tree \(--tree\) or a checkpoint with more heads",
        ),
        (
            [[0], [1, 0]],
            {},
            r"src: paths\[1\] \[1, 0\] has no parent: \[1\] is not in the tree; add it or drop the path",
        ),
        ([[0], [0, 0, 1]], {}, r"src: paths\[1\] \[0, 0, 1\] has no parent: \[0, 0\] is not in the tree"),
        ([[0]], {"topk": 0}, r"--topk 0: must be a positive integer"),
        ([[0]], {"num_heads": 0}, r"--num-heads 0: must be a positive integer"),
    ],
)
def test_invalid_trees(paths, kwargs, message):
    with pytest.raises(InputError, match=message):
        validate_paths(paths, source="src", **kwargs)


def test_invalid_tree_file_names_the_file(tmp_path):
    bad = tmp_path / "orphan.json"
    bad.write_text(json.dumps([[0], [1, 1]]))
    with pytest.raises(InputError, match=r"orphan\.json: paths\[1\] \[1, 1\] has no parent: \[1\]"):
        load_tree(bad)


def test_build_buffers_rejects_a_smaller_topk():
    with pytest.raises(InputError, match=r"tree 't': .* uses rank 2 but --topk is 2"):
        build_buffers(tree_of(DEEP, topk=3), topk=2)


def test_tree_must_be_sorted():
    with pytest.raises(InputError, match=r"tree 'x': paths must be non-empty and sorted"):
        MedusaTree(name="x", paths=((1,), (0,)))


# --------------------------------------------------------------------------- candidates

# Two batch rows for DEEP with topk 3 and 5-token vocabularies.
BASE = np.array([
    [0.1, 0.9, 0.9, 0.2, 0.0],  # tie between tokens 1 and 2 -> 1
    [0.0, 0.0, 0.0, 0.0, 0.0],  # all tied -> 0
])
HEADS = [
    np.array([[5, 1, 5, 3, 5], [1, 2, 3, 4, 5]], np.float32),  # top-3: [0 2 4], [4 3 2]
    np.array([[0, 0, 0, 0, 1], [-1, -1, -2, -1, -3]], np.float32),  # [4 0 1], [0 1 3]
    np.array([[2, 3, 1, 3, 0], [0, 9, 8, 7, 6]], np.float32),  # [1 3 0], [1 2 3]
]
# Row 0 candidates: [1 | 0 2 4 | 4 0 1 | 1 3 0]; tree_indices [0 1 2 6 4 8] pick 1 0 2 1 4 3.
# Row 1 candidates: [0 | 4 3 2 | 0 1 3 | 1 2 3]; they pick 0 4 3 3 0 2.
# cart rows read nodes [0 2 4 5] and [0 1 3 -1], with -1 reading the appended 0.
TREE_CANDIDATES = [[1, 0, 2, 1, 4, 3], [0, 4, 3, 3, 0, 2]]
CART_CANDIDATES = [
    [[1, 2, 4, 3], [1, 0, 1, 0]],
    [[0, 3, 0, 2], [0, 4, 3, 0]],
]


def test_generate_candidates_by_hand_with_ties_and_batch_two():
    buffers = build_buffers(tree_of(DEEP, topk=3), topk=3)
    tree_candidates, cart_candidates = generate_candidates(BASE, HEADS, buffers, topk=3)
    assert tree_candidates.dtype == np.int32 and cart_candidates.dtype == np.int32
    np.testing.assert_array_equal(tree_candidates, TREE_CANDIDATES)
    np.testing.assert_array_equal(cart_candidates, CART_CANDIDATES)


def test_generate_candidates_batch_rows_are_independent():
    buffers = build_buffers(tree_of(DEEP, topk=3), topk=3)
    for row in range(2):
        tree_candidates, cart_candidates = generate_candidates(
            BASE[row : row + 1], [h[row : row + 1] for h in HEADS], buffers, topk=3
        )
        np.testing.assert_array_equal(tree_candidates, [TREE_CANDIDATES[row]])
        np.testing.assert_array_equal(cart_candidates, [CART_CANDIDATES[row]])


def test_generate_candidates_ignores_heads_beyond_the_tree():
    # SMALL is 2 deep; a third head is allowed and unused
    buffers = build_buffers(tree_of(SMALL, topk=2), topk=2)
    tree_candidates, cart_candidates = generate_candidates(BASE, HEADS, buffers, topk=2)
    # Row 0: [1 | 0 2 | 4 0 | 1 3], tree_indices [0 1 2 3] -> 1 0 2 4; rows [0 1 3], [0 2 -1]
    np.testing.assert_array_equal(tree_candidates, [[1, 0, 2, 4], [0, 4, 3, 0]])
    np.testing.assert_array_equal(cart_candidates, [[[1, 0, 4], [1, 2, 0]], [[0, 4, 0], [0, 3, 0]]])


def test_generate_candidates_needs_every_head():
    buffers = build_buffers(tree_of(DEEP, topk=3), topk=3)
    with pytest.raises(InputError, match=r"the tree is 3 deep but 2 head logits were given"):
        generate_candidates(BASE, HEADS[:2], buffers, topk=3)


def test_generate_candidates_checks_shapes():
    buffers = build_buffers(tree_of(DEEP, topk=3), topk=3)
    with pytest.raises(InputError, match=r"head 1 logits have shape \[2, 4\], expected \[2, 5\]"):
        generate_candidates(BASE, [HEADS[0], HEADS[1][:, :4], HEADS[2]], buffers, topk=3)
    with pytest.raises(InputError, match=r"base logits have shape \[5\], expected \[batch, vocab\]"):
        generate_candidates(BASE[0], HEADS, buffers, topk=3)
    with pytest.raises(InputError, match=r"--topk 6: must be between 1 and the vocabulary size 5"):
        generate_candidates(BASE, HEADS, buffers, topk=6)


def test_generate_candidates_rejects_buffers_of_a_larger_topk():
    buffers = build_buffers(tree_of(DEEP, topk=3), topk=3)
    # built for topk 3, the deepest index 8 needs 1 + 3 heads * 3 ranks; topk 2 gives 7
    message = r"the buffers index entry 8 of concat\(base, heads' top-2\), which has 7; build the buffers"
    with pytest.raises(InputError, match=message):
        generate_candidates(BASE, HEADS, buffers, topk=2)
