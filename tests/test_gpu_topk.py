"""gpu_topk.py's kernels, run on the CPU: the same blocks with their loops serial (gpu=False)
instead of bound to GPU blocks and threads, so the algorithm (per-thread buffers, rounds of
cross-thread max/min, ranking by counting) is checked exactly against numpy's stable argsort;
then the whole GPU tree path of the model (one top-k over all rows, the gathers) on the CPU."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import tvm

from medusa_cli import quantization as quant
from medusa_cli.compiler import gpu_topk
from medusa_cli.compiler.gpu_topk import MIN_BLOCKS, GpuTopkLayout, chunk_kernel, merge_kernel
from medusa_cli.compiler.model import TreeSpec
from medusa_cli.compiler.pipeline import compile_library
from medusa_cli.compiler.targets import resolve_target
from medusa_cli.compiler.topk import MISSING_ID
from medusa_cli.runtime.heads import load_heads
from medusa_cli.trees import build_buffers, generate_candidates, load_tree
from tests.conftest import hard_topk_rows
from tests._params import make_params_dir, random_hidden, tiny_config


def _run(layout: GpuTopkLayout, k: int, logits: np.ndarray) -> np.ndarray:
    mod = tvm.IRModule({
        "chunks": chunk_kernel(layout, k, gpu=False).with_attr("global_symbol", "chunks"),
        "merge": merge_kernel(layout, k, gpu=False).with_attr("global_symbol", "merge"),
    })
    lib = tvm.tirx.build(mod, target="llvm")
    rows = logits.shape[0]
    keys = tvm.runtime.tensor(np.zeros((rows, layout.chunks, k), np.int32))
    ids = tvm.runtime.tensor(np.zeros((rows, layout.chunks, k), np.int32))
    out = tvm.runtime.tensor(np.full((rows, k), -1, np.int32))
    lib["chunks"](tvm.runtime.tensor(logits), keys, ids)
    lib["merge"](keys, ids, out)
    return out.numpy()




@pytest.mark.parametrize(
    "vocab, rows_at_batch_1, k",
    [
        (32000, 5, 10),  # mc_sim_7b_63 at the vicuna-7b shape: base + 4 heads
        (1003, 2, 7),    # a short last slice
        (40, 2, 10),     # slices of one id: most entries empty
        (300, 1, 1),     # one row: the most slices
    ],
)
def test_kernels_match_a_stable_sort(vocab, rows_at_batch_1, k):
    layout = GpuTopkLayout.for_rows(vocab, rows_at_batch_1, k)
    logits = hard_topk_rows(vocab)
    want = np.argsort(-logits.astype(np.float64), axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(_run(layout, k, logits), want)


def test_ranks_a_row_cannot_fill_are_missing():
    logits = np.full((1, 40), np.nan, np.float32)
    logits[0, 5] = 1.0
    logits[0, 30] = -np.inf
    got = _run(GpuTopkLayout.for_rows(40, 1, 4), 4, logits)
    np.testing.assert_array_equal(got, [[5, 30, MISSING_ID, MISSING_ID]])


@pytest.mark.parametrize("vocab", [32000, 128256, 256000])
@pytest.mark.parametrize("rows_at_batch_1, k", [(1, 1), (2, 10), (5, 10), (5, 64)])
def test_both_kernels_fill_the_gpu_at_batch_1(vocab, rows_at_batch_1, k):
    layout = GpuTopkLayout.for_rows(vocab, rows_at_batch_1, k)
    assert rows_at_batch_1 * layout.chunks >= MIN_BLOCKS
    assert rows_at_batch_1 * layout.merge_groups(k) >= MIN_BLOCKS
    assert layout.chunks * layout.span >= vocab
    # no thread scans a row alone: a block's slice is shared by its threads
    assert layout.span <= vocab // 8 and layout.chunk_threads >= min(gpu_topk.CHUNK_THREADS, layout.span)


def test_the_model_gpu_tree_path_on_the_cpu(tmp_path, monkeypatch):
    """The model's GPU get_tree_candidates (base and head rows in one top-k, then the gathers
    indexing into it) with the kernels' CPU twins, against generate_candidates on the library's
    own logits: the order of the rows and the candidate indexing are those of the GPU build."""
    monkeypatch.setattr(gpu_topk, "chunk_kernel", functools.partial(chunk_kernel, gpu=False))
    monkeypatch.setattr(gpu_topk, "merge_kernel", functools.partial(merge_kernel, gpu=False))
    config = tiny_config(medusa_num_heads=4, max_batch_size=3)
    params = make_params_dir(tmp_path / "params", "q0f32", config=config)
    tree = load_tree("mc_sim_7b_63")
    spec = TreeSpec(tree=tree, topk=10,
                    layout=GpuTopkLayout.for_rows(config.vocab_size, 1 + tree.depth, 10))
    library = tmp_path / "heads.so"
    compile_library(config, quant.get_scheme("q0f32"), resolve_target("llvm"), spec, library)
    heads = load_heads(library, params.path)
    for batch in (1, 3):
        hidden = random_hidden(config, batch, seed=batch)
        rng = np.random.default_rng(batch)
        base = (np.round(rng.standard_normal((batch, config.vocab_size)) * 2) / 2).astype(np.float32)
        got_tree, got_cart = heads.get_tree_candidates(base, hidden)
        want_tree, want_cart = generate_candidates(base, heads.get_logits(hidden),
                                                   build_buffers(tree, 10), 10)
        np.testing.assert_array_equal(got_tree, want_tree)
        np.testing.assert_array_equal(got_cart, want_cart)
    assert json.loads(json.dumps(heads.metadata.to_json()))["tree"]["name"] == "mc_sim_7b_63"
