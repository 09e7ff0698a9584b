"""medusa eval on the seeded evaluation set: the oracle and an exact library find the designed
ranks, a quantized library loses a little, outputs appear whole or not at all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medusa_cli.checkpoint.pytorch import TorchCheckpoint
from medusa_cli.commands.eval import EvalRequest, evaluate_heads, ranks_path
from medusa_cli.errors import InputError
from medusa_cli.tree_search import RANK_NO_LABEL, RANK_OUTSIDE
from medusa_cli.verify.eval_set import designed_accuracy
from tests._eval_helpers import MAX_BATCH, POSITIONS, eval_bench

HEADS, TOP_K = 4, 10


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return eval_bench(tmp_path_factory)


def counts_of(ranks: np.ndarray) -> tuple[list[int], list[list[float]]]:
    """Samples and per-rank accuracy per head, counted directly."""
    samples, accuracy = [], []
    for head in range(ranks.shape[1]):
        column = ranks[:, head]
        labelled = column[column != RANK_NO_LABEL]
        samples.append(len(labelled))
        accuracy.append([float(np.sum(labelled == r)) / len(labelled) for r in range(TOP_K)])
    return samples, accuracy


def ranks_by_numpy(ckpt: Path, hidden: np.ndarray, tokens: np.ndarray, sequence: np.ndarray):
    """The heads written with numpy from the checkpoint file, ranks by sorting."""
    out = np.full((len(tokens), HEADS), RANK_NO_LABEL)
    with TorchCheckpoint(ckpt / "medusa_lm_head.pt") as weights:
        for head in range(HEADS):
            w, b = (weights.get_tensor(f"{head}.0.linear.{n}").astype(np.float64) for n in ("weight", "bias"))
            z = hidden.astype(np.float64) @ w.T + b
            x = hidden + z / (1 + np.exp(-z))
            logits = x @ weights.get_tensor(f"{head}.1.weight").astype(np.float64).T
            for t in range(len(tokens) - head - 1):
                if sequence[t + head + 1] != sequence[t]:
                    continue
                order = np.argsort(-logits[t], kind="stable")
                rank = int(np.flatnonzero(order == tokens[t + head + 1])[0])
                out[t, head] = rank if rank < TOP_K else RANK_OUTSIDE
    return out


def test_the_evaluation_set_has_the_designed_ranks(bench):
    arrays = bench.arrays
    assert arrays["hidden"].shape == (POSITIONS, 512) and arrays["hidden"].dtype == np.float32
    np.testing.assert_array_equal(
        ranks_by_numpy(bench.ckpt, arrays["hidden"], arrays["tokens"], arrays["sequence"]),
        arrays["designed_ranks"])
    table = designed_accuracy(HEADS)
    np.testing.assert_array_equal(arrays["designed_accuracy"], table)
    assert table[0, 0] == pytest.approx(0.55) and table[1, 2] > table[1, 1]  # a rise with rank
    assert (table.sum(axis=1) < 1).all()
    # the draws follow the design: every per-rank frequency within 4 standard errors
    samples, measured = counts_of(arrays["designed_ranks"])
    for head in range(HEADS):
        error = np.sqrt(table[head] * (1 - table[head]) / samples[head]) + 1e-3
        assert (np.abs(np.array(measured[head]) - table[head]) < 4 * error).all()


def test_exact_library_and_oracle_find_the_designed_ranks(bench, tmp_path):
    library, params = bench.build("q0f32")
    seen = []
    result = evaluate_heads(
        EvalRequest(library, params, data=bench.eval_set, output=tmp_path / "accuracy.json",
                    plot=tmp_path / "accuracy.svg"),
        progress=lambda done, total: seen.append((done, total)))
    designed = bench.arrays["designed_ranks"]
    np.testing.assert_array_equal(result.ranks, designed)
    np.testing.assert_array_equal(np.load(tmp_path / "accuracy.ranks.npy"), designed)
    samples, accuracy = counts_of(designed)
    written = json.loads((tmp_path / "accuracy.json").read_text())
    assert written["samples"] == samples
    np.testing.assert_allclose(written["accuracy"], accuracy, atol=1e-15)
    np.testing.assert_allclose(written["oracle"]["accuracy"], accuracy, atol=1e-15)
    assert written["oracle"]["source"]["kind"] == "checkpoint"
    assert written["ranks"] == {"file": "accuracy.ranks.npy", "shape": [POSITIONS, HEADS],
                                "outside_top_k": -1, "no_label": -2}
    for head in written["heads"]:
        assert head["top_k"] == pytest.approx(np.cumsum(head["accuracy"]).tolist())
        for value, (low, high) in zip(head["top_k"], head["top_k_interval"]):
            assert low <= value <= high
    assert written == json.loads(json.dumps(result.to_dict()))
    # progress: positions over the library's pass and one oracle pass per head
    total = POSITIONS * (1 + HEADS)
    assert seen[-1] == (total, total) and all(t == total for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert (tmp_path / "accuracy.svg").read_text().startswith("<svg")


def test_a_quantized_library_costs_a_little_accuracy(bench):
    library, params = bench.build("q4f16_1")
    result = evaluate_heads(EvalRequest(library, params, data=bench.eval_set))
    designed = bench.arrays["designed_ranks"]
    _, accuracy = counts_of(designed)
    for head, truth, expected in zip(result.heads, result.oracle, accuracy):
        assert truth.per_rank == pytest.approx(expected, abs=1e-15)  # the oracle is exact
        assert abs(head.top_k[0] - truth.top_k[0]) < 0.1
        assert head.samples == truth.samples
    assert not np.array_equal(result.ranks, designed)  # near ties do move
    lost = result.to_dict()["oracle"]["top_k_lost"]
    assert lost[0] == pytest.approx([o - q for o, q in zip(result.oracle[0].top_k, result.heads[0].top_k)])


def test_directories_of_npy_and_odd_sizes_give_the_same_ranks(bench, tmp_path):
    library, params = bench.build("q0f32")
    rows = POSITIONS - 5  # the last batch is partial
    folder = tmp_path / "dump"
    folder.mkdir()
    for name in ("hidden", "tokens", "sequence"):
        np.save(folder / f"{name}.npy", bench.arrays[name][:rows])
    result = evaluate_heads(EvalRequest(library, params, data=folder, oracle=False))
    assert result.oracle is None and result.to_dict()["oracle"] is None
    expected = bench.arrays["designed_ranks"][:rows].copy()
    # the cut sequence loses the labels that pointed past its new end
    for head in range(HEADS):
        expected[rows - head - 1:, head] = RANK_NO_LABEL
    np.testing.assert_array_equal(result.ranks, expected)
    assert MAX_BATCH < rows


def _outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_failure_midway_leaves_no_output(bench, tmp_path):
    library, params = bench.build("q0f32")
    hidden = bench.arrays["hidden"].copy()
    hidden[-1, 3] = np.inf  # found by the last batch of the library's pass
    data = tmp_path / "bad.npz"
    np.savez(data, hidden=hidden, tokens=bench.arrays["tokens"])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=rf"--data {data}:hidden: row {POSITIONS - 1} holds NaN or Inf"):
        evaluate_heads(EvalRequest(library, params, data=data, output=out / "acc.json",
                                   plot=out / "acc.svg"))
    assert _outputs(out) == []


@pytest.mark.parametrize("change, message", [
    ({"top_k": 0}, r"--top-k 0: must be between 1 and the vocab size 128"),
    ({"output": "acc.txt"}, r"-o acc.txt: name it \*\.json"),
    ({"plot": "acc.png"}, r"--plot acc.png: name it \*\.svg"),
    ({"source": "no/such/ckpt"}, r"--source no/such/ckpt: no such file"),
])
def test_bad_requests_are_refused_before_any_work(bench, tmp_path, change, message):
    library, params = bench.build("q0f32")
    request = EvalRequest(library, params, data=bench.eval_set)
    for key, value in change.items():
        setattr(request, key, Path(value) if isinstance(value, str) else value)
    with pytest.raises(InputError, match=message):
        evaluate_heads(request)


def test_tokens_of_another_vocabulary_are_refused(bench, tmp_path):
    library, params = bench.build("q0f32")
    tokens = bench.arrays["tokens"].astype(np.int64) + 1000
    data = tmp_path / "other.npz"
    np.savez(data, hidden=bench.arrays["hidden"], tokens=tokens)
    with pytest.raises(InputError, match=r"token 10\d\d at position 0 is outside the vocabulary 0\.\.127"):
        evaluate_heads(EvalRequest(library, params, data=data, output=tmp_path / "a.json"))
    assert not (tmp_path / "a.json").exists() and not ranks_path(tmp_path / "a.json").exists()


def test_the_oracle_falls_back_to_the_packed_weights_with_a_warning(bench, tmp_path):
    library, params = bench.build("q0f32")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(bench.ckpt, ckpt)
    copy = tmp_path / "params"
    shutil.copytree(params, copy)
    config = json.loads((copy / "mlc-chat-config.json").read_text())
    config["medusa_cli"]["source"]["path"] = str(tmp_path / "gone")
    (copy / "mlc-chat-config.json").write_text(json.dumps(config))
    result = evaluate_heads(EvalRequest(copy / "heads.so", copy, data=bench.eval_set))
    assert result.source.kind == "packed"
    assert any("no longer exists" in w for w in result.warnings)
    again = evaluate_heads(EvalRequest(copy / "heads.so", copy, data=bench.eval_set, source=ckpt))
    assert again.source.kind == "checkpoint" and again.source.origin == "--source"
    assert [h.per_rank for h in again.oracle] == [h.per_rank for h in result.oracle]


def test_an_oracle_source_of_other_heads_is_refused_before_any_pass(bench, tmp_path):
    from medusa_cli.commands.example import ExampleRequest, write_example

    library, params = bench.build("q0f32")
    other = write_example(ExampleRequest(output=tmp_path / "tiny", preset="tiny")).output
    seen = []
    with pytest.raises(InputError, match=r"--source .*tiny: holds 3 heads x 1 layers, hidden 64"):
        evaluate_heads(EvalRequest(library, params, data=bench.eval_set, source=other,
                                   output=tmp_path / "a.json"),
                       progress=lambda done, total: seen.append(done))
    assert seen == [] and not (tmp_path / "a.json").exists()
