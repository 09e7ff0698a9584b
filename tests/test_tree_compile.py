"""Tree candidates compiled into the library (`--tree`) against tree.generate_candidates.

Exact equality throughout: the compiled top-k must pick the same token ids in the same order as
numpy's stable argsort, including between tied logits (lower id first). Ties are built in: the
vocab projections repeat rows, so pairs of tokens get bit-identical logits in every head.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tvm

from medusa_cli import quantization as quant
from medusa_cli.commands.compile import CompileRequest, compile_heads
from medusa_cli.library import read_library_metadata
from medusa_cli.packed.config import CONFIG_FILE, PackedConfig
from medusa_cli.errors import InputError
from medusa_cli.runtime.heads import load_heads
from medusa_cli.packed.tensor_cache import write_tensor_cache
from medusa_cli.compiler.topk import MAX_TOPK, MISSING_ID, TopkLayout, chunk_kernel, merge_kernel
from medusa_cli.trees import MedusaTree, build_buffers, generate_candidates, load_tree, validate_paths
from tests.conftest import hard_topk_rows
from tests._params import (
    TinyParams,
    make_params_dir,
    random_hidden,
    random_weights,
    reference_logits,
    tiny_config,
)

MAX_BATCH = 4
# 4 heads: enough for mc_sim_7b_63 (depth 4, top-10), the tree Medusa ships as its default
CONFIG = tiny_config(medusa_num_heads=4, max_batch_size=MAX_BATCH)
# a small tree given as a file, with its own top-k, for the quantized library
SMALL_TREE = {"name": "small", "paths": [[0], [1], [2], [0, 0], [0, 2], [1, 0], [0, 0, 1]]}
SMALL_TOPK = 3
SMALL = MedusaTree(name="small", paths=validate_paths(SMALL_TREE["paths"], SMALL_TOPK))


def _write_tied_params(path: Path, scheme_name: str, seed: int) -> TinyParams:
    """Random heads whose vocab projections repeat rows: tokens 2i and 2i + 1 always tie, and
    tokens 10, 11 and 200 tie three ways. Laid out as `medusa convert` writes them."""
    scheme = quant.get_scheme(scheme_name)
    weights = random_weights(CONFIG, seed)
    for h in range(CONFIG.medusa_num_heads):
        lm_head = weights[f"medusa_head.{h}.{CONFIG.medusa_num_layers}.weight"]  # [vocab, hidden]
        lm_head[1::2] = lm_head[0::2]
        lm_head[200] = lm_head[10]
    path.mkdir(parents=True)
    packed = [pair for name, array in weights.items() for pair in quant.convert_tensor(name, array, scheme)]
    write_tensor_cache(path, packed)
    (path / CONFIG_FILE).write_text(PackedConfig(model=CONFIG, quantization=scheme.name).to_json())
    effective = {name: array.astype(np.float64) for name, array in weights.items()}  # q0f32 only
    return TinyParams(path=path, config=CONFIG, scheme=scheme, source=effective, effective=effective)


@pytest.fixture(scope="session")
def tree_libraries(tmp_path_factory) -> dict[str, tuple[TinyParams, Path]]:
    """q0f32 with mc_sim_7b_63 / top-10, q4f16_1 with SMALL_TREE / top-3, and q0f32 without a
    tree, each compiled for llvm once."""
    root = tmp_path_factory.mktemp("tree_compile")
    tree_file = root / "small.json"
    tree_file.write_text(json.dumps(SMALL_TREE))
    q0f32 = _write_tied_params(root / "q0f32", "q0f32", seed=3)
    q4f16 = _write_tied_params(root / "q4f16_1", "q4f16_1", seed=4)
    return {
        "q0f32": (q0f32, compile_heads(CompileRequest(
            q0f32.path, tree="mc_sim_7b_63")).output),
        "q4f16_1": (q4f16, compile_heads(CompileRequest(
            q4f16.path, tree=tree_file, topk=SMALL_TOPK)).output),
        "no_tree": (q0f32, compile_heads(CompileRequest(
            q0f32.path, output=root / "no_tree.so")).output),
    }


def _base_logits(batch: int, vocab: int, seed: int) -> np.ndarray:
    """Base logits on a coarse grid (many ties) whose maximum is shared by ids 3 and 7."""
    rng = np.random.default_rng(seed)
    base = np.round(rng.standard_normal((batch, vocab)) * 2) / 2
    base[:, [7, 3]] = base.max() + 1.0
    return base.astype(np.float32)


def _has_tie_in_top(logits: np.ndarray, k: int) -> bool:
    """Some row holds two equal values among its k largest."""
    top = -np.sort(-logits, axis=1)[:, :k]
    return bool((np.diff(top, axis=1) == 0).any())


# ---------------------------------------------------------------------------------------------
# Candidates


@pytest.mark.parametrize("batch", [1, MAX_BATCH])
def test_q0f32_candidates_equal_the_numpy_reference(tree_libraries, batch):
    params, library = tree_libraries["q0f32"]
    heads = load_heads(library, params.path)
    tree = load_tree("mc_sim_7b_63")
    hidden = random_hidden(CONFIG, batch, seed=10 + batch)
    base = _base_logits(batch, CONFIG.vocab_size, seed=batch)

    tree_candidates, cart_candidates = heads.get_tree_candidates(base, hidden)

    reference = reference_logits(params.effective, CONFIG, hidden.astype(np.float64))
    assert all(_has_tie_in_top(logits, 10) for logits in reference)  # the ties are really there
    want_tree, want_cart = generate_candidates(base, reference, build_buffers(tree, 10), 10)
    assert tree_candidates.dtype == cart_candidates.dtype == np.int32
    assert tree_candidates.shape == (batch, tree.num_nodes)
    assert cart_candidates.shape == (batch, len(tree.leaves), tree.depth + 1)
    np.testing.assert_array_equal(tree_candidates, want_tree)
    np.testing.assert_array_equal(cart_candidates, want_cart)
    assert (tree_candidates[:, 0] == 3).all()  # the tied base maximum goes to the lower id
    # the same from the library's own logits
    own_tree, own_cart = generate_candidates(base, heads.get_logits(hidden), build_buffers(tree, 10), 10)
    np.testing.assert_array_equal(tree_candidates, own_tree)
    np.testing.assert_array_equal(cart_candidates, own_cart)


@pytest.mark.parametrize("batch", [1, MAX_BATCH])
def test_quantized_candidates_equal_generate_candidates_on_the_library_logits(tree_libraries, batch):
    params, library = tree_libraries["q4f16_1"]
    heads = load_heads(library, params.path)
    tree = SMALL
    hidden = random_hidden(CONFIG, batch, seed=20 + batch)
    base = _base_logits(batch, CONFIG.vocab_size, seed=30 + batch)

    tree_candidates, cart_candidates = heads.get_tree_candidates(base, hidden)

    logits = heads.get_logits(hidden)
    assert all(_has_tie_in_top(head, SMALL_TOPK) for head in logits)
    want_tree, want_cart = generate_candidates(base, logits, build_buffers(tree, SMALL_TOPK), SMALL_TOPK)
    np.testing.assert_array_equal(tree_candidates, want_tree)
    np.testing.assert_array_equal(cart_candidates, want_cart)
    assert (cart_candidates[:, :, 0] == tree_candidates[:, :1]).all()  # every leaf starts at the root


def test_tree_buffers_are_baked_in(tree_libraries):
    for name, tree, topk in (("q0f32", load_tree("mc_sim_7b_63"), 10), ("q4f16_1", SMALL, SMALL_TOPK)):
        params, library = tree_libraries[name]
        heads = load_heads(library, params.path)
        assert heads.has_tree and heads.tree == tree and heads.topk == topk
        got = heads.get_tree_buffers()
        want = build_buffers(tree, topk).as_dict()
        assert list(got) == list(want)
        for key, array in want.items():
            assert got[key].dtype == array.dtype, key
            np.testing.assert_array_equal(got[key], array, err_msg=key)


def test_metadata_holds_the_tree(tree_libraries):
    meta = read_library_metadata(tree_libraries["q0f32"][1]).to_json()["tree"]
    tree = load_tree("mc_sim_7b_63")
    assert meta["name"] == "mc_sim_7b_63" and meta["topk"] == 10
    assert [tuple(p) for p in meta["paths"]] == list(tree.paths)
    assert (meta["nodes"], meta["depth"], meta["leaves"]) == (64, 4, len(tree.leaves))

    small = read_library_metadata(tree_libraries["q4f16_1"][1]).tree
    assert (small.tree.name, small.topk, len(small.tree.paths)) == ("small", SMALL_TOPK, 7)
    assert read_library_metadata(tree_libraries["no_tree"][1]).tree is None


def test_library_without_a_tree_says_so(tree_libraries):
    params, library = tree_libraries["no_tree"]
    heads = load_heads(library, params.path)
    assert not heads.has_tree and heads.tree is None and heads.topk is None
    hidden = random_hidden(CONFIG, 1)
    with pytest.raises(InputError, match=r"compiled without a tree.*--tree"):
        heads.get_tree_candidates(np.zeros((1, CONFIG.vocab_size), np.float32), hidden)
    with pytest.raises(InputError, match="get_tree_buffers"):
        heads.get_tree_buffers()
    assert len(heads.get_logits(hidden)) == CONFIG.medusa_num_heads  # the heads still work


@pytest.mark.parametrize(
    "base_shape, hidden_batch, words",
    [
        ((2, CONFIG.vocab_size), 1, r"base logits have shape \[2, 256\], expected \[1, 256\]"),
        ((1, 100), 1, r"expected \[1, 256\]"),
        ((MAX_BATCH + 1, CONFIG.vocab_size), MAX_BATCH + 1, "--max-batch-size"),
    ],
)
def test_candidate_input_errors(tree_libraries, base_shape, hidden_batch, words):
    params, library = tree_libraries["q0f32"]
    heads = load_heads(library, params.path)
    with pytest.raises(InputError, match=words):
        heads.get_tree_candidates(np.zeros(base_shape, np.float32), random_hidden(CONFIG, hidden_batch))


def test_time_tree_candidates(tree_libraries):
    params, library = tree_libraries["q0f32"]
    timing = load_heads(library, params.path).time_tree_candidates(batch=2, repeat=1)
    assert (timing.batch, timing.num_heads, timing.tree_depth) == (2, 4, 4)
    assert 0 < timing.get_logits < 1 and 0 < timing.get_tree_candidates < 1
    assert json.loads(json.dumps(timing.to_dict()))["candidates_cost_ms"] == pytest.approx(
        (timing.get_tree_candidates - timing.get_logits) * 1e3, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# Invalid requests fail before anything is built


@pytest.fixture(scope="module")
def three_heads(tmp_path_factory) -> Path:
    return make_params_dir(tmp_path_factory.mktemp("three_heads") / "p", "q0f32").path


@pytest.mark.parametrize(
    "tree, topk, words",
    [
        ("no_such_tree", 10, r"unknown tree 'no_such_tree'.*--tree"),
        ("missing/tree.json", 10, r"tree file not found.*--tree"),
        ("mc_sim_7b_63", 10, r"4 deep but there are 3 heads.*--tree"),  # needs 4 heads
        ("vicuna_33b_stage1", 5, r"uses rank 5 but --topk is 5.*raise --topk"),  # 3 deep
        ("vicuna_33b_stage1", 0, r"--topk 0: must be a positive integer"),
        ("vicuna_33b_stage1", MAX_TOPK + 1, rf"--topk {MAX_TOPK + 1}: at most {MAX_TOPK}"),
    ],
)
def test_invalid_tree_or_topk(three_heads, tmp_path, tree, topk, words):
    out = tmp_path / "heads.so"
    with pytest.raises(InputError, match=words):
        compile_heads(CompileRequest(three_heads, tree=tree, topk=topk, output=out))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_topk_without_a_tree(three_heads, tmp_path):
    with pytest.raises(InputError, match=r"--topk 5 only applies with --tree"):
        compile_heads(CompileRequest(three_heads, topk=5, output=tmp_path / "heads.so"))
    assert list(tmp_path.iterdir()) == []


def test_topk_above_a_small_vocabulary(tmp_path):
    params = make_params_dir(tmp_path / "p", "q0f32", config=tiny_config(vocab_size=8))
    with pytest.raises(InputError, match=r"--topk 10: at most 8 \(the vocabulary size\)"):
        compile_heads(CompileRequest(params.path, tree="vicuna_33b_stage1", topk=10))


def test_opencl_library_with_a_tree(tree_libraries, tmp_path):
    params, _ = tree_libraries["q4f16_1"]
    result = compile_heads(CompileRequest(params.path, target="opencl", tree="vicuna_7b_stage1",
                                          output=tmp_path / "heads.so"))
    source = result.output.read_bytes()
    assert b"topk_chunks" in source and b"topk_merge" in source  # bound to GPU threads
    assert result.metadata.tree.tree.name == "vicuna_7b_stage1"


# ---------------------------------------------------------------------------------------------
# The top-k kernels alone, on every kind of slicing


def _run_topk(layout: TopkLayout, k: int, logits: np.ndarray) -> np.ndarray:
    mod = tvm.IRModule({
        "chunks": chunk_kernel(layout, k).with_attr("global_symbol", "chunks"),
        "merge": merge_kernel(layout, k).with_attr("global_symbol", "merge"),
    })
    lib = tvm.tirx.build(mod, target="llvm")
    rows = logits.shape[0]
    vals = tvm.runtime.tensor(np.zeros((rows, layout.chunks, k), np.float32))
    ids = tvm.runtime.tensor(np.zeros((rows, layout.chunks, k), np.int32))
    out = tvm.runtime.tensor(np.zeros((rows, k), np.int32))
    lib["chunks"](tvm.runtime.tensor(logits), vals, ids)
    lib["merge"](vals, ids, out)
    return out.numpy()




@pytest.mark.parametrize(
    "vocab, chunks, interleaved",
    [
        (1000, 1, False),   # one pass per row
        (1000, 3, False),   # contiguous slices; the last is short and ends mid-group
        (1003, 7, True),    # the GPU's interleaved slices
        (40, 9, False),     # slices with fewer than k ids
        (40, 64, True),     # more slices than ids
    ],
)
@pytest.mark.parametrize("k", [1, 7])
def test_topk_kernels_match_a_stable_sort(vocab, chunks, interleaved, k):
    logits = hard_topk_rows(vocab)
    got = _run_topk(TopkLayout(vocab=vocab, chunks=chunks, interleaved=interleaved, gpu=False), k, logits)
    # numpy: stable argsort of -logits (NaN last), as tree.generate_candidates ranks
    want = np.argsort(-logits.astype(np.float64), axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(got, want)


def test_topk_reports_missing_ranks_for_a_row_of_nan():
    logits = np.full((1, 40), np.nan, np.float32)
    logits[0, 5] = 1.0
    got = _run_topk(TopkLayout(vocab=40, chunks=3, interleaved=False, gpu=False), 3, logits)
    np.testing.assert_array_equal(got, [[5, MISSING_ID, MISSING_ID]])


def test_cpu_layout_splits_large_vocabularies():
    assert TopkLayout.for_target(256, gpu=False).chunks == 1
    layout = TopkLayout.for_target(32000, gpu=False)
    assert layout.chunks == 4 and layout.span * layout.chunks >= 32000 and not layout.interleaved
    assert TopkLayout.for_target(128256, gpu=False).chunks == 16
    assert TopkLayout.for_target(32000, gpu=True).interleaved
