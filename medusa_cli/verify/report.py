"""What `medusa verify` returns: per head, the tree, the packed directory's integrity, and the
verdict, as dataclasses that render as strict JSON (no NaN or Infinity)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import VerificationFailed
from ..library import LibraryMetadata
from .judge import Comparison
from .thresholds import Thresholds


@dataclasses.dataclass
class HeadReport:
    head: int
    # compiled vs the weights the library should hold
    vs_reference: Comparison
    # compiled vs the original checkpoint; None when verifying against the packed weights
    vs_source: Comparison | None

    @property
    def passed(self) -> bool:
        return self.vs_reference.passed and (self.vs_source is None or self.vs_source.passed)

    @property
    def reasons(self) -> list[str]:
        return self.vs_reference.reasons + (self.vs_source.reasons if self.vs_source else [])

    def to_dict(self) -> dict:
        return {
            "head": self.head,
            "passed": self.passed,
            "reasons": self.reasons,
            "vs_reference": self.vs_reference.to_dict(),
            "vs_source": self.vs_source.to_dict() if self.vs_source else None,
        }


@dataclasses.dataclass
class TreeReport:
    """Tree candidates computed in the library, checked twice.

    - against tree.generate_candidates fed with the library's own logits: the candidate kernels
      (top-k, gathers) must agree exactly, whatever the scheme;
    - against generate_candidates fed with the oracle's logits: nodes that agree, per depth.
      Exact agreement is required where the scheme keeps float32 weights (q0f32); elsewhere
      rounding legitimately reorders near-tied candidates, so it is reported, not judged.
    """

    name: str
    nodes: int
    # tree nodes (root excluded) per depth whose candidate matches, vs the oracle's logits
    oracle_agreement_per_depth: list[float]
    oracle_exact_required: bool
    # candidates (tree and cartesian) that differ from generate_candidates on the library's logits
    self_mismatches: int

    @property
    def passed(self) -> bool:
        exact = all(a == 1.0 for a in self.oracle_agreement_per_depth)
        return self.self_mismatches == 0 and (exact or not self.oracle_exact_required)

    @property
    def reason(self) -> str | None:
        if self.self_mismatches:
            return (f"tree {self.name}: {self.self_mismatches} candidates differ from the tree "
                    "algorithm applied to the library's own logits")
        if not self.passed:
            agreement = ", ".join(f"{a:.3f}" for a in self.oracle_agreement_per_depth)
            return f"tree {self.name}: candidates differ from the oracle's (agreement per depth {agreement})"
        return None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed, "reason": self.reason}


@dataclasses.dataclass
class Integrity:
    """The packed directory checked against tensor-cache.json and the library's parameter list."""

    ok: bool
    shards: int
    tensors: int
    bytes: int
    # the first problem found, naming the file or tensor
    error: str | None = None


@dataclasses.dataclass
class SourceUsed:
    # "checkpoint": the original weights; "packed": the packed directory itself
    kind: str
    path: Path
    # how it was chosen: "--source", "recorded in mlc-chat-config.json" or "packed weights"
    origin: str
    layout: str | None = None


@dataclasses.dataclass
class VerifyReport:
    library: Path
    params_dir: Path
    metadata: LibraryMetadata
    device: str
    thresholds: Thresholds
    integrity: Integrity
    # None when integrity failed before anything ran
    source: SourceUsed | None
    # {"kind": "random"|"file", "batch": N, "seed"|"path": ...}
    inputs: dict | None
    heads: list[HeadReport]
    warnings: list[str]
    seconds: float
    # None when the library has no tree
    tree: TreeReport | None = None

    @property
    def passed(self) -> bool:
        return (self.integrity.ok and bool(self.heads) and all(h.passed for h in self.heads)
                and (self.tree is None or self.tree.passed))

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"

    @property
    def failed_heads(self) -> list[int]:
        return [h.head for h in self.heads if not h.passed]

    def failure_message(self) -> str:
        """One line naming what failed: the damaged file, or each failing head's first reason."""
        if not self.integrity.ok:
            return f"verification failed: {self.integrity.error}"
        parts = [f"head {h.head}: {h.reasons[0]}" for h in self.heads if not h.passed]
        if not parts and self.tree is not None:
            return f"verification failed: {self.tree.reason}"
        return f"verification failed for {len(parts)} of {len(self.heads)} heads: " + "; ".join(parts)

    def raise_for_verdict(self) -> None:
        """Raise VerificationFailed (exit code 1) unless every check passed."""
        if not self.passed:
            raise VerificationFailed(self.failure_message())

    def to_dict(self) -> dict:
        meta = self.metadata
        return {
            "verdict": self.verdict,
            "failed_heads": self.failed_heads,
            "library": {
                "path": str(self.library),
                "quantization": meta.quantization,
                "dtype": meta.dtype,
                "target": meta.target,
                "max_batch_size": meta.max_batch_size,
                "model_config": meta.config.to_dict(),
                "medusa_cli_version": meta.medusa_cli_version,
            },
            "params_dir": str(self.params_dir),
            "device": self.device,
            "source": None if self.source is None else {
                **dataclasses.asdict(self.source), "path": str(self.source.path)},
            "inputs": self.inputs,
            "integrity": dataclasses.asdict(self.integrity),
            "thresholds": self.thresholds.to_dict(),
            "heads": [h.to_dict() for h in self.heads],
            "tree": None if self.tree is None else self.tree.to_dict(),
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }


