"""outputs.py: what is published is on disk before the rename makes it visible; a directory is
never silently replaced; outputs get the user's umask; an output may not overlap its inputs.
And packed.tensor_cache syncs each shard's data as it finishes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from medusa_cli import outputs
from medusa_cli.errors import InputError
from medusa_cli.packed import tensor_cache
from medusa_cli.packed.check import check_packed

from .conftest import leftovers


def _record(monkeypatch) -> list[tuple]:
    """Events in order: ("fsync", path) and ("rename", source, target)."""
    events: list[tuple] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def renamer(real):
        def rename(src, dst):
            events.append(("rename", Path(src), Path(dst)))
            real(src, dst)
        return rename

    monkeypatch.setattr(outputs.os, "fsync", fsync)
    monkeypatch.setattr(outputs.os, "replace", renamer(real_replace))
    monkeypatch.setattr(outputs.os, "rename", renamer(real_rename))
    return events


def test_staged_directory_is_synced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = _record(monkeypatch)
    output = tmp_path / "out"
    with outputs.staged_directory(output) as stage:
        (stage.path / "a.bin").write_bytes(b"a" * 10)
        (stage.path / "sub").mkdir()
        (stage.path / "sub" / "b.json").write_text("{}")
        staged = stage.path
        stage.publish()
    rename = events.index(("rename", staged, output))
    synced_before = {e[1] for e in events[:rename] if e[0] == "fsync"}
    assert synced_before == {staged / "a.bin", staged / "sub" / "b.json", staged / "sub", staged}
    assert ("fsync", tmp_path) in events[rename + 1:]  # the new directory entry
    assert (output / "sub" / "b.json").read_text() == "{}"


def test_staged_file_is_synced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = _record(monkeypatch)
    output = tmp_path / "lib.so"
    with outputs.staged_file(output) as tmp:
        tmp.write_bytes(b"x")
    assert events == [("fsync", tmp), ("rename", tmp, output), ("fsync", tmp_path)]
    assert output.read_bytes() == b"x"


def test_a_directory_written_meanwhile_is_not_replaced_without_force(tmp_path):
    output = tmp_path / "out"
    with outputs.staged_directory(output) as first:
        (first.path / "mine").write_text("first")
        # another run publishes into the same (then empty) output before this one finishes
        with outputs.staged_directory(output) as second:
            (second.path / "theirs").write_text("second")
            second.publish()
        with pytest.raises(InputError, match="something else was written there while this ran"):
            first.publish()
    assert sorted(p.name for p in output.iterdir()) == ["theirs"]
    assert leftovers(tmp_path) == []


def test_force_replaces_and_removes_the_old_output(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old").write_text("old")
    with outputs.staged_directory(output, force=True) as stage:
        (stage.path / "new").write_text("new")
        stage.publish()
    assert sorted(p.name for p in output.iterdir()) == ["new"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_users_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with outputs.staged_directory(tmp_path / "dir") as stage:
            (stage.path / "f").write_text("x")
            stage.publish()
        with outputs.staged_file(tmp_path / "file.so") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "dir").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "file.so").stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("relation", ["equal", "parent"])
def test_an_output_may_not_be_or_contain_an_input(tmp_path, relation):
    source = tmp_path / "ckpt"
    source.mkdir()
    output = {"equal": source, "parent": tmp_path}[relation]
    word = {"equal": "is", "parent": "contains"}[relation]
    with pytest.raises(InputError, match=f"-o {output}: {word} SRC {source}"):
        outputs.check_not_overlapping(output, [("SRC", source)])
    outputs.check_not_overlapping(tmp_path / "elsewhere", [("SRC", source)])
    outputs.check_not_overlapping(source / "params", [("SRC", source)])


def test_every_shard_is_synced_as_it_finishes(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fdatasync

    def fdatasync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real(fd)

    monkeypatch.setattr(tensor_cache.os, "fdatasync", fdatasync)
    tensors = [(f"t{i}", np.full((1000,), i, np.float32)) for i in range(5)]
    cache = tensor_cache.write_tensor_cache(tmp_path, tensors, shard_cap_bytes=8000)
    assert sorted(synced) == sorted(s.data_path for s in cache.shards) and len(synced) == 3
    expected = [(name, array.shape, "float32") for name, array in tensors]
    check_packed(tmp_path, expected, against="the test", fix="-", md5=True)  # md5s match the bytes
