"""Each layout's tensor names written out literally, independent of checkpoint.LAYOUTS.

The example writer and the converter share the layout table, so a wrong template would pass
their round trips. These names are spelled by hand from each project's published checkpoints;
every tensor is filled with a value that encodes (head, layer, role), so a mix-up of heads,
layers or weight/bias shows as a wrong value under an MLC name.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from medusa_cli.commands.convert import ConvertRequest, convert_checkpoint
from medusa_cli.packed.tensor_cache import load_array, read_tensor_cache

HIDDEN, VOCAB = 4, 6

# layout -> names for head h, layer l: (layer weight, layer bias, lm_head for 2 layers)
LITERAL = {
    "medusa1": lambda h, l: (f"{h}.{l}.linear.weight", f"{h}.{l}.linear.bias", f"{h}.2.weight"),
    "medusa2": lambda h, l: (f"medusa_head.{h}.{l}.linear.weight", f"medusa_head.{h}.{l}.linear.bias",
                             f"medusa_head.{h}.2.weight"),
    "trtllm": lambda h, l: (f"medusa_heads.{h}.medusa_layers.{l}.linear.weight",
                            f"medusa_heads.{h}.medusa_layers.{l}.linear.bias",
                            f"medusa_heads.{h}.lm_head.weight"),
    "vllm": lambda h, l: (f"blocks.{h}.layers.{l}.weight", f"blocks.{h}.layers.{l}.bias",
                          f"lm_heads.{h}.weight"),
}


def _value(h: int, l: int, role: int) -> float:
    return 100 * h + 10 * l + role + 1


@pytest.mark.parametrize("layout", sorted(LITERAL))
def test_literal_names_map_to_the_right_mlc_tensor(tmp_path, layout):
    tensors = {}
    for h in range(3):
        for l in range(2):
            weight, bias, lm_head = LITERAL[layout](h, l)
            tensors[weight] = np.full((HIDDEN, HIDDEN), _value(h, l, 0), np.float32)
            tensors[bias] = np.full((HIDDEN,), _value(h, l, 1), np.float32)
            tensors[lm_head] = np.full((VOCAB, HIDDEN), _value(h, 9, 2), np.float32)
    if layout == "medusa2":
        tensors["model.embed_tokens.weight"] = np.zeros((VOCAB, HIDDEN), np.float32)
        tensors["lm_head.weight"] = np.zeros((VOCAB, HIDDEN), np.float32)
    save_file(tensors, tmp_path / "heads.safetensors")

    result = convert_checkpoint(ConvertRequest(tmp_path / "heads.safetensors", tmp_path / "out"))
    assert result.layout == layout
    assert (result.config.medusa_num_heads, result.config.medusa_num_layers) == (3, 2)
    records = read_tensor_cache(result.output).by_name()
    for h in range(3):
        for l in range(2):
            weight = load_array(result.output, records[f"medusa_head.{h}.{l}.linear.weight"])
            bias = load_array(result.output, records[f"medusa_head.{h}.{l}.linear.bias"])
            assert np.all(weight == _value(h, l, 0)) and weight.shape == (HIDDEN, HIDDEN)
            assert np.all(bias == _value(h, l, 1))
        lm_head = load_array(result.output, records[f"medusa_head.{h}.2.weight"])
        assert np.all(lm_head == _value(h, 9, 2)) and lm_head.shape == (VOCAB, HIDDEN)


def test_vllm_names_with_the_medusa_heads_prefix(tmp_path):
    tensors = {}
    for h in range(2):
        tensors[f"medusa_heads.blocks.{h}.layers.0.weight"] = np.full((HIDDEN, HIDDEN), h + 1, np.float32)
        tensors[f"medusa_heads.lm_heads.{h}.weight"] = np.full((VOCAB, HIDDEN), 10 + h, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    result = convert_checkpoint(ConvertRequest(tmp_path / "model.safetensors", tmp_path / "out"))
    assert result.layout == "vllm"
    records = read_tensor_cache(result.output).by_name()
    assert np.all(load_array(result.output, records["medusa_head.1.0.linear.weight"]) == 2)
    assert np.all(load_array(result.output, records["medusa_head.1.1.weight"]) == 11)
    assert not load_array(result.output, records["medusa_head.1.0.linear.bias"]).any()


def test_vllm_original_lm_head_is_shared_by_every_head(tmp_path):
    import json

    tensors = {f"blocks.{h}.layers.0.weight": np.full((HIDDEN, HIDDEN), h, np.float32) for h in range(3)}
    tensors["lm_heads.0.weight"] = np.full((VOCAB, HIDDEN), 7, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 3, "original_lm_head": True}))
    result = convert_checkpoint(ConvertRequest(tmp_path, tmp_path / "out"))
    records = read_tensor_cache(result.output).by_name()
    for h in range(3):
        assert np.all(load_array(result.output, records[f"medusa_head.{h}.1.weight"]) == 7)


def test_vllm_token_map_is_refused(tmp_path):
    from medusa_cli.errors import CheckpointError

    tensors = {"blocks.0.layers.0.weight": np.zeros((HIDDEN, HIDDEN), np.float32),
               "lm_heads.0.weight": np.zeros((3, HIDDEN), np.float32),
               "token_map": np.arange(3, dtype=np.int64)}
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="token_map.*truncated draft vocabulary"):
        convert_checkpoint(ConvertRequest(tmp_path / "model.safetensors", tmp_path / "out"))
    assert not (tmp_path / "out").exists()
