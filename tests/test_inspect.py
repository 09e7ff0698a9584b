"""medusa inspect on each kind of path: checkpoint, packed directory, compiled library."""

from __future__ import annotations

from medusa_cli.commands.compile import CompileRequest, compile_heads
from medusa_cli.commands.convert import ConvertRequest, convert_checkpoint
from medusa_cli.commands.inspect import inspect_path

TINY_PARAMS = 3 * (64 * 64 + 64 + 256 * 64)


def test_inspect_checkpoint_packed_and_library_agree(make_example, tmp_path):
    example = make_example(layout="medusa2", dtype="bfloat16")
    params = convert_checkpoint(ConvertRequest(example.output, tmp_path / "p", quantization="q4f16_1")).output
    library = compile_heads(CompileRequest(params, target="llvm", output=tmp_path / "h.so")).output

    ckpt = inspect_path(example.output)
    assert (ckpt.kind, ckpt.layout, ckpt.dtype, ckpt.ignored_tensors) == ("checkpoint", "medusa2", "bfloat16", 3)
    assert ckpt.param_bytes == TINY_PARAMS * 2

    packed = inspect_path(params)
    assert (packed.kind, packed.quantization, packed.dtype) == ("packed", "q4f16_1", "float16")
    # int4 codes + one float16 scale per 32 weights, float16 biases
    weights = 3 * (64 * 64 + 256 * 64)
    assert packed.param_bytes == weights // 2 + weights // 32 * 2 + 3 * 64 * 2

    lib = inspect_path(library)
    assert (lib.kind, lib.quantization, lib.dtype) == ("library", "q4f16_1", "float16")
    assert lib.param_bytes == packed.param_bytes
    assert lib.extra["max batch size"] == 8 and lib.extra["params"] == 15
    for report in (ckpt, packed, lib):
        assert (report.num_heads, report.num_layers, report.hidden_size, report.vocab_size) == (3, 1, 64, 256)
        assert report.param_count == TINY_PARAMS
