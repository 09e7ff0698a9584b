"""gpu_bundle.py, dry-run on the CPU: `build` packs prebuilt libraries and TVM's runtime without
its compiler; `run` verifies and benches them in a child Python that has only that runtime."""

from __future__ import annotations

import re
import tarfile

from medusa_cli import gpu_bundle


def test_build_then_run_on_the_runtime_alone(tmp_path, monkeypatch):
    bundle = tmp_path / "bundle"
    built = gpu_bundle.build(bundle, "tiny", ["q4f16_1"], "cpu", None)
    assert [p.name for p in built] == ["heads-q4f16_1.so", "tvm-runtime.tar.xz"]
    with tarfile.open(bundle / "tvm-runtime.tar.xz") as tar:
        names = tar.getnames()
    assert "tvm/lib/libtvm_runtime.so" in names
    assert not [n for n in names if "libtvm_compiler" in n or "__pycache__" in n]

    monkeypatch.chdir(gpu_bundle.Path(gpu_bundle.__file__).parents[1])  # the repository root
    assert gpu_bundle.run(bundle, "cpu", tmp_path / "out", "tiny", "1,2") == 0
    text = (tmp_path / "out" / "BENCHMARKS-GPU.md").read_text()
    assert re.search(r"- TVM [\d.]+\S* \(runtime only\)\.", text), text
    rows = [line for line in text.splitlines() if line.startswith("| q4f16_1 |")]
    assert len(rows) == 2
    assert all("| prebuilt | pass (" in row for row in rows), rows
