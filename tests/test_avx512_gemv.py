"""The AVX-512 int4 kernel (avx512_gemv.py) against float64 numpy, where it applies, and through
`medusa compile --target cpu` end to end."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tvm
from tvm.target import codegen

from medusa_cli import quantization as quant
from medusa_cli.compiler import avx512_gemv
from medusa_cli.commands.compile import CompileRequest, compile_heads
from medusa_cli.runtime.heads import configure_cpu_threads, load_heads
from tests._params import make_params_dir, random_hidden, reference_logits, tiny_config

HOST = tvm.target.Target.from_device("cpu")
# a CPU with AVX-512, whatever this machine has
ZEN4 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
needs_avx512 = pytest.mark.skipif(not codegen.target_has_features("avx512f", HOST),
                                  reason="this CPU has no AVX-512")

# (in, out): one block of 128 codes, odd block counts, rows not a multiple of the 64 tasks,
# the vicuna-7b ResBlock, and in_features that end in a partial block (alone, or after full ones)
SHAPES = [(128, 2), (384, 100), (256, 4098), (640, 130), (4096, 256),
          (32, 2), (96, 100), (4000, 66)]
BATCHES = (1, 2, 3, 4, 5, 7, 8, 9, 11)


def _kernel(scheme: quant.QuantScheme, in_features: int, out_features: int):
    func = avx512_gemv.gemv_kernel(in_features, out_features, scheme, scheme.model_dtype,
                                 scheme.model_dtype)
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), HOST)["main"]


# 4-bit layouts beyond the published schemes: groups of 8 and 16 (several per block of 128
# codes, scales spread over the lanes) and of 256 (one scale for a block)
OTHER_GROUPS = {f"q4f32_g{g}": quant.QuantScheme(f"q4f32_g{g}", "float32", bits=4, group_size=g)
                for g in (8, 16, 256)}


def _scheme(name: str) -> quant.QuantScheme:
    return OTHER_GROUPS[name] if name in OTHER_GROUPS else quant.get_scheme(name)


@needs_avx512
@pytest.mark.parametrize("scheme_name", ["q4f32_1", "q4f16_1"])
@pytest.mark.parametrize("in_features, out_features", SHAPES)
def test_kernel_matches_numpy(scheme_name, in_features, out_features):
    _check_kernel(_scheme(scheme_name), in_features, out_features)


@needs_avx512
@pytest.mark.parametrize("scheme_name", list(OTHER_GROUPS))
def test_kernel_other_group_sizes(scheme_name):
    scheme = _scheme(scheme_name)
    _check_kernel(scheme, 512, 66)
    if scheme.group_size < avx512_gemv.BLOCK:  # a partial last block of two groups
        _check_kernel(scheme, 512 + 16, 66)


@needs_avx512
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_with_any_thread_count(threads):
    """Every task is computed, by its worker or one that took it over, whatever the pool's size
    (TVM caps it at the cores: 3 runs on 2 workers on a 2-core machine)."""
    try:
        configure_cpu_threads(threads)
        assert tvm.runtime.num_threads() == min(threads, len(os.sched_getaffinity(0)))
        _check_kernel(quant.get_scheme("q4f16_1"), 256, 4098, all_cores=False)
    finally:
        configure_cpu_threads()


def _check_kernel(scheme: quant.QuantScheme, in_features: int, out_features: int,
                  all_cores: bool = True) -> None:
    if all_cores:
        configure_cpu_threads()
    scheme_name = scheme.name
    rng = np.random.default_rng(in_features + out_features)
    weight = rng.standard_normal((out_features, in_features)).astype(np.float32)
    q_weight, q_scale = quant.quantize_weight(weight, scheme)
    exact = quant.dequantize_weight(q_weight, q_scale, scheme, in_features,
                                    round_to_model_dtype=False).astype(np.float64)
    kernel = _kernel(scheme, in_features, out_features)
    for batch in BATCHES:
        x = rng.standard_normal((batch, in_features)).astype(scheme.model_dtype)
        y = tvm.runtime.tensor(np.full((batch, out_features), np.nan, np.float32))
        kernel(tvm.runtime.tensor(x), tvm.runtime.tensor(q_weight), tvm.runtime.tensor(q_scale), y)
        want = x.astype(np.float64) @ exact.T
        error = np.abs(y.numpy() - want).max() / np.abs(want).max()
        assert error < 2e-6, f"{scheme_name} {in_features}x{out_features} batch {batch}: {error:.2e}"


@pytest.mark.parametrize(
    "target, scheme_name, in_features, out_features, expected",
    [
        (HOST, "q4f16_1", 4096, 32000, codegen.target_has_features("avx512f", HOST)),
        (tvm.target.Target({"kind": "llvm"}), "q4f16_1", 4096, 32000, False),  # no AVX-512
        (tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}), "q4f32_1", 4096, 4096, False),
        (ZEN4, "q4f32_1", 4096, 4096, True),
        (ZEN4, "q4f32_1", 4096, 32001, False),
        (ZEN4, "q4f32_1", 100, 64, False),
        # whole groups, a partial last block of 128 codes
        (ZEN4, "q4f32_1", 4000, 64, True),
        (ZEN4, "q4f32_g16", 144, 64, True),
        (ZEN4, "q4f32_g256", 640, 64, False),
        (ZEN4, "q4f32_g256", 768, 64, True),
        (ZEN4, "q4f32_g16", 128, 64, True),
        (ZEN4, "q3f16_1", 4000, 64, False),
        (ZEN4, "q0f16", 4096, 64, False),
        (tvm.target.Target({"kind": "cuda", "arch": "sm_90"}), "q4f16_1", 4096, 64, False),
        (None, "q4f16_1", 4096, 64, False),
    ],
)
def test_supported(target, scheme_name, in_features, out_features, expected):
    scheme = _scheme(scheme_name)
    assert avx512_gemv.supported(target, scheme, in_features, out_features) == expected


@needs_avx512
@pytest.mark.parametrize("scheme_name", ["q4f16_1", "q4f32_1"])
def test_compile_for_this_cpu_uses_the_kernel(scheme_name, tmp_path):
    # hidden 64: each row is one partial block of 8 words
    params = make_params_dir(tmp_path / "params", scheme_name, seed=5,
                             config=tiny_config(max_batch_size=9))
    result = compile_heads(CompileRequest(params.path, target="cpu"))
    assert b"q4_gemv_avx512" in result.output.read_bytes()
    heads = load_heads(result.output, params.path)
    for batch in (1, 5, 9):
        hidden = random_hidden(params.config, batch, seed=batch)
        hidden_in = quant.cast_to(hidden, params.scheme.model_dtype).astype(np.float64)
        # against MLC's weights (rounded to float16 for q4f16_1): within the runtime tests' bounds
        reference = reference_logits(params.effective, params.config, hidden_in)
        for got, want in zip(heads.get_logits(hidden), reference):
            error = np.abs(got - want).max() / np.abs(want).max()
            assert error < (2e-3 if scheme_name == "q4f16_1" else 1e-5), f"batch {batch}: {error:.2e}"
