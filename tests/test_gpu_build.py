"""GPU builds, checked without a GPU: the kernels of CUDA libraries at the vicuna-7b shape (every
scheme, and a --tree build) read from the source they were built from (--save-source) and from
the kernel report (ptxas's registers and spills); and the GPU forms of the Linears, run on the
CPU, against the CPU forms.

The shape matters (rows per block, blocks, registers) and the head count does not (every head
calls the same kernels), so the per-scheme libraries have one head; the tree library has the
four heads mc_sim_7b_63 reaches. Each library is built once per session."""

from __future__ import annotations

import re
import shutil
import struct

import numpy as np
import pytest
import tvm
from tvm.runtime.vm import VirtualMachine

from medusa_cli import quantization as quant
from medusa_cli.compiler.gpu_topk import GpuTopkLayout
from medusa_cli.compiler.model import MedusaModel, TreeSpec, centred_code
from medusa_cli.compiler.pipeline import _optimize, _finalize_pipeline, compile_library
from medusa_cli.compiler.targets import resolve_target
from medusa_cli.dtypes import NUMPY_DTYPES
from medusa_cli.library import read_library_metadata
from medusa_cli.packed.tensor_cache import load_array, read_tensor_cache
from medusa_cli.spec import MedusaConfig
from medusa_cli.trees import load_tree
from tests._params import make_params_dir, random_hidden, tiny_config

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")

VICUNA_7B = dict(medusa_num_layers=1, hidden_size=4096, vocab_size=32000, max_batch_size=8)
FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
MIN_BLOCKS = 264  # 2 per SM of a 132-SM H100 / H200
MIB = 1 << 20
_KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\([^)]*\)\s*\{')


def _kernel_sources(source: str) -> dict[str, str]:
    """__global__ function name -> its definition, from a .cu file."""
    starts = [(m.group(1), m.start()) for m in _KERNEL.finditer(source)]
    return {name: source[start:(starts[i + 1][1] if i + 1 < len(starts) else len(source))]
            for i, (name, start) in enumerate(starts)}


@pytest.fixture(scope="session")
def cuda_builds(tmp_path_factory):
    """name -> (library, its metadata, its saved CUDA source): every scheme with one head, and
    q4f16_1 with mc_sim_7b_63."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc (CUDA toolkit) not on PATH")
    root = tmp_path_factory.mktemp("cuda_builds")
    target = resolve_target("cuda", "sm_90")
    builds = {}

    def build(name, config, scheme, tree=None):
        library, source_dir = root / f"{name}.so", root / f"src-{name}"
        meta = compile_library(config, quant.get_scheme(scheme), target, tree, library, source_dir)
        (cu,) = source_dir.iterdir()
        builds[name] = (library, meta, cu.read_text())

    for scheme in quant.SCHEMES:
        build(scheme, MedusaConfig(medusa_num_heads=1, **VICUNA_7B), scheme)
    tree = load_tree("mc_sim_7b_63")
    build("tree", MedusaConfig(medusa_num_heads=4, **VICUNA_7B), "q4f16_1",
          TreeSpec(tree, 10, GpuTopkLayout.for_rows(VICUNA_7B["vocab_size"], 1 + tree.depth, 10)))
    return builds


BUILDS = [*quant.SCHEMES, "tree"]


@needs_nvcc
@pytest.mark.parametrize("name", BUILDS)
def test_the_report_names_every_kernel_of_the_source(cuda_builds, name):
    library, meta, source = cuda_builds[name]
    assert sorted(k["name"] for k in meta.kernels) == sorted(_kernel_sources(source))
    assert read_library_metadata(library).kernels == meta.kernels  # stored in the library
    data = library.read_bytes()
    assert FATBIN_MAGIC in data and b"__global__" not in data  # compiled, not source
    for kernel in meta.kernels:
        assert set(kernel) == {"name", "schedule", "threads_per_block", "blocks", "registers",
                               "spill_bytes", "weight_bytes"}
        assert set(kernel["blocks"]) == {"1", "8"}


@needs_nvcc
@pytest.mark.parametrize("name", BUILDS)
def test_weight_streaming_and_topk_kernels_fill_the_gpu_and_reduce_across_threads(cuda_builds, name):
    _, meta, source = cuda_builds[name]
    kernels = _kernel_sources(source)
    checked = [k for k in meta.kernels if k["weight_bytes"] >= MIB or k["name"].startswith("topk_")]
    assert len(checked) >= (4 if name == "tree" else 2)  # both Linears (and both top-k kernels)
    for kernel in checked:
        body = kernels[kernel["name"]]
        assert "__shfl" in body or "__shared__" in body, kernel["name"]  # a cross-thread reduction
        assert kernel["blocks"]["1"] >= MIN_BLOCKS, kernel
    for kernel in (k for k in checked if k["weight_bytes"] >= MIB):
        body = kernels[kernel["name"]]
        # the weights come in 16-byte vector loads
        assert re.search(r"\*\((?:uint4|float4)\*\)\(\w+_(?:weight|q_weight)_local_ptr", body), kernel
        # W read once per call up to the max batch: batch 8 launches no more blocks than batch 1
        assert kernel["blocks"]["8"] == kernel["blocks"]["1"], kernel
        assert kernel["schedule"].startswith("medusa GEMV"), kernel


@needs_nvcc
@pytest.mark.parametrize("name", BUILDS)
def test_no_kernel_spills_and_the_source_stays_small(cuda_builds, name):
    _, meta, source = cuda_builds[name]
    for kernel in meta.kernels:
        assert kernel["registers"] is not None and 0 < kernel["registers"] <= 255, kernel
        assert kernel["spill_bytes"] == 0, kernel
    # dlight's LowBatchGEMV unrolled each q0f16 GEMV kernel into about half a megabyte of source
    bodies = _kernel_sources(source)
    assert all(len(bodies[k["name"]]) < 24 * 1024 for k in meta.kernels if k["weight_bytes"] >= MIB)
    assert max(len(body) for body in bodies.values()) < 64 * 1024


def test_centred_code_is_exact_at_every_position():
    """model.centred_code (the GPU's unpacking without conversions) against integer arithmetic,
    for every code of every position of words holding all bit patterns."""
    for name in ("q4f16_1", "q4f32_1", "q3f16_1"):
        scheme = quant.get_scheme(name)
        rng = np.random.default_rng(0)
        words = rng.integers(0, 2**32, size=2048, dtype=np.uint64).astype(np.uint32)
        words[:2] = [0, 0xFFFFFFFF]
        word = tvm.te.placeholder((len(words),), "uint32", name="word")
        out = tvm.te.compute((len(words), scheme.per_storage),
                             lambda i, p: centred_code(word[i], p, scheme), name="out")
        func = tvm.compile(tvm.te.create_prim_func([word, out]), target="llvm")
        got = tvm.runtime.empty((len(words), scheme.per_storage), "float32")
        func(tvm.runtime.tensor(words), got)
        shifts = (np.arange(scheme.per_storage) * scheme.bits).astype(np.uint32)
        codes = (words[:, None] >> shifts) & ((1 << scheme.bits) - 1)
        np.testing.assert_array_equal(got.numpy(), codes.astype(np.float32) - scheme.max_int)


def _logits_on_cpu(config: MedusaConfig, scheme_name: str, gpu: bool, params, hidden) -> list:
    """The heads in model.py's CPU or GPU form, built for llvm (the GPU form's weight stage is
    then computed as written), on the packed parameters `params`."""
    model = MedusaModel(config, quant.get_scheme(scheme_name), gpu=gpu)
    mod, named = model.export_tvm(spec=model.get_default_spec())
    target = resolve_target("llvm")
    with target.target:
        executable = tvm.relax.build(_optimize(mod, target, config.max_batch_size), target.target,
                                     relax_pipeline=_finalize_pipeline())
    vm = VirtualMachine(executable, tvm.cpu())
    records = read_tensor_cache(params.path).by_name()
    arrays = [tvm.runtime.tensor(np.ascontiguousarray(load_array(params.path, records[name])))
              for name, _ in named]
    return [o.numpy() for o in vm["get_logits"](tvm.runtime.tensor(hidden), arrays)]


@pytest.mark.parametrize("scheme_name", list(quant.SCHEMES))
def test_the_gpu_form_computes_what_the_cpu_form_does(tmp_path, scheme_name):
    """The GPU Linears (a float32 weight stage; q3f16_1 without padding k to whole groups) give
    the CPU form's logits: the same weight values, float32 accumulation. hidden 72 leaves the
    last group of q3f16_1 (40) and q4 (32) partial."""
    config = tiny_config(hidden_size=72, max_batch_size=3)
    params = make_params_dir(tmp_path / "p", scheme_name, config=config)
    dtype = NUMPY_DTYPES[quant.get_scheme(scheme_name).model_dtype]
    hidden = random_hidden(config, 3, seed=1).astype(dtype)
    cpu = _logits_on_cpu(config, scheme_name, False, params, hidden)
    gpu = _logits_on_cpu(config, scheme_name, True, params, hidden)
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
