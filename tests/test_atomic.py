"""atomic.py: what is published is on disk before the rename makes it visible, and the rename is
synced too; tensor_cache syncs each shard's data as it finishes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medusa_cli import atomic, tensor_cache


def _record(monkeypatch) -> list[tuple]:
    """Events in order: ("fsync", path) and ("replace", source, target)."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    return events


def test_staged_directory_is_synced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = _record(monkeypatch)
    output = tmp_path / "out"
    with atomic.staged_directory(output) as stage:
        (stage.path / "a.bin").write_bytes(b"a" * 10)
        (stage.path / "sub").mkdir()
        (stage.path / "sub" / "b.json").write_text("{}")
        staged = stage.path
        stage.publish()
    rename = events.index(("replace", staged, output))
    synced_before = {e[1] for e in events[:rename] if e[0] == "fsync"}
    assert synced_before == {staged / "a.bin", staged / "sub" / "b.json", staged / "sub", staged}
    assert ("fsync", tmp_path) in events[rename + 1:]  # the new directory entry
    assert (output / "sub" / "b.json").read_text() == "{}"


def test_staged_file_is_synced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = _record(monkeypatch)
    output = tmp_path / "lib.so"
    with atomic.staged_file(output) as tmp:
        tmp.write_bytes(b"x")
    assert events == [("fsync", tmp), ("replace", tmp, output), ("fsync", tmp_path)]
    assert output.read_bytes() == b"x"


def test_every_shard_is_synced_as_it_finishes(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fdatasync

    def fdatasync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real(fd)

    monkeypatch.setattr(tensor_cache.os, "fdatasync", fdatasync)
    tensors = [(f"t{i}", np.full((1000,), i, np.float32)) for i in range(5)]
    cache = tensor_cache.write_tensor_cache(tmp_path, tensors, shard_cap_bytes=8000)
    assert sorted(synced) == sorted(s["dataPath"] for s in cache.shards) and len(synced) == 3
    tensor_cache.check_integrity(tmp_path)  # the md5s still match what was written
