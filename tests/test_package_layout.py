"""The package's layout follows the data path, and its imports point one way.

Every import in medusa_cli, function-level ones included, is read from the source (ast). Each
module belongs to a unit (a top-level module or subpackage) with a rank; a module may import
only units of a lower rank, so a lower stage never imports a higher one or a command, and two
units of one rank (the compiler and the runtime) never import each other. The module graph has
no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import medusa_cli

PACKAGE = Path(medusa_cli.__file__).parent

# unit -> rank, lowest first: the data path, then the commands and the CLI on top
RANKS = {
    "_version": 0, "errors": 0, "batch": 0,
    "dtypes": 1, "resources": 1, "outputs": 1, "devices": 1, "plots": 1,
    "quantization": 2,
    "spec": 3, "trees": 3,
    "checkpoint": 4,     # published checkpoints in
    "tree_search": 4,    # the best tree for given head accuracies (uses trees)
    "packed": 5,         # the packed parameter directory
    "library": 6,        # a compiled library's file and metadata
    "compiler": 7,       # packed directory -> library
    "runtime": 7,        # library -> logits; never the compiler
    "verify": 8,         # oracle, thresholds, reports
    "commands": 9,       # one entry function per command
    "cli": 10, "__init__": 10,
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(("medusa_cli",) + parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of medusa_cli that `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name.startswith("medusa_cli")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("medusa_cli"):
                continue
            for alias in node.names:  # `from . import x` imports module x where there is one
                candidate = f"{source}.{alias.name}"
                out.add(candidate if candidate in modules else source)
    out.discard(name)
    return out


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_place_in_the_layout():
    assert {_unit(m) for m in _graph()} <= set(RANKS), "add new units to RANKS"


def test_imports_point_down_the_data_path():
    wrong = [f"{a} -> {b}" for a, targets in _graph().items() for b in targets
             if _unit(a) != _unit(b) and RANKS[_unit(b)] >= RANKS[_unit(a)]]
    assert wrong == []


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path a -> ... -> a, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return trail[trail.index(nxt):] + [node, nxt] if nxt in trail else [node, nxt]
            if state.get(nxt) is None:
                found = visit(nxt, trail + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (found := visit(node, [])):
            return found
    return None


def test_the_module_graph_has_no_cycle():
    assert _cycle(_graph()) is None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # it would see one


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The graph would catch a lazy import that points up, written either way."""
    module = tmp_path / "x.py"
    module.write_text("def f():\n    from ..commands.verify import verify_heads\n"
                      "    import medusa_cli.cli\n")
    modules = _modules()
    found = _imports("medusa_cli.packed.x", module, modules)
    assert found == {"medusa_cli.commands.verify", "medusa_cli.cli"}


def test_benchmark_and_device_tooling_stay_outside_the_package():
    names = {path.stem for path in PACKAGE.rglob("*.py")}
    assert not names & {"bench_suite", "bench_convert", "gpu_bundle", "bench_kernels", "md5_lanes"}
    for path in PACKAGE.rglob("*.py"):
        assert "argparse" not in path.read_text(), f"{path}: a script inside the package"
