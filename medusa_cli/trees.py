"""Medusa sparse trees: load, validate, build the verification buffers, gather candidates.

A tree is a set of paths below an implicit root. The root is the base model's next token;
path (r0, r1, ..., rd-1) is the node reached by taking the r0-th ranked token of head 0,
then the r1-th of head 1, and so on. All proposals are verified by the base model in one
pass. The buffers and candidates follow FasterDecoding/Medusa medusa/model/utils.py
(generate_medusa_buffers, generate_candidates); the published trees ship as JSON in
configs/trees, installed as medusa_cli.configs (see resources.py).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .outputs import staged_file
from .errors import InputError, first_line
from .resources import config_file

# Medusa's TOPK: ranks kept per head, and the stride between heads in tree_indices.
DEFAULT_TOPK = 10
# The largest tree: published Medusa trees have up to 64 nodes (mc_sim_7b_63) and sparse trees
# in the literature a few hundred, while the attention mask alone is nodes^2 floats (a tree of
# 11,730 nodes took 587 MB). Paths are at most as deep as there can be heads (spec.py's bound).
MAX_TREE_PATHS = 1023
MAX_TREE_DEPTH = 64
# Tree files are a few kilobytes.
_MAX_TREE_FILE_BYTES = 16 << 20
# tree_indices are int32: 1 + topk * (depth - 1) + rank must fit.
_INT32_MAX = (1 << 31) - 1

TreePath = tuple[int, ...]


def _order(path: TreePath) -> tuple[int, TreePath]:
    """generate_medusa_buffers' sort key: shallower first, then lexicographic."""
    return (len(path), path)


@dataclasses.dataclass(frozen=True)
class MedusaTree:
    name: str
    # root excluded; sorted by (len, path), which is the node order of every buffer
    paths: tuple[TreePath, ...]

    def __post_init__(self) -> None:
        if not self.paths or list(self.paths) != sorted(self.paths, key=_order):
            raise InputError(
                f"tree '{self.name}': paths must be non-empty and sorted by (length, path); "
                "build trees with load_tree() or validate_paths()"
            )

    @property
    def num_nodes(self) -> int:
        """Tokens the base model verifies per step: every path plus the root."""
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
        """Longest path; the number of heads the tree needs."""
        return len(self.paths[-1])

    @property
    def nodes_per_depth(self) -> tuple[int, ...]:
        """Paths of length 1, 2, ..., depth (the root not counted)."""
        counts = [0] * self.depth
        for path in self.paths:
            counts[len(path) - 1] += 1
        return tuple(counts)

    @property
    def leaves(self) -> tuple[TreePath, ...]:
        """Paths with no children, in retrieve_indices row order (reverse of `paths`)."""
        parents = {path[:-1] for path in self.paths}
        return tuple(path for path in reversed(self.paths) if path not in parents)


# --------------------------------------------------------------------------- loading


def shipped_trees() -> list[str]:
    """Names accepted by load_tree: the JSON file stems in configs/trees."""
    return sorted(
        entry.name[: -len(".json")]
        for entry in config_file("trees").iterdir()
        if entry.name.endswith(".json")
    )


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _is_file_spec(spec: str | os.PathLike) -> bool:
    if isinstance(spec, os.PathLike):
        return True
    return spec.endswith(".json") or "/" in spec or os.sep in spec


def load_tree(
    spec: str | os.PathLike, topk: int = DEFAULT_TOPK, num_heads: int | None = None
) -> MedusaTree:
    """A shipped tree by name (e.g. 'mc_sim_7b_63') or a JSON file, validated.

    A spec is a file when it is a Path, ends in .json or contains a path separator; any
    other string names a shipped tree. The JSON is a list of paths or an object
    {"name": ..., "source": ..., "paths": [...]}.
    """
    if _is_file_spec(spec):
        path = Path(spec)
        if not path.exists():
            raise InputError(
                f"{path}: tree file not found; pass a JSON file or one of: "
                f"{', '.join(shipped_trees())} (--tree)"
            )
        if not path.is_file():
            raise InputError(f"{path}: not a regular file; pass a JSON file of paths (--tree)")
        try:
            if path.stat().st_size > _MAX_TREE_FILE_BYTES:
                raise InputError(f"{path}: {path.stat().st_size:,} bytes is too large for a tree "
                                 f"file (at most {MAX_TREE_PATHS} paths)")
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{path}: cannot read the tree file ({first_line(err)})") from None
        source, default_name = str(path), path.stem
    else:
        name = str(spec)
        entry = config_file("trees", f"{name}.json")
        if not entry.is_file():
            raise InputError(
                f"unknown tree '{name}'; choose one of: {', '.join(shipped_trees())}, "
                "or pass a path to a JSON file (--tree)"
            )
        text = entry.read_text()
        source, default_name = f"configs/trees/{name}.json", name

    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(
            f"{source}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    except RecursionError:
        raise InputError(f"{source}: not a tree: its JSON nests too deep") from None
    except ValueError as err:  # an integer of thousands of digits
        raise InputError(f"{source}: not a tree ({first_line(err)})") from None

    if isinstance(data, dict):
        if "paths" not in data:
            raise InputError(
                f"{source}: the object has no \"paths\" entry; give "
                "{\"paths\": [[0], [0, 0], ...]} or a bare list of paths"
            )
        name = data.get("name", default_name)
        if not isinstance(name, str) or not name:
            raise InputError(f"{source}: \"name\" must be a non-empty string, found {name!r}")
        paths = data["paths"]
    else:
        name, paths = default_name, data

    return MedusaTree(name=name, paths=validate_paths(paths, topk, num_heads, source=source))


def validate_paths(
    paths: Any, topk: int = DEFAULT_TOPK, num_heads: int | None = None, source: str = "tree"
) -> tuple[TreePath, ...]:
    """Check a list of paths and return it as tuples sorted by (length, path).

    `source` starts every message (a file name or "tree 'name'"); entries are named by
    their position in the list as given, `paths[i]`.
    """
    if not _is_positive_int(topk):
        raise InputError(f"--topk {topk}: must be a positive integer")
    if num_heads is not None and not _is_positive_int(num_heads):
        raise InputError(f"--num-heads {num_heads}: must be a positive integer")
    if not isinstance(paths, (list, tuple)):
        raise InputError(
            f"{source}: expected a list of paths such as [[0], [0, 0], [1]], found {type(paths).__name__}"
        )
    if not paths:
        raise InputError(f"{source}: the tree is empty; give at least one path such as [[0]]")
    if len(paths) > MAX_TREE_PATHS:
        raise InputError(f"{source}: {len(paths):,} paths ({len(paths) + 1:,} nodes with the "
                         f"root); a tree may have at most {MAX_TREE_PATHS} paths "
                         f"({MAX_TREE_PATHS + 1} nodes)")

    checked: list[TreePath] = []
    seen: dict[TreePath, int] = {}
    for i, entry in enumerate(paths):
        if (
            not isinstance(entry, (list, tuple))
            or not entry
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in entry)
        ):
            raise InputError(
                f"{source}: paths[{i}] is {entry!r:.80}; each path must be a non-empty list of "
                "integers such as [0, 1] (the root is implicit)"
            )
        if len(entry) > MAX_TREE_DEPTH:
            raise InputError(f"{source}: paths[{i}] is {len(entry)} deep; at most "
                             f"{MAX_TREE_DEPTH} (one rank per head)")
        path = tuple(int(v) for v in entry)
        if path in seen:
            raise InputError(f"{source}: paths[{i}] {_short(path)} repeats paths[{seen[path]}]; remove one")
        if min(path) < 0:
            raise InputError(
                f"{source}: paths[{i}] {_short(path)} has a negative rank; ranks count from 0 (the top token)"
            )
        if max(path) >= topk:
            raise InputError(
                f"{source}: paths[{i}] {_short(path)} uses rank {_short_int(max(path))} but "
                f"--topk is {topk} (ranks 0..{topk - 1}); raise --topk to "
                f"{_short_int(max(path) + 1)} or drop the path"
            )
        if num_heads is not None and len(path) > num_heads:
            raise InputError(
                f"{source}: paths[{i}] {list(path)} is {len(path)} deep but there are {num_heads} "
                "heads; choose a shallower tree (--tree) or a checkpoint with more heads"
            )
        seen[path] = i
        checked.append(path)

    for i, path in enumerate(checked):
        if len(path) > 1 and path[:-1] not in seen:
            raise InputError(
                f"{source}: paths[{i}] {list(path)} has no parent: {list(path[:-1])} is not in "
                "the tree; add it or drop the path"
            )
    depth = max(len(path) for path in checked)
    if 1 + topk * depth > _INT32_MAX:
        raise InputError(f"--topk {topk}: too large for a tree {depth} deep (its candidate "
                         f"indices are int32; at most {(_INT32_MAX - 1) // depth})")
    return tuple(sorted(checked, key=_order))


def _short_int(value: int) -> str:
    """An integer for a message: its digits, or how many there are when thousands."""
    return str(value) if value.bit_length() < 64 else f"<an integer of {value.bit_length()} bits>"


def _short(path: TreePath) -> str:
    return "[" + ", ".join(_short_int(v) for v in path[:8]) + (", ...]" if len(path) > 8 else "]")


# --------------------------------------------------------------------------- buffers


@dataclasses.dataclass
class TreeBuffers:
    # [L, L] float32 0/1, L = num_nodes: row i may attend to column j when j is i, the
    # root or an ancestor of i. Medusa keeps it as a torch float [1, 1, L, L]; the two
    # leading axes are dropped here.
    medusa_attn_mask: np.ndarray
    # [L] int32: each node's token in concat(base argmax, head 0 top-k, head 1 top-k, ...)
    tree_indices: np.ndarray
    # [L] int32: each node's depth (root 0); add the prompt length for absolute positions
    medusa_position_ids: np.ndarray
    # [leaves, depth + 1] int32: node indices from the root (column 0) down to each leaf,
    # padded with -1, which generate_candidates reads as token 0
    retrieve_indices: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def to_npz(self, path: str | os.PathLike) -> Path:
        """Write the buffers to `path` (an .npz file) via a temporary file and a rename."""
        path = Path(path)
        try:
            with staged_file(path) as partial, open(partial, "wb") as f:
                np.savez(f, **self.as_dict())
        except OSError as err:
            raise InputError(
                f"{path}: cannot write the tree buffers ({err.strerror}); choose another output path"
            ) from None
        return path


def build_buffers(tree: MedusaTree, topk: int = DEFAULT_TOPK) -> TreeBuffers:
    """generate_medusa_buffers for `tree` with `topk` ranks per head."""
    validate_paths(tree.paths, topk, source=f"tree '{tree.name}'")
    num_nodes = tree.num_nodes
    # node index of each path: its position in the sorted list, after the root at 0
    node = {path: i + 1 for i, path in enumerate(tree.paths)}

    mask = np.eye(num_nodes, dtype=np.float32)  # [L, L]
    mask[:, 0] = 1.0
    tree_indices = np.zeros(num_nodes, dtype=np.int32)
    position_ids = np.zeros(num_nodes, dtype=np.int32)
    for path, row in node.items():
        for length in range(1, len(path)):
            mask[row, node[path[:length]]] = 1.0
        tree_indices[row] = 1 + topk * (len(path) - 1) + path[-1]
        position_ids[row] = len(path)

    leaves = tree.leaves
    retrieve = np.full((len(leaves), tree.depth + 1), -1, dtype=np.int32)  # [leaves, depth + 1]
    retrieve[:, 0] = 0
    for r, leaf in enumerate(leaves):
        for length in range(1, len(leaf) + 1):
            retrieve[r, length] = node[leaf[:length]]

    return TreeBuffers(
        medusa_attn_mask=mask,
        tree_indices=tree_indices,
        medusa_position_ids=position_ids,
        retrieve_indices=retrieve,
    )


# --------------------------------------------------------------------------- candidates


def _top_ranks(logits: np.ndarray, topk: int) -> np.ndarray:
    """Token ids of the `topk` largest logits per row, best first; ties go to the lower id."""
    order = np.argsort(-logits.astype(np.float64), axis=-1, kind="stable")  # [batch, vocab]
    return order[:, :topk]


def generate_candidates(
    base_logits: np.ndarray,
    head_logits: Sequence[np.ndarray],
    buffers: TreeBuffers,
    topk: int = DEFAULT_TOPK,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy Medusa candidates, a numpy reference for batches.

    base_logits: [batch, vocab], the base model's last position. head_logits: one
    [batch, vocab] array per head, in head order. Returns (tree_candidates [batch, L],
    cart_candidates [batch, leaves, depth + 1]), both int32; Medusa returns the same two
    in the other order and for batch 1 only.
    """
    base = np.asarray(base_logits)
    if base.ndim != 2:
        raise InputError(f"base logits have shape {list(base.shape)}, expected [batch, vocab]")
    batch, vocab = base.shape
    if not 1 <= topk <= vocab:
        raise InputError(f"--topk {topk}: must be between 1 and the vocabulary size {vocab}")
    heads = [np.asarray(h) for h in head_logits]
    for h, logits in enumerate(heads):
        if logits.shape != base.shape:
            raise InputError(
                f"head {h} logits have shape {list(logits.shape)}, "
                f"expected [{batch}, {vocab}] like the base logits"
            )
    depth = int(buffers.medusa_position_ids.max())
    if len(heads) < depth:
        raise InputError(
            f"the tree is {depth} deep but {len(heads)} head logits were given; "
            "choose a shallower tree (--tree) or pass every head"
        )
    if int(buffers.tree_indices.max()) >= 1 + len(heads) * topk:
        raise InputError(
            f"the buffers index entry {int(buffers.tree_indices.max())} of concat(base, heads' top-{topk}), "
            f"which has {1 + len(heads) * topk}; build the buffers with the same --topk"
        )

    pieces = [np.argmax(base, axis=-1)[:, None]]  # [batch, 1]; first maximum = lower id
    pieces += [_top_ranks(logits, topk) for logits in heads]  # each [batch, topk]
    candidates = np.concatenate(pieces, axis=1)  # [batch, 1 + heads * topk]

    tree_candidates = candidates[:, buffers.tree_indices]  # [batch, L]
    # one extra column of 0 at the end, which the -1 padding in retrieve_indices reads
    zero = np.zeros((batch, 1), candidates.dtype)
    padded = np.concatenate([tree_candidates, zero], axis=1)  # [batch, L + 1]
    cart_candidates = padded[:, buffers.retrieve_indices]  # [batch, leaves, depth + 1]
    return tree_candidates.astype(np.int32), cart_candidates.astype(np.int32)


def describe(tree: MedusaTree, topk: int = DEFAULT_TOPK) -> dict[str, Any]:
    """A JSON-ready summary; "candidates" gives generate_candidates' shapes per batch row."""
    validate_paths(tree.paths, topk, source=f"tree '{tree.name}'")
    leaves = len(tree.leaves)
    return {
        "name": tree.name,
        "topk": topk,
        "nodes": tree.num_nodes,
        "depth": tree.depth,
        "nodes_per_depth": list(tree.nodes_per_depth),
        "leaves": leaves,
        "candidates": {
            # tokens verified per step: the root and every path
            "tree": [tree.num_nodes],
            # one candidate sequence per leaf, root first, at most depth + 1 tokens accepted
            "cartesian": [leaves, tree.depth + 1],
        },
    }
