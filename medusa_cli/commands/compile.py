"""`medusa compile`: a packed parameter directory -> a TVM library of the Medusa heads.

The request is checked before any compile time is spent: the packed directory (its config and
its tensors against spec.param_specs), the target's toolchain, the output's name, the tree.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..compiler.model import TreeSpec
from ..compiler.pipeline import compile_library
from ..compiler.targets import ResolvedTarget, resolve_target
from ..compiler.gpu_topk import GpuTopkLayout
from ..compiler.topk import MAX_TOPK, TopkLayout
from ..errors import InputError, ParamsError
from ..outputs import check_output_dir
from ..library import (
    SHARED_LIBRARY_SUFFIXES,
    SYSTEM_LIBRARY_SUFFIX,
    LibraryMetadata,
    library_file_name,
)
from ..packed.check import check_packed
from ..packed.config import CONFIG_FILE, read_packed_config
from ..quantization import QuantScheme, get_scheme
from ..spec import MedusaConfig, param_specs
from ..trees import DEFAULT_TOPK, load_tree


@dataclasses.dataclass
class CompileRequest:
    params_dir: Path
    # short name (llvm, cpu, cuda, ..., auto) or a TVM target JSON dict
    target: str = "llvm"
    # CUDA arch(es) "sm_90" or "sm_80,sm_90"; ROCm gfx arch. None: local GPU, else a default
    arch: str | None = None
    # None: the params dir's scheme; anything else must equal it
    quantization: str | None = None
    # None: the max_batch_size of PARAMS_DIR/mlc-chat-config.json; anything else must equal it
    max_batch_size: int | None = None
    # .so/.dylib/.dll (shared library), .tar (system library) or .wasm (webgpu);
    # None: PARAMS_DIR/medusa-<target>-<quantization>.so
    output: Path | None = None
    # a shipped tree name (configs/trees) or a JSON file of paths; None: no tree functions
    tree: str | Path | None = None
    # ranks kept per head for the tree's candidates (Medusa's TOPK); None: DEFAULT_TOPK
    topk: int | None = None
    # a new (or empty) directory for the code the library was built from: the device kernels
    # of a GPU library (CUDA: a .cu file with every __global__ kernel), a CPU library's LLVM IR
    save_source: Path | None = None


@dataclasses.dataclass
class CompileResult:
    output: Path
    seconds: float
    metadata: LibraryMetadata
    # where the source was saved (CompileRequest.save_source)
    save_source: Path | None = None

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "save_source": None if self.save_source is None else str(self.save_source),
            "target": self.metadata.target,
            "quantization": self.metadata.quantization,
            "seconds": round(self.seconds, 3),
            "metadata": self.metadata.to_json(),
        }


def _resolve_scheme(requested: str | None, packed: str, params_dir: Path) -> QuantScheme:
    scheme = get_scheme(packed)
    if requested is None:
        return scheme
    get_scheme(requested)  # an unknown name is its own error
    if requested != packed:
        raise InputError(
            f"--quantization {requested} does not match {params_dir / CONFIG_FILE}, which holds "
            f"{packed}; drop --quantization or re-run `medusa convert --quantization {requested}`"
        )
    return scheme


def _resolve_max_batch(requested: int | None, config: MedusaConfig, params_dir: Path) -> None:
    if requested is not None and requested != config.max_batch_size:
        raise InputError(
            f"--max-batch-size {requested} differs from the max_batch_size "
            f"{config.max_batch_size} in {params_dir / CONFIG_FILE}, which MLC-LLM's engine "
            f"reads too; re-run `medusa convert --max-batch-size {requested}`, or drop "
            "--max-batch-size"
        )


def _check_output_suffix(output: Path, target: ResolvedTarget) -> None:
    allowed = (".wasm",) if target.suffix == ".wasm" else SHARED_LIBRARY_SUFFIXES + (SYSTEM_LIBRARY_SUFFIX,)
    if output.suffix not in allowed:
        raise InputError(f"-o {output}: a {target.name} library must end in {' or '.join(allowed)}")


def _resolve_tree(request: CompileRequest, config: MedusaConfig,
                  target: ResolvedTarget) -> TreeSpec | None:
    """The request's tree, validated against the heads; None without --tree."""
    if request.tree is None:
        if request.topk is not None:
            raise InputError(f"--topk {request.topk} only applies with --tree; add --tree CHOICES "
                             "or drop --topk")
        return None
    topk = DEFAULT_TOPK if request.topk is None else request.topk
    most = min(MAX_TOPK, config.vocab_size)
    if isinstance(topk, int) and not isinstance(topk, bool) and topk > most:
        limit = "the vocabulary size" if most == config.vocab_size else "the most the top-k kernel keeps"
        raise InputError(f"--topk {topk}: at most {most} ({limit}); lower --topk and use a tree "
                         "whose ranks fit")
    tree = load_tree(request.tree, topk, config.medusa_num_heads)  # --tree / --topk errors
    # on a GPU one top-k call takes the base logits' rows and those of every head the tree reaches
    layout = GpuTopkLayout.for_rows(config.vocab_size, 1 + tree.depth, topk) if target.is_gpu \
        else TopkLayout.for_target(config.vocab_size, gpu=False)
    return TreeSpec(tree=tree, topk=topk, layout=layout)


def compile_heads(request: CompileRequest) -> CompileResult:
    """Build the heads in request.params_dir for request.target and write the library."""
    start = time.perf_counter()
    params_dir = Path(request.params_dir)
    if not params_dir.is_dir():
        raise ParamsError(f"{params_dir}: not a directory; pass a PARAMS_DIR written by `medusa convert`")
    packed = read_packed_config(params_dir)
    scheme = _resolve_scheme(request.quantization, packed.quantization, params_dir)
    _resolve_max_batch(request.max_batch_size, packed.model, params_dir)
    target = resolve_target(request.target, request.arch)
    output = Path(request.output) if request.output is not None else \
        params_dir / library_file_name(target.name, scheme.name, target.suffix)
    _check_output_suffix(output, target)
    tree = _resolve_tree(request, packed.model, target)
    save_source = None if request.save_source is None else Path(request.save_source)
    if save_source is not None:
        check_output_dir(save_source, force=False, flag="--save-source")
    check_packed(params_dir, param_specs(packed.model, scheme),
                 against=CONFIG_FILE, fix="re-run `medusa convert`")
    metadata = compile_library(packed.model, scheme, target, tree, output, save_source)
    return CompileResult(output=output, seconds=time.perf_counter() - start, metadata=metadata,
                         save_source=save_source)
