"""Judging one head's compiled logits against expected ones: errors, cosine, top-1 with near
ties, top-k overlap, each against its bound."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .oracle import HeadMetrics, compare_logits
from .thresholds import Bounds, Thresholds


@dataclasses.dataclass
class Comparison:
    """Compiled logits of one head against one set of expected logits, judged."""

    metrics: HeadMetrics
    # max |expected|: the scale rtol is relative to
    peak: float
    # atol + rtol * peak
    allowed_error: float
    # rows whose argmax differs from the expected one only by a near tie (counted as agreeing)
    near_ties: int
    # judged top-1 agreement: exact rows plus near ties, over the batch
    top1: float
    reasons: list[str]

    @property
    def passed(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict:
        return finite_or_none({
            **dataclasses.asdict(self.metrics),
            "peak": self.peak,
            "allowed_error": self.allowed_error,
            "near_ties": self.near_ties,
            "top1": self.top1,
            "passed": self.passed,
            "reasons": self.reasons,
        })


def finite_or_none(value: Any) -> Any:
    """inf and NaN become None: JSON has no spelling for them that jq accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def _top1_rows(actual: np.ndarray, expected: np.ndarray, slack: float) -> tuple[np.ndarray, np.ndarray]:
    """(exact, near) boolean [batch]: argmax agrees; or the compiled argmax's expected logit is
    within `slack` of the expected maximum. Rows with inf/NaN never agree."""
    finite = np.isfinite(actual).all(axis=1)
    picked = np.argmax(np.where(finite[:, None], actual, 0.0), axis=1)  # (batch,)
    exact = finite & (picked == np.argmax(expected, axis=1))
    gaps = expected.max(axis=1) - expected[np.arange(len(picked)), picked]  # (batch,)
    near = finite & ~exact & (gaps <= slack)
    return exact, near


def tie_slack(reference: np.ndarray, thresholds: Thresholds) -> float:
    """How far below the best logit a different top-1 pick may be and still count as agreeing.

    Twice the compile error the reference bounds allow: an error e can flip two logits that are
    less than 2e apart, so a library whose errors pass never fails top-1 on a near tie. The same
    slack serves the source comparison, whose own (quantization) error is no excuse for a flip.
    """
    return 2 * thresholds.reference.allowed_error(float(np.max(np.abs(reference))))


def _nonfinite_rows(array: np.ndarray) -> int:
    return int(np.count_nonzero(~np.isfinite(array).all(axis=1)))


def _unjudgeable(expected: np.ndarray, k: int, label: str) -> Comparison:
    """Expected logits with NaN or Inf (weights that hold them, converted with
    --allow-nonfinite): nothing can be compared, and the head fails saying why."""
    nan = float("nan")
    metrics = HeadMetrics(max_abs_err=nan, max_rel_err=nan, cosine=nan, top1_agreement=0.0,
                          topk_overlap=0.0, k=min(k, expected.shape[1]))
    rows = _nonfinite_rows(expected)
    reason = (f"the oracle's logits from the {label} weights hold NaN or Inf in {rows} of "
              f"{len(expected)} rows: those weights hold NaN or Inf (converted with "
              "--allow-nonfinite?), so the head cannot be verified")
    return Comparison(metrics=metrics, peak=nan, allowed_error=nan, near_ties=0, top1=0.0,
                      reasons=[reason])


def judge(actual: np.ndarray, expected: np.ndarray, bounds: Bounds, slack: float, k: int,
          label: str) -> Comparison:
    """Compare compiled logits with expected ones (float64) and list every bound they break.
    NaN or Inf on either side fails the head with a reason that says so first."""
    expected = np.asarray(expected, dtype=np.float64)
    if expected.ndim == 2 and expected.size and not np.isfinite(expected).all():
        return _unjudgeable(expected, k, label)
    metrics = compare_logits(actual, expected, k=k)
    peak = float(np.max(np.abs(expected)))
    allowed = bounds.allowed_error(peak)
    exact, near = _top1_rows(np.asarray(actual, dtype=np.float64), expected, slack)
    top1 = float(np.mean(exact | near))
    reasons = []
    bad_rows = _nonfinite_rows(np.asarray(actual))
    if bad_rows:
        reasons.append(f"the library's logits hold NaN or Inf in {bad_rows} of {len(actual)} rows")
    if not metrics.max_abs_err <= allowed:  # also catches NaN
        reasons.append(
            f"max error vs {label} {metrics.max_abs_err:.3g} ({metrics.max_rel_err:.3g} of the "
            f"logits' scale {peak:.3g}) > {allowed:.3g} (rtol {bounds.rtol:g}, atol {bounds.atol:g})"
        )
    if metrics.cosine < bounds.min_cosine:
        reasons.append(f"cosine vs {label} {metrics.cosine:.6f} < {bounds.min_cosine:g}")
    if top1 < bounds.min_top1:
        reasons.append(f"top-1 agreement vs {label} {top1:.3g} < {bounds.min_top1:g}")
    if metrics.topk_overlap < bounds.min_topk:
        reasons.append(
            f"top-{metrics.k} overlap vs {label} {metrics.topk_overlap:.3g} < {bounds.min_topk:g}"
        )
    return Comparison(metrics=metrics, peak=peak, allowed_error=allowed, near_ties=int(near.sum()),
                      top1=top1, reasons=reasons)


