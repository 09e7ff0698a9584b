"""Group quantization against a per-element reference, TVM's own kernels and codes worked by hand."""

from __future__ import annotations

import math
import time
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from medusa_cli import quantization as quant
from medusa_cli.spec import MedusaConfig, param_names, param_specs
from medusa_cli.errors import InputError
from medusa_cli.quantization import (
    SCHEMES,
    QuantScheme,
    convert_tensor,
    dequantize_weight,
    quantize_weight,
    quantized_names,
)

Q4F16 = SCHEMES["q4f16_1"]
Q4F32 = SCHEMES["q4f32_1"]
Q3F16 = SCHEMES["q3f16_1"]
# No bfloat16 group scheme ships, but TVM rounds bfloat16 arithmetic differently, so test it too.
Q4BF16 = QuantScheme("q4bf16_test", "bfloat16", bits=4, group_size=32)
GROUP_SCHEMES = [Q4F16, Q4F32, Q3F16, Q4BF16]

# Scalar type values are stored in, and the one TVM does arithmetic in, per model dtype.
STORE = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
ARITH = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32}


def reference_quantize(weight, bits, group, model_dtype):
    """One element at a time, straight from the formulas."""
    store, arith = STORE[model_dtype], ARITH[model_dtype]
    max_int = 2 ** (bits - 1) - 1
    per_word = 32 // bits
    rows, cols = weight.shape
    groups = math.ceil(cols / group)
    q_weight = np.zeros((rows, groups * group // per_word), np.uint32)
    q_scale = np.zeros((rows, groups), store)
    for r in range(rows):
        for g in range(groups):
            members = range(g * group, min((g + 1) * group, cols))
            max_abs = max(abs(float(store(weight[r, k]))) for k in members)
            scale = store(arith(max_abs) / arith(max_int))
            q_scale[r, g] = scale
            for k in members:
                with np.errstate(divide="ignore", invalid="ignore"):
                    x = arith(arith(store(weight[r, k])) / arith(scale)) + arith(max_int)
                x = float(np.rint(x))  # ties to even; NaN and inf pass through
                x = x if x > 0 else 0.0  # TVM's max(x, 0) is select(x > 0, x, 0): NaN gives 0
                x = x if x < 2 * max_int else 2 * max_int
                q_weight[r, k // per_word] |= np.uint32(int(x) << ((k % per_word) * bits))
    return q_weight, q_scale


def awkward_weight(rows, cols, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
    w[0] = 0.0  # a zero row: scale 0, must not give NaN
    w[1, : cols // 2] = 0.0  # zero groups beside live ones
    w[2] *= 1e-4  # float16 subnormal values and scales
    w[3] *= 3e3  # large magnitudes
    return w


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("scheme", GROUP_SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("in_features", [32, 40, 50, 70, 7])
def test_quantize_matches_per_element_reference(scheme, in_features):
    w = awkward_weight(8, in_features, seed=in_features)
    q_weight, q_scale = quantize_weight(w, scheme)
    ref_weight, ref_scale = reference_quantize(w, scheme.bits, scheme.group_size, scheme.model_dtype)
    assert same_bits(q_weight, ref_weight)
    assert same_bits(q_scale, ref_scale)


@pytest.mark.parametrize("scheme", GROUP_SCHEMES, ids=lambda s: s.name)
def test_quantize_float16_and_bfloat16_sources_match_reference(scheme):
    w = awkward_weight(6, 70, seed=3)
    for source in (w.astype(np.float16), w.astype(ml_dtypes.bfloat16), w.astype(np.float64)):
        q_weight, q_scale = quantize_weight(source, scheme)
        ref_weight, ref_scale = reference_quantize(source, scheme.bits, scheme.group_size, scheme.model_dtype)
        assert same_bits(q_weight, ref_weight)
        assert same_bits(q_scale, ref_scale)


def test_codes_worked_by_hand_round_half_to_even():
    # max|w| = 7 gives scale 1, so code = round(w + 7): 14, 7.5->8, 8.5->8, 6.5->6, 9.5->10, 0
    row = np.zeros((1, 32), np.float32)
    row[0, :6] = [7.0, 0.5, 1.5, -0.5, 2.5, -7.0]
    q_weight, q_scale = quantize_weight(row, Q4F32)
    assert q_scale.tolist() == [[1.0]]
    # nibbles from the low end: E 8 8 6 A 0 7 7; zeros elsewhere are code 7
    assert [hex(int(x)) for x in q_weight[0]] == ["0x770a688e", "0x77777777", "0x77777777", "0x77777777"]


def test_float16_rounding_makes_a_tie_that_rounds_to_even():
    # scale = fp16(0.0345 / 7) = 0.004925; 0.03198 / scale = 6.4942 -> fp16 6.49609375;
    # + 7 = 13.49609375, halfway between fp16 neighbours 13.4921875 and 13.5 -> 13.5 -> code 14.
    # In float32 the same weights give 13.4937 -> code 13.
    row = np.zeros((1, 32), np.float32)
    row[0, :2] = [0.03198, 0.0345]
    q16, s16 = quantize_weight(row, Q4F16)
    q32, _ = quantize_weight(row, Q4F32)
    assert s16[0, 0] == np.float16(0.004925)
    assert hex(int(q16[0, 0])) == "0x777777ee"
    assert hex(int(q32[0, 0])) == "0x777777ed"


def test_partial_last_group_pads_with_code_zero_and_ignores_padding():
    # in = 50 under int4/group 32: group 1 holds 18 weights; positions 50..63 are code 0
    w = np.full((1, 50), 0.5, np.float32)
    w[0, 49] = -7.0
    q_weight, q_scale = quantize_weight(w, Q4F32)
    assert q_weight.shape == (1, 8)
    assert q_scale[0, 0] == np.float32(0.5) / np.float32(7)
    assert q_scale[0, 1] == np.float32(1.0)  # max|w| of group 1 is 7, the zero padding is not in it
    # word 6 holds positions 48..55: 0.5 -> 7.5 -> 8, -7 -> 0, then six padding codes of 0
    assert hex(int(q_weight[0, 6])) == "0x8"
    assert int(q_weight[0, 7]) == 0


def test_zero_rows_and_groups_quantize_to_code_zero_and_dequantize_to_zero():
    w = np.zeros((2, 70), np.float32)
    w[1, 40:] = 1.0  # row 1: group 0 all zero, group 1 live
    for scheme in GROUP_SCHEMES:
        q_weight, q_scale = quantize_weight(w, scheme)
        assert not np.isnan(q_scale.astype(np.float32)).any()
        assert (q_scale.astype(np.float32)[0] == 0).all()
        assert (q_weight[0] == 0).all()  # 0 / 0 is NaN, and max(NaN, 0) selects 0
        deq = dequantize_weight(q_weight, q_scale, scheme, 70)
        assert (deq[0] == 0).all()
        assert (deq[1, :40] == 0).all()
        assert np.allclose(deq[1, 40:], 1.0, rtol=1e-2)


@pytest.mark.parametrize("scheme", GROUP_SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("in_features", [50, 70, 128])
def test_dequantize_round_trip_error_is_half_a_step(scheme, in_features):
    w = awkward_weight(16, in_features, seed=7)
    q_weight, q_scale = quantize_weight(w, scheme)
    deq = dequantize_weight(q_weight, q_scale, scheme, in_features)
    assert deq.shape == w.shape and deq.dtype == np.float32
    exact = w.astype(STORE[scheme.model_dtype]).astype(np.float32)
    scale = np.repeat(q_scale.astype(np.float32), scheme.group_size, axis=1)[:, :in_features]
    # Slack beyond scale / 2: the quotient and the "+ max_int" are each rounded in the arithmetic
    # dtype (at most max_int * eps in code units), the product to the model dtype, and a
    # subnormal float16 scale is off by up to half its smallest step.
    arith_eps = float(np.finfo(ARITH[scheme.model_dtype]).eps)
    model_eps = float(ml_dtypes.finfo(STORE[scheme.model_dtype]).eps)
    tiny = float(ml_dtypes.finfo(STORE[scheme.model_dtype]).smallest_subnormal)
    bound = scale * (0.5 + 2 * scheme.max_int * arith_eps) + np.abs(exact) * model_eps + scheme.max_int * tiny
    assert (np.abs(exact - deq) <= bound).all()


def test_dequantize_unpacks_hand_packed_codes():
    # codes 0..7 then 8..14 and 7, int4: value = (code - 7) * scale with scale 0.5
    words = np.array([[0x76543210, 0x7EDCBA98, 0x77777777, 0x77777777]], np.uint32)
    deq = dequantize_weight(words, np.array([[0.5]], np.float16), Q4F16, 32)
    expected = [(c - 7) * 0.5 for c in range(15)] + [0.0] + [0.0] * 16
    assert deq.tolist() == [expected]


def test_dequantize_rounds_the_product_to_the_model_dtype():
    # fp16(0.1) = 1638 / 2**14; code 10 gives 3 * 1638 / 2**14 = 4914 / 2**14, halfway between the
    # float16 neighbours 4912 / 2**14 and 4916 / 2**14 (step 2**-12): ties to even -> 4912 / 2**14
    words = np.array([[0x7777777A, 0x77777777, 0x77777777, 0x77777777]], np.uint32)
    scale = np.array([[0.1]], np.float16)
    assert float(scale[0, 0]) == 1638 / 2**14
    assert dequantize_weight(words, scale, Q4F16, 32)[0, 0] == 4912 / 2**14
    assert dequantize_weight(words, scale.astype(np.float32), Q4F32, 32)[0, 0] == 4914 / 2**14
    # what the compiled kernels multiply by: the exact product, not rounded to float16
    exact = dequantize_weight(words, scale, Q4F16, 32, round_to_model_dtype=False)
    assert exact[0, 0] == 4914 / 2**14 and exact[0, 1] == 0.0


def test_chunked_quantization_matches_single_pass(monkeypatch):
    w = awkward_weight(37, 70, seed=11)
    whole = quantize_weight(w, Q3F16)
    whole_deq = dequantize_weight(*whole, Q3F16, 70)
    monkeypatch.setattr(quant, "_CHUNK_ELEMENTS", 64)  # one row per chunk
    chunked = quantize_weight(w, Q3F16)
    assert same_bits(chunked[0], whole[0]) and same_bits(chunked[1], whole[1])
    assert same_bits(dequantize_weight(*chunked, Q3F16, 70), whole_deq)


def test_quantize_memory_stays_near_the_output_size():
    w = np.ones((4096, 4096), np.float16)
    tracemalloc.start()
    try:
        q_weight, q_scale = quantize_weight(w, Q4F16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    outputs = q_weight.nbytes + q_scale.nbytes
    float32_copy = w.size * 4
    assert peak < outputs + float32_copy // 4


@pytest.mark.slow
def test_quantizing_a_vicuna_vocab_projection_takes_seconds():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((32000, 4096), dtype=np.float32) * 0.02).astype(np.float16)
    start = time.perf_counter()
    q_weight, q_scale = quantize_weight(w, Q4F16)
    elapsed = time.perf_counter() - start
    assert q_weight.shape == (32000, 512) and q_scale.shape == (32000, 128)
    assert elapsed < 10.0


def tvm_quantize(weight, scheme):
    """The GroupQuantize formulas as a TVM tensor expression, built for llvm: TVM's own rounding."""
    tvm = pytest.importorskip("tvm")
    from tvm import te, tirx

    rows, cols = weight.shape
    dtype, group, per_word = scheme.model_dtype, scheme.group_size, scheme.per_storage
    groups, words = scheme.num_groups(cols), scheme.packed_words(cols)
    w = te.placeholder((rows, cols), dtype, name="w")
    r = te.reduce_axis((0, group), name="r")
    max_abs = te.compute(
        (rows, groups),
        lambda i, g: te.max(
            tirx.if_then_else(
                g * group + r < cols,
                te.abs(w[i, tirx.min(g * group + r, cols - 1)]),
                te.min_value(dtype),
            ),
            axis=r,
        ),
        name="max_abs",
    )
    max_int = tirx.const(scheme.max_int, dtype)
    scale = te.compute((rows, groups), lambda i, g: max_abs[i, g] / max_int, name="scale")
    codes = te.compute(
        (rows, cols),
        lambda i, k: tirx.min(
            tirx.max(tirx.round(w[i, k] / scale[i, k // group] + max_int), tirx.const(0, dtype)),
            max_int * 2,
        ).astype("uint32"),
        name="codes",
    )
    p = te.reduce_axis((0, per_word), name="p")
    packed = te.compute(
        (rows, words),
        lambda i, j: te.sum(
            tirx.if_then_else(
                j * per_word + p < cols,
                codes[i, tirx.min(j * per_word + p, cols - 1)] << (p * scheme.bits).astype("uint32"),
                tirx.const(0, "uint32"),
            ),
            axis=p,
        ),
        name="packed",
    )
    kernel = tvm.tirx.build(te.create_prim_func([w, packed, scale]), target="llvm")
    device = tvm.cpu()
    args = [
        tvm.runtime.tensor(weight.astype(STORE[dtype]), device),
        tvm.runtime.tensor(np.zeros((rows, words), np.uint32), device),
        tvm.runtime.tensor(np.zeros((rows, groups), STORE[dtype]), device),
    ]
    kernel(*args)
    return args[1].numpy(), args[2].numpy()


@pytest.mark.parametrize("scheme", GROUP_SCHEMES, ids=lambda s: s.name)
def test_quantize_matches_tvm_kernel_bit_for_bit(scheme):
    w = awkward_weight(256, 70, seed=5)
    w[4, :2] = [0.03198, 0.0345]  # the float16 tie from the hand-worked test
    w[4, 2:32] = 0.0
    q_weight, q_scale = quantize_weight(w, scheme)
    tvm_weight, tvm_scale = tvm_quantize(w, scheme)
    assert same_bits(q_weight, tvm_weight)
    assert same_bits(q_scale, tvm_scale)


def test_packed_words_hold_whole_codes():
    assert Q4F16.packed_words(4096) == 512  # 128 groups * 4 words
    assert Q3F16.packed_words(4096) == 412  # 103 groups * 4 words of 10 codes
    assert Q3F16.packed_words(50) == 8
    assert Q4F16.num_groups(50) == 2
    for scheme in SCHEMES.values():
        if scheme.is_quantized:
            assert scheme.group_size % scheme.per_storage == 0


def test_quantized_names():
    assert quantized_names("medusa_head.0.1.weight") == (
        "medusa_head.0.1.q_weight",
        "medusa_head.0.1.q_scale",
    )
    for bad in ("medusa_head.0.0.linear.bias", "weight"):
        with pytest.raises(InputError, match=bad):
            quantized_names(bad)


def test_param_specs_plain_follow_config_param_names():
    config = MedusaConfig(medusa_num_heads=2, medusa_num_layers=2, hidden_size=8, vocab_size=11)
    specs = param_specs(config, SCHEMES["q0f16"])
    assert [name for name, _, _ in specs] == param_names(config)
    shapes = {name: shape for name, shape, _ in specs}
    assert shapes["medusa_head.1.1.linear.weight"] == (8, 8)
    assert shapes["medusa_head.1.1.linear.bias"] == (8,)
    assert shapes["medusa_head.1.2.weight"] == (11, 8)
    assert {dtype for _, _, dtype in specs} == {"float16"}


def test_param_specs_quantized_shapes_for_a_tiny_config():
    config = MedusaConfig(medusa_num_heads=1, medusa_num_layers=1, hidden_size=64, vocab_size=100)
    assert param_specs(config, Q4F16) == [
        ("medusa_head.0.0.linear.q_weight", (64, 8), "uint32"),
        ("medusa_head.0.0.linear.q_scale", (64, 2), "float16"),
        ("medusa_head.0.0.linear.bias", (64,), "float16"),
        ("medusa_head.0.1.q_weight", (100, 8), "uint32"),
        ("medusa_head.0.1.q_scale", (100, 2), "float16"),
    ]
    odd = MedusaConfig(medusa_num_heads=1, medusa_num_layers=1, hidden_size=50, vocab_size=70)
    assert param_specs(odd, Q3F16)[:2] == [
        ("medusa_head.0.0.linear.q_weight", (50, 8), "uint32"),  # 2 groups of 40 -> 2 * 4 words
        ("medusa_head.0.0.linear.q_scale", (50, 2), "float16"),
    ]


@pytest.mark.parametrize("scheme_name", list(SCHEMES))
def test_convert_tensor_outputs_match_param_specs(scheme_name):
    scheme = SCHEMES[scheme_name]
    config = MedusaConfig(medusa_num_heads=2, medusa_num_layers=1, hidden_size=50, vocab_size=70)
    rng = np.random.default_rng(0)
    converted = []
    for name in param_names(config):
        shape = (50,) if name.endswith("bias") else (50, 50) if ".linear." in name else (70, 50)
        converted += convert_tensor(name, rng.standard_normal(shape).astype(np.float32), scheme)
    assert [(n, a.shape, str(a.dtype)) for n, a in converted] == param_specs(config, scheme)


def test_convert_tensor_casts_and_quantizes():
    rng = np.random.default_rng(1)
    bias = rng.standard_normal(70).astype(np.float32)
    weight = rng.standard_normal((70, 70)).astype(np.float32)
    [(name, array)] = convert_tensor("medusa_head.0.0.linear.bias", bias, Q4F16)
    assert name == "medusa_head.0.0.linear.bias" and same_bits(array, bias.astype(np.float16))
    [(name, array)] = convert_tensor("medusa_head.0.1.weight", weight, SCHEMES["q0bf16"])
    assert same_bits(array, weight.astype(ml_dtypes.bfloat16))
    # bfloat16 -> float32 is exact, so the float16 result is rounded once
    source = weight.astype(ml_dtypes.bfloat16)
    [(_, array)] = convert_tensor("medusa_head.0.1.weight", source, SCHEMES["q0f16"])
    assert same_bits(array, source.astype(np.float32).astype(np.float16))
    pairs = convert_tensor("medusa_head.0.1.weight", weight, Q3F16)
    q_weight, q_scale = quantize_weight(weight, Q3F16)
    assert [n for n, _ in pairs] == ["medusa_head.0.1.q_weight", "medusa_head.0.1.q_scale"]
    assert same_bits(pairs[0][1], q_weight) and same_bits(pairs[1][1], q_scale)


def test_convert_tensor_rejects_what_is_not_a_linear_tensor():
    with pytest.raises(InputError, match=r"medusa_head\.0\.1\.weight.*\(2, 3, 4\)"):
        convert_tensor("medusa_head.0.1.weight", np.zeros((2, 3, 4), np.float32), Q4F16)
    with pytest.raises(InputError, match=r"medusa_head\.0\.0\.linear\.bias.*int32"):
        convert_tensor("medusa_head.0.0.linear.bias", np.zeros(4, np.int32), Q4F16)
    with pytest.raises(InputError, match="running_mean"):
        convert_tensor("norm.running_mean", np.zeros(4, np.float32), Q4F16)


def test_quantize_and_dequantize_reject_bad_input():
    with pytest.raises(InputError, match="q0f16"):
        quantize_weight(np.zeros((2, 32), np.float32), SCHEMES["q0f16"])
    with pytest.raises(InputError, match=r"\(32,\)"):
        quantize_weight(np.zeros(32, np.float32), Q4F16)
    with pytest.raises(InputError, match=r"q_weight.*\(2, 3\).*\(2, 4\)"):
        dequantize_weight(np.zeros((2, 3), np.uint32), np.zeros((2, 1), np.float16), Q4F16, 32)
    with pytest.raises(InputError, match=r"q_scale.*\(2, 2\).*\(2, 1\)"):
        dequantize_weight(np.zeros((2, 4), np.uint32), np.zeros((2, 2), np.float16), Q4F16, 32)
