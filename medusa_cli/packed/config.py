"""mlc-chat-config.json: the config `medusa convert` writes beside the packed parameters.

Its fields are MLC-LLM's MLCChatConfig (python/mlc_llm/protocol/mlc_chat_config.py), which
MLC-LLM's engine validates for every model it loads, Medusa heads included: the required
sliding_window_size, attention_sink_size and conv_template (a Conversation object), and the
optional keys MLC-LLM's gen_config writes where their value is plain for heads. model_config is
MedusaConfig.to_dict(), which MLC-LLM's compile and JIT read with ConfigBase.from_dict. Ours (the
source's provenance) sit under "medusa_cli".

max_batch_size is one number: `medusa convert --max-batch-size` writes it into model_config
(where MLC-LLM's compile reads it) and at the top level, `medusa compile` builds for it, and the
library's metadata repeats it; MLC-LLM's engine caps its batch at the smallest over its models.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError, ParamsError, first_line
from ..quantization import SCHEMES
from ..resources import load_config_json
from ..spec import MedusaConfig

CONFIG_FILE = "mlc-chat-config.json"
# MLC-LLM's MLC_CHAT_CONFIG_VERSION
CONFIG_VERSION = "0.1.0"
_MAX_CONFIG_BYTES = 64 * 1024 * 1024
# The conversation template convert writes unless --conv-template says otherwise: Vicuna v1.3 is
# the base model of the published FasterDecoding Medusa heads.
DEFAULT_CONV_TEMPLATE = "vicuna_v1.1"
CONV_TEMPLATES_FILE = "conv_templates.json"

# gen_config's system defaults for generation (MLC_CHAT_SYSTEM_DEFAULT), which it writes when
# the model's generation_config.json does not override them; heads have none. Its token-id
# defaults (pad 0, bos 1, eos 2) are left out: they depend on the base model's tokenizer.
_GENERATION_DEFAULTS = {"temperature": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                        "repetition_penalty": 1.0, "top_p": 1.0}
# Top-level fields that repeat model_config's value; they must agree with it.
_COPIED_FROM_MODEL_CONFIG = ("vocab_size", "context_window_size", "prefill_chunk_size",
                             "tensor_parallel_shards", "max_batch_size")


# --- MLC-LLM's Conversation, as JSON -------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(v) for v in value)


def _is_str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def _is_message(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and (value[1] is None or isinstance(value[1], (str, list))))


# Conversation's fields: (required, check, what it must be). Read from MLC-LLM's
# python/mlc_llm/protocol/conversation_protocol.py; extra keys are ignored there, as here.
CONVERSATION_FIELDS: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    "name": (False, lambda v: v is None or isinstance(v, str), "a string"),
    "system_template": (False, lambda v: isinstance(v, str), "a string"),
    "system_message": (False, lambda v: isinstance(v, str), "a string"),
    "system_prefix_token_ids": (False, lambda v: v is None or _is_int_list(v), "a list of token ids"),
    "add_role_after_system_message": (False, lambda v: isinstance(v, bool), "true or false"),
    "roles": (True, _is_str_map, "an object of role names to strings"),
    "role_templates": (False, _is_str_map, "an object of role names to strings"),
    "messages": (False, lambda v: isinstance(v, list) and all(_is_message(m) for m in v),
                 "a list of [role, content] pairs"),
    "seps": (True, lambda v: _is_str_list(v) and 1 <= len(v) <= 2, "a list of 1 or 2 strings"),
    "role_content_sep": (False, lambda v: isinstance(v, str), "a string"),
    "role_empty_sep": (False, lambda v: isinstance(v, str), "a string"),
    "stop_str": (False, _is_str_list, "a list of strings"),
    "stop_token_ids": (False, _is_int_list, "a list of token ids"),
    "function_string": (False, lambda v: isinstance(v, str), "a string"),
    "use_function_calling": (False, lambda v: isinstance(v, bool), "true or false"),
}


def check_conversation(data: Any, where: str) -> dict[str, Any]:
    """`data` if it is a Conversation as MLC-LLM reads one; InputError naming `where` and the
    field otherwise."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a conversation template object, found "
                         f"{type(data).__name__}")
    for field, (required, check, words) in CONVERSATION_FIELDS.items():
        if field not in data:
            if required:
                raise InputError(f"{where}: the conversation template lacks \"{field}\" ({words})")
            continue
        if not check(data[field]):
            raise InputError(f"{where}: the conversation template's \"{field}\" is "
                             f"{data[field]!r:.60}, expected {words}")
    return data


def conversation_templates() -> dict[str, dict[str, Any]]:
    """The shipped templates by name (configs/conv_templates.json)."""
    return {k: v for k, v in load_config_json(CONV_TEMPLATES_FILE).items() if not k.startswith("_")}


def resolve_conv_template(spec: str | Path) -> dict[str, Any]:
    """--conv-template: a shipped template's name, or a JSON file holding a Conversation."""
    templates = conversation_templates()
    if isinstance(spec, str) and spec in templates:
        return templates[spec]
    path = Path(spec)
    if not (str(spec).endswith(".json") or path.is_file()):
        raise InputError(f"--conv-template {spec}: unknown template; choose one of "
                         f"{', '.join(templates)} or pass a JSON file holding MLC-LLM's "
                         "Conversation object")
    if not path.is_file():
        raise InputError(f"--conv-template {path}: no such file")
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes is too large for a template")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        reason = "it nests too deep" if isinstance(exc, RecursionError) else first_line(exc)
        raise InputError(f"--conv-template {path}: not a JSON conversation template ({reason})") from None
    return check_conversation(data, f"--conv-template {path}")


# --- the config ----------------------------------------------------------------------------


@dataclasses.dataclass
class PackedConfig:
    """What `medusa convert` records beside the packed parameters."""

    model: MedusaConfig
    quantization: str
    # provenance: source path, layout, sha256 per source file, config disagreements
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    # MLC-LLM's Conversation object (conv_templates.json); None: the default template
    conv_template: dict[str, Any] | None = None

    def to_json(self) -> str:
        model = self.model
        conv_template = self.conv_template or conversation_templates()[DEFAULT_CONV_TEMPLATE]
        data = {
            "version": CONFIG_VERSION,
            "model_type": "medusa",
            "quantization": self.quantization,
            "model_config": model.to_dict(),
            "vocab_size": model.vocab_size,
            "active_vocab_size": model.vocab_size,
            "context_window_size": model.context_window_size,
            # heads keep no KV cache: no window, no attention sink (MLC-LLM's "off")
            "sliding_window_size": -1,
            "prefill_chunk_size": model.prefill_chunk_size,
            "attention_sink_size": -1,
            "tensor_parallel_shards": model.tensor_parallel_shards,
            "pipeline_parallel_stages": 1,
            # the library's batch; MLC-LLM reads model_config's, this copy is for people
            "max_batch_size": model.max_batch_size,
            **_GENERATION_DEFAULTS,
            # heads have no tokenizer: the base model's config carries it
            "tokenizer_files": [],
            "tokenizer_info": {},
            "conv_template": conv_template,
            "medusa_cli": {"source": self.source},
        }
        return json.dumps(data, indent=2) + "\n"


# Provenance fields the commands read, and what each must be.
_SOURCE_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "path": (lambda v: isinstance(v, str), "a string"),
    "layout": (lambda v: isinstance(v, str), "a string"),
    "files": (lambda v: isinstance(v, dict) and all(
        isinstance(info, dict) and isinstance(info.get("sha256", ""), (str, type(None)))
        for info in v.values()), "an object of file paths to {sha256, bytes}"),
    "config_json": (lambda v: v is None or isinstance(v, str), "a string"),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a string"),
}


def _check_fields(data: dict, path: Path, model: MedusaConfig) -> None:
    """The MLC-LLM fields beside model_config: copies agree with it, the rest have MLC-LLM's
    types (ParamsError naming the field)."""
    for key in _COPIED_FROM_MODEL_CONFIG:
        if key in data and not (_is_int(data[key]) and data[key] == getattr(model, key)):
            raise ParamsError(f"{path}: {key} is {data[key]!r:.40} but model_config says "
                              f"{getattr(model, key)}; re-run `medusa convert`")
    for key in ("sliding_window_size", "attention_sink_size", "pipeline_parallel_stages",
                "active_vocab_size"):
        if key in data and data[key] is not None and not _is_int(data[key]):
            raise ParamsError(f"{path}: {key} is {data[key]!r:.40}, expected an integer; "
                              "re-run `medusa convert`")
    if "conv_template" in data:
        try:
            check_conversation(data["conv_template"], f"{path}: conv_template")
        except InputError as exc:
            raise ParamsError(f"{exc}; re-run `medusa convert`") from None


def _read_source(data: dict, path: Path) -> dict[str, Any]:
    """The provenance under "medusa_cli": absent in a config MLC-LLM wrote, checked where present."""
    ours = data.get("medusa_cli", {})
    source = ours.get("source", {}) if isinstance(ours, dict) else None
    if not isinstance(source, dict):
        raise ParamsError(f"{path}: medusa_cli.source is not an object; re-run `medusa convert`")
    for key, (check, words) in _SOURCE_FIELDS.items():
        if key in source and not check(source[key]):
            raise ParamsError(f"{path}: medusa_cli.source.{key} is {source[key]!r:.60}, expected "
                              f"{words}; re-run `medusa convert`")
    return source


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
    if not isinstance(quantization, str) or quantization not in SCHEMES:
        raise ParamsError(f"{path}: unknown quantization {quantization!r:.60}; re-run `medusa convert`")
    try:
        model = MedusaConfig.from_dict(data.get("model_config"), f"{path}: model_config")
    except InputError as exc:
        raise ParamsError(f"{exc}; re-run `medusa convert`") from None
    _check_fields(data, path, model)
    return PackedConfig(model=model, quantization=quantization, source=_read_source(data, path),
                        conv_template=data.get("conv_template"))
