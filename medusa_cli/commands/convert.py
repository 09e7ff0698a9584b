"""`medusa convert`: a Medusa head checkpoint in any layout -> a packed parameter directory."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from .. import quantization as quant
from ..checkpoint.files import Checkpoint, read_config_hints, sha256_file
from ..checkpoint.plan import FROM_CHECKPOINT, HeadPlan, config_disagreements, iter_head_tensors, plan_conversion
from ..checkpoint.safetensors import FileRegion
from ..errors import CheckpointError, InputError
from ..outputs import check_not_overlapping, check_output_dir, staged_directory
from ..packed.config import CONFIG_FILE, DEFAULT_CONV_TEMPLATE, PackedConfig, resolve_conv_template
from ..packed.tensor_cache import write_tensor_cache
from ..spec import DEFAULT_MAX_BATCH_SIZE, MAX_BATCH_SIZE, MedusaConfig


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
    # the largest batch the compiled library will accept (mlc-chat-config.json's max_batch_size)
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    # mlc-chat-config.json's conv_template: a shipped template's name or a JSON file of one
    conv_template: str | Path = DEFAULT_CONV_TEMPLATE


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
                f"tensor '{source_name:.200}' has {bad} NaN/Inf values; fix the checkpoint or pass "
                "--allow-nonfinite"
            )
        done += array.nbytes
        for packed_name, packed in quant.convert_tensor(name, array, scheme):
            yield packed_name, packed, region if packed is array else None
        del array
        if progress is not None:
            progress(done, total_bytes)


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
    if not 1 <= request.max_batch_size <= MAX_BATCH_SIZE:
        raise InputError(f"--max-batch-size {request.max_batch_size}: must be between 1 and {MAX_BATCH_SIZE}")
    check_not_overlapping(output, [("SRC", Path(request.source)), ("--lm-head", request.lm_head)])
    conv_template = resolve_conv_template(request.conv_template)

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

        config = dataclasses.replace(plan.config, max_batch_size=request.max_batch_size)
        total_bytes = sum(ckpt.nbytes(n) for n in plan.head_tensor_names())
        total_bytes += sum(
            (ckpt if key == FROM_CHECKPOINT else lm_head_ckpt).nbytes(name) for key, name in plan.lm_heads
        )
        source_files = list(ckpt.files) + (list(lm_head_ckpt.files) if lm_head_ckpt else [])
        # Source digests are computed beside the conversion, on a thread of their own.
        stop_hashing = threading.Event()
        hasher = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256"))
        stack.callback(stop_hashing.set)
        digests = {p: hasher.submit(sha256_file, p, stop_hashing) for p in source_files}

        try:
            with staged_directory(output, request.force) as stage:
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
                packed = PackedConfig(model=config, quantization=scheme.name, source=provenance,
                                      conv_template=conv_template)
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

