"""Building the Medusa heads into a library: the Relax module (model.py), optimized and
scheduled for the target, lowered, and exported with its metadata.

The build runs in explicit stages:
  1. _schedule: FuseTransposeMatmul first, then legalize, fuse and the target's kernel schedules
     (cpu_schedule on CPUs; on GPUs gpu_schedule's GEMVs, then dlight for the rest);
  2. _plan_memory: static memory planning with batch_size bounded by the config's max_batch_size;
  3. tvm.relax.build with relax_pipeline=_finalize_pipeline(): the VM lowering passes.
Between them the planned memory is measured and a `_metadata` Relax function returning the
metadata JSON is added, as MLC-LLM's compile does (library.py holds the metadata's format).
After the build, CUDA device code is compiled by nvcc (cuda.py) and the kernel report
(kernels.py: launches from stage 1, registers from ptxas) completes the metadata that is
embedded in the library as a string. The `_metadata` function, built before, has no kernels.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

from ..errors import CompileError, InputError, MedusaError, error_gist
from ..library import METADATA_FUNCTION, METADATA_SOURCE, LibraryMetadata, LibraryTree, metadata_c_source
from ..outputs import staged_directory, staged_file
from ..quantization import QuantScheme
from ..spec import MedusaConfig, ParamSpec, param_specs
from .cuda import compile_cuda_fatbin, cuda_source_modules, cuda_sources, fatbin_pack_imports
from .kernels import SCHEDULE_ATTR, KernelUsage, kernel_report
from .model import MedusaModel, TreeSpec
from .targets import ResolvedTarget

# Relax functions taking [batch_size, ...] inputs; memory is planned for the max batch size.
BATCHED_FUNCTIONS = ("get_logits", "get_tree_candidates")


def _named_rule(rule):
    """A dlight rule whose schedules carry its name (kernels.SCHEDULE_ATTR), for the report."""
    import tvm
    from tvm.s_tir import dlight as dl

    class Named(dl.ScheduleRule):
        def apply(self, func, target, tunable):
            space = rule.apply(func, target, tunable)
            if space is None:
                return None
            scheduled = space if isinstance(space, tvm.s_tir.Schedule) else space[0]
            named = scheduled.mod["main"].with_attr(SCHEDULE_ATTR, f"dlight {type(rule).__name__}")
            return tvm.s_tir.Schedule(named)

    return Named()


def _optimize(mod, target: ResolvedTarget, max_batch_size: int):
    """Stages 1 and 2: the module scheduled, with its memory planned."""
    return _plan_memory(_schedule(mod, target, max_batch_size), target)


def _schedule(mod, target: ResolvedTarget, max_batch_size: int):
    """Relax optimizations and the target's kernel schedules (stage 1 of the build)."""
    from tvm import relax, transform
    from tvm.s_tir import dlight as dl

    for name in _functions_in(mod, BATCHED_FUNCTIONS):
        mod[name] = mod[name].with_attr("tir_var_upper_bound", {"batch_size": max_batch_size})
    passes = [
        # Our Linear layers already read W in [out, in] layout; this keeps any other
        # matmul(x, permute_dims(w)) from transposing a weight on every call.
        relax.transform.FuseTransposeMatmul(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    if not target.is_gpu:
        # Hand schedules for the GEMV kernels: parallel rows, vectorised k, W read once per
        # call up to batch 8 (cpu_schedule.py). Other targets' kernels are left alone.
        from .cpu_schedule import schedule_cpu_kernels_pass

        passes.append(schedule_cpu_kernels_pass)
    else:
        # Our GEMV schedules (gpu_schedule.py) for every Linear; the top-k kernels come
        # scheduled (gpu_topk.py); dlight takes the rest (the tree's gathers and concatenation).
        # dl.gpu.Matmul is left out: it segfaults in MatmulTensorization on CUDA float16 with a
        # dynamic batch (TVM 0.27). Fallback binds threads for whatever the others decline.
        from .gpu_schedule import schedule_gpu_kernels_pass

        passes.append(schedule_gpu_kernels_pass)
        passes.append(dl.ApplyDefaultSchedule(*map(_named_rule, (
            dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
            dl.gpu.Fallback()))))
    with target.target:
        return transform.Sequential(passes, name="medusa_schedule")(mod)


def _plan_memory(mod, target: ResolvedTarget):
    """VM-ready Relax and static memory planning (stage 2 of the build)."""
    from tvm import relax, transform

    passes = [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
    ]
    with target.target:
        return transform.Sequential(passes, name="medusa_plan_memory")(mod)


def _functions_in(mod, names: tuple[str, ...]) -> list[str]:
    present = {gv.name_hint for gv in mod.get_global_vars()}
    return [name for name in names if name in present]


def _finalize_pipeline():
    """VM lowering after memory planning (stage 2, passed to tvm.relax.build)."""
    from tvm import relax, transform

    return transform.Sequential(
        [
            relax.transform.LowerAllocTensor(),
            relax.transform.KillAfterLastUse(),
            relax.transform.LowerRuntimeBuiltin(),
            relax.transform.ComputePrimValue(),
            relax.transform.VMShapeLower(),
            relax.transform.AttachGlobalSymbol(),
            _mark_shape_functions_noalias(),
        ],
        name="medusa_finalize",
    )


def _mark_shape_functions_noalias():
    """Give "tirx.noalias" to PrimFuncs with at most one parameter (VMShapeLower's shape_func,
    one int64 buffer), where it holds trivially.

    TVM 0.27's LLVM code generator decides whether the buffers of every function in a module
    may alias from the function it declared last (CodeGenLLVM::is_restricted_ is set per
    declaration and read while generating all of them). A shape_func without the attribute
    declared last took `noalias` away from every kernel of the library: LLVM then kept their
    accumulators in memory (measured: the q0f32 vocab projection at batch 8 took 40 ms in the
    library and 27 ms compiled alone).
    """
    from tvm import tirx

    @tirx.transform.prim_func_pass(opt_level=0, name="medusa.MarkShapeFunctionsNoAlias")
    def mark(func, mod, ctx):
        if func.attrs and "tirx.noalias" in func.attrs or len(func.params) > 1:
            return func
        return func.with_attr("tirx.noalias", True)  # one buffer (or none): nothing to alias

    return mark


def _planned_bytes(func) -> int:
    """Bytes of the storage StaticPlanBlockMemory allocated for intermediates of `func`."""
    from tvm import ir, relax, tirx

    alloc_storage = ir.Op.get("relax.memory.alloc_storage")
    sizes: list[int] = []

    def visit(expr) -> None:
        if isinstance(expr, relax.Call) and expr.op.same_as(alloc_storage):
            size = expr.args[0]  # R.shape([nbytes]), static once batch_size is bounded
            if isinstance(size, relax.ShapeExpr) and isinstance(size.values[0], tirx.IntImm):
                sizes.append(int(size.values[0]))

    relax.analysis.post_order_visit(func, visit)
    return sum(sizes)


def _with_metadata(mod, metadata: LibraryMetadata):
    """mod plus a `_metadata` Relax function returning the metadata JSON (MLC-LLM's convention)."""
    from tvm import ir, relax

    builder = relax.BlockBuilder()
    with builder.function(METADATA_FUNCTION, params=[]):
        builder.emit_func_output(ir.StringImm(json.dumps(metadata.to_json())))
    mod[METADATA_FUNCTION] = builder.finalize()[METADATA_FUNCTION]
    return mod


# Module kind -> (TVM's name of its source format, file suffix): the code --save-source writes.
# A GPU library's device modules, or a CPU library's own code (LLVM IR).
SOURCE_FORMATS = {
    "cuda": ("cuda", ".cu"),
    "opencl": ("cl", ".cl"),
    "metal": ("metal", ".metal"),
    "webgpu": ("wgsl", ".wgsl"),
    "llvm": ("ll", ".ll"),
}


def _source_modules(executable, target: ResolvedTarget) -> list:
    """The modules --save-source writes: the device modules of a GPU library, else the host's."""
    found, stack = [], list(executable.mod.imports)
    while stack:
        module = stack.pop(0)
        stack += list(module.imports)
        if module.kind in SOURCE_FORMATS and (module.kind != "llvm") == target.is_gpu:
            found.append(module)
    return found


def _write_sources(executable, target: ResolvedTarget, directory: Path, stem: str) -> None:
    """The code of every source module into the staged `directory`: STEM.cu (or .cl, .ll, ...),
    numbered when there are several."""
    modules = _source_modules(executable, target)
    if not modules:
        raise CompileError(f"--save-source: the {target.name} library keeps no source to save")
    for index, module in enumerate(modules):
        fmt, suffix = SOURCE_FORMATS[module.kind]
        name = f"{stem}{'' if len(modules) == 1 else f'-{index}'}{suffix}"
        (directory / name).write_text(module.inspect_source(fmt))


def _export_with_sources(executable, target: ResolvedTarget, output: Path,
                         metadata: LibraryMetadata, fatbins: dict[bytes, bytes],
                         save_source: Path | None) -> None:
    """_export, and the sources into `save_source`: both, or (on an error) neither."""
    if save_source is None:
        _export(executable, target, output, metadata, fatbins)
        return
    try:
        with staged_directory(save_source, flag="--save-source") as staged:
            _write_sources(executable, target, staged.path, output.stem)
            _export(executable, target, output, metadata, fatbins)
            try:
                staged.publish()
            except BaseException:
                output.unlink(missing_ok=True)
                raise
    except OSError as exc:
        raise InputError(f"--save-source {save_source}: cannot write there "
                         f"({exc.strerror or exc})") from None


def _compile_cuda(executable, target: ResolvedTarget) -> tuple[dict[bytes, bytes], dict[str, KernelUsage]]:
    """nvcc on the library's CUDA source: (source -> fatbin for the export, ptxas's report)."""
    binaries, usage = {}, {}
    with tempfile.TemporaryDirectory(prefix="medusa-nvcc-") as workdir:
        for source in cuda_sources(executable.mod):
            binary = compile_cuda_fatbin(source, target.cuda_arches, Path(workdir))
            binaries[source.encode()] = binary.fatbin
            usage.update(binary.usage)
    return binaries, usage


def _export(executable, target: ResolvedTarget, output: Path, metadata: LibraryMetadata,
            fatbins: dict[bytes, bytes]) -> None:
    """Write the library to a temporary file beside `output`, then rename it into place."""
    kwargs = {}
    if target.device_code == "fatbin":
        kwargs["fpack_imports"] = fatbin_pack_imports(target.cuda_arches, fatbins)
    try:
        with staged_file(output) as tmp, tempfile.TemporaryDirectory(prefix="medusa-export-") as workdir:
            addons = []
            if output.suffix != ".wasm":
                source = Path(workdir) / METADATA_SOURCE
                source.write_text(metadata_c_source(metadata))
                addons.append(str(source))
            try:
                executable.export_library(str(tmp), addons=addons, workspace_dir=workdir, **kwargs)
            except MedusaError:
                raise
            except Exception as exc:
                raise CompileError(
                    f"-o {output}: exporting the {target.name} library failed ({error_gist(exc)})"
                ) from exc
    except OSError as exc:
        raise InputError(f"-o {output}: cannot write there ({exc.strerror or exc})") from None


def compile_library(config: MedusaConfig, scheme: QuantScheme, target: ResolvedTarget,
                    tree: TreeSpec | None, output: Path,
                    save_source: Path | None = None) -> LibraryMetadata:
    """Build the heads for `target`, with get_tree_candidates where `tree` is given, for batches
    up to config.max_batch_size, and write the library to `output` (and its device code, or a
    CPU library's LLVM IR, into the directory `save_source`). Its metadata is returned."""
    import tvm

    model = MedusaModel(config, scheme, tree, cpu_target=None if target.is_gpu else target.target,
                        gpu=target.is_gpu)
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    params = [ParamSpec(name, tuple(int(d) for d in p.shape), str(p.dtype)) for name, p in named_params]
    if params != param_specs(config, scheme):  # model.py and spec.py must agree on the names
        raise CompileError(f"the {scheme.name} model declares parameters that spec.param_specs "
                           "does not list; model.py and spec.py disagree")
    try:
        with cuda_source_modules() if target.kind == "cuda" else contextlib.nullcontext():
            scheduled = _schedule(mod, target, config.max_batch_size)
            optimized = _plan_memory(scheduled, target)
            metadata = LibraryMetadata(
                config=config, quantization=scheme.name, dtype=scheme.model_dtype, params=params,
                target=json.loads(target.json), target_name=target.name,
                device_code=target.device_code, cuda_arches=list(target.cuda_arches),
                memory_usage={name: _planned_bytes(optimized[name])
                              for name in _functions_in(optimized, BATCHED_FUNCTIONS)},
                tree=None if tree is None else LibraryTree(tree.tree, tree.topk))
            executable = tvm.relax.build(
                _with_metadata(optimized, metadata), target.target,
                relax_pipeline=_finalize_pipeline(),
                system_lib=output.suffix == ".tar",
            )
    except MedusaError:
        raise
    except Exception as exc:
        raise CompileError(
            f"--target {target.name}: TVM failed to build the {scheme.name} heads "
            f"({error_gist(exc)})"
        ) from exc
    fatbins, usage = _compile_cuda(executable, target) if target.device_code == "fatbin" else ({}, None)
    metadata.kernels = kernel_report(scheduled, BATCHED_FUNCTIONS, config.max_batch_size, usage)
    _export_with_sources(executable, target, output, metadata, fatbins, save_source)
    return metadata
