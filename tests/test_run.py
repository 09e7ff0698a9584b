"""run_heads: logits and top-k ids in an .npz, written atomically; hidden-state files checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medusa_cli.errors import InputError
from medusa_cli.verify.oracle import HeadWeights, reference_logits
from medusa_cli.commands.run import RunRequest, load_hidden_states, run_heads, top_k_ids
from medusa_cli.runtime.heads import load_heads
from tests._verify_helpers import Workshop


@pytest.fixture(scope="session")
def workshop(tmp_path_factory) -> Workshop:
    return Workshop(tmp_path_factory.mktemp("run"))


def _hidden(tmp_path: Path, rows: int, seed: int = 0) -> Path:
    path = tmp_path / "hidden.npy"
    np.save(path, np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32))
    return path


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_logits_equal_the_library_and_the_oracle(workshop, tmp_path):
    built = workshop.build("q0f32")
    inputs = _hidden(tmp_path, 11)  # more rows than the library's max batch of 8
    out = tmp_path / "logits.npz"
    result = run_heads(RunRequest(built.library, built.params, inputs=inputs, output=out, top_k=4))
    assert result.arrays == ["head_0", "head_0_topk", "head_1", "head_1_topk", "head_2", "head_2_topk"]
    assert (result.batch, result.num_heads, result.vocab_size) == (11, 3, 256)

    hidden = np.load(inputs)
    direct = load_heads(built.library, built.params).get_logits(hidden[:8])
    from medusa_cli.checkpoint.files import Checkpoint

    with Checkpoint(built.ckpt) as ckpt:
        heads = [HeadWeights([(ckpt.read(f"{h}.0.linear.weight"), ckpt.read(f"{h}.0.linear.bias"))],
                             ckpt.read(f"{h}.1.weight")) for h in range(3)]
    oracle = reference_logits(heads, hidden)
    with np.load(out) as saved:
        for h in range(3):
            logits = saved[f"head_{h}"]
            assert logits.dtype == np.float32 and logits.shape == (11, 256)
            np.testing.assert_array_equal(logits[:8], direct[h])
            assert np.abs(logits - oracle[h]).max() < 1e-5 * np.abs(oracle[h]).max()
            ids = saved[f"head_{h}_topk"]
            assert ids.dtype == np.int32 and ids.shape == (11, 4)
            np.testing.assert_array_equal(ids[:, 0], logits.argmax(axis=1))
    assert _leftovers(tmp_path) == []


def test_top_k_ids_are_best_first_with_ties_to_the_lower_id():
    logits = np.array([[0.5, 2.0, 2.0, -1.0, 2.0], [3.0, 1.0, 2.0, 0.0, 1.0]], np.float32)
    np.testing.assert_array_equal(top_k_ids(logits, 3), [[1, 2, 4], [0, 2, 1]])


def test_without_top_k_only_logits(workshop, tmp_path):
    built = workshop.build("q4f16_1")
    out = tmp_path / "sub" / "logits.npz"  # parent created
    run_heads(RunRequest(built.library, built.params, inputs=_hidden(tmp_path, 2), output=out))
    with np.load(out) as saved:
        assert sorted(saved.files) == ["head_0", "head_1", "head_2"]


def test_existing_output_is_replaced_whole(workshop, tmp_path):
    built = workshop.build("q0f32")
    out = tmp_path / "logits.npz"
    out.write_bytes(b"old")
    run_heads(RunRequest(built.library, built.params, inputs=_hidden(tmp_path, 1), output=out))
    with np.load(out) as saved:
        assert saved["head_0"].shape == (1, 256)


@pytest.mark.parametrize(
    "change,words",
    [
        (dict(output="logits.bin"), "name it \\*.npz"),
        (dict(top_k=0), "--top-k 0: must be between 1 and the vocab size 256"),
        (dict(top_k=257), "--top-k 257"),
        (dict(inputs="wide"), r"shape \[2, 65\], expected \[batch, 64\]"),
        (dict(device="cuda:0"), "--device cuda:0"),
    ],
)
def test_errors_leave_no_output(workshop, tmp_path, change, words):
    built = workshop.build("q0f32")
    inputs = _hidden(tmp_path, 2)
    if change.get("inputs") == "wide":
        np.save(inputs, np.zeros((2, 65), np.float32))
        change = {"inputs": inputs}
    output = tmp_path / change.pop("output", "logits.npz")
    request = RunRequest(built.library, built.params, inputs=inputs, output=output)
    for key, value in change.items():
        setattr(request, key, value)
    with pytest.raises(InputError, match=words):
        run_heads(request)
    assert not output.exists() and _leftovers(tmp_path) == []


def test_a_failing_write_leaves_no_partial_file(workshop, tmp_path, monkeypatch):
    built = workshop.build("q0f32")
    out = tmp_path / "logits.npz"

    def broken_savez(file, **arrays):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(InputError, match="logits.npz: writing failed \\(disk full\\); nothing was written"):
        run_heads(RunRequest(built.library, built.params, inputs=_hidden(tmp_path, 1), output=out))
    assert not out.exists() and _leftovers(tmp_path) == []


def test_hidden_states_are_rounded_to_the_library_dtype(tmp_path):
    path = tmp_path / "h.npy"
    np.save(path, np.full((1, 4), 1.0 + 2**-12))  # between two float16 values
    rounded = load_hidden_states(path, 4, "float16")
    assert rounded.dtype == np.float16 and float(rounded[0, 0]) == 1.0
