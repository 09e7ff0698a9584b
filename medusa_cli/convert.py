"""`medusa convert`: a Medusa head checkpoint in any layout -> a packed parameter directory."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from . import quant
from .atomic import check_output_dir, staged_directory
from .checkpoint import (
    Checkpoint,
    FileRegion,
    HeadPlan,
    check_mixed_layouts,
    detect_layout,
    get_layout,
    iter_head_tensors,
    mapped_windows,
    plan_heads,
    read_config_hints,
)
from .config import CONFIG_FILE, MedusaConfig, PackedConfig
from .errors import CheckpointError, InputError
from .tensor_cache import write_tensor_cache


@dataclasses.dataclass
class ConvertRequest:
    source: Path
    output: Path
    # target dtype of plain weights; None keeps the source's (or follows --quantization)
    dtype: str | None = None
    quantization: str | None = None
    layout: str = "auto"
    num_heads: int | None = None
    # base-model weights file holding lm_head.weight, for heads without their own
    lm_head: Path | None = None
    force: bool = False
    allow_nonfinite: bool = False
    max_batch_size: int = 1


@dataclasses.dataclass
class ConfigDisagreement:
    field: str
    config_value: object
    tensor_value: object

    def message(self, config_path: Path | None) -> str:
        return (
            f"{config_path}: {self.field} is {self.config_value} but the tensors say "
            f"{self.tensor_value}; following the tensors"
        )


@dataclasses.dataclass
class ConvertResult:
    output: Path
    layout: str
    config: MedusaConfig
    quantization: str
    source_files: list[Path]
    source_dtype: str
    num_tensors: int
    param_bytes: int
    num_shards: int
    ignored_tensors: int
    warnings: list[str]
    seconds: float

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "layout": self.layout,
            "quantization": self.quantization,
            "config": self.config.to_dict(),
            "source_files": [str(p) for p in self.source_files],
            "source_dtype": self.source_dtype,
            "num_tensors": self.num_tensors,
            "param_bytes": self.param_bytes,
            "num_shards": self.num_shards,
            "ignored_tensors": self.ignored_tensors,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }


# Per float format, its bits with the sign shifted out: a value is NaN or Inf exactly when
# these are >= the floor (exponent all ones).
_NONFINITE_FLOOR = {
    "float16": (np.uint16, 0x7C00 << 1),
    "bfloat16": (np.uint16, 0x7F80 << 1),
    "float32": (np.uint32, 0x7F800000 << 1),
    "float64": (np.uint64, 0x7FF0000000000000 << 1),
}
_FINITE_CHUNK = 1 << 22


def all_finite(array: np.ndarray) -> bool:
    """No NaN or Inf, checked on the bits in cache-sized chunks (numpy's isfinite on float16
    runs scalar code: 10x slower)."""
    bits_dtype, floor = _NONFINITE_FLOOR[str(array.dtype)]
    bits = np.ascontiguousarray(array).reshape(-1).view(bits_dtype)
    floor = bits_dtype(floor & np.iinfo(bits_dtype).max)
    for start in range(0, bits.size, _FINITE_CHUNK):
        if (bits[start:start + _FINITE_CHUNK] << 1).max(initial=0) >= floor:
            return False
    return True


def resolve_scheme(dtype: str | None, quantization: str | None, source_dtype: np.dtype) -> quant.QuantScheme:
    """--dtype and --quantization together; the source dtype when neither is given."""
    if dtype is not None and dtype not in quant.PLAIN_SCHEME_FOR_DTYPE:
        raise InputError(
            f"unknown dtype '{dtype}'; choose one of: {', '.join(quant.PLAIN_SCHEME_FOR_DTYPE)} (--dtype)"
        )
    if quantization is not None:
        scheme = quant.get_scheme(quantization)
        if dtype is not None and dtype != scheme.model_dtype:
            raise InputError(
                f"--dtype {dtype} contradicts --quantization {quantization}, whose dtype is "
                f"{scheme.model_dtype}; drop --dtype"
            )
        return scheme
    name = dtype or str(source_dtype)
    if name not in quant.PLAIN_SCHEME_FOR_DTYPE:
        name = "float32"
    return quant.SCHEMES[quant.PLAIN_SCHEME_FOR_DTYPE[name]]


def config_disagreements(plan: HeadPlan, hints: dict, available_heads: int) -> list[ConfigDisagreement]:
    inferred = {
        "medusa_num_heads": available_heads,
        "medusa_num_layers": plan.num_layers,
        "hidden_size": plan.hidden_size,
        "vocab_size": plan.vocab_size,
    }
    return [
        ConfigDisagreement(field, hints[field], value)
        for field, value in inferred.items()
        if field in hints and hints[field] != value
    ]


def sha256_file(path: Path, stop: threading.Event | None = None) -> str | None:
    """The file's sha256; None if `stop` was set before it finished. Hashed through mapped
    windows of the file: no copies into Python buffers, and a bounded RSS."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for window in mapped_windows(f.fileno(), 0, os.fstat(f.fileno()).st_size):
            if stop is not None and stop.is_set():
                return None
            digest.update(window)
    return digest.hexdigest()


def _converted_stream(
    plan: HeadPlan,
    ckpt: Checkpoint,
    lm_head_ckpt: Checkpoint | None,
    scheme: quant.QuantScheme,
    allow_nonfinite: bool,
    total_bytes: int,
    progress: Callable[[int, int], None] | None,
) -> Iterator[tuple[str, np.ndarray, FileRegion | None]]:
    """(name, array, source region) per packed tensor; the region where the packed bytes are the
    source's own (a plain scheme in the source dtype), so the writer can copy file to file."""
    done = 0
    for name, array, source_name, region in iter_head_tensors(plan, ckpt, lm_head_ckpt):
        if not allow_nonfinite and not all_finite(array):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array.astype(np.float32))))
            raise CheckpointError(
                f"tensor '{source_name}' has {bad} NaN/Inf values; fix the checkpoint or pass "
                "--allow-nonfinite"
            )
        done += array.nbytes
        for packed_name, packed in quant.convert_tensor(name, array, scheme):
            yield packed_name, packed, region if packed is array else None
        del array
        if progress is not None:
            progress(done, total_bytes)


def plan_conversion(
    ckpt: Checkpoint,
    layout: str,
    num_heads: int | None,
    lm_head_ckpt: Checkpoint | None,
    hints: dict | None = None,
) -> tuple[HeadPlan, int]:
    """The head plan for a checkpoint and the number of heads it holds before --num-heads."""
    names = ckpt.names()
    if layout == "auto":
        chosen = detect_layout(names)
        check_mixed_layouts(names, chosen)
    else:
        chosen = get_layout(layout)
    shared = bool((hints or {}).get("original_lm_head", False))
    full = plan_heads(ckpt, chosen, lm_head_ckpt, shared_lm_head=shared)
    if num_heads is None:
        return full, full.num_heads
    return plan_heads(ckpt, chosen, lm_head_ckpt, num_heads=num_heads, shared_lm_head=shared), full.num_heads


def convert_checkpoint(
    request: ConvertRequest,
    progress: Callable[[int, int], None] | None = None,
) -> ConvertResult:
    """Convert request.source into request.output; progress(done_bytes, total_bytes).

    The output appears only once complete: it is written to a staging directory beside
    request.output and renamed at the end. On any error (or Ctrl-C) the staging directory is
    removed and an existing output is left untouched.
    """
    started = time.perf_counter()
    output = Path(request.output)
    check_output_dir(output, request.force)
    if request.max_batch_size < 1:
        raise InputError(f"--max-batch-size {request.max_batch_size}: must be at least 1")

    with ExitStack() as stack:
        ckpt = stack.enter_context(Checkpoint(request.source))
        lm_head_ckpt = None
        if request.lm_head is not None:
            lm_head_ckpt = stack.enter_context(Checkpoint(request.lm_head))
        config_path, hints = read_config_hints(Path(request.source))
        plan, available = plan_conversion(ckpt, request.layout, request.num_heads, lm_head_ckpt, hints)
        scheme = resolve_scheme(request.dtype, request.quantization, plan.source_dtype)
        disagreements = config_disagreements(plan, hints, available)
        warnings = [d.message(config_path) for d in disagreements]

        config = MedusaConfig(
            medusa_num_heads=plan.num_heads,
            medusa_num_layers=plan.num_layers,
            hidden_size=plan.hidden_size,
            vocab_size=plan.vocab_size,
            max_batch_size=request.max_batch_size,
        )
        total_bytes = sum(ckpt.nbytes(n) for n in plan.head_tensor_names())
        total_bytes += sum(
            (ckpt if key == "checkpoint" else lm_head_ckpt).nbytes(name) for key, name in plan.lm_heads
        )
        source_files = list(ckpt.files) + (list(lm_head_ckpt.files) if lm_head_ckpt else [])
        # Source digests are computed beside the conversion, on a thread of their own.
        stop_hashing = threading.Event()
        hasher = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256"))
        stack.callback(stop_hashing.set)
        digests = {p: hasher.submit(sha256_file, p, stop_hashing) for p in source_files}

        try:
            with staged_directory(output) as stage:
                staging = stage.path
                if progress is not None:
                    progress(0, total_bytes)
                cache = write_tensor_cache(
                    staging,
                    _converted_stream(plan, ckpt, lm_head_ckpt, scheme, request.allow_nonfinite,
                                      total_bytes, progress),
                    source_param_count=plan.param_count(),
                )
                provenance = {
                    "path": str(Path(request.source).resolve()),
                    "layout": plan.layout.name,
                    "source_dtype": str(plan.source_dtype),
                    "files": {
                        str(p.resolve()): {"sha256": digests[p].result(), "bytes": p.stat().st_size}
                        for p in source_files
                    },
                    "head_tensors": len(plan.head_tensor_names()) + plan.num_heads,
                    "ignored_tensors": plan.ignored,
                    "config_json": str(config_path.resolve()) if config_path else None,
                    "config_disagreements": [dataclasses.asdict(d) for d in disagreements],
                    "base_model_name_or_path": hints.get("base_model_name_or_path"),
                }
                packed = PackedConfig(model=config, quantization=scheme.name, source=provenance)
                (staging / CONFIG_FILE).write_text(packed.to_json())
                stage.publish()
        except OSError as exc:  # a full disk, a source file cut short...: no traceback
            where = f" ({exc.filename})" if exc.filename else ""
            raise InputError(f"-o {output}: writing failed: {exc.strerror or exc}{where}; "
                             "nothing was written") from None

    return ConvertResult(
        output=output,
        layout=plan.layout.name,
        config=config,
        quantization=scheme.name,
        source_files=source_files,
        source_dtype=str(plan.source_dtype),
        num_tensors=len(cache.tensors),
        param_bytes=cache.param_bytes,
        num_shards=len(cache.shards),
        ignored_tensors=plan.ignored,
        warnings=warnings,
        seconds=time.perf_counter() - started,
    )

