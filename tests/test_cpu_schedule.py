"""The scheduled CPU kernels against float64 numpy, on small odd shapes, for every scheme.

Each scheme's two kernels (the ResBlock with its fused bias/SiLU/residual, and the vocab
projection) come from model.py through the same legalize + fuse passes as `medusa compile`,
are scheduled by cpu_schedule, built for llvm and compared with numpy on the weights the
kernel actually sees (cast to the model dtype, or dequantized exactly in float32). Batches 1 to 8
exercise every batch tile, 11 and 16 the repeated 8-row tile with and without a remainder.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import tvm

from medusa_cli import quantization as quant
from medusa_cli.compiler import cpu_schedule

# (scheme, hidden, vocab): odd sizes; in 96 splits into int4 words and 16-lane vectors, in 200
# into int3 groups of 40; out 100 and 96 do not divide by every row count of TILE_SHAPE_*.
# The last two: in 97 is prime (the scalar fallback, no vector at all); 100 int4 codes end
# mid-word and mid-group (the reduction runs over the 128 packed codes, x read as zero past 100).
SHAPES = [
    ("q0f32", 96, 100),
    ("q0f16", 96, 100),
    ("q0bf16", 96, 100),
    ("q4f16_1", 96, 100),
    ("q4f32_1", 96, 100),
    ("q3f16_1", 200, 100),
    ("q0f32", 97, 101),
    ("q4f16_1", 100, 99),
]
BATCHES = (1, 2, 3, 4, 5, 6, 7, 8, 11, 16)
# max |got - want| / max |want|: float32 accumulation is tight; a ResBlock output stored in
# float16 or bfloat16 is rounded (and its SiLU computed) in that dtype.
TOLERANCE = {"float32": 2e-6, "float16": 3e-3, "bfloat16": 1.5e-2}
TARGET = tvm.target.Target({"kind": "llvm"})


def _numpy(array: np.ndarray, dtype: str) -> np.ndarray:
    return array.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)


def _weights(scheme: quant.QuantScheme, out_features: int, in_features: int, bias: bool,
             rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
    """(kernel parameters in model.py's order, effective weight as float64, bias as float64)."""
    w = (rng.standard_normal((out_features, in_features)) / np.sqrt(in_features)).astype(np.float32)
    if scheme.is_quantized:
        q_weight, q_scale = quant.quantize_weight(w, scheme)
        params = [q_weight, q_scale]
        effective = quant.dequantize_weight(q_weight, q_scale, scheme, in_features,
                                              round_to_model_dtype=False)
    else:
        params = [_numpy(w, scheme.model_dtype)]
        effective = params[0].astype(np.float32)
    b = None
    if bias:
        b = _numpy(rng.standard_normal(out_features).astype(np.float32) * 0.1, scheme.model_dtype)
        params.append(b)
        b = b.astype(np.float64)
    return params, effective.astype(np.float64), b


@pytest.fixture(scope="module")
def built() -> dict:
    """(scheme, hidden, vocab) -> (scheduled resblock, scheduled projection)."""
    kernels = {}
    for name, hidden, vocab in SHAPES:
        resblock, projection = cpu_schedule.head_prim_funcs(name, hidden, vocab)
        kernels[name, hidden, vocab] = tuple(
            tvm.compile(tvm.IRModule({"main": cpu_schedule.schedule_gemv_func(f)
                                      .with_attr("global_symbol", "main")}), TARGET)["main"]
            for f in (resblock, projection)
        )
    return kernels


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("name, hidden, vocab", SHAPES)
def test_kernels_match_numpy(built: dict, name: str, hidden: int, vocab: int) -> None:
    scheme = quant.get_scheme(name)
    resblock, projection = built[name, hidden, vocab]
    rng = np.random.default_rng(7)
    res_params, w1, b1 = _weights(scheme, hidden, hidden, True, rng)
    proj_params, w2, _ = _weights(scheme, vocab, hidden, False, rng)
    for batch in BATCHES:
        x = _numpy(rng.standard_normal((batch, hidden)).astype(np.float32), scheme.model_dtype)
        x64 = x.astype(np.float64)

        hidden_out = tvm.runtime.tensor(
            _numpy(np.zeros((batch, hidden), np.float32), scheme.model_dtype))
        resblock(tvm.runtime.tensor(x), *map(tvm.runtime.tensor, res_params), hidden_out)
        h = x64 @ w1.T + b1
        want = x64 + h / (1 + np.exp(-h))
        error = _relative_error(hidden_out.numpy().astype(np.float32), want)
        assert error < TOLERANCE[scheme.model_dtype], f"{name} ResBlock batch {batch}: {error:.2e}"

        logits = tvm.runtime.tensor(np.zeros((batch, vocab), np.float32))
        projection(tvm.runtime.tensor(x), *map(tvm.runtime.tensor, proj_params), logits)
        error = _relative_error(logits.numpy(), x64 @ w2.T)
        assert error < TOLERANCE["float32"], f"{name} projection batch {batch}: {error:.2e}"


def test_module_pass_schedules_only_gemv_functions() -> None:
    resblock, projection = cpu_schedule.head_prim_funcs("q4f16_1", 96, 100)
    mod = tvm.IRModule({"resblock": resblock, "projection": projection})
    scheduled = cpu_schedule.schedule_cpu_kernels(mod, TARGET)
    for name in ("resblock", "projection"):
        assert "T.parallel" in scheduled[name].script()
        assert "T.parallel" not in mod[name].script()  # the input module is left untouched
    with TARGET:
        assert "T.parallel" in cpu_schedule.schedule_cpu_kernels_pass(mod)["projection"].script()
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    assert cpu_schedule.schedule_cpu_kernels(mod, cuda).same_as(mod)


def test_functions_without_gemv_are_left_alone() -> None:
    from tvm import te

    a = te.placeholder((4, 8), "float32", name="a")
    doubled = te.compute((4, 8), lambda i, j: a[i, j] * 2, name="doubled")
    func = te.create_prim_func([a, doubled])
    assert cpu_schedule.find_gemvs(func) == []
    assert cpu_schedule.schedule_gemv_func(func) is None


def test_functions_with_a_schedule_are_left_alone() -> None:
    _, projection = cpu_schedule.head_prim_funcs("q0f32", 96, 100)
    scheduled = cpu_schedule.schedule_gemv_func(projection)
    assert cpu_schedule.find_gemvs(projection)
    assert cpu_schedule.find_gemvs(scheduled) == []


def test_sum_reductions_that_are_not_products_are_left_alone() -> None:
    from tvm import te

    a = te.placeholder((4, 6, 8), "float32", name="a")
    k = te.reduce_axis((0, 8), name="k")
    total = te.compute((4, 6), lambda i, j: te.sum(a[i, j, k], axis=k), name="total")
    largest = te.compute((4, 6), lambda i, j: te.max(a[i, j, k], axis=k), name="largest")
    for out in (total, largest):
        assert cpu_schedule.find_gemvs(te.create_prim_func([a, out])) == []
