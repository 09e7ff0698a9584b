"""Every published spelling of the Medusa heads' tensor names: one table of templates.

Templates use {h} for the head and {l} for the ResBlock; {L} is the vocab projection's slot,
which equals medusa_num_layers where a layout numbers it after the ResBlocks. A new layout is one
line of LAYOUTS.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ..errors import CheckpointError, InputError

# Roles of a head tensor.
LAYER_WEIGHT = "layer_weight"
LAYER_BIAS = "layer_bias"
LM_HEAD = "lm_head"


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    description: str
    layer_weight: str
    layer_bias: str
    lm_head: str
    # True where head tensors share the file with a base model's tensors, which are skipped
    mixed_with_base: bool = False
    # Optional prefixes some exports put before every name of this layout
    optional_prefixes: tuple[str, ...] = ()

    def templates(self) -> dict[str, str]:
        return {LAYER_WEIGHT: self.layer_weight, LAYER_BIAS: self.layer_bias, LM_HEAD: self.lm_head}


LAYOUTS: tuple[Layout, ...] = (
    # FasterDecoding/Medusa v1 heads: medusa_lm_head.pt / medusa_lm_head.safetensors
    Layout("medusa1", "FasterDecoding Medusa-1 heads (medusa_lm_head.pt/.safetensors)",
           "{h}.{l}.linear.weight", "{h}.{l}.linear.bias", "{h}.{L}.weight"),
    # FasterDecoding Medusa-2: the whole fine-tuned model with heads under medusa_head.
    Layout("medusa2", "Medusa-2 full model; heads under medusa_head., base tensors ignored",
           "medusa_head.{h}.{l}.linear.weight", "medusa_head.{h}.{l}.linear.bias",
           "medusa_head.{h}.{L}.weight", mixed_with_base=True),
    # NVIDIA TensorRT-LLM / ModelOpt Medusa export
    Layout("trtllm", "TensorRT-LLM / ModelOpt Medusa heads",
           "medusa_heads.{h}.medusa_layers.{l}.linear.weight",
           "medusa_heads.{h}.medusa_layers.{l}.linear.bias", "medusa_heads.{h}.lm_head.weight"),
    # vLLM's Medusa draft model (vllm/model_executor/models/medusa.py); its loader strips a
    # leading "medusa_heads." that some exports carry
    Layout("vllm", "vLLM Medusa draft model", "blocks.{h}.layers.{l}.weight",
           "blocks.{h}.layers.{l}.bias", "lm_heads.{h}.weight",
           optional_prefixes=("medusa_heads.",)),
    # MLC-LLM parameter names: what `medusa convert` writes (spec.py)
    Layout("mlc", "MLC-LLM parameter names (medusa convert's output names)",
           "medusa_head.{h}.{l}.linear.weight", "medusa_head.{h}.{l}.linear.bias",
           "medusa_head.{h}.{L}.weight"),
)
LAYOUT_NAMES = tuple(layout.name for layout in LAYOUTS)

# The base model's output projection, used for heads that have none of their own.
BASE_LM_HEAD_NAMES = ("lm_head.weight", "model.lm_head.weight")

# config.json keys under every published spelling, first match wins.
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "medusa_num_heads": ("medusa_num_heads", "num_medusa_heads", "num_heads"),
    "medusa_num_layers": ("medusa_num_layers", "num_medusa_layers", "num_hidden_layers"),
    "hidden_size": ("hidden_size",),
    "vocab_size": ("vocab_size",),
    "base_model_name_or_path": ("base_model_name_or_path", "base_model"),
    # vLLM: one lm_heads.0 shared by every head
    "original_lm_head": ("original_lm_head",),
}

# What each hint must be to be used: sizes are integers (JSON's true is not one), the vLLM flag
# a boolean, the base model a name.
_SIZE_HINTS = ("medusa_num_heads", "medusa_num_layers", "hidden_size", "vocab_size")
HINT_TYPES: dict[str, tuple[type, str]] = {
    **{field: (int, "an integer") for field in _SIZE_HINTS},
    "base_model_name_or_path": (str, "a string"),
    "original_lm_head": (bool, "true or false"),
}

# Head and ResBlock indices: a run of digits longer than this reads as BEYOND_ANY_INDEX (int() of
# thousands of digits is slow, and refused past 4300); the head plan then bounds every index
# (spec.py's limits) before anything is sized by one.
_MAX_INDEX_DIGITS = 9
BEYOND_ANY_INDEX = 10**_MAX_INDEX_DIGITS


def _index(digits: str) -> int:
    return int(digits) if len(digits) <= _MAX_INDEX_DIGITS else BEYOND_ANY_INDEX


def _template_regex(template: str, optional_prefixes: tuple[str, ...] = ()) -> re.Pattern[str]:
    number = r"[0-9]+"  # ASCII digits: \d would also take other scripts' digits
    pattern = re.escape(template)
    pattern = pattern.replace(r"\{h\}", f"(?P<h>{number})")
    pattern = pattern.replace(r"\{l\}", f"(?P<l>{number})").replace(r"\{L\}", f"(?P<l>{number})")
    prefix = "".join(f"(?:{re.escape(p)})?" for p in optional_prefixes)
    return re.compile(f"^{prefix}{pattern}$")


_LAYOUT_REGEXES: dict[str, dict[str, re.Pattern[str]]] = {
    layout.name: {role: _template_regex(t, layout.optional_prefixes) for role, t in layout.templates().items()}
    for layout in LAYOUTS
}


def get_layout(name: str) -> Layout:
    for layout in LAYOUTS:
        if layout.name == name:
            return layout
    raise InputError(f"unknown layout '{name}'; choose one of: auto, {', '.join(LAYOUT_NAMES)} (--layout)")


@dataclasses.dataclass(frozen=True)
class HeadTensor:
    role: str
    head: int
    # ResBlock index for layer tensors; the slot index (or None) for lm_head
    layer: int | None
    name: str


def match_name(layout: Layout, name: str) -> HeadTensor | None:
    for role, regex in _LAYOUT_REGEXES[layout.name].items():
        m = regex.match(name)
        if m:
            layer = m.groupdict().get("l")
            return HeadTensor(role, _index(m["h"]), _index(layer) if layer is not None else None, name)
    return None


def detect_layout(names: list[str]) -> Layout:
    """The layout whose templates match the most names; a Medusa-2 file also holds base tensors."""
    scores = [(sum(1 for n in names if match_name(layout, n) is not None), layout) for layout in LAYOUTS]
    best = max(matched for matched, _ in scores)
    if best == 0:
        shown = ", ".join(name[:80] for name in names[:5]) or "(no tensors)"
        raise CheckpointError(
            f"no Medusa head tensors recognised; first names: {shown}. "
            f"Known layouts: {', '.join(LAYOUT_NAMES)} (force one with --layout)"
        )
    candidates = [layout for matched, layout in scores if matched == best]
    has_foreign = best < len(names)
    # Identical templates (medusa2 and mlc) differ only in whether base tensors ride along.
    for layout in candidates:
        if layout.mixed_with_base == has_foreign:
            return layout
    return candidates[0]


def check_mixed_layouts(names: list[str], chosen: Layout) -> None:
    """Refuse a checkpoint that holds head tensors of two different layouts."""
    chosen_templates = chosen.templates()
    for layout in LAYOUTS:
        if layout.templates() == chosen_templates:
            continue
        other = [n for n in names if match_name(layout, n) and not match_name(chosen, n)]
        if other:
            raise CheckpointError(
                f"mixed layouts: tensors of '{chosen.name}' and of '{layout.name}' "
                f"(e.g. '{other[0]:.200}') in one checkpoint; keep one set, or force one with --layout"
            )


def config_hint_values(raw: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """A config.json's values under MedusaConfig's names (CONFIG_KEYS), searching the top level
    and the objects one level down (some exports nest the Medusa fields, e.g. {"medusa": {...}}).
    A value of the wrong type (a size that is NaN, a string or true) is a CheckpointError naming
    `where` and the key: a hint that cannot be compared is no hint."""
    scopes = [raw] + [v for v in raw.values() if isinstance(v, dict)]
    hints = {}
    for field, spellings in CONFIG_KEYS.items():
        for scope in scopes:
            key = next((k for k in spellings if scope.get(k) is not None), None)
            if key is None:
                continue
            value = scope[key]
            kind, words = HINT_TYPES[field]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise CheckpointError(f"{where}: \"{key}\" is {value!r:.60}, expected {words}; "
                                      "fix or remove the key (config.json is only a hint)")
            hints[field] = value
            break
    return hints
