"""The benchmark tools beside the package (tools/): what they report is laid out and sized as
the runs they make, at tiny shapes."""

from __future__ import annotations


from medusa_cli.runtime.heads import configure_cpu_threads
from tools import bench_kernels


def test_markdown_table_has_a_row_per_measurement() -> None:
    rows = [bench_kernels.KernelBenchRow("q0f32", 1, 4_000_000, 0.002, 0.003, 0.0018, None),
            bench_kernels.KernelBenchRow("q4f16_1", 8, 1_000_000, 0.001, 0.004, 0.0005, 0.02)]
    report = bench_kernels.KernelBenchReport(rows, 10.0, 2, '{"kind":"llvm"}', {"q0f32": 0.5})
    text = bench_kernels.format_markdown(report)
    table = [line for line in text.splitlines() if line.startswith("| q")]
    assert table == ["| q0f32 | 1 | 4 | 2.00 | - | 3.00 | 1.80 | 2.0 | 1.11x | 0.67x |",
                     "| q4f16_1 | 8 | 1 | 1.00 | 20.0 | 4.00 | 0.50 | 1.0 | 2.00x | 0.25x |"]
    assert "q0f32 0.50 s" in text


def test_bench_kernels_measures_every_scheme_and_batch_at_a_tiny_shape() -> None:
    try:
        report = bench_kernels.bench_kernels(["q0f32", "q4f32_1"], [1, 3], hidden=96, vocab=100,
                                             rounds=1, unscheduled=True, threads=1,
                                             floor_bytes=1 << 22)
    finally:
        configure_cpu_threads()  # the pool is process-wide: back to every core
    assert [(row.scheme, row.batch) for row in report.rows] == [
        ("q0f32", 1), ("q0f32", 3), ("q4f32_1", 1), ("q4f32_1", 3)]
    assert all(row.unscheduled_s is not None for row in report.rows)
    # what one head reads: ResBlock weight and bias, vocab projection (q4f32_1: 4-bit words and
    # one float32 scale per 32 inputs)
    assert report.rows[0].weight_bytes == (96 * 96 + 96 + 100 * 96) * 4
    assert report.rows[2].weight_bytes == (96 * 12 + 96 * 3) * 4 + 96 * 4 + (100 * 12 + 100 * 3) * 4
    assert report.threads == 1 and set(report.compile_s) == {"q0f32", "q4f32_1"}
