"""Tensors copied from a source file into shards: the page-aligned middle of a large copy is
written directly (O_DIRECT, through a bounce buffer), the ends and small copies with
copy_file_range, in pieces that run side by side; every fallback gives the same bytes."""

from __future__ import annotations

import errno
import hashlib
import os

import numpy as np
import pytest

from medusa_cli import tensor_cache
from medusa_cli.checkpoint import FileRegion

# bytes of each tensor: pieces, bounce buffers and the direct threshold are shrunk below, so
# these span several pieces and buffers, start and end off page boundaries, and include copies
# too small to go direct
SIZES = [100_000, 3, 50_001, 40_961, 8_191, 200_000, 70_000]
FROM_MEMORY = {4}  # written from the caller's array, between copies in the same shard
HEADER = 1_367  # the source's tensors start off any alignment, as in a safetensors file


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(tensor_cache, "COPY_PIECE_BYTES", 16 * 4096)
    monkeypatch.setattr(tensor_cache, "BOUNCE_BYTES", 3 * 4096)
    monkeypatch.setattr(tensor_cache, "DIRECT_MIN_BYTES", 2 * 4096)


@pytest.fixture
def direct_spy(monkeypatch):
    """Bytes each direct copy was asked for and wrote."""
    calls = []
    real = tensor_cache._direct_copy

    def spy(fd_in, offset_in, nbytes, direct_fd, offset_out, bounce):
        done = real(fd_in, offset_in, nbytes, direct_fd, offset_out, bounce)
        calls.append((nbytes, done, offset_out))
        return done

    monkeypatch.setattr(tensor_cache, "_direct_copy", spy)
    return calls


def _write(tmp_path, name="out"):
    rng = np.random.default_rng(5)
    payloads = [rng.integers(0, 256, n, dtype=np.uint8) for n in SIZES]
    source = tmp_path / "source.bin"
    source.write_bytes(b"h" * HEADER + b"".join(p.tobytes() for p in payloads))
    out = tmp_path / name
    out.mkdir()
    with open(source, "rb") as f:
        offset, tensors = HEADER, []
        for i, payload in enumerate(payloads):
            region = FileRegion(f.fileno(), offset, payload.nbytes)
            tensors.append((f"t{i}", payload) if i in FROM_MEMORY else (f"t{i}", payload, region))
            offset += payload.nbytes
        cache = tensor_cache.write_tensor_cache(out, iter(tensors), shard_cap_bytes=150_000)
    return out, cache, payloads


def _check_output(out, cache, payloads):
    assert len(cache.shards) == 4
    for record in cache.tensors:
        stored = tensor_cache.load_array(out, record)
        assert stored.tobytes() == payloads[int(record.name[1:])].tobytes(), record.name
    for shard in cache.shards:
        data = (out / shard["dataPath"]).read_bytes()
        assert len(data) == shard["nbytes"]
        assert shard["md5sum"] == hashlib.md5(data).hexdigest()


def _direct_supported(tmp_path) -> bool:
    probe = tmp_path / "probe"
    probe.touch()
    fd = tensor_cache._open_direct(probe)
    if fd is not None:
        os.close(fd)
    return fd is not None


def test_large_copies_go_direct_and_every_byte_lands(tmp_path, small_pieces, direct_spy):
    if not _direct_supported(tmp_path):
        pytest.skip(f"{tmp_path}: this file system refuses O_DIRECT (the fallback is tested below)")
    out, cache, payloads = _write(tmp_path)
    _check_output(out, cache, payloads)
    # every direct write starts on a page and covers whole pages, and all were taken
    assert direct_spy and all(n % 4096 == 0 and at % 4096 == 0 and done == n for n, done, at in direct_spy)
    copied = [n for i, n in enumerate(SIZES) if i not in FROM_MEMORY]
    direct = sum(done for _, done, _ in direct_spy)
    # left to copy_file_range: less than a page at each end of a piece, or a piece too small
    # to go direct (under 2 pages); a tensor spans at most n // piece + 2 pieces
    pieces = sum(n // (16 * 4096) + 2 for n in copied)
    assert sum(copied) - 2 * 4096 * pieces < direct < sum(copied)


def test_without_o_direct_the_copies_use_copy_file_range(tmp_path, small_pieces, direct_spy, monkeypatch):
    monkeypatch.setattr(tensor_cache, "_open_direct", lambda path: None)
    out, cache, payloads = _write(tmp_path)
    _check_output(out, cache, payloads)
    assert direct_spy == []


def test_a_refused_direct_write_is_finished_through_the_page_cache(tmp_path, small_pieces, direct_spy,
                                                                   monkeypatch):
    """EINVAL from a direct write (an alignment the file system wants larger, say) after the
    first one: the rest of each piece is copied the other way."""
    if not _direct_supported(tmp_path):
        pytest.skip(f"{tmp_path}: this file system refuses O_DIRECT")
    real = os.pwritev
    direct_writes = []

    def refuse_after_first(fd, buffers, offset):
        if _flags(fd) & os.O_DIRECT:
            direct_writes.append(offset)
            if len(direct_writes) > 1:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(tensor_cache.os, "pwritev", refuse_after_first)
    out, cache, payloads = _write(tmp_path)
    _check_output(out, cache, payloads)
    assert len(direct_writes) > 1
    assert any(done < n for n, done, _ in direct_spy)


def _flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def test_a_source_that_ends_early_is_an_error_that_says_so(tmp_path):
    source = tmp_path / "short.bin"
    source.write_bytes(b"s" * 5000)
    target = tmp_path / "target.bin"
    target.touch()
    bounce = tensor_cache._Bounce(4096)
    fd_in, fd_out = os.open(source, os.O_RDONLY), os.open(target, os.O_WRONLY)
    try:
        with pytest.raises(OSError, match="source file ended at byte 5000, inside a tensor"):
            tensor_cache._direct_copy(fd_in, 0, 8192, fd_out, 0, bounce)
    finally:
        os.close(fd_in)
        os.close(fd_out)
        bounce.close()
