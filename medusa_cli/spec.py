"""What the Medusa heads are: MLC-LLM's MedusaConfig and every parameter's name, shape and dtype.

This is the one place parameter names are spelled. The converter writes them, the compiler's
model declares them (its module tree gives the same names: tests check), the runtime loads them
in this order, and verify and the oracle read them head by head from here:

    medusa_head.{h}.{l}.linear.weight / .bias    ResBlock l of head h, l < medusa_num_layers
    medusa_head.{h}.{L}.weight                   head h's vocab projection, L = medusa_num_layers

A quantized weight "X.weight" is stored as "X.q_weight" and "X.q_scale" (MLC-LLM's
GroupQuantize names; see quantization.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from .errors import InputError
from .batch import DEFAULT_MAX_BATCH_SIZE, MAX_BATCH_SIZE  # noqa: F401 (part of the contract)
from .quantization import QuantScheme, quantized_names

# Bounds on what a config may claim, far above any published Medusa model (vicuna-33b: 5 heads x
# 1 layer, hidden 6656, vocab 32000; Llama 3: vocab 128256), so a hostile or corrupt file cannot
# make a loop or an allocation of absurd size.
_BOUNDS = {
    "medusa_num_heads": (1, 64),
    "medusa_num_layers": (0, 64),
    "hidden_size": (1, 1 << 16),
    "vocab_size": (1, 1 << 22),
    "max_batch_size": (1, MAX_BATCH_SIZE),
    "tensor_parallel_shards": (1, 1),
}


@dataclasses.dataclass
class MedusaConfig:
    """MLC-LLM's MedusaConfig (python/mlc_llm/model/medusa/medusa_model.py), field for field."""

    medusa_num_heads: int
    # ResBlocks per head, before the head's vocab projection
    medusa_num_layers: int
    hidden_size: int
    vocab_size: int
    # largest batch the compiled get_logits accepts; MLC-LLM's engine caps its batch here
    max_batch_size: int = 1
    # Medusa heads run on one device
    tensor_parallel_shards: int = 1
    # unknown fields of a config read from a file, kept (MLC-LLM's ConfigBase does the same)
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # unused by the heads; present because MLC-LLM's compile flow reads them from every model
    prefill_chunk_size: int = -1
    context_window_size: int = -1

    def __post_init__(self) -> None:
        self.check("MedusaConfig")

    def check(self, where: str) -> None:
        """Every size a positive int within bounds; InputError naming `where` and the field."""
        for field, (low, high) in _BOUNDS.items():
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise InputError(f"{where}: {field} is {value!r}, expected an integer in "
                                 f"{low}..{high}")
        for field in ("prefill_chunk_size", "context_window_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InputError(f"{where}: {field} is {value!r}, expected an integer")
        if not isinstance(self.kwargs, dict):
            raise InputError(f"{where}: kwargs is {type(self.kwargs).__name__}, expected an object")

    def to_dict(self) -> dict[str, Any]:
        """As MLC-LLM writes a model_config: the fields, with `kwargs` spread at the top level
        (MLC-LLM's ConfigBase.from_dict passes `kwargs=` itself, so a "kwargs" key would be a
        TypeError there: none is written, whatever kwargs holds)."""
        names = {f.name for f in dataclasses.fields(self)}
        data = {name: getattr(self, name) for name in names - {"kwargs"}}
        extra = {k: v for k, v in self.kwargs.items() if k not in names}
        return {**extra, **{f.name: data[f.name] for f in dataclasses.fields(self) if f.name in data}}

    @classmethod
    def from_dict(cls, data: Any, where: str = "model_config") -> "MedusaConfig":
        """Known fields as fields and the rest in kwargs, as MLC-LLM reads one; InputError naming
        `where` for anything missing or out of range."""
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected a JSON object, found {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"kwargs"}
        required = ("medusa_num_heads", "medusa_num_layers", "hidden_size", "vocab_size")
        missing = [name for name in required if name not in data]
        if missing:
            raise InputError(f"{where}: lacks {', '.join(missing)}")
        extra = data.get("kwargs", {})
        if not isinstance(extra, dict):
            raise InputError(f"{where}: kwargs is {type(extra).__name__}, expected an object")
        known = {k: v for k, v in data.items() if k in names}
        extra = {**extra, **{k: v for k, v in data.items() if k not in names and k != "kwargs"}}
        config = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(config, f.name, known.get(f.name, default))
        config.kwargs = extra
        config.check(where)
        return config


class ParamSpec(NamedTuple):
    """One packed parameter: its name, shape and dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    """One Linear of a head and where its parameters are named."""

    # "medusa_head.0.0.linear" (a ResBlock) or "medusa_head.0.1" (the vocab projection)
    prefix: str
    out_features: int
    in_features: int
    has_bias: bool

    @property
    def weight(self) -> str:
        return f"{self.prefix}.weight"

    @property
    def bias(self) -> str | None:
        return f"{self.prefix}.bias" if self.has_bias else None

    def params(self, scheme: QuantScheme) -> list[ParamSpec]:
        """The packed parameters of this Linear under `scheme`: the weight (q_weight and q_scale
        when quantized), then the bias."""
        shape = (self.out_features, self.in_features)
        if scheme.is_quantized:
            q_weight, q_scale = quantized_names(self.weight)
            specs = [ParamSpec(q_weight, (self.out_features, scheme.packed_words(self.in_features)),
                               scheme.storage_dtype),
                     ParamSpec(q_scale, (self.out_features, scheme.num_groups(self.in_features)),
                               scheme.model_dtype)]
        else:
            specs = [ParamSpec(self.weight, shape, scheme.model_dtype)]
        if self.has_bias:
            specs.append(ParamSpec(self.bias, (self.out_features,), scheme.model_dtype))
        return specs


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """Head `index`: its ResBlocks' Linears (hidden -> hidden, with bias), then its vocab
    projection (hidden -> vocab, no bias)."""

    index: int
    resblocks: tuple[LinearSpec, ...]
    lm_head: LinearSpec

    @property
    def linears(self) -> tuple[LinearSpec, ...]:
        return (*self.resblocks, self.lm_head)


def head_specs(config: MedusaConfig) -> list[HeadSpec]:
    hidden, layers = config.hidden_size, config.medusa_num_layers
    return [
        HeadSpec(
            index=h,
            resblocks=tuple(LinearSpec(f"medusa_head.{h}.{l}.linear", hidden, hidden, True)
                            for l in range(layers)),
            lm_head=LinearSpec(f"medusa_head.{h}.{layers}", config.vocab_size, hidden, False),
        )
        for h in range(config.medusa_num_heads)
    ]


def param_specs(config: MedusaConfig, scheme: QuantScheme) -> list[ParamSpec]:
    """Every packed parameter, in model order: what the converter writes and the library loads."""
    return [spec for head in head_specs(config) for linear in head.linears
            for spec in linear.params(scheme)]


def param_names(config: MedusaConfig) -> list[str]:
    """The unquantized parameter names, in model order."""
    names = []
    for head in head_specs(config):
        for linear in head.linears:
            names += [linear.weight] + ([linear.bias] if linear.has_bias else [])
    return names


def param_count(config: MedusaConfig) -> int:
    """Parameters of the unquantized heads: ResBlock weights and biases plus vocab projections."""
    per_head = config.medusa_num_layers * (config.hidden_size + 1) * config.hidden_size
    return config.medusa_num_heads * (per_head + config.vocab_size * config.hidden_size)
