"""The one check of a packed directory that compile, the runtime and verify all run.

tensor-cache.json is read and validated (tensor_cache.read_tensor_cache); every tensor has the
name, shape and dtype the caller expects (none missing, none extra); every shard file exists with
its recorded size; with md5=True, every shard's md5 matches the recorded one, and a shard without
one is a failure (a checksum that was removed proves nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import ParamsError
from ..spec import ParamSpec
from .tensor_cache import TENSOR_CACHE_FILE, TensorCache, md5_files, read_tensor_cache

_REBUILD = "the directory is corrupted, re-run `medusa convert`"


def check_packed(params_dir: Path, expected: Sequence[ParamSpec], *, against: str, fix: str,
                 md5: bool = False, cache: TensorCache | None = None) -> TensorCache:
    """ParamsError naming the first problem: the tensor or shard file, what `against` expects
    (e.g. "the library") and how to `fix` a mismatch. Returns the tensor cache."""
    params_dir = Path(params_dir)
    cache = cache or read_tensor_cache(params_dir)
    manifest = params_dir / TENSOR_CACHE_FILE
    found = cache.by_name()
    for name, shape, dtype in expected:
        record = found.get(name)
        if record is None:
            raise ParamsError(f"{manifest}: tensor '{name:.200}' that {against} needs is missing; {fix}")
        if tuple(record.shape) != tuple(shape) or record.dtype != dtype:
            raise ParamsError(
                f"{manifest}: tensor '{name:.200}' is {list(record.shape)} {record.dtype}, expected "
                f"{list(shape)} {dtype} from {against}; {fix}"
            )
    wanted = {spec[0] for spec in expected}
    extra = [t.name for t in cache.tensors if t.name not in wanted]
    if extra:
        raise ParamsError(f"{manifest}: tensor '{extra[0]:.200}' ({len(extra)} in all) is not a "
                          f"parameter of {against}; {fix}")
    for shard in cache.shards:
        path = params_dir / shard.data_path
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "is missing"
            raise ParamsError(f"{path}: shard listed in {TENSOR_CACHE_FILE} {what}; {_REBUILD}")
        size = path.stat().st_size
        if size != shard.nbytes:
            raise ParamsError(f"{path}: shard is {size} bytes, {TENSOR_CACHE_FILE} says "
                              f"{shard.nbytes}; {_REBUILD}")
    if md5:
        unrecorded = [s.data_path for s in cache.shards if not s.md5sum]
        if unrecorded:
            raise ParamsError(f"{params_dir / unrecorded[0]}: {TENSOR_CACHE_FILE} records no md5sum "
                              f"for it, so its bytes cannot be checked; {_REBUILD}")
        digests = md5_files([params_dir / s.data_path for s in cache.shards])
        for shard, digest in zip(cache.shards, digests):
            if digest != shard.md5sum:
                raise ParamsError(f"{params_dir / shard.data_path}: md5 mismatch against "
                                  f"{TENSOR_CACHE_FILE}; the shard is corrupted, re-run `medusa convert`")
    return cache
