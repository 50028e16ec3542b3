"""Private tree layer: key paths, flattening, placeholders, prefixes, mask algebra.

Every public module of jfreeze walks trees through this module, so a leaf is
named, flattened and masked the same way everywhere:

- **Paths.** Dict keys as written, sequence indices as numbers, dataclass /
  namedtuple / NNX attributes by name, joined with ``/`` (``backbone/0/kernel``).
  Two leaves never share a path string (:func:`check_unique_paths`).
- **Leaves.** ``None`` and ``optax.MaskedNode`` are *placeholders* (a path, no
  array); an NNX ``Variable`` is one leaf. A selector sees a leaf as its
  :func:`shape_dtype`, never its values.
- **Masks.** One leaf's mask is ``True`` / ``False`` (whole leaf) or a NumPy
  bool array of its shape (:data:`Mask`); an array that selects all or nothing
  is simplified to a bool.

Nothing here is exported by ``jfreeze`` except :func:`path_str`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias

import jax
import numpy as np
import optax
from jax import tree_util as jtu

__all__ = [
    "Flat",
    "Mask",
    "broadcast_prefix",
    "call_or_tree",
    "check_unique_paths",
    "closest",
    "compact",
    "describe_paths",
    "is_array",
    "is_function",
    "is_placeholder",
    "leaves_with_paths",
    "mask_and",
    "mask_count",
    "mask_equal",
    "mask_not",
    "mask_or",
    "path_str",
    "runs",
    "shape_dtype",
    "simplify",
    "slab",
    "spell_leaf",
]

#: One leaf's mask: a bool (the whole leaf) or a NumPy bool array of its shape.
Mask: TypeAlias = bool | np.ndarray


# --------------------------------------------------------------------------
# Paths.


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
    >>> import jfreeze as jf
    >>> tree = {"backbone": [{"kernel": jnp.zeros(2)}]}
    >>> [jf.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    ['backbone/0/kernel']
    """
    return "/".join(_key_str(k) for k in path)


def leaves_with_paths(
    tree: Any, is_leaf: Callable[[Any], bool] | None = None
) -> tuple[list[tuple[str, Any]], Any]:
    """Flattens ``tree`` into ``[(path string, leaf), ...]`` and its treedef.

    >>> leaves_with_paths({"a": 1, "b": (2, 3)})[0]
    [('a', 1), ('b/0', 2), ('b/1', 3)]
    """
    flat, treedef = jtu.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(p), leaf) for p, leaf in flat], treedef


_JAX_KEYS = (jtu.DictKey, jtu.SequenceKey, jtu.GetAttrKey, jtu.FlattenedIndexKey)


def _keystr(kp: Iterable[Any]) -> str:
    # JAX's own spelling (['enc']['w'], [0], .attr) shows where each key ends.
    return "".join(str(k) if isinstance(k, _JAX_KEYS) else f"[{k!r}]" for k in kp) or "(root)"


def check_unique_paths(key_paths: Iterable[Any]) -> list[str]:
    """The path strings of ``key_paths``; a ``ValueError`` if two spell the same.

    A dict key holding ``/`` spells the same path as nested keys (``{"enc/w": ..}``
    and ``{"enc": {"w": ..}}`` are both ``enc/w``), so no pattern could tell the
    two leaves apart: such a tree is refused rather than half-selected.

    >>> import jax
    >>> kps = [kp for kp, _ in jax.tree_util.tree_flatten_with_path(
    ...     {"enc/w": 1.0, "enc": {"w": 2.0}})[0]]
    >>> check_unique_paths(kps)
    Traceback (most recent call last):
    ...
    ValueError: two leaves share the path 'enc/w': key paths ['enc']['w'] and ['enc/w']. ...
    """
    seen: dict[str, Any] = {}
    out = []
    for kp in key_paths:
        s = path_str(kp)
        if s in seen:
            raise ValueError(
                f"two leaves share the path {s!r}: key paths {_keystr(seen[s])} and "
                f"{_keystr(kp)}. A key holding '/' spells the same path as nested keys, "
                "so no pattern can tell them apart; rename the key (e.g. 'enc.w') or "
                "nest it."
            )
        seen[s] = kp
        out.append(s)
    return out


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
    """Short quoted list of paths for error messages.

    >>> describe_paths(["a", "b", "c"], limit=2)
    "'a', 'b' and 1 more"
    """
    shown = ", ".join(repr(p) for p in paths[:limit])
    more = len(paths) - limit
    return shown + (f" and {more} more" if more > 0 else "")


# --------------------------------------------------------------------------
# Leaves.


def is_array(x: Any) -> bool:
    """Has a shape and a dtype: an array, a tracer or a ``jax.ShapeDtypeStruct``."""
    return hasattr(x, "shape") and hasattr(x, "dtype")


def shape_dtype(leaf: Any) -> Any:
    """What a selector may see of a leaf: its shape and dtype, never its values.

    Arrays, tracers and ``jax.ShapeDtypeStruct`` all give the same struct, which
    is why a selector answers identically on params, updates and tracers.
    """
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    if is_array(leaf):
        return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)
    return leaf  # not an array (Python scalar, string, ...): pass as is


def spell_leaf(x: Any) -> str:
    """``float32[2, 3]`` for an array (or struct), the type name otherwise."""
    x = shape_dtype(x)
    return f"{x.dtype}{list(x.shape)}" if hasattr(x, "dtype") else type(x).__name__


def is_placeholder(x: Any) -> bool:
    """``None`` (left by ``jf.split``) or ``optax.MaskedNode`` (left by ``optax.masked``).

    A placeholder carries a path but no array, so a pattern may match it
    without being a typo, and no mask is computed for it.
    """
    return x is None or isinstance(x, optax.MaskedNode)


def _is_variable(x: Any) -> bool:
    # An NNX Variable is one leaf, spelled by its own path (not ".../value"), so a
    # selector answers the same on nnx.State (optimizer init) and on plain arrays
    # (gradients). No flax import: if flax.nnx was never imported, no Variable exists.
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, nnx.Variable)


def _flat_leaf(x: Any) -> bool:
    return is_placeholder(x) or _is_variable(x)


@dataclasses.dataclass(frozen=True)
class Flat:
    """A tree flattened once: real leaves by path, plus placeholder paths.

    Attributes:
      entries: ``(path, leaf)`` for the real leaves, in tree order.
      holes: paths of the ``None`` / ``MaskedNode`` placeholders.
      slots: the flattened list, placeholders included.
      treedef: the tree's structure (NNX variables and placeholders are leaves).
      tree: the tree itself.
    """

    entries: list[tuple[str, Any]]
    holes: list[str]
    slots: list[Any]
    treedef: Any
    tree: Any

    @classmethod
    def of(cls, tree: Any) -> Flat:
        """Flattens ``tree``; two leaves spelled alike are a ``ValueError`` naming both.

        >>> flat = Flat.of({"a": 1.0, "b": None, "c": [2.0]})
        >>> flat.entries, flat.holes
        ([('a', 1.0), ('c/0', 2.0)], ['b'])
        >>> flat.unflatten([10.0, 20.0])
        {'a': 10.0, 'b': None, 'c': [20.0]}
        """
        flat, treedef = jtu.tree_flatten_with_path(tree, is_leaf=_flat_leaf)
        spelled = check_unique_paths(p for p, _ in flat)
        entries, holes = [], []
        for p, (_, x) in zip(spelled, flat, strict=True):
            if is_placeholder(x):
                holes.append(p)
            else:
                entries.append((p, x))
        return cls(entries, holes, [x for _, x in flat], treedef, tree)

    @property
    def paths(self) -> list[str]:
        """The real leaves' paths, in tree order."""
        return [p for p, _ in self.entries]

    @property
    def leaves(self) -> list[Any]:
        """The real leaves, in tree order."""
        return [x for _, x in self.entries]

    @functools.cached_property
    def structs(self) -> list[Any]:
        """What a selector sees of each real leaf (:func:`shape_dtype`), made once
        however many selectors (``jf.labels`` rules) look at this tree."""
        return [shape_dtype(x) for _, x in self.entries]

    def unflatten(self, values: Iterable[Any]) -> Any:
        """A tree shaped like the input, with ``values`` at the real leaves."""
        it = iter(values)
        return self.treedef.unflatten([x if is_placeholder(x) else next(it) for x in self.slots])


# --------------------------------------------------------------------------
# Prefix trees (optax mask and label trees).


def broadcast_prefix(
    prefix: Any, tree: Any, *, what: str, is_hole: Callable[[Any], bool] | None = None
) -> list[Any]:
    """The value of ``prefix`` that covers each leaf of ``tree``, in order.

    ``prefix`` is a tree whose structure is a prefix of ``tree``'s (an optax
    mask or label tree; a scalar covers everything). Leaves for which
    ``is_hole`` is true are skipped. A structure mismatch is a ``ValueError``
    naming the offending path, never a bare JAX tree error.

    >>> broadcast_prefix({"a": True, "b": False}, {"a": [1, 2], "b": 3}, what="mask")
    [True, True, False]
    """
    hole = is_hole or (lambda x: False)
    pflat, pdef = jtu.tree_flatten_with_path(prefix)
    try:
        subtrees = pdef.flatten_up_to(tree)
    except (ValueError, TypeError):
        raise ValueError(_mismatch(prefix, tree, what, hole)) from None
    out = []
    for (ppath, value), sub in zip(pflat, subtrees, strict=True):
        leaves = [x for x in jtu.tree_leaves(sub, is_leaf=hole) if not hole(x)]
        if len(leaves) > 1 and getattr(value, "ndim", 0) > 0:
            raise ValueError(
                f"the {what} holds an array at path {path_str(ppath)!r}, which covers "
                f"{len(leaves)} leaves; an element-wise {what} must sit at a single leaf."
            )
        out.extend([value] * len(leaves))
    return out


def call_or_tree(spec: Any, tree: Any) -> Any:
    """``spec(tree)`` for a label / mask *function*, ``spec`` for a tree.

    A callable pytree node is a tree, not a function: an Equinox module is
    callable, so a label tree of an Equinox model must not be called on it.

    >>> call_or_tree(lambda t: {"a": "x"}, {"a": 1.0}), call_or_tree({"a": "y"}, {"a": 1.0})
    ({'a': 'x'}, {'a': 'y'})
    """
    return spec(tree) if is_function(spec) else spec


def is_function(spec: Any) -> bool:
    """Callable and not a pytree with leaves (an Equinox module is a tree;
    ``jax.tree_util.Partial(f)`` without arguments is a function)."""
    if not callable(spec):
        return False
    treedef = jtu.tree_structure(spec)
    return jtu.treedef_is_leaf(treedef) or treedef.num_leaves == 0


def _mismatch(prefix: Any, tree: Any, what: str, is_hole: Callable[[Any], bool]) -> str:
    p_paths = [p for p, _ in leaves_with_paths(prefix)[0]]
    t_paths = [p for p, _ in leaves_with_paths(tree, is_leaf=is_hole)[0]]

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


def _node_mismatch(
    prefix: Any, tree: Any, path: tuple, is_hole: Callable[[Any], bool]
) -> tuple | None:
    """Key path of the first node whose type differs between ``prefix`` and ``tree``."""
    pflat, pdef = jtu.tree_flatten_with_path(prefix, is_leaf=lambda x: x is not prefix)
    if jtu.treedef_is_leaf(pdef):
        return None  # a prefix leaf covers any subtree
    tflat, tdef = jtu.tree_flatten_with_path(
        tree, is_leaf=lambda x: x is not tree or is_hole(x))
    if pdef != tdef:
        return path
    for (key, p), (_, t) in zip(pflat, tflat, strict=True):
        found = _node_mismatch(p, t, path + tuple(key), is_hole)
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------
# Mask algebra (bool, or NumPy bool array of the leaf's shape).


def mask_or(*masks: Mask) -> Mask:
    """Union of masks: ``True`` as soon as one is, arrays combined element-wise."""
    return _fold(masks, True, np.logical_or)


def mask_and(*masks: Mask) -> Mask:
    """Intersection of masks: ``False`` as soon as one is, arrays combined element-wise."""
    return _fold(masks, False, np.logical_and)


def _fold(masks: tuple[Mask, ...], absorbing: bool, op: Callable) -> Mask:
    # ``absorbing`` decides the result alone; its negation is the identity.
    out: Mask = not absorbing
    for m in masks:
        if m is absorbing or out is absorbing:
            out = absorbing
        elif out is (not absorbing):
            out = m
        elif isinstance(m, np.ndarray) and isinstance(out, np.ndarray):
            # On the compact forms, broadcast back: a view, never a pass over a whole stack.
            out = np.broadcast_to(op(compact(out), compact(m)), m.shape)
    return out


def mask_not(m: Mask) -> Mask:
    """Complement of a mask."""
    return (not m) if isinstance(m, bool) else np.broadcast_to(~compact(m), m.shape)


def _unbroadcast(m: np.ndarray) -> np.ndarray:
    """``m`` without the axes it is broadcast along (stride 0): a view holding the same
    values, so a layer mask of a (32, 4096, 11008) stack is read in 32 steps, not 1.4e9."""
    if all(st or n <= 1 for st, n in zip(m.strides, m.shape, strict=True)):
        return m
    return m[tuple(slice(0, 1) if st == 0 else slice(None) for st in m.strides)]


def simplify(m: Mask) -> Mask:
    """An element mask that selects all or nothing is a whole-leaf mask."""
    if isinstance(m, bool):
        return m
    c = compact(m)
    if c.all():
        return True
    if not c.any():
        return False
    return m


def mask_count(m: Mask, size: int) -> int:
    """How many of a leaf's ``size`` elements the mask selects."""
    if isinstance(m, bool):
        return size if m else 0
    c = compact(m)
    return int(np.count_nonzero(c)) * (size // c.size) if c.size else 0


def mask_equal(a: Mask, b: Mask) -> bool:
    """Whether two masks of one leaf select the same elements."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    ca, cb = np.broadcast_arrays(compact(a), compact(b))
    return a.shape == b.shape and bool(np.array_equal(ca, cb))


def compact(m: np.ndarray) -> np.ndarray:
    """The smallest array that broadcasts back to ``m``, so a column mask on a
    large kernel becomes a small constant in the compiled program.

    >>> compact(np.array([[True, False], [True, False]]))
    array([[ True, False]])
    """
    m = _unbroadcast(m)
    if m.size == 0:  # an empty leaf: nothing to compare
        return m
    for axis in range(m.ndim):
        if m.shape[axis] == 1:
            continue
        first = m.take([0], axis=axis)
        if (m == first).all():
            m = first
    return m


def slab(m: Mask) -> tuple[int, np.ndarray] | None:
    """``(axis, selected)`` when the element mask ``m`` selects whole slices along
    one axis (whole layers of a stack, whole rows or columns), else ``None``.

    ``selected`` is a bool per index along ``axis``. Whole-leaf masks (bools) are
    not slabs; every partial 1-D mask is one.

    >>> slab(np.array([[True, True], [False, False], [True, True]]))
    (0, array([ True, False,  True]))
    >>> slab(np.array([[True, False], [True, True]])) is None
    True
    """
    if isinstance(m, bool):
        return None
    c = compact(m)
    axes = [a for a, n in enumerate(c.shape) if n > 1]
    if len(axes) != 1:
        return None
    return axes[0], c.reshape(-1)


def runs(selected: np.ndarray) -> list[tuple[int, int, bool]]:
    """Maximal runs ``(start, stop, value)`` of equal values in a 1-D bool array.

    >>> runs(np.array([True, True, False, True]))
    [(0, 2, True), (2, 3, False), (3, 4, True)]
    """
    out: list[tuple[int, int, bool]] = []
    start = 0
    for i in range(1, len(selected) + 1):
        if i == len(selected) or selected[i] != selected[start]:
            out.append((start, i, bool(selected[start])))
            start = i
    return out
