"""The restricted unpickler is closed: a crafted data.pkl cannot change an allowed object, so it
cannot change how the next file in the same process is read; what torch.save writes still reads.

Pickles are written opcode by opcode (pickle's opcode constants), as an attacker would."""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from medusa_cli.checkpoint import pytorch
from medusa_cli.checkpoint.pytorch import (
    _ALLOWED_GLOBALS,
    TorchCheckpoint,
    _pickle_state_dict,
    _rebuild_tensor_v2,
    _StateDictUnpickler,
    save_torch_checkpoint,
)
from medusa_cli.errors import CheckpointError, UnsafePickleError

PROTO2 = pickle.PROTO + b"\x02"


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _str(text: str) -> bytes:
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _archive(path: Path, data_pkl: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", b"little")
        zf.writestr("archive/version", b"3\n")
    return path


def _good_file(path: Path) -> dict[str, np.ndarray]:
    tensors = {"0.0.linear.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
               "0.1.weight": np.arange(6, dtype=np.float16).reshape(2, 3)}
    save_torch_checkpoint(tensors, path)
    return tensors


def _read_all(path: Path) -> dict[str, np.ndarray]:
    with TorchCheckpoint(path) as ckpt:
        return {name: ckpt.get_tensor(name) for name in ckpt.keys()}


def _allow_list_snapshot() -> list:
    return [(key, repr(value), getattr(value, "__defaults__", None), getattr(value, "__dict__", None))
            for key, value in _ALLOWED_GLOBALS.items()]


# BUILD on the allow-list's FloatStorage record, its state a list of field values: on Python 3.11
# a frozen slotted dataclass has a __setstate__ that sets them. Its dtype becomes a string, so
# any later file with a FloatStorage would fail to read.
BUILD_ON_STORAGE_CLASS = (PROTO2 + _global("torch", "FloatStorage") + pickle.MARK
                          + _str("FloatStorage") + _str("garbage") + pickle.LIST + pickle.BUILD
                          + pickle.POP + pickle.EMPTY_DICT + pickle.STOP)
# BUILD with a slot state on an allowed function: setattr(function, "__defaults__", ...)
BUILD_ON_FUNCTION = (PROTO2 + _global("torch._utils", "_rebuild_tensor_v2") + pickle.NONE
                     + pickle.EMPTY_DICT + _str("__defaults__") + pickle.MARK
                     + pickle.BININT1 + b"\x07" + pickle.TUPLE + pickle.SETITEM + pickle.TUPLE2
                     + pickle.BUILD + pickle.POP + pickle.EMPTY_DICT + pickle.STOP)
# SETITEM into the OrderedDict class itself, APPEND onto a tuple made by torch.Size
SETITEM_ON_A_CLASS = (PROTO2 + _global("collections", "OrderedDict") + _str("a")
                      + pickle.BININT1 + b"\x01" + pickle.SETITEM + pickle.STOP)
APPENDS_ON_A_TUPLE = (PROTO2 + _global("torch", "Size") + pickle.MARK + pickle.EMPTY_LIST
                      + pickle.TUPLE + pickle.REDUCE + pickle.MARK + pickle.BININT1 + b"\x01"
                      + pickle.APPENDS + pickle.STOP)
NEWOBJ_OF_AN_ALLOWED_CLASS = (PROTO2 + _global("collections", "OrderedDict")
                              + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.STOP)


@pytest.mark.parametrize("data_pkl,opcode", [
    (BUILD_ON_STORAGE_CLASS, "BUILD on a _StorageType"),
    (BUILD_ON_FUNCTION, "BUILD on a function"),
    (SETITEM_ON_A_CLASS, "SETITEM on a type"),
    (APPENDS_ON_A_TUPLE, "APPENDS on a tuple"),
    (NEWOBJ_OF_AN_ALLOWED_CLASS, "the NEWOBJ opcode"),
], ids=["build-storage", "build-function", "setitem-class", "appends-tuple", "newobj"])
def test_a_crafted_shard_cannot_change_how_the_next_file_is_read(tmp_path, data_pkl, opcode):
    good = tmp_path / "good.pt"
    expected = _good_file(good)
    before = _allow_list_snapshot()
    evil = _archive(tmp_path / "evil.pt", data_pkl)
    with pytest.raises(CheckpointError) as refused:
        TorchCheckpoint(evil)
    got = _read_all(good)  # the next file in the process reads as it did before
    assert list(got) == list(expected)
    for name, array in expected.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array)
    assert _allow_list_snapshot() == before
    assert _rebuild_tensor_v2.__defaults__ == (None,)
    # and the crafted file was refused for what it tried
    assert isinstance(refused.value, UnsafePickleError), refused.value
    assert f"uses {opcode}" in str(refused.value)
    assert str(evil) in str(refused.value) and "nothing in it was run" in str(refused.value)


def test_find_class_never_hands_out_a_shared_record(tmp_path):
    unpickler = _StateDictUnpickler(PROTO2 + pickle.EMPTY_DICT + pickle.STOP, tmp_path / "x.pt")
    first, second = (unpickler.find_class("torch", "FloatStorage") for _ in range(2))
    assert first == second == _ALLOWED_GLOBALS[("torch", "FloatStorage")]
    assert first is not second and first is not _ALLOWED_GLOBALS[("torch", "FloatStorage")]
    assert unpickler.find_class("torch", "bfloat16") is not _ALLOWED_GLOBALS[("torch", "bfloat16")]


def test_the_state_dict_metadata_torch_save_builds_still_reads(tmp_path):
    """torch.save pickles the state dict's OrderedDict with its `_metadata` attribute as BUILD
    state after the items: ..., SETITEMS, {'_metadata': OrderedDict(...)}, BUILD."""
    tensors = {"0.0.linear.weight": np.ones((2, 2), np.float32)}
    path = tmp_path / "with_metadata.pt"
    save_torch_checkpoint(tensors, path)
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    plain = members["archive/data.pkl"]
    assert plain.endswith(pickle.STOP)
    metadata = (pickle.EMPTY_DICT + _str("_metadata") + _global("collections", "OrderedDict")
                + pickle.EMPTY_TUPLE + pickle.REDUCE + _str("") + pickle.EMPTY_DICT
                + _str("version") + pickle.BININT1 + b"\x01" + pickle.SETITEM + pickle.SETITEM
                + pickle.SETITEM + pickle.BUILD)
    members["archive/data.pkl"] = plain[:-1] + metadata + pickle.STOP
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    assert np.array_equal(_read_all(path)["0.0.linear.weight"], tensors["0.0.linear.weight"])


def test_build_state_must_be_a_dict_of_names(tmp_path):
    """BUILD on the unpickling's own OrderedDict is allowed with a dict state only."""
    data_pkl = (PROTO2 + _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE
                + pickle.REDUCE + pickle.NONE + pickle.EMPTY_DICT + pickle.TUPLE2 + pickle.BUILD
                + pickle.STOP)
    with pytest.raises(UnsafePickleError, match="uses BUILD with a tuple as state"):
        TorchCheckpoint(_archive(tmp_path / "slots.pt", data_pkl))


def test_containers_the_pickle_made_may_be_filled(tmp_path):
    """Nested dicts and lists (a training checkpoint's extras) are the pickle's own: filled."""
    data_pkl = bytearray(_pickle_state_dict([]))[:-1]  # an empty OrderedDict, then more items
    data_pkl += (_str("epochs") + pickle.EMPTY_LIST + pickle.MARK + pickle.BININT1 + b"\x01"
                 + pickle.BININT1 + b"\x02" + pickle.APPENDS + pickle.SETITEM)
    data_pkl += _str("state_dict") + pickle.EMPTY_DICT + pickle.SETITEM + pickle.STOP
    path = _archive(tmp_path / "extras.pt", bytes(data_pkl))
    with pytest.raises(CheckpointError, match="holds no tensors"):
        TorchCheckpoint(path)  # read through; it just has no tensors


def test_the_opcode_cap_refuses_a_pickle_that_runs_too_long(tmp_path, monkeypatch):
    path = tmp_path / "many.pt"
    save_torch_checkpoint({f"t{i}": np.zeros(1, np.float32) for i in range(10)}, path)
    assert len(_read_all(path)) == 10
    monkeypatch.setattr(pytorch, "_MAX_PICKLE_OPCODES", 100)
    with pytest.raises(CheckpointError, match="more than 100 pickle opcodes"):
        TorchCheckpoint(path)


def test_collections_ordered_dict_is_still_the_allowed_class():
    assert _ALLOWED_GLOBALS[("collections", "OrderedDict")] is collections.OrderedDict
