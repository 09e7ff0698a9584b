"""A checkpoint as a set of weight files: found, opened lazily, read one tensor at a time.

Only headers and pickles are read up front; tensor data is read by `Checkpoint.read`, so the
base-model tensors mixed into a Medusa-2 file are never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, first_line
from .layouts import config_hint_values
from .safetensors import FileRegion, SafetensorsFile, map_file_region

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# Shard indexes and config.json are small; a larger one is not what it claims to be.
_MAX_JSON_BYTES = 64 * 1024 * 1024


def _regular_file(path: Path, what: str) -> None:
    """Refuse anything but a regular file before opening it: a FIFO would block the open, a
    device such as /dev/null reads as nothing."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file; pass a {what}")


def read_json_file(path: Path, what: str) -> Any:
    """A small JSON file, size-capped and parsed with a one-line error naming it."""
    _regular_file(path, what)
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes is too large for a {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = "it nests too deep" if isinstance(exc, RecursionError) else first_line(exc)
        raise CheckpointError(f"{path}: not a valid {what} ({reason})") from None


def _open_file(path: Path):
    _regular_file(path, "weights file")
    if path.name.endswith(SAFETENSORS_SUFFIXES):
        return SafetensorsFile(path)
    if path.name.endswith(TORCH_SUFFIXES):
        from .pytorch import TorchCheckpoint

        return TorchCheckpoint(path)
    raise CheckpointError(
        f"{path}: unsupported weights file; expected .safetensors, .pt, .pth or .bin"
    )


def _plain_file_name(name: str) -> bool:
    """A name of a file in the current folder: no separator, no '..', not absolute."""
    return name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def read_index(index_path: Path) -> dict[str, Path]:
    """A shard index's weight_map: tensor name -> shard file, each shard a file in the index's
    own folder (a name that leads elsewhere is refused)."""
    data = read_json_file(index_path, "shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: not a valid shard index (no \"weight_map\" object "
                              "from tensor names to shard files)")
    shards: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index_path}: weight_map['{name:.200}'] is {shard!r:.60}, "
                                  "expected a shard file name")
        # Judged by the name, not by where a symlink leads: the Hugging Face cache links every
        # file of a snapshot into its blobs/ folder, and that is the user's doing, not the file's.
        if not _plain_file_name(shard):
            raise CheckpointError(
                f"{index_path}: weight_map['{name:.200}'] points to {shard!r:.200}, outside the "
                f"index's folder {index_path.parent}; shards must sit beside their index")
        shards[name] = index_path.parent / shard
    for path in dict.fromkeys(shards.values()):
        if not path.exists():
            raise CheckpointError(
                f"{index_path}: lists shard {path.name}, which is missing from {index_path.parent}")
        _regular_file(path, f"shard listed in {index_path.name}")
    return shards


def _indexed(index: Path) -> tuple[list[Path], Path, dict[str, Path]]:
    weight_map = read_index(index)
    return list(dict.fromkeys(weight_map.values())), index, weight_map


def discover_weight_files(src: Path) -> tuple[list[Path], Path | None, dict[str, Path]]:
    """The weight files of a checkpoint (a single file, an index's shards, or a directory's
    files), and the index they came from with its weight_map (None and {} without one).
    Safetensors are preferred over PyTorch files when a directory holds both."""
    src = Path(src)
    try:
        mode = os.stat(src).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{src}: no such file or directory") from None
    except OSError as exc:
        raise CheckpointError(f"{src}: cannot read it ({exc.strerror})") from None
    if stat.S_ISREG(mode):
        if src.name.endswith(".index.json"):
            return _indexed(src)
        return [src], None, {}
    if not stat.S_ISDIR(mode):
        raise CheckpointError(f"{src}: neither a regular file nor a directory; pass a checkpoint "
                              "directory, a weights file or a shard index")
    for pattern in ("*.safetensors.index.json", "*.bin.index.json", "*.pt.index.json"):
        indexes = sorted(src.glob(pattern))
        if indexes:
            return _indexed(indexes[0])
    for suffixes in (SAFETENSORS_SUFFIXES, TORCH_SUFFIXES):
        files = sorted(p for p in src.iterdir() if p.is_file() and p.name.endswith(suffixes))
        if files:
            return files, None, {}
    raise CheckpointError(
        f"{src}: no weights found (looked for *.safetensors, *.pt, *.pth, *.bin and shard indexes)"
    )


def read_config_hints(src: Path) -> tuple[Path | None, dict[str, Any]]:
    """config.json beside the weights, under MedusaConfig's names (a hint, not the truth)."""
    src = Path(src)
    folder = src if src.is_dir() else src.parent
    path = folder / "config.json"
    if not path.is_file():
        return None, {}
    raw = read_json_file(path, "config.json")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return path, config_hint_values(raw, str(path))


def sha256_file(path: Path, stop: threading.Event | None = None) -> str | None:
    """The file's sha256 (the provenance convert records; for a file from the Hugging Face Hub
    it is its LFS id); None if `stop` was set before it finished. Hashed through mapped windows:
    no copies into Python buffers, and a bounded RSS."""
    digest = hashlib.sha256()
    window = 1 << 24
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for start in range(0, size, window):
            if stop is not None and stop.is_set():
                return None
            digest.update(map_file_region(f.fileno(), start, min(window, size - start)))
    return digest.hexdigest()


class Checkpoint:
    """All tensors of one checkpoint, across its files, read lazily."""

    def __init__(self, src: Path):
        self.src = Path(src)
        self.files, index, weight_map = discover_weight_files(self.src)
        self._readers = []
        self._where: dict[str, Any] = {}
        try:
            for path in self.files:
                reader = _open_file(path)
                self._readers.append(reader)
                for name in reader.keys():
                    if name in self._where:
                        raise CheckpointError(
                            f"tensor '{name:.200}' appears in both {self._where[name].path} and {path}"
                        )
                    self._where[name] = reader
            if index is not None:
                self._check_index(index, weight_map)
        except BaseException:
            self.close()
            raise

    def _check_index(self, index: Path, weight_map: dict[str, Path]) -> None:
        """Every tensor the index names is in the shard it names."""
        for name, shard in weight_map.items():
            reader = self._where.get(name)
            if reader is None or reader.path != shard:
                where = "in no shard" if reader is None else f"in {reader.path.name}"
                raise CheckpointError(f"{index}: names tensor '{name:.200}' in {shard.name}, but it is "
                                      f"{where}; the index does not match its shards")

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._where[name].shape(name))

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)

    def nbytes(self, name: str) -> int:
        elements = 1
        for d in self.shape(name):
            elements *= d
        return elements * self.dtype(name).itemsize

    def file_of(self, name: str) -> Path:
        return self._where[name].path

    def read(self, name: str) -> np.ndarray:
        return self._where[name].get_tensor(name)

    def region(self, name: str) -> FileRegion | None:
        """Where the tensor's bytes lie, as stored, in its file; None where they do not lie as
        one run (PyTorch files are read through the zip reader)."""
        source = self._where[name]
        return source.region(name) if isinstance(source, SafetensorsFile) else None

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
        self._readers = []

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
