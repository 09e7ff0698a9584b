"""Accuracy statistics and the files around them: the rank of the right token, Wilson
intervals, accuracy files (ours and FasterDecoding's heads_accuracy.pt), evaluation sets."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from medusa_cli.checkpoint.pytorch import TorchCheckpoint, load_tensor_list, save_torch_checkpoint
from medusa_cli.errors import CheckpointError, InputError, UnsafePickleError
from medusa_cli.tree_search import RANK_NO_LABEL, RANK_OUTSIDE
from medusa_cli.verify.accuracy import (
    head_accuracies,
    label_ranks,
    load_accuracy,
    load_ranks,
    wilson_interval,
)
from medusa_cli.verify.eval_data import EvalData

# --------------------------------------------------------------------------- ranks and counts


def rank_by_sorting(row, label):
    """Position of `label` in the row sorted by logit, largest first, ties to the lower id."""
    order = sorted(range(len(row)), key=lambda token: (-row[token], token))
    return order.index(label)


def test_label_ranks_match_sorting_with_ties():
    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 4, size=(200, 17)).astype(np.float32)  # many ties
    labels = rng.integers(0, 17, size=200)
    for top_k in (1, 5, 17):
        got = label_ranks(logits, labels, top_k)
        expected = [rank_by_sorting(row, label) for row, label in zip(logits.tolist(), labels)]
        expected = [r if r < top_k else RANK_OUTSIDE for r in expected]
        np.testing.assert_array_equal(got, expected)


def test_a_non_finite_right_logit_is_never_right():
    logits = np.array([[0.0, np.nan, 1.0], [np.inf, 0.0, 0.0], [0.0, -np.inf, 1.0]])
    np.testing.assert_array_equal(label_ranks(logits, np.array([1, 0, 1]), 3),
                                  [RANK_OUTSIDE, RANK_OUTSIDE, RANK_OUTSIDE])


@pytest.mark.parametrize("successes, samples, low, high", [
    (0, 10, 0.0, 0.27753),  # published values of the Wilson score interval
    (5, 10, 0.23659, 0.76341),
    (10, 10, 0.72247, 1.0),
])
def test_wilson_interval_known_values(successes, samples, low, high):
    got = wilson_interval(successes, samples)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_wilson_bounds_solve_the_score_equation():
    """Each bound p is a root of (p_hat - p)^2 = z^2 p (1 - p) / n."""
    z = 1.959963984540054
    for successes, samples in [(81, 263), (1, 3), (999, 1000), (37, 40)]:
        p_hat = successes / samples
        for bound in wilson_interval(successes, samples):
            assert (p_hat - bound) ** 2 == pytest.approx(z * z * bound * (1 - bound) / samples,
                                                         rel=1e-9)


def test_wilson_interval_without_samples_says_nothing():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_head_accuracies_count_ranks_per_head():
    ranks = np.array([[0, 1], [2, RANK_OUTSIDE], [0, RANK_NO_LABEL], [RANK_OUTSIDE, RANK_NO_LABEL]])
    heads = head_accuracies(ranks, top_k=3)
    assert [h.samples for h in heads] == [4, 2]
    assert heads[0].per_rank == [0.5, 0.0, 0.25] and heads[0].top_k == [0.5, 0.5, 0.75]
    assert heads[1].per_rank == [0.0, 0.5, 0.0] and heads[1].top_k == [0.0, 0.5, 0.5]
    report = heads[0].to_dict()
    assert report["top_k_interval"][-1] == pytest.approx(list(wilson_interval(3, 4)))
    assert all(lo <= value <= hi for value, (lo, hi) in
               zip(report["accuracy"], report["accuracy_interval"]))


# --------------------------------------------------------------------------- accuracy files


def test_json_accuracy_round_trip(tmp_path):
    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps({"accuracy": [[0.5, 0.2], [0.3, 0.1]], "samples": [10, 9]}))
    table = load_accuracy(path)
    np.testing.assert_array_equal(table.accuracy, [[0.5, 0.2], [0.3, 0.1]])
    assert table.samples == (10, 9) and str(path) in table.source


@pytest.mark.parametrize("text, message", [
    ("not json", r"not a JSON accuracy file"),
    ('{"heads": []}', r'expected an object with "accuracy"'),
    ('{"accuracy": [[0.7, 0.6]]}', r"add up to 1\.3000.*cumulative"),
])
def test_bad_json_accuracy_files_name_the_file(tmp_path, text, message):
    path = tmp_path / "acc.json"
    path.write_text(text)
    with pytest.raises(InputError, match=rf"--accuracy {path}.*{message}"):
        load_accuracy(path)


def test_accuracy_files_need_a_known_suffix(tmp_path):
    with pytest.raises(InputError, match=r"--accuracy x\.csv: expected a \.json file .* heads_accuracy\.pt"):
        load_accuracy(Path("x.csv"))
    with pytest.raises(InputError, match=r"no such file"):
        load_accuracy(tmp_path / "missing.json")


def fasterdecoding_hits(rng, heads, positions, top_k):
    """What heads_accuracy.py saves: per head, [positions - head - 1, top_k] bools with at most
    one True per row (the rank holding the right token)."""
    out = []
    for head in range(heads):
        rows = positions - head - 1
        ranks = rng.integers(-1, top_k, size=rows)
        hits = np.zeros((rows, top_k), dtype=bool)
        hits[np.flatnonzero(ranks >= 0), ranks[ranks >= 0]] = True
        out.append(hits)
    return out


def test_heads_accuracy_pt_is_read_as_per_rank_accuracy(tmp_path):
    rng = np.random.default_rng(1)
    hits = fasterdecoding_hits(rng, heads=3, positions=50, top_k=20)
    path = tmp_path / "vicuna_heads_accuracy.pt"
    save_torch_checkpoint([(str(i), h) for i, h in enumerate(hits)], path, as_list=True)
    table = load_accuracy(path)
    assert table.accuracy.shape == (3, 20) and table.samples == (49, 48, 47)
    for head, h in enumerate(hits):  # gen_results.py: sum(0) / rows
        np.testing.assert_allclose(table.accuracy[head], h.sum(axis=0) / h.shape[0])


def test_heads_accuracy_pt_reader_refuses_what_is_not_a_list_of_bool_tensors(tmp_path):
    state_dict = tmp_path / "state.pt"
    save_torch_checkpoint({"w": np.ones((2, 3), np.float32)}, state_dict)
    with pytest.raises(InputError, match=r"holds a pickled OrderedDict, not a list of tensors"):
        load_accuracy(state_dict)
    counts = tmp_path / "counts.pt"
    save_torch_checkpoint([("0", np.full((2, 3), 2.0, np.float32))], counts, as_list=True)
    with pytest.raises(InputError, match=r"values other than 0 and 1"):
        load_accuracy(counts)
    ragged = tmp_path / "ragged.pt"
    save_torch_checkpoint([("0", np.zeros((2, 3), bool)), ("1", np.zeros((2, 4), bool))],
                          ragged, as_list=True)
    with pytest.raises(InputError, match=r"tensor 1 has shape \[2, 4\]"):
        load_accuracy(ragged)


def test_a_tensor_list_is_not_a_state_dict_and_the_allowlist_still_holds(tmp_path):
    path = tmp_path / "list.pt"
    save_torch_checkpoint([("0", np.arange(3, dtype=np.int64))], path, as_list=True)
    np.testing.assert_array_equal(load_tensor_list(path)[0], [0, 1, 2])
    with pytest.raises(CheckpointError, match=r"holds a pickled list, not a state dict"):
        TorchCheckpoint(path)

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps([Evil()], protocol=2))
        archive.writestr("archive/byteorder", b"little")
    with pytest.raises(UnsafePickleError, match=r"asks for '\w+\.print'.*nothing in it was run"):
        load_tensor_list(evil)
    mixed = tmp_path / "mixed.pt"
    with zipfile.ZipFile(mixed, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps([1, 2], protocol=2))
    with pytest.raises(CheckpointError, match=r"list of other things, not a list of tensors"):
        load_tensor_list(mixed)


def test_ranks_files_are_checked(tmp_path):
    good = tmp_path / "a.ranks.npy"
    np.save(good, np.zeros((4, 2), np.int32))
    assert load_ranks(good).shape == (4, 2)
    floats = tmp_path / "f.npy"
    np.save(floats, np.zeros((4, 2)))
    with pytest.raises(InputError, match=r"--ranks .*f\.npy: holds float64 \[4, 2\]"):
        load_ranks(floats)
    with pytest.raises(InputError, match=r"no such file"):
        load_ranks(tmp_path / "none.npy")


# --------------------------------------------------------------------------- evaluation sets


def labels_by_hand(tokens, sequence, head):
    out = []
    for t in range(len(tokens)):
        ahead = t + head + 1
        same_run = ahead < len(tokens) and all(sequence[u] == sequence[t] for u in range(t, ahead + 1))
        out.append(int(tokens[ahead]) if same_run else RANK_NO_LABEL)
    return out


def write_set(tmp_path, form, hidden, tokens, sequence=None):
    arrays = {"hidden": hidden, "tokens": tokens}
    if sequence is not None:
        arrays["sequence"] = sequence
    if form == "dir":
        folder = tmp_path / "set"
        folder.mkdir()
        for name, array in arrays.items():
            np.save(folder / f"{name}.npy", array)
        return folder
    path = tmp_path / "set.npz"
    (np.savez_compressed if form == "compressed" else np.savez)(path, **arrays)
    return path


@pytest.mark.parametrize("form", ["npz", "compressed", "dir"])
def test_evaluation_sets_stream_rows_and_pair_positions_within_sequences(tmp_path, form):
    rng = np.random.default_rng(2)
    hidden = rng.standard_normal((23, 6)).astype(np.float16)
    tokens = rng.integers(0, 9, 23)
    sequence = np.array([0] * 5 + [1] * 9 + [0] * 2 + [4] * 7)  # id 0 comes back: a new run
    data = EvalData(write_set(tmp_path, form, hidden, tokens, sequence), hidden_size=6, vocab_size=9)
    assert data.positions == 23 and data.sequences == 4
    for head in range(4):
        np.testing.assert_array_equal(data.labels(head), labels_by_hand(tokens, sequence, head))
    batches = list(data.hidden_batches(5))
    assert [start for start, _ in batches] == [0, 5, 10, 15, 20]
    np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), hidden)


def test_without_sequence_ids_all_positions_are_one_sequence(tmp_path):
    tokens = np.arange(6) % 4
    data = EvalData(write_set(tmp_path, "npz", np.zeros((6, 2), np.float32), tokens), 2, 4)
    np.testing.assert_array_equal(data.labels(1), [2, 3, 0, 1, RANK_NO_LABEL, RANK_NO_LABEL])


@pytest.mark.parametrize("hidden, tokens, sequence, message", [
    (np.zeros((4, 3), np.float32), np.zeros(4, int), None, r"shape \[4, 3\], expected \[positions, 2\]"),
    (np.zeros((4, 2), np.int32), np.zeros(4, int), None, r"dtype int32"),
    (np.zeros((4, 2), np.float32), np.zeros(3, int), None, r"tokens is int64 \[3\], expected integers \[4\]"),
    (np.zeros((4, 2), np.float32), np.array([0, 1, 9, 0]), None, r"token 9 at position 2 is outside the vocabulary 0\.\.3"),
    (np.zeros((4, 2), np.float32), np.zeros(4), None, r"tokens is float64"),
    (np.zeros((4, 2), np.float32), np.zeros(4, int), np.zeros(5, int), r"sequence is int64 \[5\]"),
])
def test_bad_evaluation_sets_name_the_array(tmp_path, hidden, tokens, sequence, message):
    path = write_set(tmp_path, "npz", hidden, tokens, sequence)
    with pytest.raises(InputError, match=rf"^--data {path}:\w+: .*{message}"):
        EvalData(path, hidden_size=2, vocab_size=4)


def test_evaluation_set_files_are_checked(tmp_path):
    with pytest.raises(InputError, match=r"x\.npz: no such file or directory"):
        EvalData(tmp_path / "x.npz", 2, 4)
    (tmp_path / "x.npy").write_bytes(b"")
    with pytest.raises(InputError, match=r"expected an \.npz file or a directory"):
        EvalData(tmp_path / "x.npy", 2, 4)
    folder = tmp_path / "d"
    folder.mkdir()
    np.save(folder / "hidden.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(InputError, match=r"has no tokens array"):
        EvalData(folder, 2, 4)
    fake = tmp_path / "fake.npz"
    fake.write_text("hello")
    with pytest.raises(InputError, match=r"not an \.npz archive"):
        EvalData(fake, 2, 4)


def test_non_finite_hidden_rows_are_named_when_streamed(tmp_path):
    hidden = np.zeros((9, 2), np.float32)
    hidden[7, 1] = np.nan
    data = EvalData(write_set(tmp_path, "dir", hidden, np.zeros(9, int)), 2, 4)
    with pytest.raises(InputError, match=r"row 7 holds NaN or Inf"):
        list(data.hidden_batches(4))


def test_reads_a_list_torch_saves(tmp_path):
    """heads_accuracy.py's own output: torch.save of a list of bool tensors, some of them views."""
    torch = pytest.importorskip("torch")
    topk = torch.arange(60).reshape(20, 3) % 7
    truth = torch.arange(20) % 7
    first = topk[:-1] == truth[1:, None]  # [19, 3], at most one True per row
    saved = [first[:, :2], topk[:-2, :2] == truth[2:, None]]  # a strided view, a whole tensor
    path = tmp_path / "heads_accuracy.pt"
    torch.save(saved, path)
    for got, expected in zip(load_tensor_list(path), saved):
        np.testing.assert_array_equal(got, expected.numpy())
    table = load_accuracy(path)
    np.testing.assert_allclose(table.accuracy[1], saved[1].float().mean(0).numpy())
