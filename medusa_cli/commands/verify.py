"""`medusa verify`: a compiled heads library and its parameters against the float64 numpy oracle.

The oracle reads the ORIGINAL checkpoint (any layout the converter accepts) head by head and
never the packed directory, so a bug in conversion or compilation cannot hide in both. Each head
is compared twice:
  - with the reference: the weights the library should hold (dequantized, or rounded to the model
    dtype), computed from the source. This is the compile (and conversion) error, held tightly;
  - with the source weights themselves: quantization error plus compile error, held to looser
    floors that depend on the scheme.
Hidden states are rounded to the model dtype before both sides see them, so input rounding is not
counted as error.

Order: the library's metadata; the packed directory's integrity (packed.check: size and md5 of
every shard, names, shapes and dtypes against the library's parameter list); then numerics. A
damaged or mismatched directory is a failed verification (exit 1), like wrong numbers: the
artifacts are wrong. Problems with the command itself (a missing path, bad flags, malformed
--inputs) are InputErrors (exit 2).
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ..dtypes import to_float64
from ..errors import InputError, ParamsError
from ..library import LibraryMetadata, read_library_metadata
from ..packed.check import check_packed
from ..packed.config import CONFIG_FILE, PackedConfig, read_packed_config
from ..packed.tensor_cache import TensorCache, read_tensor_cache
from ..quantization import QuantScheme, cast_to, get_scheme
from ..runtime.heads import candidates_in_batches, load_heads, logits_in_batches
from ..runtime.inputs import load_hidden_states
from ..spec import MAX_BATCH_SIZE, MedusaConfig
from ..trees import build_buffers, generate_candidates
from ..verify.judge import judge, tie_slack
from ..verify.oracle import HIDDEN_STD, head_logits, random_hidden
from ..verify.report import HeadReport, Integrity, TreeReport, VerifyReport
from ..verify.source import check_source_flags, open_oracle_heads
from ..verify.thresholds import OVERRIDES, REFERENCE, SOURCE, load_thresholds


@dataclasses.dataclass
class VerifyRequest:
    library: Path
    params_dir: Path
    # original checkpoint; None: the one recorded in PARAMS_DIR/mlc-chat-config.json
    source: Path | None = None
    # base-model weights file holding lm_head.weight, when the source's heads have none
    lm_head: Path | None = None
    # cpu, cuda:0, ..., or auto (where the library runs)
    device: str = "cpu"
    # rows of seeded random hidden states; ignored with `inputs`
    batch: int = 4
    # .npy of hidden states [batch, hidden_size]; None: seeded random ones
    inputs: Path | None = None
    seed: int = 0
    # top-k overlap's k
    topk: int = 5
    # threshold overrides; None keeps configs/thresholds.json's value for the scheme
    rtol: float | None = None
    atol: float | None = None
    min_cosine: float | None = None
    min_top1: float | None = None
    min_topk: float | None = None
    source_rtol: float | None = None
    source_min_cosine: float | None = None
    source_min_top1: float | None = None

    def overrides(self) -> dict[str, float | None]:
        return {key: getattr(self, key) for key in OVERRIDES}




def _check_integrity(params_dir: Path, metadata: LibraryMetadata,
                     packed: PackedConfig) -> tuple[Integrity, TensorCache | None]:
    """packed.check with md5, against the library's parameters and scheme; a failure is an
    Integrity, not an error. A directory that is not a packed directory at all (no readable
    tensor-cache.json) still raises ParamsError."""
    cache = read_tensor_cache(params_dir)
    integrity = Integrity(ok=True, shards=len(cache.shards), tensors=len(cache.tensors),
                          bytes=cache.param_bytes)
    fix = "pass the PARAMS_DIR this library was compiled from, or recompile it from this one"
    try:
        check_packed(params_dir, metadata.params, against="the library", md5=True, cache=cache,
                     fix=fix)
        if packed.quantization != metadata.quantization:
            raise ParamsError(f"{params_dir / CONFIG_FILE}: quantization is "
                              f"{packed.quantization}, the library's is {metadata.quantization}; {fix}")
    except ParamsError as exc:
        integrity.ok = False
        integrity.error = str(exc)
    return integrity, cache


def _batch_disagreement(params_dir: Path, metadata: LibraryMetadata, packed: PackedConfig) -> list[str]:
    """max_batch_size is one value from convert to the library (MLC-LLM reads the config's and
    the library's); a pair that disagrees computes the same numbers, so it is a warning."""
    if packed.model.max_batch_size == metadata.max_batch_size:
        return []
    return [f"{params_dir / CONFIG_FILE} says max_batch_size {packed.model.max_batch_size}, the "
            f"library was compiled for {metadata.max_batch_size}; MLC-LLM reads both: re-run "
            f"`medusa convert --max-batch-size {metadata.max_batch_size}` or recompile"]


# ---------------------------------------------------------------------------------------------
# verify_heads


def check_seed_and_batch(seed: int, batch: int) -> None:
    """--seed seeds numpy's generator, which takes no negative seed; --batch rows of random
    hidden states are made up front, so an absurd count is refused rather than allocated."""
    if seed < 0:
        raise InputError(f"--seed {seed}: must be a non-negative integer")
    if not 1 <= batch <= MAX_BATCH_SIZE:
        raise InputError(f"--batch {batch}: must be between 1 and {MAX_BATCH_SIZE}")


def _hidden_states(request: VerifyRequest, config: MedusaConfig, dtype: str) -> tuple[np.ndarray, dict]:
    """Hidden states in the model dtype, and how they were made."""
    if request.inputs is not None:
        hidden = load_hidden_states(request.inputs, config.hidden_size, dtype)
        return hidden, {"kind": "file", "path": str(request.inputs), "batch": int(hidden.shape[0])}
    hidden = cast_to(random_hidden(request.batch, config.hidden_size, request.seed), dtype)
    return hidden, {"kind": "random", "batch": request.batch, "seed": request.seed, "std": HIDDEN_STD}


def verify_heads(request: VerifyRequest) -> VerifyReport:
    """Verify request.library with request.params_dir; a report whether it passes or fails.

    Raises InputError/ParamsError (exit 2) only when verification cannot run as asked; a failing
    library gives a report with verdict "fail" (see VerifyReport.raise_for_verdict).
    """
    started = time.perf_counter()
    library, params_dir = Path(request.library), Path(request.params_dir)
    if request.topk < 1:
        raise InputError(f"--topk {request.topk}: must be at least 1")
    check_seed_and_batch(request.seed, request.batch)
    if not params_dir.is_dir():
        raise ParamsError(f"{params_dir}: not a directory; pass the PARAMS_DIR written by `medusa convert`")
    check_source_flags(request.source, request.lm_head)
    metadata = read_library_metadata(library, load=True)
    config = metadata.config
    scheme = get_scheme(metadata.quantization)
    thresholds = load_thresholds(scheme.name, request.overrides())
    packed = read_packed_config(params_dir)
    hidden, inputs = _hidden_states(request, config, scheme.model_dtype)

    def report(**fields) -> VerifyReport:
        return VerifyReport(library=library, params_dir=params_dir, metadata=metadata,
                            device=request.device, thresholds=thresholds,
                            seconds=time.perf_counter() - started, **fields)

    integrity, cache = _check_integrity(params_dir, metadata, packed)
    if not integrity.ok:
        return report(integrity=integrity, source=None, inputs=inputs, heads=[], warnings=[])

    with ExitStack() as stack:
        warnings = _batch_disagreement(params_dir, metadata, packed)
        oracle = open_oracle_heads(stack, params_dir, packed, config, scheme, cache,
                                   request.source, request.lm_head)
        source = oracle.source

        runtime = load_heads(library, params_dir, device=request.device)
        compiled = logits_in_batches(runtime, hidden)
        hidden64 = to_float64(hidden)
        heads = []
        references = []
        for index, head in enumerate(oracle.heads):
            from_source = None
            if source.kind == "checkpoint":
                from_source = head_logits(head, hidden64)
                reference = head_logits(head, hidden64, scheme)  # the weights the library holds
            else:
                reference = head_logits(head, hidden64)
            if runtime.has_tree and index < runtime.tree.depth:
                references.append(reference)
            del head
            slack = tie_slack(reference, thresholds)
            got = compiled[index]
            heads.append(HeadReport(
                head=index,
                vs_reference=judge(got, reference, thresholds.reference, slack, request.topk, REFERENCE),
                vs_source=None if from_source is None else
                judge(got, from_source, thresholds.source, slack, request.topk, SOURCE),
            ))
        tree = _check_tree(runtime, scheme, hidden, compiled, references, request.seed) \
            if runtime.has_tree else None
        warnings += oracle.finish()
    return report(integrity=integrity, source=source, inputs=inputs, heads=heads, warnings=warnings,
                  tree=tree)


# Base-model logits for the tree check: a realistic spread (std 3, like a 7B model's logits).
_BASE_LOGITS_STD = 3.0


def _check_tree(runtime, scheme: QuantScheme, hidden: np.ndarray, compiled: list[np.ndarray],
                references: list[np.ndarray], seed: int) -> TreeReport:
    tree, topk = runtime.tree, runtime.topk
    buffers = build_buffers(tree, topk)
    rng = np.random.default_rng([seed, 1])
    base = (rng.standard_normal((hidden.shape[0], runtime.config.vocab_size)) * _BASE_LOGITS_STD).astype(np.float32)
    got_tree, got_cart = candidates_in_batches(runtime, base, hidden)
    own_tree, own_cart = generate_candidates(base, compiled[:tree.depth], buffers, topk)
    self_mismatches = int(np.count_nonzero(got_tree != own_tree) + np.count_nonzero(got_cart != own_cart))
    oracle_tree, _ = generate_candidates(base, references, buffers, topk)
    depth_of_node = buffers.medusa_position_ids  # [nodes], 0 for the root
    agreement = []
    for depth in range(1, tree.depth + 1):
        columns = depth_of_node == depth
        agreement.append(float(np.mean(got_tree[:, columns] == oracle_tree[:, columns])))
    return TreeReport(
        name=tree.name,
        nodes=tree.num_nodes,
        oracle_agreement_per_depth=agreement,
        oracle_exact_required=not scheme.is_quantized and scheme.model_dtype == "float32",
        self_mismatches=self_mismatches,
    )
