"""`medusa example`: a seeded synthetic checkpoint in a published layout, written atomically."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..checkpoint.layouts import LAYOUT_NAMES, get_layout
from ..checkpoint.pytorch import save_torch_checkpoint
from ..checkpoint.safetensors import write_safetensors
from ..checkpoint.synthetic import (
    CONFIG_SPELLINGS,
    FILE_NAMES,
    base_lm_head,
    example_tensors,
    preset_config,
)
from ..dtypes import FLOAT_DTYPES
from ..errors import InputError
from ..outputs import check_output_dir, staged_directory, staged_file
from ..spec import MedusaConfig
from ..verify.eval_set import eval_weights, make_eval_set

FILE_FORMATS = ("safetensors", "pt")

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
    # also write an evaluation set (.npz) whose accuracies are known by construction, for
    # heads designed to reach any logits (verify/eval_set.py; preset eval-tiny)
    eval_set: Path | None = None
    # its positions, in sequences of eval_sequence_length
    eval_positions: int = 1024
    eval_sequence_length: int = 64


@dataclasses.dataclass
class ExampleResult:
    output: Path
    layout: str
    preset: str
    config: MedusaConfig
    files: list[Path]
    total_bytes: int
    # the evaluation set written, and its positions and designed per-rank accuracy [heads][K]
    eval_set: Path | None = None
    eval_positions: int | None = None
    designed_accuracy: list[list[float]] | None = None

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "layout": self.layout,
            "preset": self.preset,
            "config": self.config.to_dict(),
            "files": [str(p) for p in self.files],
            "total_bytes": self.total_bytes,
            "eval_set": None if self.eval_set is None else str(self.eval_set),
            "eval_positions": self.eval_positions,
            "designed_accuracy": self.designed_accuracy,
        }




def _write_weights(path: Path, specs, file_format: str) -> None:
    if file_format == "safetensors":
        write_safetensors(path, specs)
    else:
        save_torch_checkpoint(((name, make()) for name, _, _, make in specs), path)


def _split(specs: list, shards: int) -> list[list]:
    """Contiguous groups of about equal bytes."""
    sizes = [int(np.prod(shape)) for _, shape, _, _ in specs]
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
    if request.dtype not in FLOAT_DTYPES:
        raise InputError(f"unknown dtype '{request.dtype}'; choose one of: {', '.join(FLOAT_DTYPES)} (--dtype)")
    stem, default_format = FILE_NAMES[request.layout]
    file_format = request.file_format or default_format
    if file_format not in FILE_FORMATS:
        raise InputError(f"unknown format '{file_format}'; choose one of: {', '.join(FILE_FORMATS)} (--format)")
    if request.shards < 1:
        raise InputError(f"--shards {request.shards}: must be at least 1")
    if request.seed < 0:
        raise InputError(f"--seed {request.seed}: must be a non-negative integer")
    config, base_model = preset_config(request.preset)
    output = Path(request.output)
    check_output_dir(output, request.force, flag="OUT")
    designed = None
    if request.eval_set is not None:
        eval_path = Path(request.eval_set)
        if eval_path.suffix != ".npz" or eval_path.is_dir():
            raise InputError(f"--eval-set {eval_path}: give a file name ending in .npz")
        if eval_path.resolve().is_relative_to(output.resolve()):
            raise InputError(f"--eval-set {eval_path}: is inside OUT; write it beside the checkpoint")
        if not request.head_lm_head:
            raise InputError("--eval-set: its heads need vocab projections of their own")
        designed = eval_weights(config, request.dtype, request.seed, request.bias)

    specs = example_tensors(config, request.layout, request.dtype, request.seed, request.bias,
                            request.head_lm_head, values=designed)
    if file_format == "pt" and stem == "model":
        stem = "pytorch_model"
    suffix = ".safetensors" if file_format == "safetensors" else (".pt" if stem == "medusa_lm_head" else ".bin")

    with staged_directory(output, request.force, flag="OUT") as stage:
        staging = stage.path
        files = []
        groups = _split(specs, request.shards) if request.shards > 1 else [specs]
        weight_map = {}
        for i, group in enumerate(groups):
            name = f"{stem}{suffix}" if len(groups) == 1 else f"{stem}-{i + 1:05d}-of-{len(groups):05d}{suffix}"
            _write_weights(staging / name, group, file_format)
            files.append(name)
            weight_map.update({tensor: name for tensor, _, _, _ in group})
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
                              [("lm_head.weight", lm.shape, request.dtype, lambda: lm)])
            files.append("base/lm_head.safetensors")

        spellings, fixed = CONFIG_SPELLINGS[request.layout]
        values = {**config.to_dict(), "base_model": base_model}
        if request.config_num_heads is not None:
            values["medusa_num_heads"] = request.config_num_heads
        config_json = {**fixed, **{key: values[field] for field, key in spellings.items()}}
        (staging / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        files.append("config.json")
        evaluation = None
        if designed is not None:
            evaluation = make_eval_set(config, designed, request.eval_positions,
                                       request.eval_sequence_length, request.seed)
            with staged_file(eval_path) as partial, open(partial, "wb") as f:
                np.savez(f, **evaluation.arrays())
        stage.publish()
    paths = [output / f for f in files]
    return ExampleResult(
        output=output,
        layout=request.layout,
        preset=request.preset,
        config=config,
        files=paths,
        total_bytes=sum(p.stat().st_size for p in paths),
        eval_set=None if evaluation is None else eval_path,
        eval_positions=None if evaluation is None else request.eval_positions,
        designed_accuracy=None if evaluation is None else evaluation.designed_accuracy.tolist(),
    )


