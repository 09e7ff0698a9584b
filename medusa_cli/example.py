"""`medusa example`: seeded synthetic checkpoints in every published layout, without downloads."""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .atomic import check_output_dir, staged_directory
from .checkpoint import LAYOUT_NAMES, get_layout
from .config import MedusaConfig
from .errors import InputError
from .resources import load_config_json
from .tensor_cache import numpy_dtype

FILE_FORMATS = ("safetensors", "pt")
DTYPES = ("float32", "float16", "bfloat16")

# Weight scales: logits of a realistic magnitude (std about 1.3 at hidden 4096 with unit
# hidden states), ResBlocks a small correction on top of the identity.
_LAYER_STD = 0.02
_LM_HEAD_STD = 0.02

# config.json as each project writes it: our field -> that project's key, plus fixed fields.
_CONFIG_SPELLINGS: dict[str, tuple[dict[str, str], dict]] = {
    "medusa1": (
        {"medusa_num_heads": "medusa_num_heads", "medusa_num_layers": "medusa_num_layers",
         "base_model": "base_model_name_or_path"},
        {"architectures": ["MedusaModel"], "transformers_version": "4.34.0"},
    ),
    "medusa2": (
        {"medusa_num_heads": "medusa_num_heads", "medusa_num_layers": "medusa_num_layers",
         "hidden_size": "hidden_size", "vocab_size": "vocab_size",
         "base_model": "base_model_name_or_path"},
        {"architectures": ["MedusaModelLlama"], "model_type": "llama", "num_hidden_layers": 1,
         "torch_dtype": "float16"},
    ),
    "trtllm": (
        {"medusa_num_heads": "num_medusa_heads", "medusa_num_layers": "num_medusa_layers",
         "hidden_size": "hidden_size", "vocab_size": "vocab_size"},
        {"architecture": "MedusaForCausalLM"},
    ),
    "vllm": (
        {"medusa_num_heads": "num_heads", "medusa_num_layers": "num_hidden_layers",
         "hidden_size": "hidden_size", "vocab_size": "vocab_size"},
        {"architectures": ["MedusaModel"], "model_type": "medusa"},
    ),
    "mlc": (
        {"medusa_num_heads": "medusa_num_heads", "medusa_num_layers": "medusa_num_layers",
         "hidden_size": "hidden_size", "vocab_size": "vocab_size"},
        {"model_type": "medusa"},
    ),
}

# File names each project publishes: (single file stem, default format)
_FILE_NAMES = {
    "medusa1": ("medusa_lm_head", "pt"),
    "medusa2": ("model", "safetensors"),
    "trtllm": ("model", "safetensors"),
    "vllm": ("model", "safetensors"),
    "mlc": ("model", "safetensors"),
}


@dataclasses.dataclass
class ExampleRequest:
    output: Path
    layout: str = "medusa1"
    preset: str = "tiny"
    dtype: str = "float32"
    seed: int = 0
    # None: the format the layout's project publishes
    file_format: str | None = None
    shards: int = 1
    # False: ResBlocks without bias (as vLLM's default heads)
    bias: bool = True
    # False: heads without their own vocab projection; the base lm_head.weight serves them
    # (inside the file for medusa2, in OUT/base/lm_head.safetensors otherwise)
    head_lm_head: bool = True
    # Override config.json's head count, to reproduce published configs that disagree
    config_num_heads: int | None = None
    force: bool = False


@dataclasses.dataclass
class ExampleResult:
    output: Path
    layout: str
    preset: str
    config: MedusaConfig
    files: list[Path]
    total_bytes: int

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "layout": self.layout,
            "preset": self.preset,
            "config": self.config.to_dict(),
            "files": [str(p) for p in self.files],
            "total_bytes": self.total_bytes,
        }


def load_presets() -> dict[str, dict]:
    return {k: v for k, v in load_config_json("presets.json").items() if not k.startswith("_")}


def preset_config(name: str) -> tuple[MedusaConfig, str]:
    presets = load_presets()
    if name not in presets:
        raise InputError(f"unknown preset '{name}'; choose one of: {', '.join(presets)} (--preset)")
    p = presets[name]
    config = MedusaConfig(
        medusa_num_heads=p["medusa_num_heads"],
        medusa_num_layers=p["medusa_num_layers"],
        hidden_size=p["hidden_size"],
        vocab_size=p["vocab_size"],
    )
    return config, p["base_model"]


def _rng(seed: int, name: str) -> np.random.Generator:
    # Seeded per tensor, so a tensor's values do not depend on the file order or sharding.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _normal(seed: int, name: str, shape: tuple[int, ...], std: float, dtype: np.dtype) -> np.ndarray:
    values = _rng(seed, name).standard_normal(shape, dtype=np.float32)
    values *= std
    return values.astype(dtype)


def example_tensors(
    config: MedusaConfig, layout_name: str, dtype: str, seed: int, bias: bool = True,
    head_lm_head: bool = True,
) -> list[tuple[str, tuple[int, ...], "callable"]]:
    """(checkpoint name, shape, make) for every tensor of the example, in file order.

    `make()` builds the array when it is written, so a large example streams.
    """
    layout = get_layout(layout_name)
    np_dtype = numpy_dtype(dtype)
    hidden, vocab, count = config.hidden_size, config.vocab_size, config.medusa_num_layers
    specs = []

    def add(name: str, shape: tuple[int, ...], std: float, key: str) -> None:
        specs.append((name, shape, lambda: _normal(seed, key, shape, std, np_dtype)))

    if layout.mixed_with_base or not head_lm_head:
        base = [("model.embed_tokens.weight", (vocab, hidden)),
                ("model.layers.0.self_attn.q_proj.weight", (hidden, hidden)),
                ("model.norm.weight", (hidden,))]
        if layout.mixed_with_base:
            for name, shape in base:
                add(name, shape, _LAYER_STD, name)
            if not head_lm_head:
                add("lm_head.weight", (vocab, hidden), _LM_HEAD_STD, "lm_head.weight")
    for h in range(config.medusa_num_heads):
        for i in range(count):
            # Keys use MLC names so every layout of one seed holds the same numbers.
            key = f"medusa_head.{h}.{i}.linear"
            add(layout.layer_weight.format(h=h, l=i), (hidden, hidden), _LAYER_STD, key + ".weight")
            if bias:
                add(layout.layer_bias.format(h=h, l=i), (hidden,), _LAYER_STD, key + ".bias")
        if head_lm_head:
            add(layout.lm_head.format(h=h, L=count), (vocab, hidden), _LM_HEAD_STD,
                f"medusa_head.{h}.{count}.weight")
    return specs


def base_lm_head(config: MedusaConfig, dtype: str, seed: int) -> np.ndarray:
    return _normal(seed, "lm_head.weight", (config.vocab_size, config.hidden_size), _LM_HEAD_STD,
                   numpy_dtype(dtype))


_ST_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def write_safetensors(path: Path, specs, dtype: str) -> int:
    """A safetensors file written tensor by tensor (the header is known from the shapes)."""
    itemsize = numpy_dtype(dtype).itemsize
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in specs:
        nbytes = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, _, make in specs:
            f.write(memoryview(np.ascontiguousarray(make()).reshape(-1).view(np.uint8)))
    return path.stat().st_size


def _write_weights(path: Path, specs, dtype: str, file_format: str) -> int:
    if file_format == "safetensors":
        return write_safetensors(path, specs, dtype)
    from .torch_format import save_torch_checkpoint

    save_torch_checkpoint(((name, make()) for name, _, make in specs), path)
    return path.stat().st_size


def _split(specs: list, shards: int) -> list[list]:
    """Contiguous groups of about equal bytes."""
    sizes = [int(np.prod(shape)) for _, shape, _ in specs]
    target = sum(sizes) / shards
    groups: list[list] = [[]]
    acc = 0
    for spec, size in zip(specs, sizes):
        if groups[-1] and acc + size > target * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(spec)
        acc += size
    return groups


def write_example(request: ExampleRequest) -> ExampleResult:
    if request.layout not in LAYOUT_NAMES:
        raise InputError(f"unknown layout '{request.layout}'; choose one of: {', '.join(LAYOUT_NAMES)} (--layout)")
    if request.dtype not in DTYPES:
        raise InputError(f"unknown dtype '{request.dtype}'; choose one of: {', '.join(DTYPES)} (--dtype)")
    stem, default_format = _FILE_NAMES[request.layout]
    file_format = request.file_format or default_format
    if file_format not in FILE_FORMATS:
        raise InputError(f"unknown format '{file_format}'; choose one of: {', '.join(FILE_FORMATS)} (--format)")
    if request.shards < 1:
        raise InputError(f"--shards {request.shards}: must be at least 1")
    config, base_model = preset_config(request.preset)
    output = Path(request.output)
    check_output_dir(output, request.force, flag="OUT")

    specs = example_tensors(config, request.layout, request.dtype, request.seed, request.bias,
                            request.head_lm_head)
    if file_format == "pt" and stem == "model":
        stem = "pytorch_model"
    suffix = ".safetensors" if file_format == "safetensors" else (".pt" if stem == "medusa_lm_head" else ".bin")

    with staged_directory(output) as stage:
        staging = stage.path
        files = []
        groups = _split(specs, request.shards) if request.shards > 1 else [specs]
        weight_map = {}
        for i, group in enumerate(groups):
            name = f"{stem}{suffix}" if len(groups) == 1 else f"{stem}-{i + 1:05d}-of-{len(groups):05d}{suffix}"
            _write_weights(staging / name, group, request.dtype, file_format)
            files.append(name)
            weight_map.update({tensor: name for tensor, _, _ in group})
        if len(groups) > 1:
            index = f"{stem}{suffix}.index.json"
            total = sum((staging / f).stat().st_size for f in files)
            (staging / index).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
            files.append(index)
        if not request.head_lm_head and not get_layout(request.layout).mixed_with_base:
            (staging / "base").mkdir()
            lm = base_lm_head(config, request.dtype, request.seed)
            write_safetensors(staging / "base" / "lm_head.safetensors",
                              [("lm_head.weight", lm.shape, lambda: lm)], request.dtype)
            files.append("base/lm_head.safetensors")

        spellings, fixed = _CONFIG_SPELLINGS[request.layout]
        values = {**config.to_dict(), "base_model": base_model}
        if request.config_num_heads is not None:
            values["medusa_num_heads"] = request.config_num_heads
        config_json = {**fixed, **{key: values[field] for field, key in spellings.items()}}
        (staging / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        files.append("config.json")
        stage.publish()
    paths = [output / f for f in files]
    return ExampleResult(
        output=output,
        layout=request.layout,
        preset=request.preset,
        config=config,
        files=paths,
        total_bytes=sum(p.stat().st_size for p in paths),
    )


def iter_example_reference(
    config: MedusaConfig, dtype: str, seed: int, bias: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
    """The example's head tensors under MLC names, as written (for tests and the oracle)."""
    for name, _, make in example_tensors(config, "mlc", dtype, seed, bias):
        yield name, make()
