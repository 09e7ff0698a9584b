"""One exception family for the whole library.

Every message names the file, tensor or flag involved and, where there is one, the fix.
Only the CLI turns these into a red line on stderr and an exit code.
"""

from __future__ import annotations


class MedusaError(Exception):
    """Base class: a problem the user can act on. Exit code 2 (usage or input)."""

    exit_code = 2


class InputError(MedusaError):
    """A path, flag or argument is missing, malformed or contradictory."""


class CheckpointError(InputError):
    """A checkpoint cannot be read or does not hold a usable set of Medusa heads."""


class UnsafePickleError(CheckpointError):
    """A PyTorch pickle asks for something beyond a plain state dict; it is never executed."""


class ParamsError(InputError):
    """A packed parameter directory is missing, corrupted or inconsistent."""


class CompileError(MedusaError):
    """TVM could not build the module for the requested target."""


class ToolchainError(CompileError):
    """The requested target needs a toolchain this machine does not have."""


class VerificationFailed(MedusaError):
    """The compiled heads disagree with the oracle. Exit code 1."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """An exception's first line, or its type's name when it has no message."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def error_gist(exc: BaseException) -> str:
    """The gist of a TVM error for a one-line message: its last line, up to the first sentence."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    return text.splitlines()[-1].split(". ")[0]
