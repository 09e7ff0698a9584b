"""MedusaConfig (MLC-LLM's fields) and the config file written beside packed parameters."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .errors import ParamsError

# Written beside tensor-cache.json; the name and overlapping fields match MLC-LLM's.
CONFIG_FILE = "mlc-chat-config.json"
TENSOR_CACHE_FILE = "tensor-cache.json"
CONFIG_VERSION = "0.1.0"


@dataclasses.dataclass
class MedusaConfig:
    medusa_num_heads: int
    # ResBlocks per head, before the head's vocab projection
    medusa_num_layers: int
    hidden_size: int
    vocab_size: int
    # largest batch the compiled get_logits is planned for
    max_batch_size: int = 1
    tensor_parallel_shards: int = 1
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Unused by the heads; kept so MLC-LLM's compile flow accepts the config.
    prefill_chunk_size: int = -1
    context_window_size: int = -1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MedusaConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in fields}
        extra = {k: v for k, v in data.items() if k not in fields}
        config = cls(**known)
        config.kwargs = {**extra, **config.kwargs}
        return config


def param_count(config: MedusaConfig) -> int:
    """Parameters of the unquantized heads: ResBlock weights and biases plus vocab projections."""
    per_head = config.medusa_num_layers * (config.hidden_size + 1) * config.hidden_size
    return config.medusa_num_heads * (per_head + config.vocab_size * config.hidden_size)


def param_names(config: MedusaConfig) -> list[str]:
    """MLC-LLM parameter names of the unquantized heads, in model order."""
    names = []
    for h in range(config.medusa_num_heads):
        for layer in range(config.medusa_num_layers):
            names.append(f"medusa_head.{h}.{layer}.linear.weight")
            names.append(f"medusa_head.{h}.{layer}.linear.bias")
        names.append(f"medusa_head.{h}.{config.medusa_num_layers}.weight")
    return names


@dataclasses.dataclass
class PackedConfig:
    """What `medusa convert` records beside the packed parameters."""

    model: MedusaConfig
    quantization: str
    # provenance: source path, layout, sha256 per source file, config disagreements
    source: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        data = {
            "version": CONFIG_VERSION,
            "model_type": "medusa",
            "quantization": self.quantization,
            "model_config": self.model.to_dict(),
            "vocab_size": self.model.vocab_size,
            "context_window_size": self.model.context_window_size,
            "prefill_chunk_size": self.model.prefill_chunk_size,
            "tensor_parallel_shards": self.model.tensor_parallel_shards,
            "max_batch_size": self.model.max_batch_size,
            "tokenizer_files": [],
            "medusa_cli": {"source": self.source},
        }
        return json.dumps(data, indent=2, sort_keys=False) + "\n"


def read_packed_config(params_dir: Path) -> PackedConfig:
    path = Path(params_dir) / CONFIG_FILE
    if not path.is_file():
        raise ParamsError(
            f"{path}: not found; PARAMS_DIR must be a directory written by `medusa convert`"
        )
    try:
        data = json.loads(path.read_text())
        if data.get("model_type") != "medusa":
            raise ParamsError(
                f"{path}: model_type is {data.get('model_type')!r}, expected 'medusa'"
            )
        model = MedusaConfig.from_dict(data["model_config"])
        return PackedConfig(
            model=model,
            quantization=data["quantization"],
            source=data.get("medusa_cli", {}).get("source", {}),
        )
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ParamsError(f"{path}: unreadable config ({exc}); re-run `medusa convert`") from None
