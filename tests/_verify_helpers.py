"""Checkpoints, packed directories and libraries for the verify, run and build tests.

`Workshop` builds each (checkpoint, scheme) once per test session and hands out copies for tests
that damage them. The sabotage helpers below damage a packed directory the ways the verify issue
names: heads swapped, one weight element changed, a shard byte flipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from medusa_cli.commands.compile import CompileRequest, compile_heads
from medusa_cli.commands.convert import ConvertRequest, convert_checkpoint
from medusa_cli.commands.example import ExampleRequest, write_example
from medusa_cli.dtypes import numpy_dtype
from medusa_cli.packed.tensor_cache import TENSOR_CACHE_FILE, read_tensor_cache

MAX_BATCH = 8
LIBRARY_NAME = "heads.so"


@dataclasses.dataclass(frozen=True)
class Built:
    # the checkpoint the params were converted from
    ckpt: Path
    params: Path
    library: Path
    scheme: str


class Workshop:
    """Builds on demand under `root`, each distinct request once."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._checkpoints: dict[tuple, Path] = {}
        self._builds: dict[tuple, Built] = {}
        self._copies = 0

    def checkpoint(self, seed: int = 0, layout: str = "medusa1", dtype: str = "float32",
                   **options) -> Path:
        key = (seed, layout, dtype, tuple(sorted(options.items())))
        if key not in self._checkpoints:
            out = self.root / f"ckpt-{len(self._checkpoints)}-{layout}-{dtype}-s{seed}"
            write_example(ExampleRequest(output=out, layout=layout, dtype=dtype, seed=seed, **options))
            self._checkpoints[key] = out
        return self._checkpoints[key]

    def build(self, scheme: str, seed: int = 0, layout: str = "medusa1", dtype: str = "float32",
              **options) -> Built:
        key = (scheme, seed, layout, dtype, tuple(sorted(options.items())))
        if key not in self._builds:
            ckpt = self.checkpoint(seed, layout, dtype, **options)
            params = self.root / f"params-{len(self._builds)}-{scheme}-{layout}-s{seed}"
            convert_checkpoint(ConvertRequest(source=ckpt, output=params, quantization=scheme,
                                              max_batch_size=MAX_BATCH))
            library = compile_heads(CompileRequest(params, output=params / LIBRARY_NAME)).output
            self._builds[key] = Built(ckpt, params, library, scheme)
        return self._builds[key]

    def copy(self, built: Built) -> Built:
        """A private copy of a build's params directory and library, free to damage."""
        self._copies += 1
        params = self.root / f"copy-{self._copies}"
        shutil.copytree(built.params, params)
        return dataclasses.replace(built, params=params, library=params / built.library.name)


def _rewrite_manifest(params_dir: Path, edit) -> None:
    path = Path(params_dir) / TENSOR_CACHE_FILE
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def swap_heads(params_dir: Path, a: int, b: int) -> None:
    """Exchange the names of heads a and b in tensor-cache.json; shards and md5s stay valid."""
    prefixes = {f"medusa_head.{a}.": f"medusa_head.{b}.", f"medusa_head.{b}.": f"medusa_head.{a}."}

    def edit(manifest: dict) -> None:
        for shard in manifest["records"]:
            for record in shard["records"]:
                for old, new in prefixes.items():
                    if record["name"].startswith(old):
                        record["name"] = new + record["name"][len(old):]
                        break

    _rewrite_manifest(params_dir, edit)


def perturb_element(params_dir: Path, name: str, index: tuple[int, ...], delta: float) -> tuple[float, float]:
    """Add delta to one element of a plain tensor in its shard and re-record the shard's md5, as a
    converter bug would write it. Returns (old, new) value."""
    params_dir = Path(params_dir)
    record = read_tensor_cache(params_dir).by_name()[name]
    dtype = numpy_dtype(record.dtype)
    offset = record.byte_offset + int(np.ravel_multi_index(index, record.shape)) * dtype.itemsize
    shard = params_dir / record.shard
    data = bytearray(shard.read_bytes())
    old = np.frombuffer(bytes(data[offset:offset + dtype.itemsize]), dtype=dtype)[0]
    new = np.array([float(old) + delta], dtype=np.float64).astype(dtype)
    data[offset:offset + dtype.itemsize] = new.tobytes()
    shard.write_bytes(bytes(data))
    digest = hashlib.md5(bytes(data)).hexdigest()

    def edit(manifest: dict) -> None:
        for entry in manifest["records"]:
            if entry["dataPath"] == record.shard:
                entry["md5sum"] = digest

    _rewrite_manifest(params_dir, edit)
    return float(old), float(new[0])


def flip_byte(path: Path, offset: int = 100) -> None:
    """Corrupt one byte of a file in place (md5 left as recorded)."""
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def lm_head_name(head: int, num_layers: int = 1) -> str:
    return f"medusa_head.{head}.{num_layers}.weight"
