"""torch.save checkpoints read and written without torch; cross-checked with torch if installed."""

from __future__ import annotations

import os
import pickle
import shlex
import struct
import subprocess
import tarfile
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from medusa_cli.errors import CheckpointError, UnsafePickleError
from medusa_cli.checkpoint.pytorch import (
    TorchCheckpoint,
    _ArchiveWriter,
    _emit_int,
    _emit_str,
    _StorageRef,
    _TensorRecord,
    save_torch_checkpoint,
)

BF16 = np.dtype(ml_dtypes.bfloat16)


def _sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "0.0.linear.weight": rng.standard_normal((5, 3)).astype(np.float32),
        "0.0.linear.bias": rng.standard_normal(5).astype(np.float16),
        "1.0.linear.weight": rng.standard_normal((2, 4)).astype(BF16),
        "steps": np.array([3, -7, 2**40], dtype=np.int64),
        "mask": np.array([[True, False]]),
        "scale": np.array(0.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float16),
    }


def _bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _rewrite(path: Path, replace: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> None:
    """Copy the archive at ``path`` onto itself with some members' contents replaced."""
    with zipfile.ZipFile(path) as src:
        members = {name: src.read(name) for name in src.namelist()}
    members.update(replace)
    with zipfile.ZipFile(path, "w", compression=compression) as dst:
        for name, data in members.items():
            dst.writestr(name, data)


def _write_records(
    path: Path, storage: np.ndarray, records: list[tuple[str, int, tuple, tuple]]
) -> None:
    """One storage holding ``storage``, viewed by tensors given as (name, offset, shape, stride)."""
    with open(path, "wb") as file, _ArchiveWriter(file) as writer:
        ref = writer.add_storage(storage)
        writer.finish(
            (name, _TensorRecord(ref, ref.dtype, offset, shape, stride))
            for name, offset, shape, stride in records
        )


class _Call:
    """Pickles as a call of ``func(*args)``: what a malicious checkpoint smuggles in."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _archive_with_pickle(path: Path, data_pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", b"little")
        zf.writestr("archive/version", b"3\n")


# --- round trips without torch ------------------------------------------------------------


def test_round_trip_keeps_order_shapes_dtypes_and_bits(tmp_path):
    tensors = _sample_tensors()
    path = tmp_path / "medusa_lm_head.pt"
    save_torch_checkpoint(tensors, path)
    with TorchCheckpoint(path) as ckpt:
        assert ckpt.keys() == list(tensors)
        for name, expected in tensors.items():
            assert ckpt.shape(name) == expected.shape
            assert ckpt.dtype(name) == expected.dtype
            got = ckpt.get_tensor(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert got.flags.c_contiguous and got.flags.writeable
            np.testing.assert_array_equal(_bits(got), _bits(expected))
    assert ckpt.shape("1.0.linear.weight") == (2, 4)
    assert ckpt.dtype("1.0.linear.weight") == BF16


def test_writer_takes_a_generator_and_normalises_layout(tmp_path):
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    big_endian = np.array([1.5, -2.25], dtype=">f8")

    def stream():
        yield "transposed", base.T  # non-contiguous input is written contiguously
        yield "big_endian", big_endian

    path = tmp_path / "gen.pt"
    save_torch_checkpoint(stream(), path)
    with TorchCheckpoint(path) as ckpt:
        assert ckpt.keys() == ["transposed", "big_endian"]
        np.testing.assert_array_equal(ckpt.get_tensor("transposed"), base.T)
        assert ckpt.dtype("big_endian") == np.dtype("<f8")
        np.testing.assert_array_equal(ckpt.get_tensor("big_endian"), [1.5, -2.25])


def test_archive_layout_is_torchs(tmp_path):
    path = tmp_path / "a.pt"
    save_torch_checkpoint(_sample_tensors(), path)
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == [f"archive/data/{i}" for i in range(7)] + [
            "archive/data.pkl",
            "archive/byteorder",
            "archive/version",
        ]
        assert zf.read("archive/byteorder") == b"little"
        assert zf.read("archive/version") == b"3\n"
        assert len(zf.read("archive/data/0")) == 5 * 3 * 4
        for info in infos:
            assert info.compress_type == zipfile.ZIP_STORED
            _, name_len, extra_len = struct.unpack_from("<4s22xHH", raw, info.header_offset)
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
    # a fixed timestamp: the same tensors give the same bytes
    again = tmp_path / "b.pt"
    save_torch_checkpoint(_sample_tensors(), again)
    assert again.read_bytes() == raw


def test_shared_storage_with_offsets_and_strides(tmp_path):
    base = np.arange(24, dtype=np.float32)
    path = tmp_path / "shared.pt"
    _write_records(
        path,
        base,
        [
            ("whole", 0, (24,), (1,)),
            ("tail", 10, (2, 3), (3, 1)),
            ("transposed", 0, (6, 4), (1, 6)),
            ("column", 2, (4,), (6,)),
            ("broadcast", 5, (3, 2), (0, 1)),
        ],
    )
    grid = base.reshape(4, 6)
    with TorchCheckpoint(path) as ckpt:
        np.testing.assert_array_equal(ckpt.get_tensor("whole"), base)
        np.testing.assert_array_equal(ckpt.get_tensor("tail"), [[10, 11, 12], [13, 14, 15]])
        transposed = ckpt.get_tensor("transposed")
        np.testing.assert_array_equal(transposed, grid.T)
        assert transposed.flags.c_contiguous and transposed.strides == (16, 4)
        np.testing.assert_array_equal(ckpt.get_tensor("column"), [2, 8, 14, 20])
        np.testing.assert_array_equal(ckpt.get_tensor("broadcast"), [[5, 6], [5, 6], [5, 6]])


def test_bfloat16_view_with_stride_is_bit_exact(tmp_path):
    base = np.array([1.0, -2.5, 3.25, 1e-3, 65504.0, -0.0], dtype=BF16)
    path = tmp_path / "bf16.pt"
    _write_records(path, base, [("pairs_t", 0, (2, 3), (1, 2))])
    with TorchCheckpoint(path) as ckpt:
        got = ckpt.get_tensor("pairs_t")
    assert got.dtype == BF16
    np.testing.assert_array_equal(_bits(got), _bits(base.reshape(3, 2).T))


def test_tensors_are_read_on_get_tensor_not_on_open(tmp_path):
    path = tmp_path / "lazy.pt"
    twos = np.full(4, 2.0, np.float32)
    save_torch_checkpoint({"a": np.full(4, 1.0, np.float32), "b": twos}, path)
    raw = bytearray(path.read_bytes())
    with TorchCheckpoint(path) as ckpt:
        # overwrite b's bytes in place after the metadata was read
        start = raw.index(twos.tobytes())
        raw[start : start + 16] = np.full(4, 9.0, np.float32).tobytes()
        path.write_bytes(raw)
        np.testing.assert_array_equal(ckpt.get_tensor("a"), [1, 1, 1, 1])
        np.testing.assert_array_equal(ckpt.get_tensor("b"), [9, 9, 9, 9])


def test_compressed_members_are_read(tmp_path):
    base = np.arange(12, dtype=np.float16)
    path = tmp_path / "deflated.pt"
    _write_records(path, base, [("all", 0, (12,), (1,)), ("view", 1, (3, 2), (4, 1))])
    _rewrite(path, {}, compression=zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo("archive/data/0").compress_type == zipfile.ZIP_DEFLATED
    with TorchCheckpoint(path) as ckpt:
        np.testing.assert_array_equal(ckpt.get_tensor("all"), base)
        np.testing.assert_array_equal(ckpt.get_tensor("view"), [[1, 2], [5, 6], [9, 10]])


# 'state_dict' is a known wrapper key; 'ema' is found as the only nested dict of tensors
@pytest.mark.parametrize("wrapper", ["state_dict", "ema"])
def test_state_dict_nested_under_a_key_is_unwrapped(tmp_path, wrapper):
    path = tmp_path / "lightning.ckpt"
    save_torch_checkpoint({"w": np.ones(2, np.float32), "b": np.array([3.0], np.float32)}, path)
    with zipfile.ZipFile(path) as zf:
        inner = zf.read("archive/data.pkl")
    # {'epoch': 3, 'name': 'run', wrapper: <the OrderedDict of tensors>}
    outer = bytearray(pickle.PROTO + b"\x02" + pickle.EMPTY_DICT)
    _emit_str(outer, "epoch")
    _emit_int(outer, 3)
    outer += pickle.SETITEM
    _emit_str(outer, "name")
    _emit_str(outer, "run")
    outer += pickle.SETITEM
    _emit_str(outer, wrapper)
    outer += inner[2:-1] + pickle.SETITEM + pickle.STOP  # inner without PROTO and STOP
    _rewrite(path, {"archive/data.pkl": bytes(outer)})
    with TorchCheckpoint(path) as ckpt:
        assert ckpt.keys() == ["w", "b"]
        np.testing.assert_array_equal(ckpt.get_tensor("b"), [3.0])


def test_pickle_without_tensors_names_what_it_found(tmp_path):
    path = tmp_path / "config.pt"
    _archive_with_pickle(path, pickle.dumps({"epoch": 3, "args": {"lr": 0.1}}, protocol=2))
    expected = r"holds no tensors at its top level or under 'state_dict'"
    with pytest.raises(CheckpointError, match=expected) as err:
        TorchCheckpoint(path)
    assert str(path) in str(err.value) and "nested dicts with tensors: none" in str(err.value)

    _archive_with_pickle(path, pickle.dumps([1, 2], protocol=2))
    with pytest.raises(CheckpointError, match=r"holds a pickled list, not a state dict"):
        TorchCheckpoint(path)


@pytest.mark.parametrize(
    "value", [0, 7, 255, 256, -1, 2**31 - 1, -(2**31), 2**31, 2**40 + 3, -(2**63)]
)
def test_emitted_ints_unpickle_to_themselves(value):
    out = bytearray(pickle.PROTO + b"\x02")
    _emit_int(out, value)
    assert pickle.loads(bytes(out) + pickle.STOP) == value


# --- refusals -----------------------------------------------------------------------------


def test_os_system_is_refused_and_never_runs(tmp_path):
    # The payload is live: plain pickle.loads runs it and creates its marker.
    live_marker = tmp_path / "live"
    live = _Call(os.system, f"touch {shlex.quote(str(live_marker))}")
    pickle.loads(pickle.dumps(live, protocol=2))
    assert live_marker.exists()

    marker = tmp_path / "pwned"
    payload = {"0.0.linear.weight": _Call(os.system, f"touch {shlex.quote(str(marker))}")}
    path = tmp_path / "evil.pt"
    _archive_with_pickle(path, pickle.dumps(payload, protocol=2))
    with pytest.raises(UnsafePickleError) as err:
        TorchCheckpoint(path)
    message = str(err.value)
    assert f"'{os.system.__module__}.system'" in message  # 'posix.system' on Linux
    assert str(path) in message and "nothing in it was run" in message
    assert "convert it to safetensors" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    ("data_pkl", "refused"),
    [
        (pickle.dumps(_Call(eval, "1 + 1"), protocol=4), "builtins.eval"),
        (pickle.dumps(_Call(subprocess.Popen, ["true"]), protocol=4), "subprocess.Popen"),
        # torch.save(model) instead of torch.save(model.state_dict())
        (b"\x80\x02ctorch.nn.modules.linear\nLinear\n)\x81.", "torch.nn.modules.linear.Linear"),
    ],
    ids=["eval", "popen", "whole-module"],
)
def test_other_globals_are_refused(tmp_path, data_pkl, refused):
    path = tmp_path / "evil.bin"
    _archive_with_pickle(path, data_pkl)
    with pytest.raises(UnsafePickleError, match=f"asks for '{refused}'"):
        TorchCheckpoint(path)


def test_legacy_formats_say_how_to_convert(tmp_path):
    stream = tmp_path / "legacy_stream.pt"
    # torch < 1.6 wrote a magic number, a protocol version, then more pickles
    stream.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001))
    legacy_tar = tmp_path / "legacy_tar.pt"
    (tmp_path / "storages").write_bytes(b"\x00" * 16)
    with tarfile.open(legacy_tar, "w") as tar:
        tar.add(tmp_path / "storages", arcname="storages")
    for path in (stream, legacy_tar):
        with pytest.raises(CheckpointError) as err:
            TorchCheckpoint(path)
        assert str(err.value) == (
            f"{path} is in PyTorch's legacy (pre-1.6) pickle/tar format, which medusa-cli does "
            "not read; re-save it with a recent torch (torch.save(torch.load(path), path)) or "
            "convert it to safetensors"
        )


def test_truncated_empty_missing_and_foreign_files(tmp_path):
    path = tmp_path / "cut.pt"
    save_torch_checkpoint(_sample_tensors(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="is a truncated or corrupt zip archive") as err:
        TorchCheckpoint(path)
    assert str(path) in str(err.value)

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt is empty"):
        TorchCheckpoint(empty)

    with pytest.raises(CheckpointError, match=r"cannot open checkpoint .*nope\.pt: No such file"):
        TorchCheckpoint(tmp_path / "nope.pt")

    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.pt is not a PyTorch checkpoint"):
        TorchCheckpoint(text)

    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("readme.txt", "hi")
    expected = r"expected one <prefix>/data.pkl, found 0 among \['readme.txt'\]"
    with pytest.raises(CheckpointError, match=expected):
        TorchCheckpoint(other_zip)


def test_big_endian_checkpoint_is_refused(tmp_path):
    path = tmp_path / "s390x.pt"
    save_torch_checkpoint({"w": np.ones(2, np.float32)}, path)
    _rewrite(path, {"archive/byteorder": b"big"})
    with pytest.raises(CheckpointError) as err:
        TorchCheckpoint(path)
    assert str(err.value).startswith(f"{path} was saved on a big-endian machine (byteorder 'big')")
    assert "re-save it with torch on a little-endian" in str(err.value)


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    _archive_with_pickle(path, pickle.dumps({}, protocol=2))
    _rewrite(path, {"archive/constants.pkl": pickle.dumps((), protocol=2)})
    with pytest.raises(CheckpointError, match=r"is a TorchScript archive \(torch.jit.save\)"):
        TorchCheckpoint(path)


def test_tensor_past_its_storage_is_refused_at_open(tmp_path):
    path = tmp_path / "oob.pt"
    _write_records(path, np.zeros(4, np.float32), [("ok", 0, (4,), (1,)), ("w", 2, (3,), (1,))])
    with pytest.raises(CheckpointError) as err:
        TorchCheckpoint(path)
    assert str(err.value) == (
        f"tensor 'w' in {path} (shape (3,), stride (1,), offset 2) reaches byte 20 of a "
        "16-byte storage; the file is corrupt"
    )


def test_storage_smaller_than_declared_or_missing_is_refused(tmp_path):
    path = tmp_path / "short.pt"
    with open(path, "wb") as file, _ArchiveWriter(file) as writer:
        ref = writer.add_storage(np.zeros(4, np.float32))
        claimed = _StorageRef(ref.key, ref.dtype, 8)
        writer.finish([("w", _TensorRecord(claimed, ref.dtype, 0, (8,), (1,)))])
    expected = r"archive/data/0 in .* holds 16 bytes, but tensor 'w' declares 32"
    with pytest.raises(CheckpointError, match=expected):
        TorchCheckpoint(path)

    with zipfile.ZipFile(path) as zf:
        data_pkl = zf.read("archive/data.pkl")
    _archive_with_pickle(path, data_pkl)  # same pickle, storage member gone
    expected = r"tensor 'w' in .* uses storage archive/data/0, which the archive lacks"
    with pytest.raises(CheckpointError, match=expected):
        TorchCheckpoint(path)


def test_corrupt_pickle_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "garbled.pt"
    save_torch_checkpoint({"w": np.ones(2, np.float32)}, path)
    with zipfile.ZipFile(path) as zf:
        data_pkl = zf.read("archive/data.pkl")
    _rewrite(path, {"archive/data.pkl": data_pkl[: len(data_pkl) // 2]})
    expected = r"cannot unpickle data.pkl in .*garbled\.pt: it is corrupt"
    with pytest.raises(CheckpointError, match=expected):
        TorchCheckpoint(path)


def test_unknown_name_and_closed_file(tmp_path):
    path = tmp_path / "a.pt"
    save_torch_checkpoint({"w": np.ones(2, np.float32)}, path)
    ckpt = TorchCheckpoint(path)
    expected = r"no tensor 'v' in .*a\.pt; it holds 1 tensors, e.g. \['w'\]"
    with pytest.raises(CheckpointError, match=expected):
        ckpt.get_tensor("v")
    ckpt.close()
    with pytest.raises(CheckpointError, match=r"cannot read tensor 'w': .*a\.pt was closed"):
        ckpt.get_tensor("w")


def test_writer_refuses_bad_input_and_leaves_nothing(tmp_path):
    path = tmp_path / "out.pt"
    expected = r"tensor 'names' has dtype <U3, which .* do not support"
    with pytest.raises(CheckpointError, match=expected):
        save_torch_checkpoint({"w": np.ones(2, np.float32), "names": np.array(["abc"])}, path)
    with pytest.raises(CheckpointError, match=r"tensor 'w' appears twice"):
        save_torch_checkpoint([("w", np.ones(2)), ("w", np.zeros(2))], path)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(CheckpointError, match=r"cannot write .*a-file/out\.pt"):
        save_torch_checkpoint({"w": np.ones(2)}, tmp_path / "a-file" / "out.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


# --- cross-checks against real torch (skipped where torch is not installed) ---------------


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def _torch_bits(torch, tensor) -> np.ndarray:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def test_reads_what_torch_saves(tmp_path, torch):
    gen = torch.Generator().manual_seed(0)
    grid = torch.randn(4, 6, generator=gen)
    state = {
        "0.0.linear.weight": torch.randn(5, 3, generator=gen).to(torch.bfloat16),
        "0.0.linear.bias": torch.randn(5, generator=gen).half(),
        "grid_t": grid.t(),  # non-contiguous
        "grid_row": grid[2],  # shares grid's storage at an offset
        "grid_col": grid[:, 1],
        "fp8": torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),  # _rebuild_tensor_v3
        "u16": torch.tensor([1, 65535], dtype=torch.uint16),
        "param": torch.nn.Parameter(torch.ones(2)),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
    }
    path = tmp_path / "torch_saved.pt"
    torch.save(state, path)
    with TorchCheckpoint(path) as ckpt:
        assert ckpt.keys() == list(state)
        assert ckpt.dtype("fp8") == np.dtype(ml_dtypes.float8_e4m3fn)
        assert ckpt.dtype("0.0.linear.weight") == BF16
        for name, tensor in state.items():
            got = ckpt.get_tensor(name)
            assert got.shape == tuple(tensor.shape), name
            np.testing.assert_array_equal(_bits(got), _torch_bits(torch, tensor.detach()))
        np.testing.assert_array_equal(ckpt.get_tensor("fp8").astype(np.float32), [0.5, -2.0, 448.0])

    wrapped = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {"w": grid}, "optimizer": {"lr": 0.1}}, wrapped)
    with TorchCheckpoint(wrapped) as ckpt:
        assert ckpt.keys() == ["w"]
        np.testing.assert_array_equal(ckpt.get_tensor("w"), grid.numpy())


def test_torch_loads_what_we_write(tmp_path, torch):
    tensors = _sample_tensors()
    path = tmp_path / "ours.pt"
    save_torch_checkpoint(tensors, path)
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert list(loaded) == list(tensors)
        for name, expected in tensors.items():
            assert tuple(loaded[name].shape) == expected.shape
            np.testing.assert_array_equal(_torch_bits(torch, loaded[name]), _bits(expected))
    assert loaded["1.0.linear.weight"].dtype == torch.bfloat16


def test_torch_agrees_on_shared_strided_storage(tmp_path, torch):
    path = tmp_path / "shared.pt"
    views = [("tail", 10, (2, 3), (3, 1)), ("t", 0, (6, 4), (1, 6))]
    _write_records(path, np.arange(24, dtype=np.float32), views)
    loaded = torch.load(path, weights_only=True)
    assert loaded["t"].stride() == (1, 6)
    assert loaded["tail"].untyped_storage().data_ptr() == loaded["t"].untyped_storage().data_ptr()
    with TorchCheckpoint(path) as ckpt:
        for name in ("tail", "t"):
            np.testing.assert_array_equal(ckpt.get_tensor(name), loaded[name].numpy())
