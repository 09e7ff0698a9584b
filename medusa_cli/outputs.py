"""Outputs appear whole or not at all, with the user's permissions.

Everything is written beside its final path (same file system, so the rename is atomic) and
renamed into place at the end. On any error, Ctrl-C or termination signal (the CLI turns SIGTERM
and SIGHUP into an exception, so these `finally` blocks run) the partial output is removed and
an existing output is left as it was. What is renamed into place is on disk first (fsync of its
files and folder, then of the folder it lands in), so a crash just after publishing cannot leave
files that exist but are empty.

Publishing a directory without `force` is a plain rename, which fails when another process has
put a non-empty directory there in the meantime: two runs into one output never silently replace
each other's work.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .errors import InputError


def _umask() -> int:
    """The process's umask, read without changing it (Linux), else by setting it back."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_default(path: Path, directory: bool) -> None:
    """Give a temporary file (0600) or folder (0700) the mode a plain open()/mkdir() would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def check_output_dir(output: Path, force: bool, flag: str = "-o") -> None:
    """Refuse a non-empty output directory (or a file in its place) unless force."""
    if output.exists():
        if not output.is_dir():
            raise InputError(f"{flag} {output}: exists and is not a directory; choose another {flag}")
        if any(output.iterdir()) and not force:
            raise InputError(f"{flag} {output}: directory exists and is not empty; pass --force to replace it")


def check_not_overlapping(output: Path, inputs: Sequence[tuple[str, Path | None]],
                          flag: str = "-o") -> None:
    """Refuse an output that is or contains one of the inputs (name, path): with --force,
    replacing it would delete what is being read. (An output inside an input's folder is fine.)"""
    out = Path(output).resolve()
    for name, path in inputs:
        if path is None:
            continue
        source = Path(path).resolve()
        if out == source or out in source.parents:
            relation = "is" if out == source else "contains"
            raise InputError(f"{flag} {output}: {relation} {name} {path}; write the output "
                             "somewhere else")


def _writable_parent(output: Path) -> None:
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{output}: cannot create {output.parent} ({exc.strerror})") from None


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file under root, then every folder, to disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


class StagedDirectory:
    """A directory being filled beside `output`; publish() moves it into place."""

    def __init__(self, output: Path, force: bool = False, flag: str = "-o"):
        self.output = output
        self.force = force
        self.flag = flag
        _writable_parent(output)
        self.path = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
        _chmod_default(self.path, directory=True)
        self.published = False

    def publish(self) -> None:
        """Move the staged directory onto `output`. Without force only an absent or empty
        output is replaced, checked by the rename itself; with force an old output is moved
        aside first and removed after."""
        _fsync_tree(self.path)
        trash = None
        if self.force and self.output.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.old-", dir=self.output.parent))
            os.replace(self.output, trash / self.output.name)
        try:
            os.rename(self.path, self.output)
        except OSError as exc:
            if trash is not None:  # put the old output back
                os.replace(trash / self.output.name, self.output)
                shutil.rmtree(trash, ignore_errors=True)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise InputError(
                    f"{self.flag} {self.output}: something else was written there while this ran; "
                    "nothing was replaced (pass --force to replace it)") from None
            raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        fsync_path(self.output.parent)
        self.published = True


@contextlib.contextmanager
def staged_directory(output: Path, force: bool = False, flag: str = "-o") -> Iterator[StagedDirectory]:
    """Yield a StagedDirectory; whatever was not published is removed on the way out."""
    staged = StagedDirectory(Path(output), force, flag)
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
        _chmod_default(tmp, directory=False)
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, output)
        fsync_path(output.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_together(writes: Sequence[tuple[Path, Callable[[Path], None]]]) -> None:
    """write(partial) for each (path, write), each into a file staged beside its path; the
    files are renamed into place only once every write has succeeded, else all are removed.
    OSError propagates for the caller to name in its own terms."""
    with contextlib.ExitStack() as stack:
        for path, write in writes:
            write(stack.enter_context(staged_file(Path(path))))
