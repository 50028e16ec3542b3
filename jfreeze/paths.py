"""One spelling of a leaf's key path, and walking trees by it.

Every part of jfreeze (selectors, errors, the summary) names a leaf the same way:
dict keys as written, sequence indices as numbers, dataclass / namedtuple / NNX
attributes by name, joined with ``/``, e.g. ``backbone/layers/0/kernel``.
Two leaves may never share a path string (a key ``"enc/w"`` beside nested keys
``enc`` → ``w``): :func:`check_unique_paths` refuses such a tree. Globs are
matched here too (:func:`compile_glob`), segment by segment in linear steps.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
from jax import tree_util as jtu

__all__ = [
    "path_str", "leaves_with_paths", "closest", "broadcast_prefix", "compile_glob",
    "check_unique_paths",
]


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


_JAX_KEYS = (jtu.DictKey, jtu.SequenceKey, jtu.GetAttrKey, jtu.FlattenedIndexKey)


def _keystr(kp: Iterable[Any]) -> str:
    # JAX's own spelling (['enc']['w'], [0], .attr) shows where each key ends.
    return "".join(str(k) if isinstance(k, _JAX_KEYS) else f"[{k!r}]" for k in kp) or "(root)"


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


# --------------------------------------------------------------------------
# Globs, matched segment by segment: O(len(glob) * len(path)) steps, never the
# exponential backtracking of a regex with nested unbounded quantifiers.

_STAR, _ANY, _DEEP = ("*",), ("?",), ("**",)  # tokens; a 1-char str is a literal


def _segment_tokens(seg: str) -> tuple:
    """One glob segment as tokens: ``_STAR``, ``_ANY``, literal chars, classes."""
    out: list = []
    i, n = 0, len(seg)
    while i < n:
        c = seg[i]
        i += 1
        if c == "*":
            if not out or out[-1] is not _STAR:  # "**" inside a segment is "*"
                out.append(_STAR)
        elif c == "?":
            out.append(_ANY)
        elif c == "[":
            j = i  # where the class ends, by fnmatch's own rule
            if j < n and seg[j] == "!":
                j += 1
            if j < n and seg[j] == "]":
                j += 1
            while j < n and seg[j] != "]":
                j += 1
            if j >= n:
                out.append("[")  # no closing "]" in this segment: a literal "["
            else:
                # fnmatch compiles the class: "!" negates, "^" is literal, ranges.
                out.append(re.compile(fnmatch.translate(seg[i - 1 : j + 1])))
                i = j + 1
        else:
            out.append(c)
    return tuple(out)


def _advance_stars(states: set, tokens: Sequence) -> set:
    # A star (or "**" segment) may match nothing: also be past it (and past the
    # stars after it). Each position is added once, so this stays linear.
    out = set(states)
    for i in sorted(states):
        while i < len(tokens) and (tokens[i] is _STAR or tokens[i] is _DEEP) and i + 1 not in out:
            i += 1
            out.add(i)
    return out


class Glob:
    """A compiled glob; :meth:`fullmatch` tells whether a path string matches.

    Matching simulates the pattern as a set of states (a Thompson NFA), first
    over ``/``-separated segments, then over the characters of one segment, so
    every path is matched in at most ``(len(glob) + 1) * (len(path) + 1)`` steps.
    """

    def __init__(self, glob: str):
        self.glob = glob
        self.literal = not any(c in glob for c in "*?[")
        self.parts = tuple(_DEEP if s == "**" else _segment_tokens(s) for s in glob.split("/"))
        self._seen: dict[str, bool] = {}

    def fullmatch(self, path: str) -> bool:
        """True if ``path`` matches the whole glob."""
        if self.literal:
            return path == self.glob
        found = self._seen.get(path)
        if found is None:  # a tree is evaluated at every trace: remember answers
            if len(self._seen) > 65536:
                self._seen.clear()
            found = self._seen[path] = self.match_counting(path)[0]
        return found

    def match_counting(self, path: str) -> tuple[bool, int]:
        """``(matched, steps)``: steps counts state transitions, for tests."""
        steps = 0
        states = _advance_stars({0}, self.parts)
        for seg in path.split("/"):
            nxt = set()
            for i in states:
                steps += 1
                if i == len(self.parts):
                    continue
                part = self.parts[i]
                if part is _DEEP:
                    nxt.add(i)  # "**" takes this segment and may take more
                else:
                    ok, k = _match_segment(part, seg)
                    steps += k
                    if ok:
                        nxt.add(i + 1)
            states = _advance_stars(nxt, self.parts)
            if not states:
                break
        return len(self.parts) in states, steps

    def __repr__(self):
        return f"Glob({self.glob!r})"


def _match_segment(tokens: tuple, seg: str) -> tuple[bool, int]:
    steps = 0
    states = _advance_stars({0}, tokens)
    for c in seg:
        nxt = set()
        for i in states:
            steps += 1
            if i == len(tokens):
                continue
            t = tokens[i]
            if t is _STAR:
                nxt.add(i)
            elif t is _ANY or t == c or (isinstance(t, re.Pattern) and t.match(c)):
                nxt.add(i + 1)
        states = _advance_stars(nxt, tokens)
        if not states:
            return False, steps
    return len(tokens) in states, steps


@functools.lru_cache(maxsize=4096)
def compile_glob(glob: str) -> Glob:
    """The compiled form of a ``jf.paths`` glob (cached).

    >>> compile_glob("enc/**/k*").fullmatch("enc/layers/0/kernel")
    True
    >>> compile_glob("a[!b]c").fullmatch("a/c")  # no class, star or ? crosses '/'
    False
    """
    return Glob(glob)
