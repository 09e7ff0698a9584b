"""medusa compile: target resolution, input errors, metadata, CUDA fatbin, every target x scheme."""

from __future__ import annotations

import json
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

from medusa_cli import quantization as quant
from medusa_cli.commands.compile import CompileRequest, compile_heads
from medusa_cli.compiler import pipeline as compile_mod
from medusa_cli.compiler import targets
from medusa_cli.compiler.cuda import patch_cuda_library_bin
from medusa_cli.compiler.targets import resolve_target
from medusa_cli.errors import CompileError, InputError, ParamsError, ToolchainError
from medusa_cli.library import read_library_metadata
from medusa_cli.packed.config import CONFIG_FILE
from medusa_cli.packed.tensor_cache import TENSOR_CACHE_FILE
from medusa_cli.spec import MedusaConfig, param_specs
from tests._params import make_params_dir, tiny_config

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")
FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
EM_CUDA = 190  # ELF e_machine of a cubin


@pytest.fixture(scope="module")
def q0f32_dir(tmp_path_factory) -> Path:
    return make_params_dir(tmp_path_factory.mktemp("params") / "q0f32", "q0f32").path


@pytest.fixture
def params_copy(q0f32_dir, tmp_path) -> Path:
    copy = tmp_path / "params"
    shutil.copytree(q0f32_dir, copy)
    return copy


def _libraries(directory: Path) -> list[str]:
    """Anything compile may have written into `directory`, temporary files included."""
    return sorted(p.name for p in directory.iterdir() if p.suffix in (".so", ".tar") or p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# Target resolution


@pytest.mark.parametrize(
    "name, arch, kind, attrs",
    [
        ("llvm", None, "llvm", {}),
        ("cpu", None, "llvm", {"mcpu": json.loads(str(tvm.target.Target.from_device("cpu"))).get("mcpu")}),
        ("opencl", None, "opencl", {}),
        ('{"kind": "llvm", "mcpu": "skylake"}', None, "llvm", {"mcpu": "skylake"}),
        ("auto", None, "llvm", {}),  # with no GPU visible
    ],
)
def test_resolve_target_table(name, arch, kind, attrs, monkeypatch):
    monkeypatch.setattr(targets, "device_visible", lambda kind, index=0: False)
    resolved = resolve_target(name, arch)
    exported = json.loads(resolved.json)
    assert resolved.kind == kind == exported["kind"]
    for key, value in attrs.items():
        assert exported.get(key) == value
    assert resolved.description


@needs_nvcc
@pytest.mark.parametrize(
    "name, arch, arches",
    [
        ("cuda", "sm_90", ("sm_90",)),
        ("cuda", "sm_90,sm_80", ("sm_80", "sm_90")),
        ("cuda -arch=sm_86", None, ("sm_86",)),
        ('{"kind": "cuda", "arch": "sm_89"}', None, ("sm_89",)),
    ],
)
def test_resolve_cuda_translates_to_json(name, arch, arches):
    resolved = resolve_target(name, arch)
    exported = json.loads(resolved.json)
    assert exported["kind"] == "cuda" and exported["arch"] == arches[0]
    assert exported["host"]["kind"] == "llvm"
    assert resolved.cuda_arches == arches and resolved.device_code == "fatbin"


@needs_nvcc
def test_cuda_default_arch_is_stated(monkeypatch):
    monkeypatch.setattr(targets, "device_visible", lambda kind, index=0: False)
    assert resolve_target("cuda").cuda_arches == (targets.DEFAULT_CUDA_ARCH,)


@needs_nvcc
def test_auto_prefers_a_visible_cuda_gpu(monkeypatch):
    monkeypatch.setattr(targets, "device_visible", lambda kind, index=0: kind == "cuda")
    monkeypatch.setattr(targets, "_parse_cuda_arches", lambda arch: ("sm_90",))
    assert resolve_target("auto").kind == "cuda"


@pytest.mark.parametrize(
    "name, arch, error, words",
    [
        ("tpu", None, InputError, ["unknown target 'tpu'", "--target"]),
        ("llvm", "sm_80", InputError, ["--arch", "cuda and rocm"]),
        ("{not json", None, InputError, ["--target", "invalid JSON"]),
        ('{"kind": "fpga"}', None, InputError, ['"kind" must be one of']),
        ('{"kind": "llvm", "colour": "red"}', None, InputError, ["TVM rejects it", "colour"]),
        ("cuda -arch", None, InputError, ["cannot read option"]),
    ],
)
def test_resolve_target_input_errors(name, arch, error, words):
    with pytest.raises(error) as info:
        resolve_target(name, arch)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


@needs_nvcc
def test_bad_cuda_arch_is_an_input_error():
    with pytest.raises(InputError, match="--arch '90'"):
        resolve_target("cuda", "90")


def test_missing_toolchains_name_what_is_needed(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc, emcc, ld.lld or xcrun
    monkeypatch.setattr(targets, "_rocm_home", lambda: None)
    monkeypatch.setattr(targets.sys, "platform", "linux")
    expected = {
        "cuda": "install the CUDA toolkit",
        "rocm": "install ROCm",
        "metal": "needs macOS",
        "webgpu": "install Emscripten",
    }
    if tvm.get_global_func("target.build.vulkan", True) is None:
        expected["vulkan"] = "USE_VULKAN=ON"
    for name, words in expected.items():
        with pytest.raises(ToolchainError) as info:
            resolve_target(name)
        assert words in str(info.value) and f"--target {name}" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Input errors leave nothing behind


def test_quantization_mismatch_names_both(params_copy):
    with pytest.raises(InputError) as info:
        compile_heads(CompileRequest(params_copy, quantization="q4f16_1"))
    assert "q4f16_1" in str(info.value) and "q0f32" in str(info.value)
    assert _libraries(params_copy) == []


def test_unknown_quantization(params_copy):
    with pytest.raises(InputError, match="unknown quantization 'q9'"):
        compile_heads(CompileRequest(params_copy, quantization="q9"))


@pytest.mark.parametrize("max_batch_size", [0, 4])
def test_max_batch_size_other_than_the_configs(params_copy, max_batch_size):
    """The max batch is set once, by convert, and read from mlc-chat-config.json (MLC-LLM's
    engine reads it there too); compile refuses a different one instead of building a library
    that disagrees with its config."""
    with pytest.raises(InputError) as info:
        compile_heads(CompileRequest(params_copy, max_batch_size=max_batch_size))
    assert str(info.value).startswith(f"--max-batch-size {max_batch_size} differs from the "
                                      f"max_batch_size 8 in {params_copy / CONFIG_FILE}")
    assert "medusa convert --max-batch-size" in str(info.value)
    assert _libraries(params_copy) == []


def test_bad_output_suffix(params_copy, tmp_path):
    with pytest.raises(InputError, match=r"\.so or \.dylib or \.dll or \.tar"):
        compile_heads(CompileRequest(params_copy, output=tmp_path / "heads.bin"))


def _drop_first_record(params_dir: Path) -> str:
    manifest = json.loads((params_dir / TENSOR_CACHE_FILE).read_text())
    name = manifest["records"][0]["records"].pop(0)["name"]
    (params_dir / TENSOR_CACHE_FILE).write_text(json.dumps(manifest))
    return name


def _grow_hidden_size(params_dir: Path) -> str:
    config = json.loads((params_dir / CONFIG_FILE).read_text())
    config["model_config"]["hidden_size"] = 96
    (params_dir / CONFIG_FILE).write_text(json.dumps(config))
    return "medusa_head.0.0.linear.weight"


def _truncate_shard(params_dir: Path) -> str:
    shard = params_dir / "params_shard_0.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    return "params_shard_0.bin"


@pytest.mark.parametrize(
    "damage, error_words",
    [
        (lambda d: shutil.rmtree(d), ["not a directory"]),
        (lambda d: (d / CONFIG_FILE).unlink(), [CONFIG_FILE, "not found"]),
        (lambda d: (d / TENSOR_CACHE_FILE).unlink(), [TENSOR_CACHE_FILE, "not found"]),
        (lambda d: (d / CONFIG_FILE).write_text("{"), [CONFIG_FILE, "unreadable"]),
        (_drop_first_record, ["is missing"]),
        (_grow_hidden_size, ["[64, 64] float32, expected [96, 96] float32"]),
        (lambda d: (d / "params_shard_0.bin").unlink(), ["params_shard_0.bin", "missing"]),
        (_truncate_shard, ["params_shard_0.bin", "corrupted"]),
    ],
    ids=["no-dir", "no-config", "no-cache", "bad-config", "no-tensor", "wrong-shape", "no-shard",
         "short-shard"],
)
def test_broken_params_dir(params_copy, tmp_path, damage, error_words):
    detail = damage(params_copy)
    output = tmp_path / "out" / "heads.so"
    with pytest.raises(ParamsError) as info:
        compile_heads(CompileRequest(params_copy, output=output))
    message = str(info.value)
    for word in error_words + ([detail] if isinstance(detail, str) else []):
        assert word in message
    assert not output.parent.exists() or _libraries(output.parent) == []
    if params_copy.exists():
        assert _libraries(params_copy) == []


def test_failed_export_leaves_nothing(params_copy, monkeypatch):
    monkeypatch.setattr(compile_mod, "metadata_c_source", lambda metadata: "this is not C\n")
    with pytest.raises(CompileError, match="exporting the llvm library failed"):
        compile_heads(CompileRequest(params_copy))
    assert _libraries(params_copy) == []


# ---------------------------------------------------------------------------------------------
# Output and metadata


def test_default_output_and_metadata(tmp_path):
    params = make_params_dir(tmp_path / "params", "q0f32", config=tiny_config(max_batch_size=4)).path
    result = compile_heads(CompileRequest(params))
    assert result.output == params / "medusa-llvm-q0f32.so"
    assert _libraries(params) == ["medusa-llvm-q0f32.so"]
    meta = read_library_metadata(result.output)
    assert meta == result.metadata
    data = json.loads(json.dumps(result.to_dict()))  # what --json prints
    assert data["output"] == str(result.output) and data["metadata"] == meta.to_json()
    as_json = meta.to_json()
    assert as_json["model_type"] == "medusa" and as_json["kv_state_kind"] == "none"
    assert meta.quantization == "q0f32" and meta.max_batch_size == as_json["max_batch_size"] == 4
    assert data["target"]["kind"] == meta.target["kind"] == "llvm"
    specs = param_specs(meta.config, quant.get_scheme("q0f32"))
    assert meta.params == specs
    assert [(p["name"], tuple(p["shape"]), p["dtype"]) for p in as_json["params"]] == specs
    assert as_json["params_bytes"] == sum(np.prod(s) * 4 for _, s, _ in specs)
    # intermediates: one [max_batch, hidden] float32 buffer reused by every head
    assert meta.memory_usage == {"get_logits": 4 * meta.config.hidden_size * 4}

    # the MLC-LLM way: the library's _metadata function returns the same JSON
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(result.output)), tvm.cpu())
    assert json.loads(str(vm["_metadata"]())) == as_json


def test_system_library_tar(params_copy, tmp_path):
    result = compile_heads(CompileRequest(params_copy, output=tmp_path / "heads.tar"))
    with tarfile.open(result.output) as tar:
        names = tar.getnames()
    assert "devc.o" in names and any(n.endswith(".o") and n != "devc.o" for n in names)
    assert read_library_metadata(result.output).quantization == "q0f32"


def test_read_library_metadata_errors(tmp_path):
    with pytest.raises(InputError, match="no such library"):
        read_library_metadata(tmp_path / "missing.so")
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"\x7fELF not really")
    with pytest.raises(InputError, match="holds no medusa-cli metadata.*it was not loaded"):
        read_library_metadata(junk)  # never loaded: its constructors would run
    with pytest.raises(InputError, match="cannot read its metadata"):
        read_library_metadata(junk, load=True)


def test_compile_time_for_tiny_heads(params_copy):
    result = compile_heads(CompileRequest(params_copy, target="cpu"))
    assert result.seconds < 30
    assert result.output.name == "medusa-cpu-q0f32.so"


# ---------------------------------------------------------------------------------------------
# Every target x scheme that this machine can build


@pytest.fixture(scope="module")
def scheme_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("schemes")
    return {name: make_params_dir(root / name, name).path for name in quant.SCHEMES}


@pytest.mark.parametrize("scheme_name", list(quant.SCHEMES))
def test_opencl_compiles_every_scheme(scheme_dirs, scheme_name, tmp_path):
    result = compile_heads(CompileRequest(scheme_dirs[scheme_name], target="opencl",
                                          output=tmp_path / "heads.so"))
    assert b"__kernel" in result.output.read_bytes()  # OpenCL C, built by the driver at load
    assert read_library_metadata(result.output).device_code == "source"


def _cubin_flags(data: bytes) -> list[int]:
    """e_flags of every cubin (ELF with e_machine EM_CUDA) inside a file."""
    flags = []
    start = data.find(b"\x7fELF")
    while start >= 0:
        (machine,) = struct.unpack_from("<H", data, start + 18)
        if machine == EM_CUDA:
            flags.append(struct.unpack_from("<I", data, start + 48)[0])  # 64-bit ELF e_flags
        start = data.find(b"\x7fELF", start + 4)
    return flags


def _sm_numbers(flags: list[int]) -> set[int]:
    # the SM number sits in bits 0-7 of e_flags before CUDA 12.8's new cubin ABI, bits 8-15 after
    return {f & 0xFF for f in flags} | {(f >> 8) & 0xFF for f in flags}


@needs_nvcc
@pytest.mark.parametrize("scheme_name", list(quant.SCHEMES))
def test_cuda_library_carries_a_fatbin(scheme_dirs, scheme_name, tmp_path):
    result = compile_heads(CompileRequest(scheme_dirs[scheme_name], target="cuda", arch="sm_80,sm_90",
                                          output=tmp_path / "heads.so"))
    data = result.output.read_bytes()
    assert FATBIN_MAGIC in data
    flags = _cubin_flags(data)
    assert len(flags) == 2 and {80, 90} <= _sm_numbers(flags)  # one cubin per --arch
    assert b"__global__" not in data  # no CUDA source left to compile at load
    meta = read_library_metadata(result.output)  # readable without a CUDA runtime
    assert meta.device_code == "fatbin" and meta.cuda_arches == ["sm_80", "sm_90"]
    assert meta.quantization == scheme_name


# ---------------------------------------------------------------------------------------------
# The library-blob rewrite, on a synthetic blob


def _str(value: bytes) -> bytes:
    return struct.pack("<Q", len(value)) + value


def _blob(cuda_payload: bytes) -> bytes:
    tree = struct.pack("<Q", 4) + struct.pack("<4Q", 0, 1, 2, 2) + struct.pack("<Q", 2) + struct.pack("<2Q", 1, 2)
    body = tree + _str(b"relax.VMExecutable") + _str(b"vm-bytes") + _str(b"_lib") + _str(b"cuda") + _str(cuda_payload)
    return struct.pack("<Q", len(body)) + body


def test_patch_cuda_library_bin_swaps_source_for_fatbin():
    source, function_map, fatbin = b"extern \"C\" __global__ void k() {}", b"\x01fmap\x02", b"FATBIN" * 10
    patched = patch_cuda_library_bin(_blob(_str(b"cuda") + function_map + _str(source)), {source: fatbin})
    assert patched == _blob(_str(b"fatbin") + function_map + _str(fatbin))


def test_patch_cuda_library_bin_refuses_unknown_layout():
    with pytest.raises(CompileError, match="cannot embed the fatbin"):
        patch_cuda_library_bin(_blob(_str(b"cuda") + b"map" + _str(b"other source")), {b"source": b"x"})
    with pytest.raises(CompileError, match="unexpected header"):
        patch_cuda_library_bin(b"\x00" * 16, {})


def test_every_function_of_a_cpu_library_is_noalias():
    """TVM 0.27's LLVM codegen takes the noalias decision for a whole module from the function
    it declared last; VMShapeLower's shape_func has no "tirx.noalias", and declared last it took
    noalias from every kernel (their accumulators then lived in memory). The finalize pipeline
    marks such one-buffer functions; functions with several buffers are left as they are."""
    from medusa_cli.compiler.model import MedusaModel
    from tvm.script import tirx as T

    target = resolve_target("cpu", None)
    config = MedusaConfig(medusa_num_heads=2, medusa_num_layers=1, hidden_size=64, vocab_size=96)
    model = MedusaModel(config, quant.get_scheme("q0f32"), cpu_target=target.target)
    mod, _ = model.export_tvm(spec=model.get_default_spec())
    with target.target:
        final = compile_mod._finalize_pipeline()(compile_mod._optimize(mod, target, 4))
    prim_funcs = {gv.name_hint: f for gv, f in final.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert any(name.startswith("shape_func") for name in prim_funcs)
    assert all(f.attrs and f.attrs.get("tirx.noalias") for f in prim_funcs.values()), [
        name for name, f in prim_funcs.items() if not (f.attrs and f.attrs.get("tirx.noalias"))]

    @T.prim_func(private=True, s_tir=True)
    def two_buffers(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
        for i in range(4):
            b[i] = a[i]

    marked = compile_mod._mark_shape_functions_noalias()(tvm.IRModule({"two": two_buffers}))
    assert not (marked["two"].attrs and marked["two"].attrs.get("tirx.noalias"))
