"""md5_lanes: the vector-lane md5 kernel and its hashers, against hashlib."""

from __future__ import annotations

import ctypes
import hashlib
import json

import numpy as np
import pytest

from medusa_cli import checkpoint as ckpt_mod
from medusa_cli import md5_lanes, tensor_cache

# every padding case, a file longer than one call's blocks, and more files than lanes
LENGTHS = [0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 1000, 64 * md5_lanes._CALL_BLOCKS + 100,
           *(12345 * j for j in range(1, 12))]


def _files(tmp_path, lengths, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i, n in enumerate(lengths):
        path = tmp_path / f"file{i}.bin"
        path.write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        paths.append(path)
    return paths


def _hashlib(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def kernel():
    kernel = md5_lanes.load_kernel()
    assert kernel is not None, "the md5 kernel did not build or failed its check here"
    return kernel


def test_lanes_match_hashlib_on_every_length(tmp_path, kernel):
    paths = _files(tmp_path, LENGTHS)
    assert len(paths) > md5_lanes.LANES
    hasher = md5_lanes.file_hasher()
    assert isinstance(hasher, md5_lanes.LaneHasher)
    hasher.close()
    assert md5_lanes.md5_files(paths) == [_hashlib(p) for p in paths]


def test_message_given_region_by_region(tmp_path, kernel):
    """Regions of a file written as it goes and of an array, at odd offsets and sizes (blocks
    straddle regions, some empty), reported over time beside whole files in other lanes."""
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 3 * 1024 * 1024 + 77, dtype=np.uint8)
    extra = rng.integers(0, 256, 5000, dtype=np.uint8)
    others = _files(tmp_path, [5000, 70000, 1 << 20], seed=2)
    growing = tmp_path / "growing.bin"
    hasher = md5_lanes.LaneHasher(kernel)
    expected = b""
    try:
        with open(growing, "w+b", buffering=0) as f:  # the hasher reads through the fd
            handle = hasher.open()
            done = [hasher.submit(others[0])]
            written = 0
            for size in (1, 63, 64, 64, 1000, 65536 + 3, 1 << 20, len(data)):
                f.write(data[written:size].tobytes())
                handle.add(f.fileno(), written, size - written)
                expected += data[written:size].tobytes()
                handle.add(extra, 7, 33)  # and 33 bytes of an array after each
                expected += extra[7:40].tobytes()
                written = size
                if size == 1000:
                    done += [hasher.submit(p) for p in others[1:]]
            digest = handle.finish()
            assert digest.result(timeout=60) == hashlib.md5(expected).hexdigest()
        assert [d.result(timeout=60) for d in done] == [_hashlib(p) for p in others]
    finally:
        hasher.close()


def test_cancel_fails_a_message_left_unfinished(kernel):
    hasher = md5_lanes.LaneHasher(kernel)
    handle = hasher.open()
    handle.add(np.zeros(100, dtype=np.uint8), 0, 100)
    hasher.close(cancel=True)
    with pytest.raises(RuntimeError, match="cancelled"):
        handle.finish().result(timeout=10)


def test_missing_file_is_an_error_naming_it(tmp_path, kernel):
    hasher = md5_lanes.LaneHasher(kernel)
    try:
        with pytest.raises(FileNotFoundError, match="nope.bin"):
            hasher.submit(tmp_path / "nope.bin")
    finally:
        hasher.close()


def test_hashlib_fallback_gives_the_same_digests(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_MD5", "hashlib")
    monkeypatch.setattr(md5_lanes, "_loaded", {})
    hasher = md5_lanes.file_hasher()
    assert isinstance(hasher, md5_lanes.ThreadHasher)
    hasher.close()
    paths = _files(tmp_path, LENGTHS[:8])
    assert md5_lanes.md5_files(paths) == [_hashlib(p) for p in paths]


def test_a_broken_cached_build_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(md5_lanes, "_loaded", {})
    path = md5_lanes.library_path()
    path.write_bytes(b"\x7fELF truncated")
    kernel = md5_lanes.load_kernel()
    assert kernel is not None
    assert path.stat().st_size > 1000
    paths = _files(tmp_path, [0, 100, 70000])
    assert md5_lanes.md5_files(paths) == [_hashlib(p) for p in paths]


def test_a_kernel_that_disagrees_with_hashlib_is_not_used(kernel):
    def off_by_one(state, table, blocks, *data):  # addresses, as the kernel takes them
        kernel.function(state, table, blocks, *data)
        (ctypes.c_uint32 * 1).from_address(state)[0] ^= 1

    assert md5_lanes._checked(kernel) is kernel
    assert md5_lanes._checked(md5_lanes._Kernel(off_by_one, kernel.lanes)) is None


@pytest.mark.parametrize("method", ["lanes", "hashlib"])
def test_written_shards_record_their_md5(tmp_path, monkeypatch, method):
    """write_tensor_cache's md5sum of each shard is hashlib's md5 of the file on disk, for
    tensors written from memory and tensors copied from a source file (hashed from the source,
    while the copy goes on), mixed in one shard."""
    if method == "hashlib":
        monkeypatch.setenv("MEDUSA_MD5", "hashlib")
        monkeypatch.setattr(md5_lanes, "_loaded", {})
    rng = np.random.default_rng(3)
    sizes = [10, 4096, 333, 70000, 1, 250000, 17, 9999, 40000]
    arrays = [rng.standard_normal(n).astype(np.float16) for n in sizes]
    source = tmp_path / "source.bin"
    source.write_bytes(b"header" + b"".join(a.tobytes() for a in arrays))
    out = tmp_path / "out"
    out.mkdir()
    with open(source, "rb") as f:
        offset, tensors = 6, []
        for i, array in enumerate(arrays):
            region = ckpt_mod.FileRegion(f.fileno(), offset, array.nbytes)
            tensors.append((f"t{i}", array, region) if i % 3 else (f"t{i}", array))
            offset += array.nbytes
        cache = tensor_cache.write_tensor_cache(out, iter(tensors), shard_cap_bytes=200_000)
    manifest = json.loads((out / "tensor-cache.json").read_text())
    assert len(manifest["records"]) >= 3
    for shard in manifest["records"]:
        assert shard["md5sum"] == _hashlib(out / shard["dataPath"])
    assert [s["md5sum"] for s in cache.shards] == [s["md5sum"] for s in manifest["records"]]
    for record in cache.tensors:
        stored = tensor_cache.load_array(out, record)
        assert stored.tobytes() == arrays[int(record.name[1:])].tobytes()
