"""When a head passes: per-scheme bounds from configs/thresholds.json, with flag overrides."""

from __future__ import annotations

import dataclasses
import math

from ..errors import InputError
from ..resources import load_config_json

THRESHOLDS_FILE = "thresholds.json"
# The two comparisons each head gets, in report order.
REFERENCE = "reference"
SOURCE = "source"


@dataclasses.dataclass(frozen=True)
class Bounds:
    """When one comparison of compiled logits [batch, vocab] with expected logits passes."""

    # max |compiled - expected| <= atol + rtol * max |expected| (allclose, with the logits' peak
    # as the scale: single logits near zero have no meaningful relative error)
    rtol: float
    atol: float = 0.0
    # worst batch row's cosine similarity
    min_cosine: float = -1.0
    # rows whose argmax agrees, near ties included (see tie_slack)
    min_top1: float = 0.0
    # mean top-k overlap; exact, near ties included
    min_topk: float = 0.0

    def allowed_error(self, peak: float) -> float:
        return self.atol + self.rtol * peak


@dataclasses.dataclass(frozen=True)
class Thresholds:
    scheme: str
    # compiled vs the weights the library should hold (compile error)
    reference: Bounds
    # compiled vs the original checkpoint (quantization + compile error)
    source: Bounds

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, REFERENCE: dataclasses.asdict(self.reference),
                SOURCE: dataclasses.asdict(self.source)}


# VerifyRequest field -> (comparison, Bounds field, CLI flag)
OVERRIDES = {
    "rtol": (REFERENCE, "rtol", "--rtol"),
    "atol": (REFERENCE, "atol", "--atol"),
    "min_cosine": (REFERENCE, "min_cosine", "--min-cosine"),
    "min_top1": (REFERENCE, "min_top1", "--min-top1"),
    "min_topk": (REFERENCE, "min_topk", "--min-topk"),
    "source_rtol": (SOURCE, "rtol", "--source-rtol"),
    "source_min_cosine": (SOURCE, "min_cosine", "--source-min-cosine"),
    "source_min_top1": (SOURCE, "min_top1", "--source-min-top1"),
}
# Allowed range of each Bounds field
_RANGES = {"rtol": (0.0, math.inf), "atol": (0.0, math.inf), "min_cosine": (-1.0, 1.0),
           "min_top1": (0.0, 1.0), "min_topk": (0.0, 1.0)}


def _bounds_from(data: dict, where: str) -> Bounds:
    try:
        return Bounds(**{key: float(value) for key, value in data.items()})
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: invalid bounds {data} ({exc})") from None


def load_thresholds(scheme: str, overrides: dict[str, float | None] | None = None) -> Thresholds:
    """The defaults for `scheme` from configs/thresholds.json, with flag overrides applied."""
    table = load_config_json(THRESHOLDS_FILE)
    if scheme not in table:
        raise InputError(f"configs/{THRESHOLDS_FILE} has no thresholds for quantization '{scheme}'")
    entry = table[scheme]
    bounds = {
        name: _bounds_from(entry[name], f"configs/{THRESHOLDS_FILE} {scheme}.{name}")
        for name in (REFERENCE, SOURCE)
    }
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        comparison, field, flag = OVERRIDES[key]
        low, high = _RANGES[field]
        if not (low <= value <= high):
            raise InputError(f"{flag} {value}: must be between {low:g} and {high:g}")
        bounds[comparison] = dataclasses.replace(bounds[comparison], **{field: float(value)})
    return Thresholds(scheme=scheme, reference=bounds[REFERENCE], source=bounds[SOURCE])


