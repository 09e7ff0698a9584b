"""Quantization schemes (one table for convert, compile and the oracle) and numpy group quantization.

Group quantization follows MLC-LLM's GroupQuantize bit for bit ("NK" layout, uint32 storage):
  q_weight [out, ceil(in / group) * (group // per_u32)] uint32, per_u32 = 32 // bits
  q_scale  [out, ceil(in / group)]                       in the model dtype
  scale = max|w| / max_int,  q = clamp(round(w / scale + max_int), 0, 2 * max_int)
  element k of a row is packed at bit (k % per_u32) * bits of word k // per_u32;
  positions past `in` in the last group hold code 0 and do not enter max|w|.
Values are cast to the model dtype first, as MLC-LLM's loader does before quantizing. Arithmetic
then rounds like the TVM kernel: every float16 operation to float16; bfloat16 arithmetic runs in
float32 and only the stored scale is rounded to bfloat16. round() is ties-to-even: TVM 0.27 lowers
tir.round to nearbyint/hrint/rint on llvm, cuda, rocm and metal. A group of zeros has scale 0;
0/0 is NaN and TVM's max(NaN, 0) selects 0, so its codes are 0 and it dequantizes to exactly 0.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .dtypes import FLOAT_DTYPES, NUMPY_DTYPES, is_float
from .errors import InputError


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    name: str
    # dtype the kernels compute in, and of biases, scales and plain weights
    model_dtype: str
    # 0 for plain (unquantized) weights
    bits: int = 0
    # input elements sharing one scale; 0 for plain weights
    group_size: int = 0
    storage_dtype: str = "uint32"

    @property
    def is_quantized(self) -> bool:
        return self.bits > 0

    @property
    def max_int(self) -> int:
        """Largest magnitude a symmetric code can represent (7 for int4, 3 for int3)."""
        return (1 << (self.bits - 1)) - 1

    @property
    def per_storage(self) -> int:
        """Codes packed into one storage word (8 for int4, 10 for int3)."""
        return 32 // self.bits

    def num_groups(self, in_features: int) -> int:
        return -(-in_features // self.group_size)

    def packed_words(self, in_features: int) -> int:
        """Storage words per output row of q_weight (a word holds per_storage whole codes)."""
        return self.num_groups(in_features) * (self.group_size // self.per_storage)


SCHEMES: dict[str, QuantScheme] = {
    s.name: s
    for s in (
        QuantScheme("q0f32", "float32"),
        QuantScheme("q0f16", "float16"),
        QuantScheme("q0bf16", "bfloat16"),
        QuantScheme("q4f16_1", "float16", bits=4, group_size=32),
        QuantScheme("q4f32_1", "float32", bits=4, group_size=32),
        QuantScheme("q3f16_1", "float16", bits=3, group_size=40),
    )
}

# The plain scheme for each --dtype of `medusa convert`.
PLAIN_SCHEME_FOR_DTYPE = {"float32": "q0f32", "float16": "q0f16", "bfloat16": "q0bf16"}


def get_scheme(name: str) -> QuantScheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise InputError(
            f"unknown quantization '{name}'; choose one of: {', '.join(SCHEMES)} (--quantization)"
        ) from None


# Elements of one weight quantized at a time: a few float32 temporaries of this size stay in
# cache and bound peak memory whatever the matrix.
_CHUNK_ELEMENTS = 1 << 18

# The dtype TVM evaluates elementwise arithmetic in, per model dtype: float16 natively (every
# operation rounded to float16); bfloat16 is legalized to float32 and rounded only where a stage
# is stored, such as q_scale. Checked bit for bit against TVM 0.27 kernels on llvm.
_ARITHMETIC_DTYPE = {"float32": "float32", "float16": "float16", "bfloat16": "float32"}


def cast_to(array: np.ndarray, dtype_name: str) -> np.ndarray:
    """`array` in the named model dtype, rounded to nearest even; no copy when it already is."""
    if dtype_name not in FLOAT_DTYPES:
        raise InputError(
            f"unknown model dtype '{dtype_name}'; choose one of: {', '.join(FLOAT_DTYPES)} (--dtype)"
        )
    target = NUMPY_DTYPES[dtype_name]
    if array.dtype == target:
        return array
    if array.dtype == NUMPY_DTYPES["bfloat16"]:
        # bfloat16 -> float32 is exact, so this rounds once
        array = array.astype(np.float32)
    return array.astype(target)


def _round_arithmetic_in_place(x: np.ndarray, model_dtype: str) -> None:
    """Round float32 `x` as TVM rounds an arithmetic result in `model_dtype`.

    Only float16 needs work. Rounding to nearest even carries the 13 dropped mantissa bits into
    the kept ones on the int32 view: a few integer passes instead of two dtype conversions.
    Correct for inf/NaN and values in float16's normal range; float16 subnormals keep too many
    bits, which _quantize_rows makes harmless.
    """
    if _ARITHMETIC_DTYPE[model_dtype] != "float16":
        return  # numpy already rounded each float32 operation
    bits = x.view(np.uint32)
    carry = np.right_shift(bits, 13)
    carry &= 1  # the lowest kept bit breaks ties towards even
    carry += (1 << 12) - 1
    bits += carry
    bits &= np.uint32(0xFFFFE000)


def _require_quantized(scheme: QuantScheme) -> None:
    if not scheme.is_quantized:
        raise InputError(f"quantization '{scheme.name}' stores plain weights; nothing to (de)quantize")


def _quantize_rows(
    rows: np.ndarray, scheme: QuantScheme, q_weight: np.ndarray, q_scale: np.ndarray
) -> None:
    """Quantize rows [n, in] into the preallocated q_weight [n, words] and q_scale [n, groups]."""
    n, in_features = rows.shape
    groups = scheme.num_groups(in_features)
    padded_in = groups * scheme.group_size
    max_int = np.float32(scheme.max_int)

    # MLC-LLM's loader casts to the model dtype first; float32 holds those values exactly.
    w = np.zeros((n, padded_in), np.float32)
    w[:, :in_features] = cast_to(rows, scheme.model_dtype)
    w_groups = w.reshape(n, groups, scheme.group_size)  # (n, groups, group)

    # max|w| is exact in any dtype, and zero padding cannot raise it. Clearing the sign bit is
    # abs(); non-negative floats order like their bit patterns, so the max runs on integers.
    magnitudes = w_groups.view(np.uint32) & np.uint32(0x7FFFFFFF)
    max_abs = magnitudes.max(axis=2).view(np.float32)  # (n, groups)
    # The division is rounded to float32, then to the model dtype: still correctly rounded,
    # since float32 carries more than twice the significand bits of float16 or bfloat16, plus two.
    scale = cast_to(max_abs / max_int, scheme.model_dtype)
    q_scale[...] = scale

    # code = clamp(round(w / scale + max_int)), each operation rounded as TVM rounds it. A float16
    # quotient in the subnormal range (< 2**-14) is absorbed by "+ max_int" whatever its last
    # bits, so the fast rounding's extra precision there never changes a code.
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(w_groups, scale.astype(np.float32)[:, :, None], out=w_groups)
    _round_arithmetic_in_place(w, scheme.model_dtype)
    w += max_int
    _round_arithmetic_in_place(w, scheme.model_dtype)
    # fmax(NaN, 0) = 0 like TVM's max(x, 0) = select(x > 0, x, 0): a zero group gets code 0.
    # Clamping to integer bounds before rounding gives the same codes as after.
    np.fmax(w, 0, out=w)
    np.fmin(w, 2 * max_int, out=w)
    # Adding 2**23 rounds a value in [0, 2**23) to an integer k, ties to even, and leaves the
    # bit pattern 0x4B000000 + k: round() and the conversion to uint32 in two passes.
    w += np.float32(1 << 23)
    codes = w.view(np.uint32)
    codes -= np.uint32(0x4B000000)
    codes[:, in_features:] = 0  # MLC-LLM packs 0 past the row's end

    codes = codes.reshape(n, -1, scheme.per_storage)  # (n, words, per_storage)
    q_weight[...] = codes[:, :, 0]
    for position in range(1, scheme.per_storage):
        q_weight |= codes[:, :, position] << np.uint32(position * scheme.bits)


def _rows_per_chunk(row_elements: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, row_elements))


def quantize_weight(weight: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """Group-quantize weight [out, in] (any float dtype) into (q_weight uint32, q_scale).

    q_weight is [out, scheme.packed_words(in)], q_scale [out, scheme.num_groups(in)] in the
    model dtype. Rows are processed in chunks, so a memory-mapped weight is read once and only a
    few chunk-sized float32 temporaries exist at a time.
    """
    _require_quantized(scheme)
    if weight.ndim != 2 or weight.shape[1] == 0:
        raise InputError(f"weight to quantize has shape {weight.shape}, expected [out, in] with in > 0")
    if not is_float(weight.dtype):
        raise InputError(f"weight to quantize has dtype {weight.dtype}, expected a float dtype")
    out_features, in_features = weight.shape
    q_weight = np.empty((out_features, scheme.packed_words(in_features)), np.uint32)
    q_scale = np.empty((out_features, scheme.num_groups(in_features)), NUMPY_DTYPES[scheme.model_dtype])
    step = _rows_per_chunk(scheme.num_groups(in_features) * scheme.group_size)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        _quantize_rows(weight[start:stop], scheme, q_weight[start:stop], q_scale[start:stop])
    return q_weight, q_scale


def dequantize_weight(
    q_weight: np.ndarray, q_scale: np.ndarray, scheme: QuantScheme, in_features: int,
    round_to_model_dtype: bool = True,
) -> np.ndarray:
    """float32 [out, in_features]: (code - max_int) * scale, rounded to the model dtype as
    MLC-LLM's dequantize stores it; round_to_model_dtype=False keeps the exact float32 product,
    which is what the compiled kernels multiply by (model.GroupQuantLinear)."""
    _require_quantized(scheme)
    groups = scheme.num_groups(in_features)
    out_features = q_weight.shape[0] if q_weight.ndim == 2 else -1
    expected_weight = (out_features, scheme.packed_words(in_features))
    expected_scale = (out_features, groups)
    if q_weight.shape != expected_weight or q_weight.dtype != np.uint32:
        raise InputError(
            f"q_weight has shape {q_weight.shape} {q_weight.dtype}, expected {expected_weight} uint32 "
            f"for in_features={in_features} under '{scheme.name}'"
        )
    if q_scale.shape != expected_scale:
        raise InputError(
            f"q_scale has shape {q_scale.shape}, expected {expected_scale} under '{scheme.name}'"
        )
    shifts = np.arange(scheme.per_storage, dtype=np.uint32) * np.uint32(scheme.bits)
    mask = np.uint32((1 << scheme.bits) - 1)
    result = np.empty((out_features, in_features), np.float32)
    step = _rows_per_chunk(groups * scheme.group_size)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        n = stop - start
        codes = (q_weight[start:stop, :, None] >> shifts) & mask  # (n, words, per_storage)
        values = codes.reshape(n, groups, scheme.group_size).astype(np.float32)  # (n, groups, group)
        values -= np.float32(scheme.max_int)
        values *= q_scale[start:stop].astype(np.float32)[:, :, None]
        # code - max_int is a small integer and the product is exact in float32: one rounding
        if round_to_model_dtype:
            values = cast_to(values, scheme.model_dtype).astype(np.float32)
        result[start:stop] = values.reshape(n, -1)[:, :in_features]
    return result


def quantized_names(weight_name: str) -> tuple[str, str]:
    """"X.weight" -> ("X.q_weight", "X.q_scale"), MLC-LLM's names for a quantized Linear."""
    stem, dot, suffix = weight_name.rpartition(".")
    if not dot or suffix != "weight":
        raise InputError(f"tensor '{weight_name}' is not a Linear weight (name must end in '.weight')")
    return f"{stem}.q_weight", f"{stem}.q_scale"


def convert_tensor(name: str, array: np.ndarray, scheme: QuantScheme) -> list[tuple[str, np.ndarray]]:
    """The packed tensors for one source tensor under its MLC-LLM name.

    Every Medusa weight belongs to a Linear layer: 2-D, quantized into (q_weight, q_scale) or cast
    to the model dtype. Biases (1-D) are cast to the model dtype and never quantized.
    """
    kind = name.rpartition(".")[2]
    expected_ndim = {"weight": 2, "bias": 1}.get(kind)
    if expected_ndim is None:
        raise InputError(f"tensor '{name}': expected a Linear '.weight' or '.bias'")
    if array.ndim != expected_ndim:
        raise InputError(f"tensor '{name}' has shape {tuple(array.shape)}, expected {expected_ndim}-D")
    if not is_float(array.dtype):
        raise InputError(f"tensor '{name}' has dtype {array.dtype}, expected a float dtype")
    if kind == "weight" and scheme.is_quantized:
        q_weight_name, q_scale_name = quantized_names(name)
        q_weight, q_scale = quantize_weight(array, scheme)
        return [(q_weight_name, q_weight), (q_scale_name, q_scale)]
    return [(name, cast_to(array, scheme.model_dtype))]
