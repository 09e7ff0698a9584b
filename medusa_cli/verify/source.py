"""The oracle's heads: read from the ORIGINAL checkpoint, independently of the packed directory.

Shared by `medusa verify` and `medusa eval`. The source is --source when given, else the checkpoint
`medusa convert` recorded in PARAMS_DIR/mlc-chat-config.json, else (with a warning) the packed
weights themselves. Heads come one at a time in float64: a vicuna-7b head is 1.2 GB so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ..checkpoint.files import Checkpoint, read_config_hints, sha256_file
from ..checkpoint.plan import iter_head_tensors, plan_conversion
from ..errors import InputError
from ..packed.config import CONFIG_FILE, PackedConfig
from ..packed.tensor_cache import TensorCache, load_array
from ..quantization import QuantScheme, dequantize_weight, quantized_names
from ..spec import MedusaConfig, head_specs
from .oracle import HeadWeights
from .report import SourceUsed


def check_source_flags(source: Path | None, lm_head: Path | None) -> None:
    """--source and --lm-head exist, checked before any work."""
    if source is not None and not Path(source).exists():
        raise InputError(f"--source {source}: no such file or directory")
    if lm_head is not None and not Path(lm_head).exists():
        raise InputError(f"--lm-head {lm_head}: no such file")


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


def _heads(config: MedusaConfig, read: Callable[[str], np.ndarray]) -> Iterator[HeadWeights]:
    """Each head, one at a time, its arrays as read (the oracle takes them to float64 a block
    at a time); read(name) returns the unquantized tensor `name` (spec.py's names: a
    ResBlock's weight and bias, then the vocab projection)."""
    for head in head_specs(config):
        layers = [(read(linear.weight), read(linear.bias)) for linear in head.resblocks]
        yield HeadWeights(layers=layers, lm_head=read(head.lm_head.weight))


def _source_heads(plan, ckpt: Checkpoint, lm_head_ckpt: Checkpoint | None) -> Iterator[HeadWeights]:
    """The source checkpoint's heads, read in the order iter_head_tensors streams them."""
    stream = iter_head_tensors(plan, ckpt, lm_head_ckpt)

    def read(name: str) -> np.ndarray:
        got, array, *_ = next(stream)
        if got != name:  # iter_head_tensors and spec.head_specs walk the heads in one order
            raise RuntimeError(f"the head plan streamed '{got}' where '{name}' was due")
        return array

    return _heads(plan.config, read)


def _packed_heads(params_dir: Path, cache: TensorCache, config: MedusaConfig,
                  scheme: QuantScheme) -> Iterator[HeadWeights]:
    """The heads as stored in the packed directory (dequantized), one at a time, in float64."""
    records = cache.by_name()

    def read(name: str) -> np.ndarray:
        if name.endswith(".weight") and scheme.is_quantized:
            q_weight, q_scale = (load_array(params_dir, records[n]) for n in quantized_names(name))
            return dequantize_weight(q_weight, q_scale, scheme, config.hidden_size)
        return load_array(params_dir, records[name])

    return _heads(config, read)


@dataclasses.dataclass
class OracleHeads:
    """Where the oracle's weights come from, and the heads themselves."""

    source: SourceUsed
    # one HeadWeights per head in order, read lazily: iterate once
    heads: Iterator[HeadWeights]
    warnings: list[str]
    # the recorded source files' sha256 check, running on a thread while the heads are used
    changed: Future | None = None

    def finish(self) -> list[str]:
        """Every warning, once the sha256 check is done."""
        return self.warnings + (self.changed.result() if self.changed is not None else [])


def open_oracle_heads(stack: ExitStack, params_dir: Path, packed: PackedConfig,
                      config: MedusaConfig, scheme: QuantScheme, cache: TensorCache,
                      source: Path | None = None, lm_head: Path | None = None) -> OracleHeads:
    """The oracle's heads for the library `config` describes, from `source` (--source), else
    the checkpoint recorded in params_dir, else the packed weights. Files and the hashing
    thread stay open until `stack` closes."""
    warnings: list[str] = []
    changed: Future | None = None
    if source is not None:
        used = SourceUsed("checkpoint", Path(source), "--source")
    else:
        recorded, warnings = _recorded_source(packed, params_dir)
        if recorded is None:
            used = SourceUsed("packed", params_dir, "packed weights")
        else:
            used = SourceUsed("checkpoint", recorded, f"recorded in {CONFIG_FILE}")
            # hashed on a thread of its own while the heads run
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256"))
            changed = pool.submit(_changed_source_files, packed)

    if used.kind != "checkpoint":
        return OracleHeads(used, _packed_heads(params_dir, cache, config, scheme), warnings, changed)
    ckpt = stack.enter_context(Checkpoint(used.path))
    if lm_head is None and source is None:
        lm_head = _lm_head_file(packed, ckpt)
    lm_head_ckpt = stack.enter_context(Checkpoint(lm_head)) if lm_head is not None else None
    layout = "auto" if source is not None else packed.source.get("layout") or "auto"
    what = f"--source {used.path}" if source is not None else \
        f"the source recorded in {params_dir / CONFIG_FILE} ({used.path})"
    plan = _plan_source(ckpt, what, layout, config, lm_head_ckpt)
    used.layout = plan.layout.name
    return OracleHeads(used, _source_heads(plan, ckpt, lm_head_ckpt), warnings, changed)
