"""Packed parameter directories for tests, written directly (no checkpoint, no converter).

make_params_dir writes random heads under a scheme the way `medusa convert` lays them out, and
returns the float weights the numpy references need: the source weights, and for quantized
schemes the dequantized ones the compiled kernels actually use.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from medusa_cli import quantization as quant
from medusa_cli.packed.config import CONFIG_FILE, PackedConfig
from medusa_cli.packed.tensor_cache import write_tensor_cache
from medusa_cli.spec import MedusaConfig, param_names

TINY = dict(medusa_num_heads=3, medusa_num_layers=1, hidden_size=64, vocab_size=256, max_batch_size=8)


@dataclasses.dataclass
class TinyParams:
    path: Path
    config: MedusaConfig
    scheme: quant.QuantScheme
    # name -> float64 weight as drawn (the checkpoint's values)
    source: dict[str, np.ndarray]
    # name -> float64 weight the kernels see: cast to the model dtype, or dequantized
    effective: dict[str, np.ndarray]


def tiny_config(**overrides) -> MedusaConfig:
    return MedusaConfig(**{**TINY, **overrides})


def random_weights(config: MedusaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 weights at the scale of trained heads (1/sqrt(hidden) init, logits of order 1-3)."""
    rng = np.random.default_rng(seed)
    hidden = config.hidden_size
    weights = {}
    for name in param_names(config):
        if name.endswith(".linear.weight"):
            shape = (hidden, hidden)
        elif name.endswith(".bias"):
            shape = (hidden,)
        else:
            shape = (config.vocab_size, hidden)
        weights[name] = (rng.standard_normal(shape) / np.sqrt(hidden)).astype(np.float32)
    return weights


def _effective(name: str, tensors: dict[str, np.ndarray], scheme: quant.QuantScheme,
               in_features: int) -> np.ndarray:
    if name.endswith(".weight") and scheme.is_quantized:
        q_weight_name, q_scale_name = quant.quantized_names(name)
        return quant.dequantize_weight(
            tensors[q_weight_name], tensors[q_scale_name], scheme, in_features
        ).astype(np.float64)
    return tensors[name].astype(np.float32).astype(np.float64)


def make_params_dir(path: Path, scheme_name: str = "q0f32", seed: int = 0,
                    config: MedusaConfig | None = None) -> TinyParams:
    """Write a packed directory of random heads under `scheme_name` into `path`."""
    config = config or tiny_config()
    scheme = quant.get_scheme(scheme_name)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    source = random_weights(config, seed)
    tensors: dict[str, np.ndarray] = {}
    for name, array in source.items():
        for packed_name, packed in quant.convert_tensor(name, array, scheme):
            tensors[packed_name] = packed
    write_tensor_cache(path, list(tensors.items()))
    (path / CONFIG_FILE).write_text(PackedConfig(model=config, quantization=scheme.name).to_json())
    effective = {name: _effective(name, tensors, scheme, config.hidden_size) for name in source}
    return TinyParams(
        path=path,
        config=config,
        scheme=scheme,
        source={k: v.astype(np.float64) for k, v in source.items()},
        effective=effective,
    )


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def reference_logits(weights: dict[str, np.ndarray], config: MedusaConfig,
                     hidden: np.ndarray) -> list[np.ndarray]:
    """The heads in float64 numpy: per head, [batch, vocab]."""
    x0 = hidden.astype(np.float64)
    out = []
    for h in range(config.medusa_num_heads):
        x = x0
        for layer in range(config.medusa_num_layers):
            prefix = f"medusa_head.{h}.{layer}.linear"
            x = x + _silu(x @ weights[f"{prefix}.weight"].T + weights[f"{prefix}.bias"])
        out.append(x @ weights[f"medusa_head.{h}.{config.medusa_num_layers}.weight"].T)
    return out


def random_hidden(config: MedusaConfig, batch: int, seed: int = 1) -> np.ndarray:
    """Hidden states of unit scale per element, like a base model's final normed states."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, config.hidden_size)).astype(np.float32)
