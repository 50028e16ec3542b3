"""One spelling of a leaf's key path, and walking trees by it.

Every part of jfreeze (selectors, errors, the summary) names a leaf the same way:
dict keys as written, sequence indices as numbers, dataclass / namedtuple / NNX
attributes by name, joined with ``/``, e.g. ``backbone/layers/0/kernel``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

import jax
from jax import tree_util as jtu

__all__ = ["path_str", "leaves_with_paths", "closest", "broadcast_prefix"]


def _key_str(key: Any) -> str:
    if isinstance(key, jtu.DictKey):
        return str(key.key)
    if isinstance(key, jtu.SequenceKey):
        return str(key.idx)
    if isinstance(key, jtu.GetAttrKey):
        return key.name
    if isinstance(key, jtu.FlattenedIndexKey):
        return str(key.key)
    # NNX state paths and hand-made paths hold raw keys (str / int).
    return str(getattr(key, "key", key))


def path_str(path: Iterable[Any]) -> str:
    """Spells a JAX key path (or a tuple of raw keys) as a ``/``-joined string.

    Args:
      path: a key path from ``jax.tree_util.tree_flatten_with_path``, or a tuple
        of plain keys such as an NNX state path.

    Returns:
      The path string used by every selector, error message and summary.

    >>> import jax, jax.numpy as jnp
    >>> tree = {"backbone": [{"kernel": jnp.zeros(2)}]}
    >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    ['backbone/0/kernel']
    """
    return "/".join(_key_str(k) for k in path)


def leaves_with_paths(tree: Any, is_leaf=None) -> tuple[list[tuple[str, Any]], Any]:
    """Flattens ``tree`` into ``[(path string, leaf), ...]`` and its treedef.

    >>> leaves_with_paths({"a": 1, "b": (2, 3)})[0]
    [('a', 1), ('b/0', 2), ('b/1', 3)]
    """
    flat, treedef = jtu.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(p), leaf) for p, leaf in flat], treedef


def _candidates(paths: Sequence[str]) -> list[str]:
    # Leaf paths plus every subtree as "<prefix>/**", so a typo in a module
    # name ("backbon/**") is matched to the subtree it meant.
    out = dict.fromkeys(paths)
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            out.setdefault("/".join(parts[:i]) + "/**")
    return list(out)


def closest(pattern: str, paths: Sequence[str], n: int = 3) -> list[str]:
    """The existing paths (or ``prefix/**`` subtrees) that look most like ``pattern``.

    >>> closest("backbon/**", ["backbone/kernel", "head/kernel"])
    ['backbone/**', 'backbone/kernel']
    """
    cands = _candidates(paths)
    found = difflib.get_close_matches(pattern, cands, n=n, cutoff=0.5)
    return found or cands[:n]


def describe_paths(paths: Sequence[str], limit: int = 5) -> str:
    """Short quoted list of paths for error messages."""
    shown = ", ".join(repr(p) for p in paths[:limit])
    more = len(paths) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def shape_dtype(leaf: Any) -> Any:
    """What a selector may see of a leaf: its shape and dtype, never its values.

    Arrays, tracers and ``jax.ShapeDtypeStruct`` all give the same struct, which
    is why a selector answers identically on params, updates and tracers.
    """
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)
    return leaf  # not an array (Python scalar, string, ...): pass as is


def broadcast_prefix(prefix: Any, tree: Any, *, what: str, is_hole=None) -> list:
    """The value of ``prefix`` that covers each leaf of ``tree``, in order.

    ``prefix`` is a tree whose structure is a prefix of ``tree``'s (an optax
    mask or label tree; a scalar covers everything). Leaves for which
    ``is_hole`` is true are skipped. A structure mismatch is a ``ValueError``
    naming the offending path, never a bare JAX tree error.

    >>> broadcast_prefix({"a": True, "b": False}, {"a": [1, 2], "b": 3}, what="mask")
    [True, True, False]
    """
    is_hole = is_hole or (lambda x: False)
    pflat, pdef = jtu.tree_flatten_with_path(prefix)
    try:
        subtrees = pdef.flatten_up_to(tree)
    except (ValueError, TypeError):
        raise ValueError(_mismatch(prefix, tree, what, is_hole)) from None
    out = []
    for (ppath, value), sub in zip(pflat, subtrees):
        leaves = [x for x in jtu.tree_leaves(sub, is_leaf=is_hole) if not is_hole(x)]
        if len(leaves) > 1 and getattr(value, "ndim", 0) > 0:
            raise ValueError(
                f"the {what} holds an array at path {path_str(ppath)!r}, which covers "
                f"{len(leaves)} leaves; an element-wise {what} must sit at a single leaf."
            )
        out.extend([value] * len(leaves))
    return out


def _mismatch(prefix: Any, tree: Any, what: str, is_hole) -> str:
    p_paths = [path_str(p) for p, _ in jtu.tree_flatten_with_path(prefix)[0]]
    t_paths = [path_str(p) for p, _ in jtu.tree_flatten_with_path(tree, is_leaf=is_hole)[0]]

    def covers(pp: str, tp: str) -> bool:
        return pp == "" or tp == pp or tp.startswith(pp + "/")

    for pp in p_paths:
        if not any(covers(pp, tp) for tp in t_paths):
            return (
                f"the {what} has an entry at path {pp!r} that the params tree does "
                f"not have. Closest paths: {describe_paths(closest(pp, t_paths))}."
            )
    for tp in t_paths:
        if not any(covers(pp, tp) for pp in p_paths):
            return (
                f"the {what} does not cover the params leaf at path {tp!r}: it must "
                "have the structure of the params tree, or a prefix of it."
            )
    at = _node_mismatch(prefix, tree, (), is_hole)
    where_ = "" if at is None else f" at path {path_str(at)!r}" if at else " at the root"
    return (
        f"the {what} and the params tree have the same paths but different node "
        f"types{where_} (e.g. list vs tuple, dict vs dataclass). {what.capitalize()}: "
        f"{jtu.tree_structure(prefix)}; params: {jtu.tree_structure(tree, is_leaf=is_hole)}."
    )


def _node_mismatch(prefix: Any, tree: Any, path: tuple, is_hole) -> tuple | None:
    """Key path of the first node whose type differs between ``prefix`` and ``tree``."""
    pflat, pdef = jtu.tree_flatten_with_path(prefix, is_leaf=lambda x: x is not prefix)
    if jtu.treedef_is_leaf(pdef):
        return None  # a prefix leaf covers any subtree
    tflat, tdef = jtu.tree_flatten_with_path(
        tree, is_leaf=lambda x: x is not tree or is_hole(x))
    if pdef != tdef:
        return path
    for (key, p), (_, t) in zip(pflat, tflat):
        found = _node_mismatch(p, t, path + tuple(key), is_hole)
        if found is not None:
            return found
    return None
