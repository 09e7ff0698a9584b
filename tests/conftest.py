"""Shared fixtures: tiny checkpoints generated in tmp_path, in every published layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medusa_cli.checkpoint.synthetic import iter_example_reference, preset_config
from medusa_cli.commands.example import ExampleRequest, write_example
from medusa_cli.spec import MedusaConfig


@pytest.fixture
def tiny_config() -> MedusaConfig:
    return preset_config("tiny")[0]


@pytest.fixture
def make_example(tmp_path: Path):
    """make_example(layout=..., dtype=..., ...) -> ExampleResult in a fresh tmp directory."""
    counter = iter(range(1000))

    def make(**kwargs):
        out = tmp_path / f"ckpt{next(counter)}"
        return write_example(ExampleRequest(output=out, **kwargs))

    return make


def reference_tensors(config: MedusaConfig, dtype: str = "float32", seed: int = 0, bias: bool = True):
    return dict(iter_example_reference(config, dtype, seed, bias))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype.itemsize == b.dtype.itemsize and a.tobytes() == b.tobytes()


def leftovers(parent: Path) -> list[str]:
    """Staging directories a failed write would leave behind."""
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def check_packed_dir(params_dir: Path) -> None:
    """The packed directory is intact: every tensor its config describes, with every shard's
    size and md5 as recorded (packed.check, as verify runs it)."""
    from medusa_cli.packed.check import check_packed
    from medusa_cli.packed.config import read_packed_config
    from medusa_cli.quantization import get_scheme
    from medusa_cli.spec import param_specs

    packed = read_packed_config(params_dir)
    check_packed(params_dir, param_specs(packed.model, get_scheme(packed.quantization)),
                 against="mlc-chat-config.json", fix="-", md5=True)


def hard_topk_rows(vocab: int) -> np.ndarray:
    """Rows that stress a top-k kernel: heavy ties, ascending (every element enters),
    descending, half -inf, all -inf, all zero, some NaN, and -0.0 and +0.0 alternating (equal as
    floats, so ids decide)."""
    rng = np.random.default_rng(vocab)
    rows = [
        np.round(rng.standard_normal(vocab) * 2) / 2,
        np.arange(vocab, dtype=np.float64),
        -np.arange(vocab, dtype=np.float64),
        np.where(rng.random(vocab) < 0.5, -np.inf, rng.standard_normal(vocab)),
        np.full(vocab, -np.inf),
        np.zeros(vocab),
        np.where(np.arange(vocab) % 7 == 3, np.nan, rng.standard_normal(vocab)),
        np.where(np.arange(vocab) % 2 == 0, -0.0, 0.0),
    ]
    return np.stack(rows).astype(np.float32)
