"""medusa convert as a library: every layout, format and dtype, and every bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tvm
from safetensors.numpy import save_file
from tvm.contrib import tvmjs

from medusa_cli import quantization as quant
from medusa_cli.checkpoint import files as ckpt_mod
from medusa_cli.commands.convert import ConvertRequest, convert_checkpoint
from medusa_cli.errors import CheckpointError, InputError, MedusaError
from medusa_cli.packed.config import CONFIG_FILE, read_packed_config
from medusa_cli.packed.tensor_cache import load_array, read_tensor_cache

from .conftest import check_packed_dir, leftovers, reference_tensors, same_bits

LAYOUTS = ["medusa1", "medusa2", "trtllm", "vllm", "mlc"]


def _tvm_arrays(out: Path) -> dict[str, np.ndarray]:
    loaded = tvmjs.load_tensor_cache(str(out), tvm.cpu())
    params = loaded[0] if isinstance(loaded, tuple) else loaded
    return {name: arr.numpy() for name, arr in params.items()}


def _convert(src: Path, out: Path, **kwargs):
    return convert_checkpoint(ConvertRequest(source=src, output=out, **kwargs))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_every_layout_and_dtype_round_trips_through_tvmjs(make_example, tmp_path, layout, dtype, tiny_config):
    example = make_example(layout=layout, dtype=dtype, file_format="safetensors")
    result = _convert(example.output, tmp_path / "params")

    assert result.layout == layout
    assert result.quantization == quant.PLAIN_SCHEME_FOR_DTYPE[dtype]
    assert (result.config.medusa_num_heads, result.config.medusa_num_layers) == (3, 1)
    assert (result.config.hidden_size, result.config.vocab_size) == (64, 256)
    expected = reference_tensors(tiny_config, dtype)
    loaded = _tvm_arrays(result.output)
    assert set(loaded) == set(expected)
    for name, ref in expected.items():
        assert same_bits(loaded[name], ref), name
    check_packed_dir(result.output)


@pytest.mark.parametrize("layout", ["medusa1", "medusa2", "vllm"])
def test_pytorch_files_single_and_sharded(make_example, tmp_path, layout, tiny_config):
    pytest.importorskip("medusa_cli.checkpoint.pytorch")
    for shards in (1, 2):
        example = make_example(layout=layout, dtype="float16", file_format="pt", shards=shards)
        result = _convert(example.output, tmp_path / f"params{shards}")
        expected = reference_tensors(tiny_config, "float16")
        loaded = _tvm_arrays(result.output)
        assert all(same_bits(loaded[n], expected[n]) for n in expected)
        assert len(result.source_files) == shards


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_safetensors_with_index(make_example, tmp_path, layout, tiny_config):
    example = make_example(layout=layout, shards=3, file_format="safetensors")
    index = next(example.output.glob("*.index.json"))
    for src in (example.output, index):
        out = tmp_path / f"params-{src.is_dir()}"
        result = _convert(src, out)
        assert len(result.source_files) == 3
        loaded = _tvm_arrays(out)
        assert all(same_bits(loaded[n], v) for n, v in reference_tensors(tiny_config).items())


def test_single_file_source(make_example, tmp_path):
    example = make_example(layout="trtllm", file_format="safetensors")
    result = _convert(example.output / "model.safetensors", tmp_path / "p")
    assert result.layout == "trtllm" and result.config.medusa_num_heads == 3


def test_medusa2_base_tensors_are_never_read(make_example, tmp_path, monkeypatch):
    example = make_example(layout="medusa2")
    read = []
    original = ckpt_mod.Checkpoint.read
    monkeypatch.setattr(ckpt_mod.Checkpoint, "read", lambda self, name: read.append(name) or original(self, name))
    result = _convert(example.output, tmp_path / "p")
    assert result.ignored_tensors == 3
    assert read and all(name.startswith("medusa_head.") for name in read)


def test_heads_without_bias_get_zero_bias(make_example, tmp_path, tiny_config):
    example = make_example(layout="vllm", bias=False)
    loaded = _tvm_arrays(_convert(example.output, tmp_path / "p").output)
    for h in range(3):
        bias = loaded[f"medusa_head.{h}.0.linear.bias"]
        assert bias.shape == (64,) and not bias.any()
    ref = reference_tensors(tiny_config, bias=False)
    assert all(same_bits(loaded[n], v) for n, v in ref.items())


def test_medusa2_heads_reuse_base_lm_head_in_the_same_file(tmp_path, make_example):
    from medusa_cli.checkpoint.synthetic import base_lm_head, preset_config

    example = make_example(layout="medusa2", head_lm_head=False)
    loaded = _tvm_arrays(_convert(example.output, tmp_path / "p").output)
    base = base_lm_head(preset_config("tiny")[0], "float32", 0)
    for h in range(3):
        assert same_bits(loaded[f"medusa_head.{h}.1.weight"], base)


def test_lm_head_flag_supplies_a_missing_vocab_projection(tmp_path, make_example):
    from medusa_cli.checkpoint.synthetic import base_lm_head, preset_config

    example = make_example(layout="vllm", head_lm_head=False)
    out = tmp_path / "p"
    with pytest.raises(CheckpointError, match="--lm-head") as info:
        _convert(example.output, out)
    assert "head 0 has no vocab projection ('lm_heads.0.weight')" in str(info.value)
    assert not out.exists() and leftovers(tmp_path) == []

    lm_file = example.output / "base" / "lm_head.safetensors"
    result = _convert(example.output, out, lm_head=lm_file)
    loaded = _tvm_arrays(result.output)
    base = base_lm_head(preset_config("tiny")[0], "float32", 0)
    assert all(same_bits(loaded[f"medusa_head.{h}.1.weight"], base) for h in range(3))
    assert str(lm_file.resolve()) in read_packed_config(out).source["files"]


def test_config_that_disagrees_warns_and_follows_tensors(make_example, tmp_path):
    example = make_example(layout="medusa1", file_format="safetensors", config_num_heads=2)
    result = _convert(example.output, tmp_path / "p")
    assert result.config.medusa_num_heads == 3
    assert len(result.warnings) == 1
    assert "medusa_num_heads is 2 but the tensors say 3" in result.warnings[0]
    assert "config.json" in result.warnings[0]


@pytest.mark.parametrize(
    "key_heads,key_layers",
    [("medusa_num_heads", "medusa_num_layers"), ("num_medusa_heads", "num_medusa_layers"),
     ("num_heads", "num_hidden_layers")],
)
def test_config_spellings(tmp_path, key_heads, key_layers):
    (tmp_path / "config.json").write_text(json.dumps({key_heads: 4, key_layers: 2, "hidden_size": 8}))
    _, hints = ckpt_mod.read_config_hints(tmp_path)
    assert hints == {"medusa_num_heads": 4, "medusa_num_layers": 2, "hidden_size": 8}


def test_num_heads_keeps_the_first_heads(make_example, tmp_path, tiny_config):
    example = make_example(layout="trtllm")
    result = _convert(example.output, tmp_path / "p", num_heads=2)
    loaded = _tvm_arrays(result.output)
    assert result.config.medusa_num_heads == 2
    assert sorted({n.split(".")[1] for n in loaded}) == ["0", "1"]
    ref = reference_tensors(tiny_config)
    assert all(same_bits(loaded[n], ref[n]) for n in loaded)


def test_dtype_cast_and_quantization(make_example, tmp_path, tiny_config):
    example = make_example(layout="medusa1", file_format="safetensors")
    loaded = _tvm_arrays(_convert(example.output, tmp_path / "f16", dtype="float16").output)
    ref = reference_tensors(tiny_config)
    name = "medusa_head.1.0.linear.weight"
    assert loaded[name].dtype == np.float16
    np.testing.assert_array_equal(loaded[name], ref[name].astype(np.float16))

    result = _convert(example.output, tmp_path / "q4", quantization="q4f16_1")
    assert result.quantization == "q4f16_1"
    loaded = _tvm_arrays(result.output)
    scheme = quant.SCHEMES["q4f16_1"]
    q_weight, q_scale = quant.quantize_weight(ref["medusa_head.2.1.weight"], scheme)
    np.testing.assert_array_equal(loaded["medusa_head.2.1.q_weight"], q_weight)
    np.testing.assert_array_equal(loaded["medusa_head.2.1.q_scale"], q_scale)
    assert loaded["medusa_head.2.0.linear.bias"].dtype == np.float16
    assert read_packed_config(result.output).quantization == "q4f16_1"


def test_output_is_deterministic(make_example, tmp_path):
    example = make_example(layout="medusa2", shards=2)
    a = _convert(example.output, tmp_path / "a").output
    b = _convert(example.output, tmp_path / "b").output
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_packed_config_records_provenance(make_example, tmp_path):
    example = make_example(layout="medusa1", file_format="safetensors")
    out = _convert(example.output, tmp_path / "p").output
    data = json.loads((out / CONFIG_FILE).read_text())
    assert data["model_type"] == "medusa"
    assert data["model_config"]["medusa_num_heads"] == 3
    assert data["model_config"]["max_batch_size"] == data["max_batch_size"] == 8
    assert data["model_config"]["tensor_parallel_shards"] == 1
    source = data["medusa_cli"]["source"]
    assert source["layout"] == "medusa1"
    import hashlib

    weights = example.output / "medusa_lm_head.safetensors"
    assert source["files"][str(weights.resolve())]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    meta = json.loads((out / "tensor-cache.json").read_text())["metadata"]
    assert meta["ParamSize"] == 9
    assert meta["BitsPerParam"] == pytest.approx(32.0)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error, nothing written


def _assert_refused(tmp_path: Path, src: Path, match: str, exc=MedusaError, **kwargs) -> str:
    out = tmp_path / "out"
    with pytest.raises(exc, match=match) as info:
        _convert(src, out, **kwargs)
    assert not out.exists()
    assert leftovers(tmp_path) == []
    return str(info.value)


def test_missing_source(tmp_path):
    message = _assert_refused(tmp_path, tmp_path / "nope", "no such file or directory")
    assert str(tmp_path / "nope") in message


def test_directory_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("hi")
    _assert_refused(tmp_path, tmp_path / "empty", "no weights found")


def test_unknown_layout_lists_names(tmp_path):
    save_file({"encoder.w": np.zeros((2, 2), np.float32), "decoder.b": np.zeros(2, np.float32)},
              tmp_path / "x.safetensors")
    message = _assert_refused(tmp_path, tmp_path / "x.safetensors", "no Medusa head tensors recognised")
    assert "encoder.w" in message and "--layout" in message


def test_unknown_layout_flag(make_example, tmp_path):
    example = make_example(layout="medusa1", file_format="safetensors")
    _assert_refused(tmp_path, example.output, "unknown layout 'foo'.*--layout", InputError, layout="foo")


def test_mixed_layouts(tmp_path):
    z = np.zeros((4, 4), np.float32)
    save_file({"0.0.linear.weight": z, "0.1.weight": z, "blocks.0.layers.0.weight": z, "lm_heads.0.weight": z},
              tmp_path / "m.safetensors")
    _assert_refused(tmp_path, tmp_path / "m.safetensors", "mixed layouts")


def test_missing_tensor_is_named(tmp_path, make_example):
    from safetensors.numpy import load_file

    example = make_example(layout="medusa1", file_format="safetensors")
    tensors = load_file(example.output / "medusa_lm_head.safetensors")
    del tensors["1.0.linear.weight"]
    save_file(tensors, tmp_path / "broken.safetensors")
    message = _assert_refused(tmp_path, tmp_path / "broken.safetensors", "head 1")
    assert "1.0.linear.weight" in message


def test_inconsistent_shapes_between_heads(tmp_path, make_example):
    from safetensors.numpy import load_file

    example = make_example(layout="trtllm")
    tensors = load_file(example.output / "model.safetensors")
    tensors["medusa_heads.2.lm_head.weight"] = np.zeros((100, 64), np.float32)
    save_file(tensors, tmp_path / "bad.safetensors")
    message = _assert_refused(tmp_path, tmp_path / "bad.safetensors", "medusa_heads.2.lm_head.weight")
    assert "[100, 64]" in message and "[256, 64]" in message


def test_truncated_safetensors(tmp_path, make_example):
    example = make_example(layout="trtllm")
    data = (example.output / "model.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    message = _assert_refused(tmp_path, tmp_path / "t.safetensors", "truncated or corrupt")
    assert "t.safetensors" in message


def test_nonfinite_weights(tmp_path, make_example):
    from safetensors.numpy import load_file

    example = make_example(layout="vllm")
    tensors = load_file(example.output / "model.safetensors")
    tensors["blocks.1.layers.0.weight"][3, 5] = np.nan
    (tmp_path / "src").mkdir()
    save_file(tensors, tmp_path / "src" / "model.safetensors")
    message = _assert_refused(tmp_path, tmp_path / "src", "NaN/Inf")
    assert "blocks.1.layers.0.weight" in message and "--allow-nonfinite" in message
    result = _convert(tmp_path / "src", tmp_path / "ok", allow_nonfinite=True)
    assert result.num_tensors == 9


def test_num_heads_too_large(make_example, tmp_path):
    example = make_example(layout="medusa2")
    _assert_refused(tmp_path, example.output, r"--num-heads 7: the checkpoint has 3 heads", num_heads=7)


def test_unknown_dtype_and_contradicting_flags(make_example, tmp_path):
    example = make_example(layout="medusa2")
    _assert_refused(tmp_path, example.output, "unknown dtype 'float8'.*--dtype", dtype="float8")
    _assert_refused(tmp_path, example.output, "unknown quantization 'q9'", quantization="q9")
    _assert_refused(tmp_path, example.output, "--dtype float32 contradicts --quantization q4f16_1",
                    dtype="float32", quantization="q4f16_1")


def test_existing_output_needs_force(make_example, tmp_path):
    example = make_example(layout="medusa2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(InputError, match="--force"):
        _convert(example.output, out)
    assert (out / "keep.txt").read_text() == "precious"
    _convert(example.output, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "tensor-cache.json").is_file()


def test_failure_mid_write_leaves_nothing(make_example, tmp_path, monkeypatch):
    example = make_example(layout="medusa2")
    calls = []
    original = quant.convert_tensor

    def failing(name, array, scheme):
        calls.append(name)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the shards
        return original(name, array, scheme)

    monkeypatch.setattr(quant, "convert_tensor", failing)
    with pytest.raises(KeyboardInterrupt):
        _convert(example.output, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_failure_with_force_keeps_the_old_output(make_example, tmp_path, monkeypatch):
    example = make_example(layout="medusa2")
    out = _convert(example.output, tmp_path / "out").output
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing(name, array, scheme):
        raise CheckpointError("simulated read failure")

    monkeypatch.setattr(quant, "convert_tensor", failing)
    with pytest.raises(CheckpointError):
        _convert(example.output, out, force=True, dtype="float16")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_a_full_disk_is_one_clear_error_and_leaves_nothing(make_example, tmp_path, monkeypatch):
    """An OSError while writing the shards (here ENOSPC from a copy on the disk pool) names
    the output and the system's reason, without a traceback, and removes the staging dir."""
    import errno

    from medusa_cli.packed import tensor_cache

    example = make_example(layout="medusa1", dtype="float16", file_format="safetensors")

    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tensor_cache, "_copy_region", disk_full)
    out = tmp_path / "out"
    with pytest.raises(InputError) as failure:
        _convert(example.output, out)
    assert str(failure.value) == (f"-o {out}: writing failed: No space left on device; "
                                  "nothing was written")
    assert not out.exists() and leftovers(tmp_path) == []


def test_progress_reports_bytes(make_example, tmp_path):
    example = make_example(layout="medusa1", file_format="safetensors")
    seen = []
    convert_checkpoint(ConvertRequest(example.output, tmp_path / "p"), progress=lambda d, t: seen.append((d, t)))
    total = seen[-1][1]
    assert seen[-1][0] == total == 3 * (64 * 64 + 64 + 256 * 64) * 4
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_load_array_memory_maps_the_shard(make_example, tmp_path, tiny_config):
    example = make_example(layout="mlc")
    out = _convert(example.output, tmp_path / "p").output
    record = read_tensor_cache(out).by_name()["medusa_head.0.1.weight"]
    assert same_bits(load_array(out, record), reference_tensors(tiny_config)["medusa_head.0.1.weight"])


def test_pickle_that_calls_os_system_is_refused_and_never_runs(tmp_path):
    import zipfile

    marker = tmp_path / "pwned"
    payload = f"cposix\nsystem\n(Vtouch {marker}\ntR.".encode()
    src = tmp_path / "medusa_lm_head.pt"
    with zipfile.ZipFile(src, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    message = _assert_refused(tmp_path, src, "posix.system")
    assert str(src) in message
    assert not marker.exists()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_all_finite_on_the_bits_agrees_with_isfinite(dtype):
    from medusa_cli.commands.convert import all_finite
    from medusa_cli.dtypes import numpy_dtype

    np_dtype = numpy_dtype(dtype)
    values = (np.random.default_rng(1).standard_normal(9000) * 100).astype(np_dtype)
    largest = np.array([3.0e38 if dtype == "bfloat16" else np.finfo(np_dtype).max], np_dtype)
    values[:2] = [largest[0], -largest[0]]
    assert all_finite(values) and all_finite(values[:0])
    for bad in (np.nan, np.inf, -np.inf):
        broken = values.copy()
        broken[8765] = bad
        assert not all_finite(broken)
        assert not np.isfinite(broken.astype(np.float64)).all()


def _packed_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_source_dtype_tensors_are_copied_file_to_file(make_example, tmp_path, monkeypatch):
    """A plain conversion in the source dtype copies each tensor in the kernel
    (copy_file_range): the same bytes as writing it, and no copy for a cast."""
    example = make_example(layout="medusa1", dtype="float16", file_format="safetensors")
    written = _packed_bytes(_convert(example.output, tmp_path / "written").output)  # reference

    import os

    from medusa_cli.packed import tensor_cache

    calls = []
    real = os.copy_file_range

    def counting(fd_in, fd_out, count, offset_in=None, offset_out=None):
        calls.append(count)
        return real(fd_in, fd_out, count, offset_in, offset_out)

    monkeypatch.setattr(tensor_cache.os, "copy_file_range", counting)
    copied = _packed_bytes(_convert(example.output, tmp_path / "copied").output)
    assert copied == written
    assert len(calls) == 3 * 3  # 3 heads x (ResBlock weight, bias, vocab projection)

    calls.clear()
    _convert(example.output, tmp_path / "cast", dtype="float32")
    assert calls == []


def test_copy_falls_back_to_writing_where_the_kernel_cannot(make_example, tmp_path, monkeypatch):
    """copy_file_range may stop part-way (EXDEV across file systems, no support): the rest of
    the tensor is written, and the output is the same."""
    example = make_example(layout="medusa1", dtype="float32", file_format="safetensors")
    import errno
    import os

    from medusa_cli.packed import tensor_cache

    monkeypatch.setattr(tensor_cache.os, "copy_file_range",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EXDEV, "cross-device")))
    none = _packed_bytes(_convert(example.output, tmp_path / "none").output)

    real = os.copy_file_range
    state = {"first": True}

    def half_then_fail(fd_in, fd_out, count, offset_in=None, offset_out=None):
        if state["first"]:  # copy part of the first tensor, then refuse everything
            state["first"] = False
            return real(fd_in, fd_out, count // 2 + 1, offset_in, offset_out)
        raise OSError(errno.ENOSYS, "not supported")

    monkeypatch.setattr(tensor_cache.os, "copy_file_range", half_then_fail)
    partial = _packed_bytes(_convert(example.output, tmp_path / "partial").output)
    monkeypatch.undo()
    copied = _packed_bytes(_convert(example.output, tmp_path / "copied").output)
    assert none == partial == copied
    check_packed_dir(tmp_path / "partial")


def test_short_writes_are_completed(tmp_path, monkeypatch):
    """A write may take fewer bytes than given (Linux caps one call at 2 GiB)."""
    from medusa_cli.packed import tensor_cache

    real = os.pwrite
    calls = []

    def trickle(fd, view, offset):
        calls.append(offset)
        return real(fd, bytes(view[:7]), offset)

    monkeypatch.setattr(tensor_cache.os, "pwrite", trickle)
    payload = bytes(range(256)) * 3
    path = tmp_path / "out.bin"
    path.write_bytes(b"x" * 5)
    fd = os.open(path, os.O_WRONLY)
    try:
        tensor_cache._pwrite_all(fd, memoryview(payload), 5)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 5 + payload
    assert len(calls) == -(-len(payload) // 7)
