"""'/'-joined leaf paths over nested-dict parameter trees, regex selection, and tree summaries.

Paths look like `Transformer/encoderblock_3/MlpBlock_0/Dense_1/kernel`. Selections use
`re.search` semantics on the full path; a pattern that selects nothing raises, naming a few
paths that do exist so the typo is easy to spot.

Block children are named as in the in-memory (Linen) tree: `LayerNorm_0`,
`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`. The original `.npz` files number
them with one counter (`LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`,
`MlpBlock_3`); `select` accepts either spelling in a pattern (`FILE_TO_TREE_NAMES`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

Tree = Mapping[str, Any]


def flatten(tree: Tree, sep: str = "/") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf} in insertion order."""
    out: dict[str, Any] = {}

    def rec(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                rec(v, f"{prefix}{sep}{k}" if prefix else str(k))
        else:
            out[prefix] = node

    rec(tree, "")
    return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested dict."""
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {path!r} goes through a leaf at {p!r}")
        if last in node:
            raise ValueError(f"duplicate path {path!r}")
        node[last] = leaf
    return out


def group_by_node(tree: Tree) -> dict[str, dict[str, Any]]:
    """{node path: {leaf name: leaf}}: an adapter tree's leaves grouped by the node that holds them
    (`"a/b/s_in"` -> `{"a/b": {"s_in": ...}}`), in flattening order."""
    groups: dict[str, dict[str, Any]] = {}
    for path, leaf in flatten(tree).items():
        node, _, name = path.rpartition("/")
        groups.setdefault(node, {})[name] = leaf
    return groups


def leaf_paths(tree: Tree) -> list[str]:
    return list(flatten(tree))


def _patterns(patterns: str | Iterable[str]) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns)


# Encoder-block children: the name in Google's .npz files -> the name in the in-memory tree
# (jax_peft.checkpoint renames them on load and back on save).
FILE_TO_TREE_NAMES = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
                      "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
_FILE_NAME = re.compile("|".join(rf"{k}(?!\d)" for k in FILE_TO_TREE_NAMES))


def tree_spelling(pattern: str) -> str:
    """`pattern` with the file spellings of block children replaced by the in-memory ones
    (`MlpBlock_3/Dense_0` -> `MlpBlock_0/Dense_0`); other text unchanged."""
    return _FILE_NAME.sub(lambda m: FILE_TO_TREE_NAMES[m.group(0)], pattern)


def select(tree: Tree | Iterable[str], patterns: str | Iterable[str], *, what: str = "pattern") -> list[str]:
    """Paths matching any of `patterns` (re.search). Each pattern must match at least one path.

    A pattern may name block children as the `.npz` files do (`LayerNorm_2`, `MlpBlock_3`,
    `MultiHeadDotProductAttention_1`) or as the in-memory tree does (`LayerNorm_1`, `MlpBlock_0`,
    `MultiHeadDotProductAttention_0`): a path matches the pattern or its in-memory spelling."""
    paths = leaf_paths(tree) if isinstance(tree, Mapping) else list(tree)
    chosen: list[str] = []
    for pat in _patterns(patterns):
        try:
            rxs = [re.compile(p) for p in dict.fromkeys((pat, tree_spelling(pat)))]
        except re.error as e:
            raise ValueError(f"invalid regex {pat!r} for {what}: {e}") from None
        hits = [p for p in paths if any(rx.search(p) for rx in rxs)]
        if not hits:
            sample = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
            raise ValueError(
                f"{what} {pat!r} selects no parameter. Paths look like: {sample}. "
                "Fix the regex (it is matched with re.search against '/'-joined paths)."
            )
        chosen.extend(h for h in hits if h not in chosen)
    return [p for p in paths if p in chosen]


def mask(tree: Tree, patterns: str | Iterable[str] | Callable[[str], bool], *, what: str = "pattern") -> dict:
    """A bool tree, True where the path matches (or the predicate is true)."""
    flat = flatten(tree)
    if callable(patterns):
        keep = {p for p in flat if patterns(p)}
    else:
        keep = set(select(list(flat), patterns, what=what))
    return unflatten({p: (p in keep) for p in flat})


def map_with_path(fn: Callable[[str, Any], Any], tree: Tree) -> dict:
    """Applies fn(path, leaf) to every leaf, keeping the structure."""
    return unflatten({p: fn(p, v) for p, v in flatten(tree).items()})


def get(tree: Tree, path: str) -> Any:
    node: Any = tree
    for part in path.split("/"):
        try:
            node = node[part]
        except (KeyError, TypeError):
            raise KeyError(f"no parameter at path {path!r} (missing {part!r})") from None
    return node


def replace(tree: Tree, updates: Mapping[str, Any]) -> dict:
    """A copy of `tree` with the leaves at the given paths replaced (paths must exist)."""
    flat = flatten(tree)
    missing = [p for p in updates if p not in flat]
    if missing:
        raise KeyError(f"cannot replace missing path(s) {missing[:5]}")
    flat.update(updates)
    return unflatten(flat)


def count(tree: Tree) -> int:
    """Number of scalar parameters in a tree (works on arrays and ShapeDtypeStructs)."""
    return int(sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(tree)))


def summarize(tree: Tree, *, max_rows: int | None = None) -> str:
    """A table of path, shape, dtype and size per leaf, with the total."""
    flat = flatten(tree)
    rows = [(p, tuple(np.shape(v)), str(getattr(v, "dtype", type(v).__name__)), int(np.prod(np.shape(v))))
            for p, v in flat.items()]
    if max_rows is not None and len(rows) > max_rows:
        rows = rows[:max_rows] + [("...", (), "", 0)]
    w = max([len(r[0]) for r in rows] + [4])
    lines = [f"{'path'.ljust(w)}  {'shape':<20} {'dtype':<9} {'size':>12}"]
    lines += [f"{p.ljust(w)}  {str(s):<20} {d:<9} {n:>12,}" for p, s, d, n in rows]
    lines.append(f"{'total'.ljust(w)}  {'':<20} {'':<9} {count(tree):>12,}")
    return "\n".join(lines)
