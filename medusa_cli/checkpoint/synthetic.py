"""Seeded synthetic Medusa checkpoints in every published layout: the tensors, their values and
the config.json each project writes (`medusa example`; no download needed)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from ..dtypes import NUMPY_DTYPES
from ..errors import InputError
from ..resources import load_config_json
from ..spec import MedusaConfig, head_specs
from .layouts import get_layout

# Weight scales: logits of a realistic magnitude (std about 1.3 at hidden 4096 with unit
# hidden states), ResBlocks a small correction on top of the identity.
_LAYER_STD = 0.02
_LM_HEAD_STD = 0.02

# config.json as each project writes it: our field -> that project's key, plus fixed fields.
CONFIG_SPELLINGS: dict[str, tuple[dict[str, str], dict]] = {
    "medusa1": (
        {"medusa_num_heads": "medusa_num_heads", "medusa_num_layers": "medusa_num_layers",
         "base_model": "base_model_name_or_path"},
        {"architectures": ["MedusaModel"], "transformers_version": "4.34.0"},
    ),
    "medusa2": (
        {"medusa_num_heads": "medusa_num_heads", "medusa_num_layers": "medusa_num_layers",
         "hidden_size": "hidden_size", "vocab_size": "vocab_size",
         "base_model": "base_model_name_or_path"},
        {"architectures": ["MedusaModelLlama"], "model_type": "llama", "num_hidden_layers": 1,
         "torch_dtype": "float16"},
    ),
    "trtllm": (
        {"medusa_num_heads": "num_medusa_heads", "medusa_num_layers": "num_medusa_layers",
         "hidden_size": "hidden_size", "vocab_size": "vocab_size"},
        {"architecture": "MedusaForCausalLM"},
    ),
    "vllm": (
        {"medusa_num_heads": "num_heads", "medusa_num_layers": "num_hidden_layers",
         "hidden_size": "hidden_size", "vocab_size": "vocab_size"},
        {"architectures": ["MedusaModel"], "model_type": "medusa"},
    ),
    "mlc": (
        {"medusa_num_heads": "medusa_num_heads", "medusa_num_layers": "medusa_num_layers",
         "hidden_size": "hidden_size", "vocab_size": "vocab_size"},
        {"model_type": "medusa"},
    ),
}

# File names each project publishes: (single file stem, default format)
FILE_NAMES = {
    "medusa1": ("medusa_lm_head", "pt"),
    "medusa2": ("model", "safetensors"),
    "trtllm": ("model", "safetensors"),
    "vllm": ("model", "safetensors"),
    "mlc": ("model", "safetensors"),
}


def load_presets() -> dict[str, dict]:
    return {k: v for k, v in load_config_json("presets.json").items() if not k.startswith("_")}


def preset_config(name: str) -> tuple[MedusaConfig, str]:
    presets = load_presets()
    if name not in presets:
        raise InputError(f"unknown preset '{name}'; choose one of: {', '.join(presets)} (--preset)")
    p = presets[name]
    config = MedusaConfig(
        medusa_num_heads=p["medusa_num_heads"],
        medusa_num_layers=p["medusa_num_layers"],
        hidden_size=p["hidden_size"],
        vocab_size=p["vocab_size"],
    )
    return config, p["base_model"]


def _rng(seed: int, name: str) -> np.random.Generator:
    # Seeded per tensor, so a tensor's values do not depend on the file order or sharding.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _normal(seed: int, name: str, shape: tuple[int, ...], std: float, dtype: np.dtype) -> np.ndarray:
    values = _rng(seed, name).standard_normal(shape, dtype=np.float32)
    values *= std
    return values.astype(dtype)


# (checkpoint name, shape, dtype name, make): make() builds the array when it is written
TensorSpec = tuple[str, tuple[int, ...], str, Callable[[], np.ndarray]]


def example_tensors(
    config: MedusaConfig, layout_name: str, dtype: str, seed: int, bias: bool = True,
    head_lm_head: bool = True, values: Mapping[str, np.ndarray] | None = None,
) -> list[TensorSpec]:
    """Every tensor of the example, in file order; a large example streams, each array made
    when it is written. `values` (by spec name, in `dtype`) replaces the seeded random values
    of the head tensors it holds."""
    layout = get_layout(layout_name)
    np_dtype = NUMPY_DTYPES[dtype]
    hidden, vocab, count = config.hidden_size, config.vocab_size, config.medusa_num_layers
    specs: list[TensorSpec] = []
    given = values or {}

    def add(name: str, shape: tuple[int, ...], std: float, key: str) -> None:
        if key in given:
            specs.append((name, shape, dtype, lambda: given[key]))
        else:
            specs.append((name, shape, dtype, lambda: _normal(seed, key, shape, std, np_dtype)))

    if layout.mixed_with_base or not head_lm_head:
        base = [("model.embed_tokens.weight", (vocab, hidden)),
                ("model.layers.0.self_attn.q_proj.weight", (hidden, hidden)),
                ("model.norm.weight", (hidden,))]
        if layout.mixed_with_base:
            for name, shape in base:
                add(name, shape, _LAYER_STD, name)
            if not head_lm_head:
                add("lm_head.weight", (vocab, hidden), _LM_HEAD_STD, "lm_head.weight")
    for head in head_specs(config):
        h = head.index
        # values are seeded by the MLC name, so every layout of one seed holds the same numbers
        for i, linear in enumerate(head.resblocks):
            add(layout.layer_weight.format(h=h, l=i), (hidden, hidden), _LAYER_STD, linear.weight)
            if bias:
                add(layout.layer_bias.format(h=h, l=i), (hidden,), _LAYER_STD, linear.bias)
        if head_lm_head:
            add(layout.lm_head.format(h=h, L=count), (vocab, hidden), _LM_HEAD_STD,
                head.lm_head.weight)
    return specs


def base_lm_head(config: MedusaConfig, dtype: str, seed: int) -> np.ndarray:
    return _normal(seed, "lm_head.weight", (config.vocab_size, config.hidden_size), _LM_HEAD_STD,
                   NUMPY_DTYPES[dtype])


def iter_example_reference(
    config: MedusaConfig, dtype: str, seed: int, bias: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
    """The example's head tensors under MLC names, as written (for tests and the oracle)."""
    for name, _, _, make in example_tensors(config, "mlc", dtype, seed, bias):
        yield name, make()
