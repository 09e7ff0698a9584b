"""`medusa inspect`: what a checkpoint, a packed directory or a compiled library holds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..checkpoint.files import Checkpoint, read_config_hints
from ..checkpoint.layouts import BASE_LM_HEAD_NAMES
from ..checkpoint.plan import config_disagreements, plan_conversion
from ..devices import gpu_bandwidth_gbps
from ..errors import InputError
from ..library import SHARED_LIBRARY_SUFFIXES, SYSTEM_LIBRARY_SUFFIX, read_library_metadata
from ..packed.config import CONFIG_FILE, read_packed_config
from ..packed.tensor_cache import TENSOR_CACHE_FILE, read_tensor_cache
from ..quantization import get_scheme
from ..spec import param_count

# The GPU of the roofline when --kernels is given without --gpu.
DEFAULT_ROOFLINE_GPU = "h100"


@dataclasses.dataclass
class InspectReport:
    kind: str  # "checkpoint", "packed" or "library"
    path: Path
    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype: str
    param_count: int
    param_bytes: int
    layout: str | None = None
    quantization: str | None = None
    files: list[str] = dataclasses.field(default_factory=list)
    ignored_tensors: int = 0
    warnings: list[str] = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)
    # a library's kernel report (LibraryMetadata.kernels), with --kernels
    kernels: list[dict] | None = None
    # a library's roofline at a GPU's published bandwidth, with --kernels or --gpu
    roofline: dict | None = None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        return data


def inspect_checkpoint(path: Path, layout: str = "auto") -> InspectReport:
    with Checkpoint(path) as ckpt:
        config_path, hints = read_config_hints(path)
        plan, available = plan_conversion(ckpt, layout, None, None, hints)
        warnings = [d.message(config_path) for d in config_disagreements(plan, hints, available)]
        param_bytes = sum(ckpt.nbytes(n) for n in plan.head_tensor_names())
        param_bytes += sum(ckpt.nbytes(name) for _, name in plan.lm_heads)
        shared = sum(1 for _, name in plan.lm_heads if name in BASE_LM_HEAD_NAMES)
        extra = {"heads_using_base_lm_head": shared} if shared else {}
        return InspectReport(
            kind="checkpoint",
            path=Path(path),
            layout=plan.layout.name,
            num_heads=plan.num_heads,
            num_layers=plan.num_layers,
            hidden_size=plan.hidden_size,
            vocab_size=plan.vocab_size,
            dtype=str(plan.source_dtype),
            param_count=plan.param_count(),
            param_bytes=param_bytes,
            files=[str(p) for p in ckpt.files],
            ignored_tensors=plan.ignored,
            warnings=warnings,
            extra=extra,
        )


def inspect_packed(path: Path) -> InspectReport:
    packed = read_packed_config(path)
    cache = read_tensor_cache(path)
    model = packed.model
    scheme = get_scheme(packed.quantization)
    return InspectReport(
        kind="packed",
        path=Path(path),
        layout=packed.source.get("layout"),
        quantization=packed.quantization,
        num_heads=model.medusa_num_heads,
        num_layers=model.medusa_num_layers,
        hidden_size=model.hidden_size,
        vocab_size=model.vocab_size,
        dtype=scheme.model_dtype,
        param_count=param_count(model),
        param_bytes=cache.param_bytes,
        files=[TENSOR_CACHE_FILE, CONFIG_FILE] + [s.data_path for s in cache.shards],
        extra={"source": packed.source.get("path"), "tensors": len(cache.tensors),
               "bits_per_param": round(cache.metadata.get("BitsPerParam", 0.0), 3)},
    )


def roofline(params_bytes: int, gpu: str) -> dict:
    """get_logits' floor on `gpu`: every parameter read once per call (batch 1 to 8), at the
    GPU's published bandwidth (devices.GPU_BANDWIDTH_GBPS)."""
    bandwidth = gpu_bandwidth_gbps(gpu)
    return {"gpu": gpu.lower(), "bandwidth_gbps": bandwidth, "bytes_per_call": params_bytes,
            "predicted_ms": params_bytes / (bandwidth * 1e9) * 1e3}


def inspect_library(path: Path, load: bool = False, kernels: bool = False,
                    gpu: str | None = None) -> InspectReport:
    """A library's metadata, read from the file; load=True lets a library without our metadata
    be loaded to ask its _metadata function (which runs its code). kernels: its kernel report;
    with it or a `gpu` name, the roofline at that GPU's bandwidth (h100 by default)."""
    if gpu is not None:
        gpu_bandwidth_gbps(gpu)  # an unknown name is an error before anything is read
    meta = read_library_metadata(path, load=load)
    model = meta.config
    return InspectReport(
        kind="library",
        path=Path(path),
        quantization=meta.quantization,
        num_heads=model.medusa_num_heads,
        num_layers=model.medusa_num_layers,
        hidden_size=model.hidden_size,
        vocab_size=model.vocab_size,
        dtype=meta.dtype,
        param_count=param_count(model),
        param_bytes=meta.params_bytes,
        extra={"target": json.dumps(meta.target), "device code": meta.device_code,
               "max batch size": meta.max_batch_size, "params": len(meta.params)},
        kernels=list(meta.kernels) if kernels else None,
        roofline=roofline(meta.params_bytes, gpu or DEFAULT_ROOFLINE_GPU) if kernels or gpu else None,
    )


def inspect_path(path: Path, load: bool = False, kernels: bool = False,
                 gpu: str | None = None) -> InspectReport:
    """What PATH is: a packed directory, a compiled library (.so, .dylib, .dll, .tar) or a
    checkpoint. kernels / gpu apply to libraries only (InputError elsewhere)."""
    path = Path(path)
    # a library by its name (a missing or unreadable one is reported by the library reader)
    is_library = not path.is_dir() and path.suffix in SHARED_LIBRARY_SUFFIXES + (SYSTEM_LIBRARY_SUFFIX,)
    if (kernels or gpu is not None) and not is_library:
        flag = "--kernels" if kernels else "--gpu"
        raise InputError(f"{flag}: {path} is not a compiled library; pass a .so/.dylib/.dll/.tar "
                         "from `medusa compile`")
    if path.is_dir() and (path / TENSOR_CACHE_FILE).is_file():
        return inspect_packed(path)
    if is_library:
        return inspect_library(path, load, kernels, gpu)
    return inspect_checkpoint(path)

