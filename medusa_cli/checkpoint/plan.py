"""Which tensor of a checkpoint is which parameter of which head: the head plan.

plan_heads maps a layout's names onto heads and ResBlocks and checks every shape and dtype
against head 0's, so nothing later is sized by a number it has not checked. iter_head_tensors
then streams the tensors in model order under their MLC-LLM names (spec.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from ..dtypes import FLOAT_DTYPES, dtype_name
from ..errors import CheckpointError, InputError
from ..spec import MedusaConfig, head_specs, param_count
from .files import Checkpoint
from .layouts import (
    BASE_LM_HEAD_NAMES,
    LAYER_BIAS,
    LAYER_WEIGHT,
    LM_HEAD,
    Layout,
    check_mixed_layouts,
    detect_layout,
    get_layout,
    match_name,
)
from .safetensors import FileRegion

# Where a head's vocab projection comes from: the checkpoint itself or the --lm-head file.
FROM_CHECKPOINT = "checkpoint"
FROM_LM_HEAD_FILE = "lm_head_file"
# As many heads and ResBlocks per head as spec.MedusaConfig allows.
_MAX_HEADS = 64
_MAX_LAYERS = 64


@dataclasses.dataclass
class HeadPlan:
    """Where every tensor of the heads comes from, and the shapes inferred from them."""

    layout: Layout
    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    # per head: [(weight name, bias name or None)] * num_layers
    layers: list[list[tuple[str, str | None]]]
    # per head: (FROM_CHECKPOINT or FROM_LM_HEAD_FILE, tensor name)
    lm_heads: list[tuple[str, str]]
    # names in the checkpoint that belong to no head (base model tensors)
    ignored: int
    source_dtype: np.dtype

    @property
    def config(self) -> MedusaConfig:
        return MedusaConfig(self.num_heads, self.num_layers, self.hidden_size, self.vocab_size)

    def param_count(self) -> int:
        """Parameters of the unquantized heads, zero biases included."""
        return param_count(self.config)

    def head_tensor_names(self) -> list[str]:
        """The ResBlock tensors' names in the checkpoint (the vocab projections are lm_heads)."""
        names = []
        for h in range(self.num_heads):
            for weight, bias in self.layers[h]:
                names.append(weight)
                if bias:
                    names.append(bias)
        return names


def _describe_slot(slot: tuple[str, int, int | None]) -> str:
    role, head, layer = slot
    if role == LAYER_WEIGHT:
        return f"head {head}'s ResBlock {layer} weight"
    if role == LAYER_BIAS:
        return f"head {head}'s ResBlock {layer} bias"
    return f"head {head}'s vocab projection"


def _contiguous(indices: list[int], what: str, where, example) -> None:
    """indices (sorted) must be 0, 1, 2, ...; the error names the first missing one."""
    for expected, found in enumerate(indices):
        if found != expected:
            raise CheckpointError(f"{where}: {what} {expected} is missing (found {indices[:8]}"
                                  f"{'...' if len(indices) > 8 else ''}); expected a tensor such "
                                  f"as '{example(expected)}'")


def plan_heads(
    ckpt: Checkpoint,
    layout: Layout,
    lm_head_source: Checkpoint | None = None,
    num_heads: int | None = None,
    shared_lm_head: bool = False,
) -> HeadPlan:
    """Map every head tensor of `layout` in ckpt; shared_lm_head: heads without a vocab
    projection reuse head 0's (vLLM's original_lm_head)."""
    if "token_map" in ckpt:
        raise CheckpointError(
            f"{ckpt.file_of('token_map')}: has a 'token_map' (a vLLM truncated draft vocabulary); "
            "its heads score a subset of the vocabulary, which the Medusa model does not support. "
            "Export the heads with their full lm_heads"
        )
    found: dict[tuple[str, int, int | None], str] = {}
    ignored = 0
    for name in ckpt.names():
        tensor = match_name(layout, name)
        if tensor is None:
            ignored += 1
            continue
        if tensor.head >= _MAX_HEADS or (tensor.layer or 0) > _MAX_LAYERS:
            raise CheckpointError(
                f"{ckpt.file_of(name)}: tensor '{name:.200}' names a head or ResBlock index "
                f"beyond the limits: at most {_MAX_HEADS} heads of {_MAX_LAYERS} ResBlocks are "
                "supported")
        slot = (tensor.role, tensor.head, tensor.layer)
        if slot in found:  # '00.0.linear.weight' beside '0.0.linear.weight', a prefix and none
            raise CheckpointError(
                f"{ckpt.src}: tensors '{found[slot]:.200}' and '{name:.200}' are both "
                f"{_describe_slot(slot)}; keep one of them")
        found[slot] = name

    heads = sorted({h for (_, h, _) in found})
    if not heads:
        raise CheckpointError(
            f"{ckpt.src}: no tensors of layout '{layout.name}' "
            f"(expected names like '{layout.layer_weight.format(h=0, l=0)}'); try --layout auto"
        )
    _contiguous(heads, "head", ckpt.src, lambda h: layout.layer_weight.format(h=h, l=0))
    available = len(heads)
    if num_heads is not None and not 1 <= num_heads <= available:
        raise InputError(f"--num-heads {num_heads}: the checkpoint has {available} heads (1..{available})")
    count = num_heads or available

    layer_sets = [sorted({l for (role, h, l) in found if role == LAYER_WEIGHT and h == head})
                  for head in range(available)]
    # every head must have ResBlocks 0 .. num_layers - 1, num_layers one past the highest index
    # any head has
    num_layers = max((ids[-1] + 1 for ids in layer_sets if ids), default=0)
    for head, layer_ids in enumerate(layer_sets):
        missing = next((l for l in range(num_layers) if l not in layer_ids), None)
        if missing is not None:
            held = f"has ResBlocks {layer_ids}" if layer_ids else "has no ResBlocks"
            raise CheckpointError(
                f"{ckpt.src}: head {head} {held} but no ResBlock {missing}: tensor "
                f"'{layout.layer_weight.format(h=head, l=missing)}' is missing (the heads have "
                f"up to {num_layers} ResBlocks; every head needs ResBlocks 0..{num_layers - 1})")
    for (role, head, layer), name in found.items():
        if role == LAYER_BIAS and not (head < available and layer is not None and layer < num_layers):
            raise CheckpointError(f"{ckpt.file_of(name)}: bias '{name:.200}' belongs to no ResBlock "
                                  "of the checkpoint (its weight is missing)")

    layers = [[(found[(LAYER_WEIGHT, head, i)], found.get((LAYER_BIAS, head, i)))
               for i in range(num_layers)] for head in range(count)]

    lm_heads = []
    base_name = next((n for n in BASE_LM_HEAD_NAMES if n in ckpt), None)
    slot = num_layers if "{L}" in layout.lm_head else None
    for head in range(count):
        own = found.get((LM_HEAD, head, slot))
        if own is None and shared_lm_head:
            own = found.get((LM_HEAD, 0, slot))
        if own is not None:
            lm_heads.append((FROM_CHECKPOINT, own))
        elif base_name is not None:
            lm_heads.append((FROM_CHECKPOINT, base_name))
        elif lm_head_source is not None:
            name = next((n for n in BASE_LM_HEAD_NAMES if n in lm_head_source), None)
            if name is None:
                raise CheckpointError(
                    f"{lm_head_source.src}: no 'lm_head.weight' in the file given by --lm-head"
                )
            lm_heads.append((FROM_LM_HEAD_FILE, name))
        else:
            expected = layout.lm_head.format(h=head, L=num_layers)
            raise CheckpointError(
                f"{ckpt.src}: head {head} has no vocab projection ('{expected}') and the checkpoint "
                "has no 'lm_head.weight'; pass the base model's weights file with --lm-head FILE"
            )

    def source_of(key: str) -> Checkpoint:
        return ckpt if key == FROM_CHECKPOINT else lm_head_source  # type: ignore[return-value]

    first_lm = source_of(lm_heads[0][0]).shape(lm_heads[0][1])
    if len(first_lm) != 2 or 0 in first_lm:
        raise CheckpointError(f"{source_of(lm_heads[0][0]).file_of(lm_heads[0][1])}: tensor "
                              f"'{lm_heads[0][1]}' has shape {list(first_lm)}, expected "
                              "[vocab, hidden] with both above 0")
    vocab_size, hidden_size = first_lm
    # the sizes the heads get are bounded like any config's (InputError names the tensor)
    try:
        MedusaConfig(count, num_layers, hidden_size, vocab_size)
    except InputError as exc:
        raise CheckpointError(f"{ckpt.src}: the heads' tensors give {exc}") from None

    def check(source: Checkpoint, name: str, shape: tuple[int, ...]) -> None:
        found_shape = source.shape(name)
        if found_shape != shape:
            raise CheckpointError(
                f"{source.file_of(name)}: tensor '{name:.200}' has shape {list(found_shape)}, "
                f"expected {list(shape)} (hidden_size {hidden_size}, vocab_size {vocab_size} "
                "from head 0)"
            )
        if dtype_name(source.dtype(name)) not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{source.file_of(name)}: tensor '{name:.200}' has dtype {source.dtype(name)}, "
                f"expected {', '.join(FLOAT_DTYPES)}"
            )

    for head in range(count):
        for weight, bias in layers[head]:
            check(ckpt, weight, (hidden_size, hidden_size))
            if bias is not None:
                check(ckpt, bias, (hidden_size,))
        key, name = lm_heads[head]
        check(source_of(key), name, (vocab_size, hidden_size))

    first_source, first_tensor = (ckpt, layers[0][0][0]) if num_layers else \
        (source_of(lm_heads[0][0]), lm_heads[0][1])
    return HeadPlan(
        layout=layout,
        num_heads=count,
        num_layers=num_layers,
        hidden_size=int(hidden_size),
        vocab_size=int(vocab_size),
        layers=layers,
        lm_heads=lm_heads,
        ignored=ignored,
        source_dtype=np.dtype(first_source.dtype(first_tensor)),
    )


def plan_conversion(
    ckpt: Checkpoint,
    layout: str,
    num_heads: int | None,
    lm_head_ckpt: Checkpoint | None,
    hints: dict | None = None,
) -> tuple[HeadPlan, int]:
    """The head plan for a checkpoint (--layout auto detects it) and the number of heads it
    holds before --num-heads."""
    names = ckpt.names()
    if layout == "auto":
        chosen = detect_layout(names)
        check_mixed_layouts(names, chosen)
    else:
        chosen = get_layout(layout)
    shared = (hints or {}).get("original_lm_head", False) is True
    full = plan_heads(ckpt, chosen, lm_head_ckpt, shared_lm_head=shared)
    if num_heads is None:
        return full, full.num_heads
    return plan_heads(ckpt, chosen, lm_head_ckpt, num_heads=num_heads, shared_lm_head=shared), full.num_heads


@dataclasses.dataclass
class ConfigDisagreement:
    field: str
    config_value: object
    tensor_value: object

    def message(self, config_path) -> str:
        return (
            f"{config_path}: {self.field} is {self.config_value!r} but the tensors say "
            f"{self.tensor_value}; following the tensors"
        )


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


def iter_head_tensors(
    plan: HeadPlan, ckpt: Checkpoint, lm_head_source: Checkpoint | None = None
) -> Iterator[tuple[str, np.ndarray, str, FileRegion | None]]:
    """(MLC name, array, source name, where its bytes are stored or None) for every head
    tensor, one at a time, in model order (spec.head_specs). A missing ResBlock bias comes out
    as zeros in the source dtype."""
    for head in head_specs(plan.config):
        for linear, (weight, bias) in zip(head.resblocks, plan.layers[head.index]):
            yield linear.weight, ckpt.read(weight), weight, ckpt.region(weight)
            if bias is None:
                zeros = np.zeros(plan.hidden_size, dtype=plan.source_dtype)
                yield linear.bias, zeros, "(zero bias)", None
            else:
                yield linear.bias, ckpt.read(bias), bias, ckpt.region(bias)
        key, name = plan.lm_heads[head.index]
        source = ckpt if key == FROM_CHECKPOINT else lm_head_source
        yield head.lm_head.weight, source.read(name), name, source.region(name)
