"""mlc-chat-config.json against MLC-LLM's readers, whose field lists are held here as data.

MLC-LLM is not a dependency: the tables below were read from mlc-ai/mlc-llm at commit
79d603f085f50500e9509fa01785ffa7ecfaaa93 and are checked the way MLC-LLM checks them:
  - python/mlc_llm/protocol/mlc_chat_config.py, MLCChatConfig (a pydantic model its engine
    validates every model's config with, Medusa heads included): fields without a default are
    required;
  - python/mlc_llm/protocol/conversation_protocol.py, Conversation (conv_template's type): roles
    and seps are required, seps holds 1 or 2 strings;
  - python/mlc_llm/model/medusa/medusa_model.py, MedusaConfig, read by ConfigBase.from_dict
    (python/mlc_llm/support/config.py) in MLC-LLM's compile and JIT: known fields become keyword
    arguments and everything else goes to kwargs=, so a "kwargs" key is a TypeError.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medusa_cli.cli import app
from medusa_cli.commands.compile import CompileRequest, compile_heads
from medusa_cli.commands.convert import ConvertRequest, convert_checkpoint
from medusa_cli.commands.example import ExampleRequest, write_example
from medusa_cli.library import read_library_metadata
from medusa_cli.packed.config import PackedConfig, conversation_templates, read_packed_config
from medusa_cli.spec import MedusaConfig

from .conftest import leftovers

NONE = type(None)

# MLCChatConfig: field (by its JSON alias) -> the JSON types pydantic accepts for it
MLC_CHAT_CONFIG_REQUIRED = {
    "model_type": (str,),
    "quantization": (str,),
    "model_config": (dict,),
    "vocab_size": (int,),
    "context_window_size": (int,),
    "sliding_window_size": (int,),
    "prefill_chunk_size": (int,),
    "attention_sink_size": (int,),
    "tensor_parallel_shards": (int,),
    "conv_template": (dict,),
}
MLC_CHAT_CONFIG_OPTIONAL = {
    "version": (str,),
    "pipeline_parallel_stages": (int,),
    "active_vocab_size": (int, NONE),
    "temperature": (float, int, NONE),
    "presence_penalty": (float, int, NONE),
    "frequency_penalty": (float, int, NONE),
    "repetition_penalty": (float, int, NONE),
    "top_p": (float, int, NONE),
    "tokenizer_files": (list,),
    "tokenizer_info": (dict,),
    "pad_token_id": (int, NONE),
    "bos_token_id": (int, NONE),
    "eos_token_id": (int, list, NONE),
    "model_task": (str,),
    "embedding_metadata": (dict, NONE),
}
# The optional keys gen_config (python/mlc_llm/interface/gen_config.py) writes whose value is
# plain for heads: ours must write them too.
GEN_CONFIG_WRITES = ("version", "pipeline_parallel_stages", "active_vocab_size", "temperature",
                     "presence_penalty", "frequency_penalty", "repetition_penalty", "top_p",
                     "tokenizer_files", "tokenizer_info")

# Conversation
CONVERSATION_REQUIRED = {"roles": (dict,), "seps": (list,)}
CONVERSATION_OPTIONAL = {
    "name": (str, NONE),
    "system_template": (str,),
    "system_message": (str,),
    "system_prefix_token_ids": (list, NONE),
    "add_role_after_system_message": (bool,),
    "role_templates": (dict,),
    "messages": (list,),
    "role_content_sep": (str,),
    "role_empty_sep": (str,),
    "stop_str": (list,),
    "stop_token_ids": (list,),
    "function_string": (str,),
    "use_function_calling": (bool,),
}

# MedusaConfig's dataclass fields in order, with their defaults (MISSING: required)
MISSING = dataclasses.MISSING
MLC_MEDUSA_CONFIG_FIELDS = [
    ("medusa_num_heads", int, MISSING),
    ("medusa_num_layers", int, MISSING),
    ("hidden_size", int, MISSING),
    ("vocab_size", int, MISSING),
    ("max_batch_size", int, 1),
    ("tensor_parallel_shards", int, 1),
    ("kwargs", dict, dataclasses.field(default_factory=dict)),
    ("prefill_chunk_size", int, -1),
    ("context_window_size", int, -1),
]
MlcMedusaConfig = dataclasses.make_dataclass(
    "MlcMedusaConfig",
    [(name, kind) if default is MISSING else (name, kind, default)
     for name, kind, default in MLC_MEDUSA_CONFIG_FIELDS])


def mlc_from_dict(source: dict):
    """ConfigBase.from_dict on MLC-LLM's MedusaConfig field list."""
    names = [f.name for f in dataclasses.fields(MlcMedusaConfig)]
    fields = {k: v for k, v in source.items() if k in names}
    kwargs = {k: v for k, v in source.items() if k not in names}
    return MlcMedusaConfig(**fields, kwargs=kwargs)


def _is(value, kinds) -> bool:
    """JSON value of one of `kinds`; pydantic takes no bool for an int (nor for a float here)."""
    if isinstance(value, bool) and bool not in kinds:
        return False
    return isinstance(value, kinds)


def check_like_mlc(config: dict) -> None:
    """What MLCChatConfig's validation asks of an mlc-chat-config.json."""
    for key, kinds in MLC_CHAT_CONFIG_REQUIRED.items():
        assert key in config, f"MLCChatConfig requires {key}"
        assert _is(config[key], kinds), (key, config[key])
    for key, kinds in MLC_CHAT_CONFIG_OPTIONAL.items():
        if key in config:
            assert _is(config[key], kinds), (key, config[key])
    check_conversation_like_mlc(config["conv_template"])
    assert all(isinstance(f, str) for f in config["tokenizer_files"])


def check_conversation_like_mlc(conversation: dict) -> None:
    for key, kinds in CONVERSATION_REQUIRED.items():
        assert key in conversation, f"Conversation requires {key}"
        assert _is(conversation[key], kinds), (key, conversation[key])
    for key, kinds in CONVERSATION_OPTIONAL.items():
        if key in conversation:
            assert _is(conversation[key], kinds), (key, conversation[key])
    assert 1 <= len(conversation["seps"]) <= 2 and all(isinstance(s, str) for s in conversation["seps"])
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in conversation["roles"].items())
    for key in ("stop_token_ids", "system_prefix_token_ids"):
        assert all(_is(t, (int,)) for t in conversation.get(key) or [])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_example(ExampleRequest(output=tmp_path_factory.mktemp("mlc") / "ckpt")).output


def _convert(checkpoint: Path, out: Path, **options) -> dict:
    convert_checkpoint(ConvertRequest(source=checkpoint, output=out, **options))
    return json.loads((out / "mlc-chat-config.json").read_text())


def test_the_config_is_what_mlc_llm_validates(checkpoint, tmp_path):
    config = _convert(checkpoint, tmp_path / "params")
    check_like_mlc(config)
    assert (config["sliding_window_size"], config["attention_sink_size"]) == (-1, -1)
    assert config["conv_template"]["name"] == "vicuna_v1.1"  # the documented default
    missing = [key for key in GEN_CONFIG_WRITES if key not in config]
    assert missing == []
    assert config["active_vocab_size"] == config["vocab_size"] == 256


def test_model_config_reads_with_mlc_llm_from_dict(checkpoint, tmp_path):
    config = _convert(checkpoint, tmp_path / "params", max_batch_size=3)
    model_config = config["model_config"]
    assert "kwargs" not in model_config
    read = mlc_from_dict(model_config)
    assert (read.medusa_num_heads, read.medusa_num_layers, read.hidden_size, read.vocab_size,
            read.max_batch_size, read.kwargs) == (3, 1, 64, 256, 3, {})
    for name, kind, _ in MLC_MEDUSA_CONFIG_FIELDS:
        assert name == "kwargs" or _is(getattr(read, name), (kind,)), name


def test_the_from_dict_check_would_catch_a_kwargs_key():
    with pytest.raises(TypeError, match="kwargs"):
        mlc_from_dict({"medusa_num_heads": 1, "medusa_num_layers": 1, "hidden_size": 8,
                       "vocab_size": 8, "kwargs": {}})


@pytest.mark.parametrize("extra", [{"kwargs": {"kwargs": 1, "hidden_size": 9, "rope": 2}},
                                   {"kwargs": {}, "architectures": ["X"]}])
def test_no_model_config_ever_writes_a_kwargs_key(extra):
    """Whatever a config read from a file carried, writing it back gives MLC-LLM no "kwargs"
    key and keeps the fields' own values."""
    data = {"medusa_num_heads": 2, "medusa_num_layers": 1, "hidden_size": 8, "vocab_size": 16, **extra}
    config = MedusaConfig.from_dict(data)
    written = config.to_dict()
    assert "kwargs" not in written and written["hidden_size"] == 8
    assert mlc_from_dict(written).hidden_size == 8
    written = json.loads(PackedConfig(config, "q0f32").to_json())["model_config"]
    assert "kwargs" not in written


@pytest.mark.parametrize("name", sorted(conversation_templates()))
def test_every_shipped_template_is_a_conversation(name):
    template = conversation_templates()[name]
    check_conversation_like_mlc(template)
    assert template["name"] == name


def test_conv_template_by_name_and_from_a_file_through_the_cli(checkpoint, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(checkpoint), "-o", str(tmp_path / "a"),
                                 "--conv-template", "llama-3"])
    assert result.exit_code == 0, result.stderr
    config = json.loads((tmp_path / "a" / "mlc-chat-config.json").read_text())
    assert config["conv_template"] == conversation_templates()["llama-3"]
    check_like_mlc(config)
    # read back as it was written
    assert read_packed_config(tmp_path / "a").conv_template == conversation_templates()["llama-3"]

    own = {"name": "mine", "roles": {"user": "U", "assistant": "A"}, "seps": ["\n"]}
    (tmp_path / "mine.json").write_text(json.dumps(own))
    result = runner.invoke(app, ["convert", str(checkpoint), "-o", str(tmp_path / "b"),
                                 "--conv-template", str(tmp_path / "mine.json")])
    assert result.exit_code == 0, result.stderr
    config = json.loads((tmp_path / "b" / "mlc-chat-config.json").read_text())
    assert config["conv_template"] == own
    check_like_mlc(config)


@pytest.mark.parametrize("template,words", [
    ("vicuna", "unknown template"),
    ("missing.json", "no such file"),
    ('{"roles": {"user": "U"}}', "lacks \"seps\""),
    ('{"roles": {"user": "U"}, "seps": ["a", "b", "c"]}', "1 or 2 strings"),
    ('{"roles": ["U"], "seps": [""]}', "\"roles\""),
    ("[", "not a JSON conversation template"),
])
def test_a_bad_conv_template_is_one_error_and_writes_nothing(checkpoint, tmp_path, template, words):
    if template.startswith(("{", "[")):
        (tmp_path / "t.json").write_text(template)
        template = str(tmp_path / "t.json")
    elif template.endswith(".json"):
        template = str(tmp_path / template)
    result = CliRunner().invoke(app, ["convert", str(checkpoint), "-o", str(tmp_path / "out"),
                                      "--conv-template", template])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--conv-template" in errors[0] and words in errors[0]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_max_batch_size_is_one_value_from_convert_to_the_library(checkpoint, tmp_path):
    """--max-batch-size flows into model_config (what MLC-LLM's compile reads), the top-level
    copy, and the library compile builds; the library's metadata repeats it in both places."""
    params = tmp_path / "params"
    config = _convert(checkpoint, params, max_batch_size=5)
    assert config["max_batch_size"] == config["model_config"]["max_batch_size"] == 5
    library = compile_heads(CompileRequest(params, output=tmp_path / "heads.so")).output
    metadata = read_library_metadata(library)
    assert metadata.max_batch_size == 5
    written = metadata.to_json()
    assert written["max_batch_size"] == written["model_config"]["max_batch_size"] == 5
    assert mlc_from_dict(written["model_config"]).max_batch_size == 5

    # verify warns about a directory and a library of different batches (same numbers)
    other = tmp_path / "params-batch-3"
    _convert(checkpoint, other, max_batch_size=3)
    result = CliRunner().invoke(app, ["verify", str(library), str(other)])
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "says max_batch_size 3, the library was compiled for 5" in warnings[0]
    result = CliRunner().invoke(app, ["verify", str(library), str(params)])
    assert result.exit_code == 0 and "warning:" not in result.stderr
