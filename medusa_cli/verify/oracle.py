"""A float64 numpy reference of the Medusa heads, independent of TVM and of packed parameters.

Each head is medusa_num_layers ResBlocks, x = x + SiLU(x @ W.T + b), then logits = x @ W_vocab.T
(no bias), as in MLC-LLM's MedusaModel. Heads are taken one at a time from any iterable, so a
caller can stream them: a vicuna-7b head is 4096 x 4096 + 32000 x 4096 weights, 1.2 GB in float64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from ..dtypes import to_float64
from ..errors import InputError
from ..quantization import QuantScheme, cast_to, dequantize_weight, quantize_weight

# Standard deviation of random_hidden's states. Medusa heads read the base model's last hidden
# state after its final RMSNorm, which has unit RMS before a learned per-channel gain of order
# one; 1.5 sits inside the range such gains give without assuming a particular checkpoint.
HIDDEN_STD = 1.5


@dataclasses.dataclass
class HeadWeights:
    """One Medusa head; its arrays in any float dtype (a checkpoint's own, memory-mapped), which
    the oracle takes to float64 a block at a time."""

    # (weight [hidden, hidden], bias [hidden]) per ResBlock, in order
    layers: list[tuple[np.ndarray, np.ndarray]]
    # [vocab, hidden]
    lm_head: np.ndarray


@dataclasses.dataclass
class HeadMetrics:
    """How far one head's logits [batch, vocab] are from the reference."""

    max_abs_err: float
    # max_abs_err / max|reference|
    max_rel_err: float
    # smallest cosine similarity over batch rows (the worst row, not the average)
    cosine: float
    # fraction of batch rows whose argmax matches
    top1_agreement: float
    # mean over batch rows of |top-k ∩ reference top-k| / k
    topk_overlap: float
    k: int


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), with sigmoid written so exp() never overflows."""
    e = np.exp(-np.abs(x))
    sigmoid = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return x * sigmoid


def _float64(array: np.ndarray) -> np.ndarray:
    return to_float64(array) if np.asarray(array).dtype != np.float64 else np.asarray(array)


# Rows of a weight brought to float64 at a time: 256 rows of 4096 are 8 MiB, converted and
# multiplied while in cache, where a whole vicuna-7b vocab projection in float64 is 1 GiB of
# fresh memory per head and pass (the oracle's time went mostly to those copies).
_ROWS_PER_BLOCK = 256


def _as_model_weight(weight: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """Rows of a weight as the compiled module holds them, in float64: through quantize ->
    dequantize, or rounded to the model dtype. Quantization is per row, so any block of rows
    gives the rows of the whole."""
    if scheme.is_quantized:
        q_weight, q_scale = quantize_weight(weight, scheme)
        return dequantize_weight(q_weight, q_scale, scheme, weight.shape[1]).astype(np.float64)
    return cast_to(weight, scheme.model_dtype).astype(np.float64)


def _times_transposed(x: np.ndarray, weight: np.ndarray, scheme: QuantScheme | None) -> np.ndarray:
    """x @ weight.T in float64, block of rows by block of rows; with `scheme`, of the weight as
    the module holds it under that scheme."""
    out = np.empty((x.shape[0], weight.shape[0]))  # (batch, out)
    for start in range(0, weight.shape[0], _ROWS_PER_BLOCK):
        rows = weight[start:start + _ROWS_PER_BLOCK]
        block = _float64(rows) if scheme is None else _as_model_weight(rows, scheme)
        out[:, start:start + len(rows)] = x @ block.T
    return out


def head_logits(head: HeadWeights, hidden: np.ndarray, scheme: QuantScheme | None = None) -> np.ndarray:
    """Logits [batch, vocab] in float64 of one head for hidden states [batch, hidden]. With
    `scheme`, of the parameters the compiled module holds under it (each weight through
    quantize -> dequantize or rounded to the model dtype, biases rounded): the same as
    head_logits(dequantized_head(head, scheme), hidden), without a float64 copy of the head."""
    x = _float64(hidden)
    if x.ndim != 2:
        raise InputError(f"hidden states have shape {x.shape}, expected [batch, hidden]")
    size = x.shape[1]
    for index, (weight, bias) in enumerate(head.layers):
        if weight.shape != (size, size) or bias.shape != (size,):
            raise InputError(
                f"ResBlock {index} has weight {weight.shape} and bias {bias.shape}, "
                f"expected ({size}, {size}) and ({size},) for hidden size {size}"
            )
        bias64 = _float64(bias) if scheme is None else cast_to(bias, scheme.model_dtype).astype(np.float64)
        x = x + silu(_times_transposed(x, weight, scheme) + bias64)  # (batch, hidden)
    if head.lm_head.ndim != 2 or head.lm_head.shape[1] != size:
        raise InputError(f"lm_head has shape {head.lm_head.shape}, expected [vocab, {size}]")
    return _times_transposed(x, head.lm_head, scheme)  # (batch, vocab)


def reference_logits(heads: Iterable[HeadWeights], hidden: np.ndarray) -> list[np.ndarray]:
    """head_logits for each head, taking heads one at a time from any iterable (a generator
    keeps one head in memory)."""
    return [head_logits(head, hidden) for head in heads]


def dequantized_head(head: HeadWeights, scheme: QuantScheme) -> HeadWeights:
    """The head with the parameters the compiled module holds under `scheme`, in float64.

    Comparing a module against this separates compile error from quantization error; comparing
    this against the original head measures the quantization error alone. (head_logits with
    `scheme` computes its logits without building it.)
    """
    layers = [
        (_as_model_weight(weight, scheme), cast_to(bias, scheme.model_dtype).astype(np.float64))
        for weight, bias in head.layers
    ]
    return HeadWeights(layers=layers, lm_head=_as_model_weight(head.lm_head, scheme))


def _row_cosines(actual: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row pair; 1 when both rows are zero, 0 when only one is."""
    dots = np.einsum("bv,bv->b", actual, reference)  # (batch,)
    actual_norms = np.linalg.norm(actual, axis=1)
    reference_norms = np.linalg.norm(reference, axis=1)
    norms = actual_norms * reference_norms
    cosines = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    cosines[(actual_norms == 0) & (reference_norms == 0)] = 1.0
    return np.clip(cosines, -1.0, 1.0)


def compare_logits(actual: np.ndarray, reference: np.ndarray, k: int = 5) -> HeadMetrics:
    """Metrics of logits [batch, vocab] against the reference's.

    Any non-finite value in `actual` makes both errors inf and its row's cosine 0, so a threshold
    test fails whichever way it is written. k is capped at the vocab size.
    """
    actual = _float64(actual)
    reference = _float64(reference)
    if actual.ndim != 2 or actual.shape != reference.shape:
        raise InputError(
            f"logits have shape {actual.shape}, expected the reference's {reference.shape} [batch, vocab]"
        )
    if actual.shape[0] == 0 or actual.shape[1] == 0:
        raise InputError(f"logits have shape {actual.shape}; need at least one row and one column")
    if not np.isfinite(reference).all():
        raise InputError("reference logits contain inf or NaN")
    if k < 1:
        raise InputError(f"k is {k}; top-k overlap needs k >= 1")
    k = min(k, actual.shape[1])

    finite_rows = np.isfinite(actual).all(axis=1)
    if finite_rows.all():
        max_abs_err = float(np.max(np.abs(actual - reference)))
        peak = float(np.max(np.abs(reference)))
        max_rel_err = max_abs_err / peak if peak > 0 else (0.0 if max_abs_err == 0 else float("inf"))
    else:
        max_abs_err = max_rel_err = float("inf")
    # a row holding inf or NaN is compared as zeros: cosine 0 against a nonzero reference row
    cosines = _row_cosines(np.where(finite_rows[:, None], actual, 0.0), reference)

    top1 = np.argmax(actual, axis=1) == np.argmax(reference, axis=1)
    top_actual = np.argsort(-actual, axis=1, kind="stable")[:, :k]  # (batch, k)
    top_reference = np.argsort(-reference, axis=1, kind="stable")[:, :k]  # (batch, k)
    overlaps = [len(set(a) & set(r)) / k for a, r in zip(top_actual.tolist(), top_reference.tolist())]
    return HeadMetrics(
        max_abs_err=max_abs_err,
        max_rel_err=max_rel_err,
        cosine=float(np.min(cosines)),
        top1_agreement=float(np.mean(top1)),
        topk_overlap=float(np.mean(overlaps)),
        k=k,
    )


def random_hidden(batch: int, hidden_size: int, seed: int) -> np.ndarray:
    """Hidden states [batch, hidden_size] in float64, normal with std HIDDEN_STD.

    Round them to the model dtype before giving them to both the module and the oracle, so the
    input rounding is not counted as error.
    """
    if batch < 1 or hidden_size < 1:
        raise InputError(
            f"random hidden states need batch >= 1 and hidden_size >= 1, got {batch} and {hidden_size}"
        )
    return np.random.default_rng(seed).standard_normal((batch, hidden_size)) * HIDDEN_STD
