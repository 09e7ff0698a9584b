"""Outputs appear whole or not at all.

Everything is written beside its final path (same filesystem, so the rename is atomic) and
renamed into place at the end. On any error or Ctrl-C the partial output is removed and an
existing output is left as it was. What is renamed into place is on disk first (fsync of its
files and folder, then of the folder it lands in), so that a crash just after publishing
cannot leave files that exist but are empty.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError


def check_output_dir(output: Path, force: bool, flag: str = "-o") -> None:
    """Refuse a non-empty output directory (or a file in its place) unless force."""
    if output.exists():
        if not output.is_dir():
            raise InputError(f"{flag} {output}: exists and is not a directory; choose another {flag}")
        if any(output.iterdir()) and not force:
            raise InputError(f"{flag} {output}: directory exists and is not empty; pass --force to replace it")


def _writable_parent(output: Path) -> None:
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{output}: cannot create {output.parent} ({exc.strerror})") from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file under root, then every folder, to disk (files already synced cost little)."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


class StagedDirectory:
    """A directory being filled beside `output`; publish() moves it into place."""

    def __init__(self, output: Path):
        self.output = output
        _writable_parent(output)
        self.path = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
        self.published = False

    def publish(self) -> None:
        """Replace `output` with the staged directory; an old output is removed only after."""
        _fsync_tree(self.path)
        if self.output.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.old-", dir=self.output.parent))
            os.replace(self.output, trash / self.output.name)
            os.replace(self.path, self.output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.path, self.output)
        _fsync(self.output.parent)
        self.published = True


@contextlib.contextmanager
def staged_directory(output: Path) -> Iterator[StagedDirectory]:
    """Yield a StagedDirectory; whatever was not published is removed on the way out."""
    staged = StagedDirectory(Path(output))
    try:
        yield staged
    finally:
        if not staged.published:
            shutil.rmtree(staged.path, ignore_errors=True)


@contextlib.contextmanager
def staged_file(output: Path) -> Iterator[Path]:
    """Yield an empty temporary file beside `output` with the same suffix; renamed onto
    `output` when the block ends normally, removed when it raises. OSError propagates for
    the caller to name in its own terms."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{output.stem}.", suffix=f".partial{output.suffix}",
                                dir=output.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, output)
        _fsync(output.parent)
    finally:
        tmp.unlink(missing_ok=True)
