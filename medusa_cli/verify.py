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

Order: the library's metadata; the packed directory's integrity (size and md5 of every shard,
names, shapes and dtypes against the library's parameter list); then numerics. A damaged or
mismatched directory is a failed verification (exit 1), like wrong numbers: the artifacts are
wrong. Problems with the command itself (a missing path, bad flags, malformed --inputs) are
InputErrors (exit 2).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import Checkpoint, iter_head_tensors, read_config_hints
from .config import CONFIG_FILE, TENSOR_CACHE_FILE, MedusaConfig, PackedConfig, read_packed_config
from .errors import InputError, ParamsError, VerificationFailed
from .oracle import HIDDEN_STD, HeadMetrics, HeadWeights, compare_logits, dequantized_head, head_logits, random_hidden
from .quant import QuantScheme, cast_to, dequantize_weight, get_scheme, quantized_names
from .resources import load_config_json
from .run import load_hidden_states, logits_in_batches, read_library, to_float64
from .tensor_cache import TensorCache, check_integrity, load_array, read_tensor_cache

THRESHOLDS_FILE = "thresholds.json"
# The two comparisons each head gets, in report order.
REFERENCE = "reference"
SOURCE = "source"


# ---------------------------------------------------------------------------------------------
# Thresholds


@dataclasses.dataclass(frozen=True)
class Bounds:
    """When one comparison of compiled logits [batch, vocab] with expected logits passes."""

    # max |compiled - expected| <= atol + rtol * max |expected| (allclose, with the logits' peak
    # as the scale: single logits near zero have no meaningful relative error)
    rtol: float
    atol: float = 0.0
    # worst batch row's cosine similarity
    min_cosine: float = -1.0
    # rows whose argmax agrees, near ties included (see tie_slack)
    min_top1: float = 0.0
    # mean top-k overlap; exact, near ties included
    min_topk: float = 0.0

    def allowed_error(self, peak: float) -> float:
        return self.atol + self.rtol * peak


@dataclasses.dataclass(frozen=True)
class Thresholds:
    scheme: str
    # compiled vs the weights the library should hold (compile error)
    reference: Bounds
    # compiled vs the original checkpoint (quantization + compile error)
    source: Bounds

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, REFERENCE: dataclasses.asdict(self.reference),
                SOURCE: dataclasses.asdict(self.source)}


# VerifyRequest field -> (comparison, Bounds field, CLI flag)
_OVERRIDES = {
    "rtol": (REFERENCE, "rtol", "--rtol"),
    "atol": (REFERENCE, "atol", "--atol"),
    "min_cosine": (REFERENCE, "min_cosine", "--min-cosine"),
    "min_top1": (REFERENCE, "min_top1", "--min-top1"),
    "min_topk": (REFERENCE, "min_topk", "--min-topk"),
    "source_rtol": (SOURCE, "rtol", "--source-rtol"),
    "source_min_cosine": (SOURCE, "min_cosine", "--source-min-cosine"),
    "source_min_top1": (SOURCE, "min_top1", "--source-min-top1"),
}
# Allowed range of each Bounds field
_RANGES = {"rtol": (0.0, math.inf), "atol": (0.0, math.inf), "min_cosine": (-1.0, 1.0),
           "min_top1": (0.0, 1.0), "min_topk": (0.0, 1.0)}


def _bounds_from(data: dict, where: str) -> Bounds:
    try:
        return Bounds(**{key: float(value) for key, value in data.items()})
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: invalid bounds {data} ({exc})") from None


def load_thresholds(scheme: str, overrides: dict[str, float | None] | None = None) -> Thresholds:
    """The defaults for `scheme` from configs/thresholds.json, with flag overrides applied."""
    table = load_config_json(THRESHOLDS_FILE)
    if scheme not in table:
        raise InputError(f"configs/{THRESHOLDS_FILE} has no thresholds for quantization '{scheme}'")
    entry = table[scheme]
    bounds = {
        name: _bounds_from(entry[name], f"configs/{THRESHOLDS_FILE} {scheme}.{name}")
        for name in (REFERENCE, SOURCE)
    }
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        comparison, field, flag = _OVERRIDES[key]
        low, high = _RANGES[field]
        if not (low <= value <= high):
            raise InputError(f"{flag} {value}: must be between {low:g} and {high:g}")
        bounds[comparison] = dataclasses.replace(bounds[comparison], **{field: float(value)})
    return Thresholds(scheme=scheme, reference=bounds[REFERENCE], source=bounds[SOURCE])


# ---------------------------------------------------------------------------------------------
# Judging one head


@dataclasses.dataclass
class Comparison:
    """Compiled logits of one head against one set of expected logits, judged."""

    metrics: HeadMetrics
    # max |expected|: the scale rtol is relative to
    peak: float
    # atol + rtol * peak
    allowed_error: float
    # rows whose argmax differs from the expected one only by a near tie (counted as agreeing)
    near_ties: int
    # judged top-1 agreement: exact rows plus near ties, over the batch
    top1: float
    reasons: list[str]

    @property
    def passed(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict:
        return _finite_or_none({
            **dataclasses.asdict(self.metrics),
            "peak": self.peak,
            "allowed_error": self.allowed_error,
            "near_ties": self.near_ties,
            "top1": self.top1,
            "passed": self.passed,
            "reasons": self.reasons,
        })


def _finite_or_none(value: Any) -> Any:
    """inf and NaN become None: JSON has no spelling for them that jq accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def _top1_rows(actual: np.ndarray, expected: np.ndarray, slack: float) -> tuple[np.ndarray, np.ndarray]:
    """(exact, near) boolean [batch]: argmax agrees; or the compiled argmax's expected logit is
    within `slack` of the expected maximum. Rows with inf/NaN never agree."""
    finite = np.isfinite(actual).all(axis=1)
    picked = np.argmax(np.where(finite[:, None], actual, 0.0), axis=1)  # (batch,)
    exact = finite & (picked == np.argmax(expected, axis=1))
    gaps = expected.max(axis=1) - expected[np.arange(len(picked)), picked]  # (batch,)
    near = finite & ~exact & (gaps <= slack)
    return exact, near


def tie_slack(reference: np.ndarray, thresholds: Thresholds) -> float:
    """How far below the best logit a different top-1 pick may be and still count as agreeing.

    Twice the compile error the reference bounds allow: an error e can flip two logits that are
    less than 2e apart, so a library whose errors pass never fails top-1 on a near tie. The same
    slack serves the source comparison, whose own (quantization) error is no excuse for a flip.
    """
    return 2 * thresholds.reference.allowed_error(float(np.max(np.abs(reference))))


def judge(actual: np.ndarray, expected: np.ndarray, bounds: Bounds, slack: float, k: int,
          label: str) -> Comparison:
    """Compare compiled logits with expected ones (float64) and list every bound they break."""
    metrics = compare_logits(actual, expected, k=k)
    expected = np.asarray(expected, dtype=np.float64)
    peak = float(np.max(np.abs(expected)))
    allowed = bounds.allowed_error(peak)
    exact, near = _top1_rows(np.asarray(actual, dtype=np.float64), expected, slack)
    top1 = float(np.mean(exact | near))
    reasons = []
    if not metrics.max_abs_err <= allowed:  # also catches NaN
        reasons.append(
            f"max error vs {label} {metrics.max_abs_err:.3g} ({metrics.max_rel_err:.3g} of the "
            f"logits' scale {peak:.3g}) > {allowed:.3g} (rtol {bounds.rtol:g}, atol {bounds.atol:g})"
        )
    if metrics.cosine < bounds.min_cosine:
        reasons.append(f"cosine vs {label} {metrics.cosine:.6f} < {bounds.min_cosine:g}")
    if top1 < bounds.min_top1:
        reasons.append(f"top-1 agreement vs {label} {top1:.3g} < {bounds.min_top1:g}")
    if metrics.topk_overlap < bounds.min_topk:
        reasons.append(
            f"top-{metrics.k} overlap vs {label} {metrics.topk_overlap:.3g} < {bounds.min_topk:g}"
        )
    return Comparison(metrics=metrics, peak=peak, allowed_error=allowed, near_ties=int(near.sum()),
                      top1=top1, reasons=reasons)


# ---------------------------------------------------------------------------------------------
# Reports


@dataclasses.dataclass
class HeadReport:
    head: int
    # compiled vs the weights the library should hold
    vs_reference: Comparison
    # compiled vs the original checkpoint; None when verifying against the packed weights
    vs_source: Comparison | None

    @property
    def passed(self) -> bool:
        return self.vs_reference.passed and (self.vs_source is None or self.vs_source.passed)

    @property
    def reasons(self) -> list[str]:
        return self.vs_reference.reasons + (self.vs_source.reasons if self.vs_source else [])

    def to_dict(self) -> dict:
        return {
            "head": self.head,
            "passed": self.passed,
            "reasons": self.reasons,
            "vs_reference": self.vs_reference.to_dict(),
            "vs_source": self.vs_source.to_dict() if self.vs_source else None,
        }


@dataclasses.dataclass
class TreeReport:
    """Tree candidates computed in the library, checked twice.

    - against tree.generate_candidates fed with the library's own logits: the candidate kernels
      (top-k, gathers) must agree exactly, whatever the scheme;
    - against generate_candidates fed with the oracle's logits: nodes that agree, per depth.
      Exact agreement is required where the scheme keeps float32 weights (q0f32); elsewhere
      rounding legitimately reorders near-tied candidates, so it is reported, not judged.
    """

    name: str
    nodes: int
    # tree nodes (root excluded) per depth whose candidate matches, vs the oracle's logits
    oracle_agreement_per_depth: list[float]
    oracle_exact_required: bool
    # candidates (tree and cartesian) that differ from generate_candidates on the library's logits
    self_mismatches: int

    @property
    def passed(self) -> bool:
        exact = all(a == 1.0 for a in self.oracle_agreement_per_depth)
        return self.self_mismatches == 0 and (exact or not self.oracle_exact_required)

    @property
    def reason(self) -> str | None:
        if self.self_mismatches:
            return (f"tree {self.name}: {self.self_mismatches} candidates differ from the tree "
                    "algorithm applied to the library's own logits")
        if not self.passed:
            agreement = ", ".join(f"{a:.3f}" for a in self.oracle_agreement_per_depth)
            return f"tree {self.name}: candidates differ from the oracle's (agreement per depth {agreement})"
        return None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed, "reason": self.reason}


@dataclasses.dataclass
class Integrity:
    """The packed directory checked against tensor-cache.json and the library's parameter list."""

    ok: bool
    shards: int
    tensors: int
    bytes: int
    # the first problem found, naming the file or tensor
    error: str | None = None


@dataclasses.dataclass
class SourceUsed:
    # "checkpoint": the original weights; "packed": the packed directory itself
    kind: str
    path: Path
    # how it was chosen: "--source", "recorded in mlc-chat-config.json" or "packed weights"
    origin: str
    layout: str | None = None


@dataclasses.dataclass
class VerifyReport:
    library: Path
    params_dir: Path
    # the library's metadata: quantization, dtype, target, params, ...
    metadata: dict
    device: str
    thresholds: Thresholds
    integrity: Integrity
    # None when integrity failed before anything ran
    source: SourceUsed | None
    # {"kind": "random"|"file", "batch": N, "seed"|"path": ...}
    inputs: dict | None
    heads: list[HeadReport]
    warnings: list[str]
    seconds: float
    # None when the library has no tree
    tree: TreeReport | None = None

    @property
    def passed(self) -> bool:
        return (self.integrity.ok and bool(self.heads) and all(h.passed for h in self.heads)
                and (self.tree is None or self.tree.passed))

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"

    @property
    def failed_heads(self) -> list[int]:
        return [h.head for h in self.heads if not h.passed]

    def failure_message(self) -> str:
        """One line naming what failed: the damaged file, or each failing head's first reason."""
        if not self.integrity.ok:
            return f"verification failed: {self.integrity.error}"
        parts = [f"head {h.head}: {h.reasons[0]}" for h in self.heads if not h.passed]
        if not parts and self.tree is not None:
            return f"verification failed: {self.tree.reason}"
        return f"verification failed for {len(parts)} of {len(self.heads)} heads: " + "; ".join(parts)

    def raise_for_verdict(self) -> None:
        """Raise VerificationFailed (exit code 1) unless every check passed."""
        if not self.passed:
            raise VerificationFailed(self.failure_message())

    def to_dict(self) -> dict:
        meta = self.metadata
        return {
            "verdict": self.verdict,
            "failed_heads": self.failed_heads,
            "library": {
                "path": str(self.library),
                "quantization": meta.get("quantization"),
                "dtype": meta.get("dtype"),
                "target": meta.get("target"),
                "max_batch_size": meta.get("max_batch_size"),
                "model_config": meta.get("model_config"),
                "medusa_cli_version": meta.get("medusa_cli_version"),
            },
            "params_dir": str(self.params_dir),
            "device": self.device,
            "source": None if self.source is None else {
                **dataclasses.asdict(self.source), "path": str(self.source.path)},
            "inputs": self.inputs,
            "integrity": dataclasses.asdict(self.integrity),
            "thresholds": self.thresholds.to_dict(),
            "heads": [h.to_dict() for h in self.heads],
            "tree": None if self.tree is None else self.tree.to_dict(),
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }


# ---------------------------------------------------------------------------------------------
# The request


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
        return {key: getattr(self, key) for key in _OVERRIDES}


# ---------------------------------------------------------------------------------------------
# Integrity


def _check_against_library(cache: TensorCache, metadata: dict, params_dir: Path) -> None:
    """Names, shapes and dtypes of the packed tensors against the library's parameter list."""
    manifest = params_dir / TENSOR_CACHE_FILE
    found = cache.by_name()
    fix = "pass the PARAMS_DIR this library was compiled from, or recompile it from this one"
    for param in metadata["params"]:
        record = found.get(param["name"])
        if record is None:
            raise ParamsError(f"{manifest}: tensor '{param['name']}' that the library needs is missing; {fix}")
        if list(record.shape) != list(param["shape"]) or record.dtype != param["dtype"]:
            raise ParamsError(
                f"{manifest}: tensor '{record.name}' is {list(record.shape)} {record.dtype}, the "
                f"library expects {list(param['shape'])} {param['dtype']}; {fix}"
            )
    wanted = {param["name"] for param in metadata["params"]}
    extra = [t.name for t in cache.tensors if t.name not in wanted]
    if extra:
        raise ParamsError(f"{manifest}: tensor '{extra[0]}' is not a parameter of the library; {fix}")


def check_packed_integrity(params_dir: Path, metadata: dict) -> tuple[Integrity, TensorCache]:
    """Every shard's size and md5, then the tensors against the library. A directory that is
    not a packed directory at all (no tensor-cache.json) raises ParamsError instead."""
    cache = read_tensor_cache(params_dir)
    integrity = Integrity(ok=True, shards=len(cache.shards), tensors=len(cache.tensors),
                          bytes=cache.param_bytes)
    try:
        check_integrity(params_dir, cache)
        _check_against_library(cache, metadata, Path(params_dir))
    except ParamsError as exc:
        integrity.ok = False
        integrity.error = str(exc)
    return integrity, cache


# ---------------------------------------------------------------------------------------------
# The oracle's heads


def _recorded_source(packed: PackedConfig, params_dir: Path) -> tuple[Path | None, list[str]]:
    """The source checkpoint recorded by `medusa convert`, if it still exists, and warnings."""
    config_path = params_dir / CONFIG_FILE
    recorded = packed.source.get("path")
    if not recorded:
        return None, [
            f"{config_path} records no source checkpoint; verifying against the packed weights "
            "themselves, which cannot reveal conversion or quantization errors (pass --source CKPT)"
        ]
    path = Path(recorded)
    if not path.exists():
        return None, [
            f"the source recorded in {config_path} ({path}) no longer exists; verifying against "
            "the packed weights themselves, which cannot reveal conversion or quantization errors "
            "(pass --source CKPT)"
        ]
    return path, []


def _changed_source_files(packed: PackedConfig) -> list[str]:
    """Warnings for recorded source files that are gone or whose sha256 no longer matches."""
    from .convert import sha256_file

    warnings = []
    for name, info in (packed.source.get("files") or {}).items():
        if not Path(name).is_file():
            warnings.append(f"source file {name}, recorded at conversion, is missing")
        elif info.get("sha256") and sha256_file(Path(name)) != info["sha256"]:
            warnings.append(
                f"source file {name} changed since `medusa convert` (its sha256 differs from the "
                "recorded one); verifying against its current contents"
            )
    return warnings


def _lm_head_file(packed: PackedConfig, ckpt: Checkpoint) -> Path | None:
    """The --lm-head file a conversion used: a recorded source file outside the checkpoint."""
    own = {str(p.resolve()) for p in ckpt.files}
    others = [Path(name) for name in (packed.source.get("files") or {}) if name not in own]
    return others[0] if len(others) == 1 and others[0].is_file() else None


def _plan_source(ckpt: Checkpoint, what: str, layout: str, config: MedusaConfig, lm_head_ckpt):
    """The head plan of the source, limited to the library's heads, checked against its shapes.
    `what` names the source in messages."""
    from .convert import plan_conversion

    _, hints = read_config_hints(ckpt.src)
    plan, available = plan_conversion(ckpt, layout, None, lm_head_ckpt, hints)
    found = (available, plan.num_layers, plan.hidden_size, plan.vocab_size)
    wanted = (config.medusa_num_heads, config.medusa_num_layers, config.hidden_size, config.vocab_size)
    if found[0] < wanted[0] or found[1:] != wanted[1:]:
        raise InputError(
            f"{what}: holds {found[0]} heads x {found[1]} layers, hidden {found[2]}, vocab "
            f"{found[3]}; the library has {wanted[0]} x {wanted[1]}, hidden {wanted[2]}, vocab "
            f"{wanted[3]}; pass the checkpoint the library was converted from"
        )
    if available > config.medusa_num_heads:  # converted with --num-heads
        plan, _ = plan_conversion(ckpt, layout, config.medusa_num_heads, lm_head_ckpt, hints)
    return plan


def _group_heads(tensors: Iterator[tuple[str, np.ndarray]], num_layers: int) -> Iterator[HeadWeights]:
    """(MLC name, array) in model order -> one float64 HeadWeights per head."""
    layers: list[tuple[np.ndarray, np.ndarray]] = []
    weight = None
    for name, array in tensors:
        if name.endswith(".linear.weight"):
            weight = to_float64(array)
        elif name.endswith(".linear.bias"):
            layers.append((weight, to_float64(array)))
        else:  # the head's vocab projection comes last
            if len(layers) != num_layers:
                raise InputError(f"tensor '{name}' arrives after {len(layers)} ResBlocks, expected {num_layers}")
            yield HeadWeights(layers=layers, lm_head=to_float64(array))
            layers = []


def _packed_heads(params_dir: Path, cache: TensorCache, config: MedusaConfig,
                  scheme: QuantScheme) -> Iterator[HeadWeights]:
    """The heads as stored in the packed directory (dequantized), one at a time, in float64."""
    from .config import param_names

    records = cache.by_name()

    def read(name: str) -> np.ndarray:
        if name.endswith(".weight") and scheme.is_quantized:
            q_weight, q_scale = (load_array(params_dir, records[n]) for n in quantized_names(name))
            return dequantize_weight(q_weight, q_scale, scheme, config.hidden_size)
        return load_array(params_dir, records[name])

    yield from _group_heads(((name, read(name)) for name in param_names(config)), config.medusa_num_layers)


# ---------------------------------------------------------------------------------------------
# verify_heads


def _hidden_states(request: VerifyRequest, config: MedusaConfig, dtype: str) -> tuple[np.ndarray, dict]:
    """Hidden states in the model dtype, and how they were made."""
    if request.inputs is not None:
        hidden = load_hidden_states(request.inputs, config.hidden_size, dtype)
        return hidden, {"kind": "file", "path": str(request.inputs), "batch": int(hidden.shape[0])}
    if request.batch < 1:
        raise InputError(f"--batch {request.batch}: must be at least 1")
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
    if not params_dir.is_dir():
        raise ParamsError(f"{params_dir}: not a directory; pass the PARAMS_DIR written by `medusa convert`")
    if request.source is not None and not Path(request.source).exists():
        raise InputError(f"--source {request.source}: no such file or directory")
    if request.lm_head is not None and not Path(request.lm_head).exists():
        raise InputError(f"--lm-head {request.lm_head}: no such file")
    metadata, config = read_library(library)
    scheme = get_scheme(metadata["quantization"])
    thresholds = load_thresholds(scheme.name, request.overrides())
    packed = read_packed_config(params_dir)
    hidden, inputs = _hidden_states(request, config, scheme.model_dtype)

    def report(**fields) -> VerifyReport:
        return VerifyReport(library=library, params_dir=params_dir, metadata=metadata,
                            device=request.device, thresholds=thresholds,
                            seconds=time.perf_counter() - started, **fields)

    integrity, cache = check_packed_integrity(params_dir, metadata)
    if not integrity.ok:
        return report(integrity=integrity, source=None, inputs=inputs, heads=[], warnings=[])

    with ExitStack() as stack:
        warnings: list[str] = []
        changed: Future | None = None
        if request.source is not None:
            source = SourceUsed("checkpoint", Path(request.source), "--source")
        else:
            recorded, warnings = _recorded_source(packed, params_dir)
            if recorded is None:
                source = SourceUsed("packed", params_dir, "packed weights")
            else:
                source = SourceUsed("checkpoint", recorded, f"recorded in {CONFIG_FILE}")
                # hashed on a thread of its own while the heads run
                pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256"))
                changed = pool.submit(_changed_source_files, packed)

        if source.kind == "checkpoint":
            ckpt = stack.enter_context(Checkpoint(source.path))
            lm_head = request.lm_head
            if lm_head is None and request.source is None:
                lm_head = _lm_head_file(packed, ckpt)
            lm_head_ckpt = stack.enter_context(Checkpoint(lm_head)) if lm_head is not None else None
            layout = "auto" if request.source is not None else packed.source.get("layout") or "auto"
            what = f"--source {source.path}" if request.source is not None else \
                f"the source recorded in {params_dir / CONFIG_FILE} ({source.path})"
            plan = _plan_source(ckpt, what, layout, config, lm_head_ckpt)
            source.layout = plan.layout.name
            tensors = ((name, array) for name, array, *_ in iter_head_tensors(plan, ckpt, lm_head_ckpt))
            oracle_heads = _group_heads(tensors, config.medusa_num_layers)
        else:
            oracle_heads = _packed_heads(params_dir, cache, config, scheme)

        from .runtime import load_heads

        runtime = load_heads(library, params_dir, device=request.device)
        compiled = logits_in_batches(runtime, hidden)
        hidden64 = to_float64(hidden)
        heads = []
        references = []
        for index, head in enumerate(oracle_heads):
            from_source = None
            if source.kind == "checkpoint":
                from_source = head_logits(head, hidden64)
                head = dequantized_head(head, scheme)
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
        if changed is not None:
            warnings += changed.result()
    return report(integrity=integrity, source=source, inputs=inputs, heads=heads, warnings=warnings,
                  tree=tree)


# Base-model logits for the tree check: a realistic spread (std 3, like a 7B model's logits).
_BASE_LOGITS_STD = 3.0


def _check_tree(runtime, scheme: QuantScheme, hidden: np.ndarray, compiled: list[np.ndarray],
                references: list[np.ndarray], seed: int) -> TreeReport:
    from .run import candidates_in_batches
    from .tree import build_buffers, generate_candidates

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
