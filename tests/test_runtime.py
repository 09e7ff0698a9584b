"""Compiled heads through the TVM VM against a float64 numpy computation, for every scheme."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import tvm

from medusa_cli import quantization as quant
from medusa_cli.commands.compile import CompileRequest, compile_heads
from medusa_cli.errors import InputError, ParamsError
from medusa_cli.runtime.heads import CompiledHeads, load_heads
from tests._params import TinyParams, make_params_dir, random_hidden, reference_logits, tiny_config

MAX_BATCH = 4
# Max |compiled - reference| over max |reference|, reference on the weights the kernels use
# (dequantized for quantized schemes). float32 schemes: float32 rounding only. Half-precision
# schemes round the hidden state to the model dtype after each ResBlock (float16: 2**-11,
# bfloat16: 2**-8 relative) and accumulate in float32.
TOLERANCE = {
    "q0f32": 1e-5,
    "q4f32_1": 1e-5,
    "q0f16": 2e-3,
    "q4f16_1": 2e-3,
    "q3f16_1": 2e-3,
    "q0bf16": 1.5e-2,
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, tuple[TinyParams, Path]]:
    """Every scheme converted and compiled for llvm once: scheme -> (params, library)."""
    root = tmp_path_factory.mktemp("runtime")
    out = {}
    for seed, name in enumerate(quant.SCHEMES):
        params = make_params_dir(root / name, name, seed=seed,
                                 config=tiny_config(max_batch_size=MAX_BATCH))
        result = compile_heads(CompileRequest(params.path))
        out[name] = (params, result.output)
    return out


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("batch", [1, MAX_BATCH])
@pytest.mark.parametrize("scheme_name", list(quant.SCHEMES))
def test_logits_match_numpy(compiled, scheme_name, batch):
    params, library = compiled[scheme_name]
    heads = load_heads(library, params.path)
    hidden = random_hidden(params.config, batch, seed=batch)
    logits = heads.get_logits(hidden)

    # the kernels see the hidden states in the model dtype
    hidden_in = quant.cast_to(hidden, params.scheme.model_dtype).astype(np.float64)
    reference = reference_logits(params.effective, params.config, hidden_in)
    assert len(logits) == params.config.medusa_num_heads
    for got, want in zip(logits, reference):
        assert got.dtype == np.float32 and got.shape == (batch, params.config.vocab_size)
        assert _relative_error(got, want) < TOLERANCE[scheme_name]
        assert (got.argmax(axis=1) == want.argmax(axis=1)).mean() >= 0.75


@pytest.mark.parametrize("scheme_name", ["q4f16_1", "q4f32_1", "q3f16_1"])
def test_quantized_logits_stay_near_the_source_weights(compiled, scheme_name):
    """Quantization error (source vs dequantized weights) is bounded, and separate from the above."""
    params, library = compiled[scheme_name]
    hidden = random_hidden(params.config, MAX_BATCH)
    logits = load_heads(library, params.path).get_logits(hidden)
    source = reference_logits(params.source, params.config, hidden.astype(np.float64))
    for got, want in zip(logits, source):
        cosine = (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)
        assert cosine > 0.9
        assert _relative_error(got, want) > 1e-4  # really quantized: not the float weights


def test_input_dtypes_are_cast(compiled):
    params, library = compiled["q0f32"]
    heads = load_heads(library, params.path)
    hidden = random_hidden(params.config, 2)
    want = heads.get_logits(hidden)
    for dtype in (np.float64, np.float16, ml_dtypes.bfloat16):
        got = heads.get_logits(hidden.astype(dtype))
        rounded = heads.get_logits(hidden.astype(dtype).astype(np.float32))
        np.testing.assert_array_equal(got[0], rounded[0])
        np.testing.assert_allclose(got[0], want[0], atol=0.05 * np.abs(want[0]).max())


@pytest.mark.parametrize(
    "shape, dtype, words",
    [
        ((2, 63), np.float32, ["[2, 63]", "[batch, 64]"]),
        ((64,), np.float32, ["[64]"]),
        ((0, 64), np.float32, ["batch 0"]),
        ((MAX_BATCH + 1, 64), np.float32, [f"batch {MAX_BATCH + 1}", "--max-batch-size"]),
        ((2, 64), np.int32, ["dtype int32"]),
    ],
)
def test_bad_hidden_states(compiled, shape, dtype, words):
    params, library = compiled["q0f32"]
    heads = load_heads(library, params.path)
    with pytest.raises(InputError) as info:
        heads.get_logits(np.zeros(shape, dtype))
    for word in words:
        assert word in str(info.value)


def test_attributes(compiled):
    params, library = compiled["q4f16_1"]
    heads = load_heads(library, params.path, device="auto")
    assert isinstance(heads, CompiledHeads)
    assert heads.quantization == "q4f16_1" and heads.dtype == "float16"
    assert heads.config.hidden_size == params.config.hidden_size
    assert heads.max_batch_size == MAX_BATCH
    assert heads.metadata.to_json()["model_type"] == "medusa"


def test_device_errors(compiled):
    params, library = compiled["q0f32"]
    with pytest.raises(InputError, match="compiled for llvm"):
        load_heads(library, params.path, device="cuda:0")
    with pytest.raises(InputError, match="cuda:0"):
        load_heads(library, params.path, device="cpu:x")


def test_params_from_another_scheme_are_refused(compiled):
    _, library = compiled["q4f16_1"]
    other, _ = compiled["q4f32_1"]
    with pytest.raises(ParamsError, match="q_scale' is .* float32, expected .* float16"):
        load_heads(library, other.path)


def test_missing_params_dir(compiled, tmp_path):
    _, library = compiled["q0f32"]
    with pytest.raises(ParamsError, match="not a directory"):
        load_heads(library, tmp_path / "nowhere")


def test_corrupted_shard_is_named(compiled, tmp_path):
    params, library = compiled["q0f32"]
    copy = tmp_path / "params"
    shutil.copytree(params.path, copy)
    (copy / "params_shard_0.bin").write_bytes(b"\0" * 10)
    with pytest.raises(ParamsError, match="params_shard_0.bin"):
        load_heads(library, copy)


def test_uses_every_cpu_by_default(compiled, monkeypatch):
    params, library = compiled["q0f32"]
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    cpus = len(os.sched_getaffinity(0))
    heads = load_heads(library, params.path)
    heads.get_logits(random_hidden(params.config, 1))
    assert heads.num_threads == cpus == tvm.get_global_func("runtime.NumThreads")()
    # TVM must not have pinned this thread to one core (numpy would run on one core too)
    assert len(os.sched_getaffinity(0)) == cpus

    assert load_heads(library, params.path, num_threads=1).num_threads == 1
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    assert load_heads(library, params.path).num_threads == 1


def _cuda_visible() -> bool:
    try:
        return shutil.which("nvcc") is not None and bool(tvm.cuda(0).exist)
    except Exception:
        return False


@pytest.mark.skipif(not _cuda_visible(), reason="needs nvcc and a visible CUDA GPU")
@pytest.mark.parametrize("scheme_name", ["q0f16", "q4f16_1"])
def test_cuda_logits_match_numpy(compiled, scheme_name, tmp_path):
    """On a GPU machine: compile for the local arch, run on cuda:0, compare with numpy."""
    params, _ = compiled[scheme_name]
    result = compile_heads(CompileRequest(params.path, target="cuda",
                                          output=tmp_path / "heads.so"))
    heads = load_heads(result.output, params.path, device="cuda:0")
    for batch in (1, MAX_BATCH):
        hidden = random_hidden(params.config, batch, seed=batch)
        hidden_in = quant.cast_to(hidden, params.scheme.model_dtype).astype(np.float64)
        reference = reference_logits(params.effective, params.config, hidden_in)
        for got, want in zip(heads.get_logits(hidden), reference):
            assert _relative_error(got, want) < TOLERANCE[scheme_name]


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1:text.index("]")]


def _smaps_entry(address: int) -> str:
    """The /proc/self/smaps block of the mapping that holds `address`."""
    block, inside = [], False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            if inside:
                break
            low, high = (int(v, 16) for v in head.split("-"))
            inside = low <= address < high
        if inside:
            block.append(line)
    return "\n".join(block)


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"),
                    reason="transparent huge pages are off or absent here")
def test_large_params_are_advised_onto_huge_pages():
    from medusa_cli.runtime.heads import _param_tensor

    big = np.arange(3 << 20, dtype=np.float32)  # 12 MiB
    tensor = _param_tensor(big, tvm.cpu())
    assert np.array_equal(tensor.numpy(), big)
    entry = _smaps_entry(tensor.data_ptr() + (4 << 20))
    flags = next(line for line in entry.splitlines() if line.startswith("VmFlags:")).split()
    assert "hg" in flags, entry  # madvise(MADV_HUGEPAGE) applied to the tensor's pages

    small = np.arange(1000, dtype=np.float16)
    assert np.array_equal(_param_tensor(small, tvm.cpu()).numpy(), small)
