"""mlc-chat-config.json: the config `medusa convert` writes beside the packed parameters.

Its fields follow MLC-LLM's MLCChatConfig, so MLC-LLM's tools read the directory; ours (the
source's provenance) sit under "medusa_cli".
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..errors import InputError, ParamsError, first_line
from ..quantization import SCHEMES
from ..spec import MedusaConfig

CONFIG_FILE = "mlc-chat-config.json"
CONFIG_VERSION = "0.1.0"
_MAX_CONFIG_BYTES = 64 * 1024 * 1024


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
        return json.dumps(data, indent=2) + "\n"


def read_packed_config(params_dir: Path) -> PackedConfig:
    """PARAMS_DIR/mlc-chat-config.json, validated; ParamsError naming the file and the field."""
    path = Path(params_dir) / CONFIG_FILE
    if not path.is_file():
        raise ParamsError(
            f"{path}: not found; PARAMS_DIR must be a directory written by `medusa convert`"
        )
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes is too large for a config")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, UnicodeDecodeError) as exc:
        reason = "it nests too deep" if isinstance(exc, RecursionError) else first_line(exc)
        raise ParamsError(f"{path}: unreadable config ({reason}); re-run `medusa convert`") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a JSON object; re-run `medusa convert`")
    if data.get("model_type") != "medusa":
        raise ParamsError(f"{path}: model_type is {data.get('model_type')!r:.60}, expected 'medusa'")
    quantization = data.get("quantization")
    if quantization not in SCHEMES:
        raise ParamsError(f"{path}: unknown quantization {quantization!r:.60}; re-run `medusa convert`")
    try:
        model = MedusaConfig.from_dict(data.get("model_config"), f"{path}: model_config")
    except InputError as exc:
        raise ParamsError(f"{exc}; re-run `medusa convert`") from None
    ours = data.get("medusa_cli", {})
    source = ours.get("source", {}) if isinstance(ours, dict) else {}
    return PackedConfig(model=model, quantization=quantization,
                        source=source if isinstance(source, dict) else {})
