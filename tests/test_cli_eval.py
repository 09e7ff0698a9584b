"""`medusa example --eval-set`, `eval`, `tree-search` and `tree --accuracy` through the CLI:
exit codes, one JSON object on stdout, one-line errors, nothing left behind, loadable trees,
well-formed pictures."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from typer.testing import CliRunner

from medusa_cli.checkpoint.pytorch import save_torch_checkpoint
from medusa_cli.cli import app
from medusa_cli.trees import load_tree
from tests._eval_helpers import eval_bench

runner = CliRunner()
SVG = "{http://www.w3.org/2000/svg}"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return eval_bench(tmp_path_factory)


@pytest.fixture(scope="module")
def accuracy(bench, tmp_path_factory):
    """eval's JSON and ranks for the q0f32 library."""
    out = tmp_path_factory.mktemp("cli-eval") / "accuracy.json"
    library, params = bench.build("q0f32")
    result = run("eval", library, params, "--data", bench.eval_set, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    return out


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _svg(path):
    root = ET.parse(path).getroot()  # well-formed XML
    assert root.tag == f"{SVG}svg"
    return root


def test_example_writes_an_evaluation_set(tmp_path):
    result = run("example", tmp_path / "ckpt", "--preset", "eval-tiny", "--eval-set",
                 tmp_path / "eval.npz", "--eval-positions", "64", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["eval_set"] == str(tmp_path / "eval.npz") and report["eval_positions"] == 64
    assert np.array(report["designed_accuracy"]).shape == (4, 10)
    with np.load(tmp_path / "eval.npz") as data:
        assert data["hidden"].shape == (64, 512) and data["tokens"].shape == (64,)


def test_example_refuses_an_evaluation_set_the_heads_cannot_reach(tmp_path):
    result = run("example", tmp_path / "ckpt", "--preset", "tiny", "--eval-set", tmp_path / "e.npz")
    assert result.exit_code == 2
    assert "hidden_size >= heads x vocab (768)" in _error_line(result) and "eval-tiny" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_eval_json_is_one_object_and_the_human_table_goes_to_stderr(bench, accuracy, tmp_path):
    report = json.loads(accuracy.read_text())
    assert len(report["accuracy"]) == 4 and len(report["accuracy"][0]) == 10
    assert (accuracy.parent / "accuracy.ranks.npy").is_file()
    library, params = bench.build("q0f32")
    result = run("eval", library, params, "--data", bench.eval_set, "--top-k", "3", "--no-oracle")
    assert result.exit_code == 0 and result.stdout == ""
    assert "top-3" in result.stderr and "oracle top-1" not in result.stderr


def test_eval_errors_are_one_line_and_leave_nothing(bench, tmp_path):
    library, params = bench.build("q0f32")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, hidden=np.zeros((4, 64), np.float32), tokens=np.zeros(4, int))
    out = tmp_path / "out"
    result = run("eval", library, params, "--data", wrong, "-o", out / "a.json")
    assert result.exit_code == 2
    assert "hidden states have shape [4, 64], expected [positions, 512]" in _error_line(result)
    assert not out.exists() or list(out.iterdir()) == []


def test_tree_search_curve_and_a_tree_compile_loads(bench, accuracy, tmp_path):
    result = run("tree-search", "--accuracy", accuracy, "--nodes", "4,8,16", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    curve = [p["expected_acceptance_length"] for p in report["curve"]]
    assert [p["nodes"] for p in report["curve"]] == [4, 8, 16] and curve == sorted(curve)
    assert all(p["expected_acceptance_length"] >= p["greedy_expected_acceptance_length"] - 1e-12
               for p in report["curve"])
    assert report["objective"] == "model" and report["measured_acceptance_length"] is None

    tree_file, picture = tmp_path / "tree.json", tmp_path / "tree.svg"
    ranks = accuracy.parent / "accuracy.ranks.npy"
    result = run("tree-search", "--accuracy", accuracy, "--ranks", ranks, "--nodes", "12",
                 "--max-depth", "3", "-o", tree_file, "--plot", picture, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["objective"] == "data" and report["positions"] > 0
    assert report["measured_acceptance_length"] > 1 and report["max_depth"] == 3
    tree = load_tree(tree_file)
    assert len(tree.paths) == 12 and tree.depth <= 3
    assert [list(p) for p in report["paths"]] == json.loads(tree_file.read_text())["paths"]
    boxes = [e for e in _svg(picture).iter(f"{SVG}rect") if e.get("rx") == "4"]
    assert len(boxes) == 13  # every path and the root
    scored = run("tree", tree_file, "--accuracy", accuracy, "--ranks", ranks, "--json")
    assert scored.exit_code == 0, scored.stderr
    scored = json.loads(scored.stdout)
    assert scored["expected_acceptance_length"] == pytest.approx(report["expected_acceptance_length"])
    assert tree.depth == 3  # so tree counts the same positions: those labelled to depth 3
    assert scored["measured_acceptance_length"] == pytest.approx(report["measured_acceptance_length"])
    assert scored["positions"] == report["positions"]

    library, params = bench.build("q0f32")
    result = run("compile", params, "--tree", tree_file, "-o", tmp_path / "tree.so", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["metadata"]["tree"]["nodes"] == 13


def test_tree_search_writes_one_tree_only(accuracy, tmp_path):
    result = run("tree-search", "--accuracy", accuracy, "--nodes", "8,16", "-o", tmp_path / "t.json")
    assert result.exit_code == 2
    assert "-o and --plot write one tree" in _error_line(result)
    assert list(tmp_path.iterdir()) == []
    result = run("tree-search", "--accuracy", accuracy, "--nodes", "eight")
    assert result.exit_code == 2 and "--nodes 'eight'" in _error_line(result)


def test_tree_search_reads_fasterdecodings_heads_accuracy(tmp_path):
    rng = np.random.default_rng(0)
    hits = []
    for head in range(3):
        ranks = rng.integers(-1, 20, size=100 - head)
        rows = np.zeros((len(ranks), 20), bool)
        rows[np.flatnonzero(ranks >= 0), ranks[ranks >= 0]] = True
        hits.append(rows)
    path = tmp_path / "vicuna_heads_accuracy.pt"
    save_torch_checkpoint([(str(i), h) for i, h in enumerate(hits)], path, as_list=True)
    result = run("tree-search", "--accuracy", path, "--nodes", "63", "--max-child", "10", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["paths"]) == 63 and report["max_child"] == [10, 10, 10]
    assert max(max(p) for p in report["paths"]) < 10


def test_tree_reports_expected_acceptance_and_draws(accuracy, tmp_path):
    picture = tmp_path / "mc.svg"
    result = run("tree", "mc_sim_7b_63", "--accuracy", accuracy, "--plot", picture, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["nodes"] == 64 and 1 < report["expected_acceptance_length"] < 5
    assert report["plot"] == str(picture)
    texts = [e.text for e in _svg(picture).iter(f"{SVG}text")]
    assert sum(t.startswith("rank ") and "p=" in t for t in texts) == 63
    plain = run("tree", "mc_sim_7b_63", "--json")
    assert json.loads(plain.stdout)["expected_acceptance_length"] is None
    human = run("tree", "mc_sim_7b_63", "--accuracy", accuracy)
    assert "expected acceptance length" in human.stderr


def test_eval_plot_is_well_formed(bench, tmp_path):
    library, params = bench.build("q0f32")
    picture = tmp_path / "acc.svg"
    result = run("eval", library, params, "--data", bench.eval_set, "--plot", picture,
                 "--top-k", "5")
    assert result.exit_code == 0, result.stderr
    lines = list(_svg(picture).iter(f"{SVG}polyline"))
    assert len(lines) == 8  # 4 heads, library and oracle
    assert all(len(line.get("points").split()) == 5 for line in lines)


def test_help_has_examples():
    for command, example in (("eval", "medusa eval heads.so"),
                             ("tree-search", "medusa tree-search --accuracy"),
                             ("tree", "--accuracy accuracy.json"),
                             ("example", "--eval-set")):
        result = run(command, "--help")
        assert result.exit_code == 0 and "Examples" in result.stdout
        assert example in result.stdout
