"""Tree candidates through `medusa run --base-logits` and `medusa verify`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medusa_cli.cli import app
from medusa_cli.commands.compile import CompileRequest, compile_heads
from medusa_cli.commands.convert import ConvertRequest, convert_checkpoint
from medusa_cli.commands.example import ExampleRequest, write_example
from medusa_cli.trees import build_buffers, generate_candidates, load_tree

runner = CliRunner()
TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1]]
TOPK = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tree-run")
    ckpt = write_example(ExampleRequest(output=root / "ckpt", layout="vllm", seed=3)).output
    tree_file = root / "tree.json"
    tree_file.write_text(json.dumps(TREE))
    out = {"ckpt": ckpt, "tree": tree_file}
    for scheme in ("q0f32", "q4f16_1"):
        params = convert_checkpoint(ConvertRequest(ckpt, root / f"params-{scheme}", quantization=scheme)).output
        out[f"{scheme}-params"] = params
        out[scheme] = compile_heads(CompileRequest(params, target="llvm", tree=str(tree_file), topk=TOPK,
                                                   output=root / f"{scheme}.so")).output
    out["plain"] = compile_heads(CompileRequest(out["q0f32-params"], target="llvm", output=root / "plain.so")).output
    rng = np.random.default_rng(0)
    np.save(root / "hidden.npy", rng.standard_normal((5, 64)).astype(np.float32))
    np.save(root / "base.npy", (rng.standard_normal((5, 256)) * 3).astype(np.float32))
    np.save(root / "base-bad.npy", np.zeros((4, 256), np.float32))
    out["root"] = root
    return out


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("scheme", ["q0f32", "q4f16_1"])
def test_run_writes_candidates_equal_to_the_tree_algorithm_on_its_logits(built, tmp_path, scheme):
    out = tmp_path / "c.npz"
    root = built["root"]
    result = invoke("run", built[scheme], built[f"{scheme}-params"], "--inputs", root / "hidden.npy",
                    "--base-logits", root / "base.npy", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert "tree_candidates" in json.loads(result.stdout)["arrays"]
    with np.load(out) as arrays:
        logits = [arrays[f"head_{h}"] for h in range(3)]
        buffers = build_buffers(load_tree(built["tree"], topk=TOPK), TOPK)
        tree_expected, cart_expected = generate_candidates(np.load(root / "base.npy"), logits, buffers, TOPK)
        # batch 5 runs as one call: max batch size is 8
        np.testing.assert_array_equal(arrays["tree_candidates"], tree_expected)
        np.testing.assert_array_equal(arrays["cart_candidates"], cart_expected)
        assert arrays["tree_candidates"].shape == (5, len(TREE) + 1)
        assert arrays["tree_candidates"].dtype == np.int32


def test_run_base_logits_need_a_tree_and_the_right_shape(built, tmp_path):
    root = built["root"]
    out = tmp_path / "c.npz"
    result = invoke("run", built["plain"], built["q0f32-params"], "--inputs", root / "hidden.npy",
                    "--base-logits", root / "base.npy", "-o", out)
    assert result.exit_code == 2 and "compiled without a tree" in result.stderr and "--tree" in result.stderr
    result = invoke("run", built["q0f32"], built["q0f32-params"], "--inputs", root / "hidden.npy",
                    "--base-logits", root / "base-bad.npy", "-o", out)
    assert result.exit_code == 2
    assert "[4, 256]" in result.stderr and "[5, 256]" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("scheme,exact", [("q0f32", True), ("q4f16_1", False)])
def test_verify_reports_tree_agreement(built, scheme, exact):
    result = invoke("verify", built[scheme], built[f"{scheme}-params"], "--json", "--batch", "6")
    assert result.exit_code == 0, result.stderr
    tree = json.loads(result.stdout)["tree"]
    assert tree["self_mismatches"] == 0 and tree["passed"]
    assert tree["oracle_exact_required"] is exact
    assert len(tree["oracle_agreement_per_depth"]) == 3
    if exact:
        assert tree["oracle_agreement_per_depth"] == [1.0, 1.0, 1.0]
    assert all(0.5 <= a <= 1.0 for a in tree["oracle_agreement_per_depth"])


def test_verify_fails_when_the_candidate_kernel_is_wrong(built, monkeypatch):
    from medusa_cli.runtime import heads as runtime

    original = runtime.CompiledHeads.get_tree_candidates

    def off_by_one(self, base, hidden):
        tree_candidates, cart = original(self, base, hidden)
        tree_candidates = tree_candidates.copy()
        tree_candidates[:, 2] += 1  # one node's token is wrong
        return tree_candidates, cart

    monkeypatch.setattr(runtime.CompiledHeads, "get_tree_candidates", off_by_one)
    result = invoke("verify", built["q4f16_1"], built["q4f16_1-params"], "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["verdict"] == "fail"
    assert report["tree"]["self_mismatches"] == 4  # one node in each of the 4 rows
    assert "differ from the tree algorithm" in result.stderr


def test_verify_has_no_tree_section_without_a_tree(built):
    result = invoke("verify", built["plain"], built["q0f32-params"], "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["tree"] is None


def test_bench_reports_rows_and_tree_cost(built):
    from medusa_cli.packed.tensor_cache import read_tensor_cache

    result = invoke("bench", built["q0f32"], built["q0f32-params"], "--batch", "1,3", "--repeat", "3",
                    "--warmup", "1", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    weight_bytes = read_tensor_cache(built["q0f32-params"]).param_bytes
    assert [r["batch"] for r in report["rows"]] == [1, 3]
    for row in report["rows"]:
        assert row["weight_bytes"] == weight_bytes
        assert row["effective_gbps"] == pytest.approx(weight_bytes / (row["median_ms"] / 1e3) / 1e9)
        assert row["time_vs_numpy"] == pytest.approx(row["median_ms"] / row["numpy_median_ms"])
        assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
    assert report["bandwidth_gbps"] > 0 and report["bandwidth_method"] == "reading a buffer (numpy sum, max, dot)"
    assert [t["batch"] for t in report["tree"]] == [1, 3] and report["tree"][0]["tree_depth"] == 3


def test_timed_call_returns_the_logits_on_the_device(built):
    from medusa_cli.runtime.heads import load_heads

    heads = load_heads(built["q0f32"], built["q0f32-params"])
    hidden = np.random.default_rng(3).standard_normal((2, heads.config.hidden_size)).astype(np.float32)
    timed = heads.logits_call(hidden)
    for _ in range(2):  # the same inputs, call after call
        got = [out.numpy() for out in timed()]
        for g, want in zip(got, heads.get_logits(hidden), strict=True):
            np.testing.assert_array_equal(g, want)


def test_device_bandwidth_of_a_copy():
    """The GPU floor's bandwidth (a device-to-device copy), measured here on the CPU device:
    2 x 64 MiB moved, at a rate a machine can have (0.1 GB/s to 10 TB/s)."""
    import tvm

    from medusa_cli.commands.bench import measure_device_bandwidth

    assert 0.1 < measure_device_bandwidth(tvm.cpu(), nbytes=64 << 20, repeat=3) < 10_000


def test_bench_rejects_bad_batches(built):
    result = invoke("bench", built["plain"], built["q0f32-params"], "--batch", "1,x")
    assert result.exit_code == 2 and "--batch '1,x'" in result.stderr
    result = invoke("bench", built["plain"], built["q0f32-params"], "--batch", "16")
    assert result.exit_code == 2 and "--max-batch-size" in result.stderr
