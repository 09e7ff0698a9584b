"""The float64 Medusa oracle against hand-worked heads, closed forms and a per-element loop."""

from __future__ import annotations

import gc
import math
import warnings
import weakref

import numpy as np
import pytest

from medusa_cli.errors import InputError
from medusa_cli.verify.oracle import (
    HIDDEN_STD,
    HeadWeights,
    compare_logits,
    dequantized_head,
    head_logits,
    random_hidden,
    reference_logits,
    silu,
)
from medusa_cli.quantization import SCHEMES


def closed_form_silu(x: float) -> float:
    return x / (1.0 + math.exp(-x))


def loop_logits(head: HeadWeights, hidden: np.ndarray) -> list[list[float]]:
    """One multiply-add at a time with Python floats and math.exp."""
    rows = []
    for h in hidden.tolist():
        x = list(h)
        for weight, bias in head.layers:
            pre = [
                sum(w * v for w, v in zip(weight_row, x)) + b
                for weight_row, b in zip(weight.tolist(), bias.tolist())
            ]
            x = [v + closed_form_silu(p) for v, p in zip(x, pre)]
        rows.append([sum(w * v for w, v in zip(vocab_row, x)) for vocab_row in head.lm_head.tolist()])
    return rows


def test_silu_matches_closed_form():
    xs = [-700.0, -40.0, -5.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 5.0, 40.0, 700.0]
    np.testing.assert_allclose(silu(np.array(xs)), [closed_form_silu(x) for x in xs], rtol=1e-15, atol=0)
    assert silu(np.array([1.0]))[0] == pytest.approx(0.7310585786300049, rel=1e-15)
    assert silu(np.array([-2.0]))[0] == pytest.approx(-0.23840584404423515, rel=1e-15)


def test_silu_never_overflows():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = silu(np.array([-1e4, -800.0, 800.0, 1e4]))
    assert values.tolist() == [-0.0, -0.0, 800.0, 1e4]


def test_zero_resblocks_pass_hidden_states_through():
    head = HeadWeights(
        layers=[(np.zeros((2, 2)), np.zeros(2))] * 3,
        lm_head=np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
    )
    logits = head_logits(head, np.array([[1.0, 2.0], [-3.0, 0.5]]))
    assert logits.tolist() == [[1.0, 2.0, 3.0], [-3.0, 0.5, -2.5]]


def test_identity_resblock_adds_silu_of_the_input():
    identity = np.eye(2)
    head = HeadWeights(layers=[(identity, np.zeros(2))], lm_head=identity)
    logits = head_logits(head, np.array([[1.0, -2.0]]))
    # 1 + silu(1) and -2 + silu(-2)
    np.testing.assert_allclose(logits, [[1.7310585786300049, -2.2384058440442351]], rtol=1e-15)

    twice = HeadWeights(layers=[(identity, np.zeros(2))] * 2, lm_head=identity)
    once = 1.0 + closed_form_silu(1.0)
    expected = once + closed_form_silu(once)
    assert head_logits(twice, np.array([[1.0, 0.0]]))[0, 0] == pytest.approx(expected, rel=1e-15)


def test_bias_only_resblock_and_empty_or_zero_vocab_projection():
    bias_only = HeadWeights(layers=[(np.zeros((2, 2)), np.array([1.0, -1.0]))], lm_head=np.eye(2))
    np.testing.assert_allclose(
        head_logits(bias_only, np.array([[0.0, 0.0]])),
        [[0.7310585786300049, -0.2689414213699951]],
        rtol=1e-15,
    )
    no_layers = HeadWeights(layers=[], lm_head=np.array([[2.0, 3.0]]))
    assert head_logits(no_layers, np.array([[1.0, 1.0]])).tolist() == [[5.0]]
    zero_vocab = HeadWeights(layers=[(np.eye(2), np.ones(2))], lm_head=np.zeros((4, 2)))
    assert head_logits(zero_vocab, np.array([[1.0, 1.0]])).tolist() == [[0.0] * 4]


def random_head(hidden: int, vocab: int, layers: int, seed: int) -> HeadWeights:
    rng = np.random.default_rng(seed)
    return HeadWeights(
        layers=[
            (rng.standard_normal((hidden, hidden)) * 0.3, rng.standard_normal(hidden)) for _ in range(layers)
        ],
        lm_head=rng.standard_normal((vocab, hidden)),
    )


def test_head_logits_match_a_per_element_loop():
    head = random_head(hidden=3, vocab=4, layers=2, seed=0)
    hidden = random_hidden(2, 3, seed=1)
    logits = head_logits(head, hidden)
    assert logits.shape == (2, 4) and logits.dtype == np.float64
    np.testing.assert_allclose(logits, loop_logits(head, hidden), rtol=1e-12, atol=1e-12)


def test_reference_logits_takes_heads_one_at_a_time():
    refs = []

    def stream():
        for seed in range(4):
            # the head before the previous one must be gone by now
            gc.collect()
            assert all(ref() is None for ref in refs[:-1])
            head = random_head(hidden=4, vocab=5, layers=1, seed=seed)
            refs.append(weakref.ref(head))
            yield head
            del head

    hidden = random_hidden(3, 4, seed=2)
    logits = reference_logits(stream(), hidden)
    assert len(logits) == 4
    for seed, got in enumerate(logits):
        assert np.array_equal(got, head_logits(random_head(hidden=4, vocab=5, layers=1, seed=seed), hidden))


def test_head_logits_name_the_mismatched_tensor():
    good = random_head(hidden=4, vocab=5, layers=2, seed=0)
    bad_layer = HeadWeights(layers=[good.layers[0], (np.zeros((4, 3)), np.zeros(4))], lm_head=good.lm_head)
    with pytest.raises(InputError, match=r"ResBlock 1.*\(4, 3\)"):
        head_logits(bad_layer, np.zeros((1, 4)))
    with pytest.raises(InputError, match=r"lm_head.*\(5, 3\)"):
        head_logits(HeadWeights(layers=[], lm_head=np.zeros((5, 3))), np.zeros((1, 4)))
    with pytest.raises(InputError, match="hidden states"):
        head_logits(good, np.zeros(4))


def test_dequantized_head_is_exact_for_q0f32_on_float32_weights():
    head = random_head(hidden=6, vocab=7, layers=2, seed=3)
    def to_float32(a):
        return a.astype(np.float32).astype(np.float64)

    head = HeadWeights(
        layers=[(to_float32(w), to_float32(b)) for w, b in head.layers], lm_head=to_float32(head.lm_head)
    )
    hidden = random_hidden(4, 6, seed=0)
    plain = dequantized_head(head, SCHEMES["q0f32"])
    assert np.array_equal(head_logits(plain, hidden), head_logits(head, hidden))


def test_dequantized_head_rounds_plain_parameters_to_the_model_dtype():
    head = HeadWeights(layers=[(np.full((2, 2), 0.1), np.full(2, 0.1))], lm_head=np.full((3, 2), 0.1))
    rounded = dequantized_head(head, SCHEMES["q0f16"])
    fp16_tenth = 1638 / 2**14
    weight, bias = rounded.layers[0]
    assert weight.dtype == np.float64 and (weight == fp16_tenth).all() and (bias == fp16_tenth).all()
    assert (rounded.lm_head == fp16_tenth).all()


def test_dequantized_head_is_exact_when_weights_sit_on_the_int4_grid():
    # integers in [-7, 7] with a +-7 in every group of 32: scale 1, so int4 represents them exactly
    rng = np.random.default_rng(4)
    on_grid = rng.integers(-7, 8, size=(64, 64)).astype(np.float64)
    on_grid[:, ::32] = 7.0
    vocab = rng.integers(-7, 8, size=(10, 64)).astype(np.float64)
    vocab[:, ::32] = -7.0
    head = HeadWeights(layers=[(on_grid * 0.01, np.full(64, 0.5))], lm_head=vocab)
    # 0.01 is not on a power-of-two grid, so only the vocab projection survives unchanged
    q = dequantized_head(head, SCHEMES["q4f32_1"])
    assert np.array_equal(q.lm_head, vocab)
    assert q.layers[0][1].tolist() == [0.5] * 64
    assert np.max(np.abs(q.layers[0][0] - head.layers[0][0])) <= 0.01 * 2**-20


def test_dequantized_head_error_is_bounded_for_q4f16():
    head = random_head(hidden=64, vocab=50, layers=1, seed=5)
    q = dequantized_head(head, SCHEMES["q4f16_1"])
    # within half a quantization step of each group (max|w| / 7 / 2) plus float16 rounding
    for original, quantized in ((head.layers[0][0], q.layers[0][0]), (head.lm_head, q.lm_head)):
        steps = np.abs(original).reshape(original.shape[0], -1, 32).max(axis=2) / 7
        bound = np.repeat(steps, 32, axis=1) * 0.52 + np.abs(original) * 2**-10
        assert (np.abs(original - quantized) <= bound).all()
        assert not np.array_equal(original, quantized)


def test_compare_logits_on_identical_logits():
    reference = random_hidden(3, 100, seed=0)
    m = compare_logits(reference.copy(), reference)
    assert (m.max_abs_err, m.max_rel_err, m.top1_agreement, m.topk_overlap, m.k) == (0.0, 0.0, 1.0, 1.0, 5)
    assert m.cosine == pytest.approx(1.0, abs=1e-15)


def test_compare_logits_on_a_perturbed_row():
    reference = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    actual = reference + np.array([[0.0, 0.0, 0.0, 0.0, 0.0, 0.5]])
    m = compare_logits(actual, reference, k=3)
    assert m.max_abs_err == 0.5
    assert m.max_rel_err == pytest.approx(0.5 / 6)
    # dot = 91 + 6 * 0.5 = 94; |reference|^2 = 91; |actual|^2 = 55 + 6.5^2 = 97.25
    assert m.cosine == pytest.approx(94 / math.sqrt(91 * 97.25), rel=1e-14)
    assert (m.top1_agreement, m.topk_overlap, m.k) == (1.0, 1.0, 3)


def test_compare_logits_on_swapped_logits():
    reference = np.array([np.arange(10.0), np.arange(10.0)])
    actual = reference.copy()
    actual[0, [9, 8]] = actual[0, [8, 9]]  # row 0: top two swapped; top-2 set unchanged
    actual[1, [9, 0]] = actual[1, [0, 9]]  # row 1: the best and the worst swapped
    m = compare_logits(actual, reference, k=2)
    assert m.top1_agreement == 0.0
    assert m.topk_overlap == pytest.approx((1.0 + 0.5) / 2)  # row 1 keeps 8 of {9, 8}
    assert m.max_abs_err == 9.0 and m.max_rel_err == 1.0
    m3 = compare_logits(actual, reference, k=3)
    assert m3.topk_overlap == pytest.approx((3 / 3 + 2 / 3) / 2)
    one_right = compare_logits(np.array([actual[0], reference[1]]), reference, k=1)
    assert one_right.top1_agreement == 0.5 and one_right.topk_overlap == 0.5


def test_compare_logits_cosine_edge_cases():
    reference = np.array([[1.0, -2.0, 3.0], [0.0, 0.0, 0.0]])
    assert compare_logits(-reference, reference).cosine == -1.0
    assert compare_logits(reference * 2.0, reference).cosine == pytest.approx(1.0, abs=1e-15)
    zero_actual = compare_logits(np.zeros((1, 3)), reference[:1])
    assert zero_actual.cosine == 0.0 and zero_actual.max_rel_err == pytest.approx(1.0)
    both_zero = compare_logits(np.zeros((1, 3)), np.zeros((1, 3)))
    assert (both_zero.cosine, both_zero.max_abs_err, both_zero.max_rel_err) == (1.0, 0.0, 0.0)


def test_compare_logits_non_finite_actual_fails_every_threshold():
    reference = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    actual = reference.copy()
    actual[1, 0] = np.nan
    m = compare_logits(actual, reference)
    assert m.max_abs_err == math.inf and m.max_rel_err == math.inf
    assert m.cosine == 0.0
    assert m.k == 3  # capped at the vocab size


def test_compare_logits_rejects_mismatched_input():
    with pytest.raises(InputError, match=r"\(2, 3\).*\(2, 4\)"):
        compare_logits(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(InputError, match="k is 0"):
        compare_logits(np.zeros((1, 3)), np.zeros((1, 3)), k=0)
    with pytest.raises(InputError, match="reference"):
        compare_logits(np.zeros((1, 3)), np.array([[0.0, np.inf, 0.0]]))


def test_random_hidden_scale_and_determinism():
    states = random_hidden(64, 4096, seed=7)
    assert states.shape == (64, 4096) and states.dtype == np.float64
    assert np.array_equal(states, random_hidden(64, 4096, seed=7))
    assert not np.array_equal(states, random_hidden(64, 4096, seed=8))
    assert states.std() == pytest.approx(HIDDEN_STD, rel=0.01)
    assert abs(states.mean()) < 0.01 * HIDDEN_STD
    with pytest.raises(InputError, match="batch"):
        random_hidden(0, 8, seed=0)


@pytest.mark.parametrize("scheme_name", list(SCHEMES))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_logits_under_a_scheme_equal_those_of_the_dequantized_head(scheme_name, dtype):
    """head_logits(head, x, scheme) streams each weight through the scheme a block of rows at a
    time; it gives the logits of the materialized dequantized_head (vocab 600 spans three
    blocks, the last one partial)."""
    head = random_head(hidden=80, vocab=600, layers=2, seed=7)
    head = HeadWeights(layers=[(w.astype(dtype), b.astype(dtype)) for w, b in head.layers],
                       lm_head=head.lm_head.astype(dtype))
    hidden = np.random.default_rng(3).standard_normal((3, 80))
    scheme = SCHEMES[scheme_name]
    streamed = head_logits(head, hidden, scheme)
    whole = head_logits(dequantized_head(head, scheme), hidden)
    np.testing.assert_allclose(streamed, whole, rtol=1e-12, atol=1e-12)
