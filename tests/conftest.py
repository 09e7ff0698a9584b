"""Shared fixtures: tiny checkpoints generated in tmp_path, in every published layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medusa_cli.config import MedusaConfig
from medusa_cli.example import ExampleRequest, iter_example_reference, preset_config, write_example


@pytest.fixture(scope="session", autouse=True)
def _kernel_cache(tmp_path_factory):
    """Compiled helper kernels (md5_lanes) go to a folder of this run, not the user's cache;
    children started by tests inherit it."""
    import os

    os.environ["MEDUSA_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernel-cache"))


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
