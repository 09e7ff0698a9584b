"""medusa-cli: Medusa speculative-decoding heads from published checkpoints to verified TVM libraries.

The Python API is the library under the CLI:

    from medusa_cli import load_heads, verify_heads, VerifyRequest
    heads = load_heads("out/heads.so", "out/params", device="cpu")
    logits = heads.get_logits(hidden)      # hidden [batch, hidden_size] -> per head [batch, vocab]
    report = verify_heads(VerifyRequest("out/heads.so", "out/params"))
    report.raise_for_verdict()

Names are imported on first use, so `import medusa_cli` (and `medusa --help`) does not load TVM.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

# public name -> module that defines it
_API = {
    "convert_checkpoint": "commands.convert",
    "ConvertRequest": "commands.convert",
    "compile_heads": "commands.compile",
    "CompileRequest": "commands.compile",
    "verify_heads": "commands.verify",
    "VerifyRequest": "commands.verify",
    "VerifyReport": "verify.report",
    "run_heads": "commands.run",
    "RunRequest": "commands.run",
    "build_heads": "commands.build",
    "BuildRequest": "commands.build",
    "evaluate_heads": "commands.eval",
    "EvalRequest": "commands.eval",
    "search_tree": "commands.tree_search",
    "TreeSearchRequest": "commands.tree_search",
    "load_heads": "runtime.heads",
    "CompiledHeads": "runtime.heads",
    "MedusaConfig": "spec",
    "MedusaError": "errors",
    "VerificationFailed": "errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'medusa_cli' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
