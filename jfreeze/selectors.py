"""Selectors: pure, static, hashable descriptions of a set of leaves or elements.

A selector looks only at a leaf's key path (``/``-joined, see :func:`jfreeze.path_str`),
shape and dtype, never at its values, so it gives the same answer on params,
gradients, tracers and ``jax.ShapeDtypeStruct``; it is evaluated with NumPy at
trace time.

Calling a selector on a tree gives a *mask tree*: ``True``/``False`` per leaf, or
a NumPy bool array of the leaf's shape where only some elements are selected.
A whole-leaf selector is therefore a drop-in ``optax.masked`` mask function.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias, Union

import jax
import numpy as np
from jax.core import Tracer

from jfreeze._globs import Glob, compile_glob
from jfreeze._tree import (
    Flat,
    Mask,
    broadcast_prefix,
    call_or_tree,
    closest,
    describe_paths,
    is_array,
    is_function,
    is_placeholder,
    mask_and,
    mask_equal,
    mask_not,
    mask_or,
    shape_dtype,
    simplify,
    spell_leaf,
)

__all__ = [
    "FrozenSpec",
    "Selector",
    "as_selector",
    "elements",
    "everything",
    "layers",
    "nothing",
    "paths",
    "regex",
    "where",
]

#: What ``frozen=`` (and a ``jf.labels`` rule) accepts everywhere: a :class:`Selector`;
#: or what optax takes as a mask: a bool, a bool mask tree that is a prefix of the
#: params tree (dicts, lists, tuples, NamedTuples; other pytree nodes such as
#: dataclasses are accepted at run time too), or a function ``params -> mask tree``.
FrozenSpec: TypeAlias = Union[
    "Selector", bool, np.ndarray, jax.Array, Mapping[Any, Any], Sequence[Any],
    Callable[[Any], Any],
]


def _concrete(value: Any, where_: str) -> Any:
    """NumPy value of ``value``; a clear error if it is traced."""
    if isinstance(value, Tracer):
        raise TypeError(
            f"{where_}: the selection depends on traced values. Selectors and masks "
            "must depend only on the key path, shape and dtype of a leaf, so they "
            "can be evaluated with NumPy at trace time."
        )
    return value if isinstance(value, (bool, np.bool_)) else np.asarray(value)


def _bool_mask(value: Any, leaf: Any, where_: str) -> Mask:
    """Checks one mask value (bool or bool array) against one leaf."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if value is None:
        raise TypeError(
            f"{where_}: the mask must be boolean (True = selected), got None: does the "
            "function forget to return?"
        )
    value = _concrete(value, where_)
    if not isinstance(value, np.ndarray) or value.dtype != np.bool_:
        got = (
            f"{value.dtype} array" if getattr(value, "ndim", 0) else
            f"{value.dtype} scalar" if isinstance(value, np.ndarray) else type(value).__name__
        )
        raise TypeError(
            f"{where_}: the mask must be boolean (True = selected), got {got}. "
            "Use a bool or a bool array; for positions use an index expression "
            "such as np.s_[:, 0]."
        )
    if value.ndim == 0:
        return bool(value)
    shape = getattr(leaf, "shape", None)
    if shape is None:
        raise TypeError(
            f"{where_}: an element-wise mask needs an array leaf, got "
            f"{type(leaf).__name__}."
        )
    try:
        return simplify(np.broadcast_to(value, shape))
    except ValueError:
        raise ValueError(
            f"{where_}: mask of shape {value.shape} does not broadcast to the "
            f"leaf's shape {tuple(shape)}."
        ) from None


# --------------------------------------------------------------------------
# Patterns (globs and regexes) and strictness.


@functools.lru_cache(maxsize=4096)
def _compile_regex(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def _check_strict(sel: Selector, flat: Flat) -> None:
    """Every strict glob / regex inside ``sel`` must match some path."""
    all_paths = flat.paths + flat.holes
    for label, compiled, spelled in sel._strict_patterns():
        if not any(compiled.fullmatch(p) for p in all_paths):
            near = closest(spelled, all_paths)
            hint = f"Closest paths: {describe_paths(near)}." if near else "The tree has no leaves."
            raise ValueError(
                f"{label} matches no leaf of the tree. {hint} "
                "Paths are '/'-joined keys (see "
                "jf.summary(params)); pass strict=False to allow a pattern that "
                "matches nothing."
            )


def _check_same_answer(sel: Selector, flat: Flat, masks: list[Mask], like: Any) -> None:
    other_flat = Flat.of(like)
    other = dict(zip(other_flat.paths, sel.evaluate(other_flat), strict=True))
    leaves = dict(other_flat.entries)

    def kind(m: Mask) -> str:
        return "selected" if m is True else "not selected" if m is False else "some elements"

    for (path, x), m in zip(flat.entries, masks, strict=True):
        if path not in other:
            continue
        o = other[path]
        if not mask_equal(m, o):
            raise ValueError(
                f"{sel!r} gives different answers for the two trees at path {path!r}: "
                f"{kind(o)} on {spell_leaf(leaves[path])}, {kind(m)} on {spell_leaf(x)}. "
                "A selector must answer the same for params and their updates; if it tests the "
                "dtype (e.g. f32 params, bf16 gradients), test the path or shape instead, or "
                "cast the gradients to the params' dtype."
            )


# --------------------------------------------------------------------------
# Selectors.


class Selector:
    """Base class of every selector; combine with ``|``, ``&``, ``~`` and ``-``.

    A selector is called on a tree (``sel(params)``) and returns its mask tree.

    **Writing a selector.** Subclass it as a frozen dataclass (hashable, compared
    by value) and implement :meth:`leaf_mask`, the one extension point: it
    receives a leaf's path string and its ``jax.ShapeDtypeStruct`` and returns a
    :data:`Mask` (``True``/``False``, or a bool array broadcastable to the leaf's
    shape; anything else, ``None`` or a number included, is an error naming the
    path). The combinators, strict-pattern checks and every transform then work with it:

    >>> import dataclasses
    >>> import jax.numpy as jnp
    >>> import jfreeze as jf
    >>> @dataclasses.dataclass(frozen=True)
    ... class Rank(jf.Selector):
    ...     ndim: int
    ...     def leaf_mask(self, path, leaf):
    ...         return leaf.ndim == self.ndim
    >>> params = {"backbone": {"w": jnp.ones((2, 2))}, "head": {"w": jnp.ones(2)}}
    >>> (Rank(1) | jf.paths("backbone/**"))(params)
    {'backbone': {'w': True}, 'head': {'w': True}}
    >>> (Rank(2) - jf.paths("backbone/**"))(params)
    {'backbone': {'w': False}, 'head': {'w': False}}

    (``jf.where(lambda path, leaf: leaf.ndim == 1)`` does the same without a class.)
    """

    @property
    def per_leaf(self) -> bool:
        """False for a selector that needs the whole tree (a mask tree or mask
        function, alone or in a combination): it has no :meth:`leaf_mask`, so it
        cannot serve where leaves are seen one at a time (an NNX filter)."""
        return True

    def leaf_mask(self, path: str, leaf: Any) -> Mask:
        """The mask of one leaf: ``True``, ``False`` or a bool array of its shape.

        Args:
          path: the leaf's ``/``-joined path.
          leaf: a ``jax.ShapeDtypeStruct`` for arrays (the leaf as is otherwise):
            shape and dtype only, never values.
        """
        raise TypeError(
            f"{type(self).__name__} does not implement leaf_mask (asked about path "
            f"{path!r}); a Selector subclass answers one leaf at a time through it."
        )

    def _masks(self, flat: Flat) -> list[Mask]:
        # The one evaluation path: per leaf, unless a subclass needs the whole tree.
        pairs = zip(flat.paths, flat.structs, strict=True)
        # Outside any trace: shape-only jnp code in a leaf_mask gives concrete values under jit.
        with jax.ensure_compile_time_eval():
            return [checked_leaf_mask(self, p, x) for p, x in pairs]

    def _strict_patterns(self) -> Iterator[tuple[str, re.Pattern | Glob, str]]:
        return iter(())

    def evaluate(self, flat: Flat) -> list[Mask]:
        """Masks of a flattened tree's leaves, with strict patterns checked."""
        _check_strict(self, flat)
        return [simplify(m) for m in self._masks(flat)]

    def masks(self, tree: Any, *, like: Any = None) -> tuple[Flat, list[Mask]]:
        """Flattens ``tree`` and evaluates the selector on it.

        This is how jfreeze's transforms evaluate a selector; user code calls
        the selector instead.

        Args:
          tree: the tree to select in (params, updates, ...).
          like: optionally another tree with the same paths (the params, when
            ``tree`` holds the updates). The selector must give the same answer
            at every path both hold, else a ``ValueError`` names the path: a
            selector that tests the dtype, on f32 params and bf16 gradients,
            would otherwise route a leaf one way at ``init`` and another at
            ``update``.

        Returns:
          The flattened tree and one mask per real leaf, in tree order.
        """
        flat = Flat.of(tree)
        masks = self.evaluate(flat)
        if like is not None:
            _check_same_answer(self, flat, masks, like)
        return flat, masks

    def __call__(self, tree: Any) -> Any:
        flat, masks = self.masks(tree)
        return flat.unflatten(masks)

    def __or__(self, other: FrozenSpec) -> Selector:
        return _Combined.of("|", self, as_selector(other))

    def __and__(self, other: FrozenSpec) -> Selector:
        return _Combined.of("&", self, as_selector(other))

    def __sub__(self, other: FrozenSpec) -> Selector:
        return _Combined.of("&", self, ~as_selector(other))

    # A mask (bool, mask tree, mask function) on the left: `True | sel`, `{...} - sel`.
    def __ror__(self, other: FrozenSpec) -> Selector:
        return _Combined.of("|", as_selector(other), self)

    def __rand__(self, other: FrozenSpec) -> Selector:
        return _Combined.of("&", as_selector(other), self)

    def __rsub__(self, other: FrozenSpec) -> Selector:
        return _Combined.of("&", as_selector(other), ~self)

    def __invert__(self) -> Selector:
        if isinstance(self, _Combined) and self.op == "~":
            return self.parts[0]  # ~~a is a
        return _Combined.of("~", self)


def checked_leaf_mask(sel: Selector, path: str, leaf: Any) -> Mask:
    """``sel.leaf_mask(path, leaf)``, its answer checked: ``True``/``False`` or a
    bool array broadcast to the leaf's shape; anything else (``None``, a number, a
    float array, an array of another shape) is an error naming the path."""
    m = sel.leaf_mask(path, leaf)
    if m is True or m is False:  # the common answer: no message to build
        return m
    return _bool_mask(m, leaf, f"{sel!r} at path {path!r}")


@dataclasses.dataclass(frozen=True, repr=False)
class _Paths(Selector):
    globs: tuple[str, ...]
    strict: bool = True

    def leaf_mask(self, path, leaf):
        return any(compile_glob(g).fullmatch(path) for g in self.globs)

    def _strict_patterns(self):
        if self.strict:
            for g in self.globs:
                yield f"jf.paths({g!r})", compile_glob(g), g

    def __repr__(self):
        args = ", ".join(map(repr, self.globs))
        return f"paths({args}{'' if self.strict else ', strict=False'})"


@dataclasses.dataclass(frozen=True, repr=False)
class _Regex(Selector):
    pattern: str
    strict: bool = True

    def leaf_mask(self, path, leaf):
        return _compile_regex(self.pattern).fullmatch(path) is not None

    def _strict_patterns(self):
        if self.strict:
            yield f"jf.regex({self.pattern!r})", _compile_regex(self.pattern), self.pattern

    def __repr__(self):
        return f"regex({self.pattern!r}{'' if self.strict else ', strict=False'})"


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


@dataclasses.dataclass(frozen=True, repr=False)
class _Where(Selector):
    predicate: Callable[[str, Any], Any]

    def leaf_mask(self, path, leaf):
        try:
            # Outside any trace: shape-only jnp code gives concrete values under jit.
            with jax.ensure_compile_time_eval():
                out = self.predicate(path, leaf)
        except Exception as e:
            seen = (
                "a jax.ShapeDtypeStruct: it may use the path, shape and dtype, never the values"
                if is_array(leaf) else
                f"not an array but the leaf itself, here a {type(leaf).__name__} (filter the "
                "tree to arrays first, e.g. eqx.filter(model, eqx.is_array), or test "
                "isinstance(leaf, jax.ShapeDtypeStruct))"
            )
            raise TypeError(
                f"jf.where({_name(self.predicate)}) failed at path {path!r}: "
                f"{type(e).__name__}: {e}. The predicate receives (path, leaf); this "
                f"leaf is {seen}."
            ) from e
        return _bool_mask(out, leaf, f"jf.where({_name(self.predicate)}) at path {path!r}")

    def __repr__(self):
        return f"where({_name(self.predicate)})"


def _freeze_index(x: Any) -> Any:
    """A hashable, comparable stand-in for an index expression or mask."""
    if isinstance(x, slice):
        return ("slice", x.start, x.stop, x.step)
    if isinstance(x, (tuple, list)):
        return (type(x).__name__, *map(_freeze_index, x))
    if isinstance(x, np.ndarray):
        return ("array", x.shape, x.dtype.str, x.tobytes())
    if isinstance(x, Tracer):
        return ("traced", id(x))  # never equal to another value; hashable
    if isinstance(x, (bool, int, float, complex, np.generic)):
        return (type(x).__name__, x)  # True and 1 are different masks
    return x


def _to_numpy(x: Any) -> Any:
    """Concrete jax arrays and lists inside an index expression as NumPy arrays.

    NumPy reads a list index as the array of it (``x[[0, 2]]`` is
    ``x[np.array([0, 2])]``), so this keeps the meaning and makes it hashable.
    """
    if isinstance(x, tuple):
        return tuple(map(_to_numpy, x))
    if isinstance(x, jax.Array) and not isinstance(x, Tracer):
        x = np.asarray(x)
    elif isinstance(x, list):
        try:  # [] selects nothing, as x[[]] does in NumPy (not a float64 array)
            x = np.asarray(x) if x else np.zeros(0, np.intp)
        except ValueError:  # ragged: reported as "a list" when evaluated
            return x
    if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.integer):
        return x.astype(np.intp)  # int32 and int64 positions are the same index
    return x


def _index_problem(x: Any, top: bool = True) -> str | None:
    """What keeps ``x`` from being a NumPy index expression (None if it is one)."""
    if top and isinstance(x, tuple):
        return next(filter(None, (_index_problem(y, top=False) for y in x)), None)
    if x is Ellipsis or isinstance(x, slice) or (x is None and not top):
        return None
    if isinstance(x, (int, np.integer, np.bool_)):
        return None
    if isinstance(x, np.ndarray) and (x.dtype == np.bool_ or np.issubdtype(x.dtype, np.integer)):
        return None
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array" if x.ndim else f"{x.dtype} scalar"
    return "None" if x is None else type(x).__name__


def _element_mask(spec: Any, leaf: Any, where_: str) -> Mask:
    """One leaf's mask from a bool / bool array (broadcast) or an index expression."""
    spec = _to_numpy(_concrete(spec, where_) if isinstance(spec, Tracer) else spec)
    if isinstance(spec, (bool, np.bool_)) or (
        isinstance(spec, np.ndarray) and spec.dtype == np.bool_
    ):
        return _bool_mask(spec, leaf, where_)
    problem = _index_problem(spec)
    if problem is not None:
        hint = " (does the mask function forget to return?)" if spec is None else ""
        raise TypeError(
            f"{where_}: the mask must be boolean (True = selected) or an index "
            f"expression such as np.s_[:, 0] or np.s_[np.array([0, 2])], got "
            f"{problem}{hint}."
        )
    out = np.zeros(leaf.shape, dtype=bool)  # an index expression: mark its entries
    try:
        out[spec] = True
    except (IndexError, TypeError, ValueError) as e:
        raise ValueError(
            f"{where_}: index {_index_repr(spec)} does not fit the leaf's shape "
            f"{tuple(leaf.shape)}: {e}"
        ) from None
    return simplify(out)


def _index_repr(x: Any) -> str:
    if isinstance(x, slice):
        parts = ["" if v is None else repr(v) for v in (x.start, x.stop, x.step)]
        return ":".join(parts[:2] if x.step is None else parts)
    if x is Ellipsis:
        return "..."
    if isinstance(x, tuple):
        return ", ".join(map(_index_repr, x)) if x else "()"
    if isinstance(x, np.ndarray):
        if x.dtype != np.bool_ and x.size <= 8:
            return f"np.array({x.tolist()})"
        return f"array(shape={x.shape}, dtype={x.dtype})"
    if callable(x):
        return _name(x)
    return repr(x)


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class _Elements(Selector):
    glob: str
    mask: Any
    strict: bool = True

    def __post_init__(self):
        if not callable(self.mask):  # hashable, value-compared, never a jax.Array
            object.__setattr__(self, "mask", _to_numpy(self.mask))

    def leaf_mask(self, path, leaf):
        if not compile_glob(self.glob).fullmatch(path):
            return False
        where_ = f"jf.elements({self.glob!r}) at path {path!r}"
        if not is_array(leaf):
            raise TypeError(
                f"{where_}: element-wise selection needs an array leaf, got "
                f"{type(leaf).__name__}. Use jf.paths for whole leaves."
            )
        spec = self.mask
        if callable(spec):
            try:
                # Outside any trace: shape-only jnp code gives concrete values under jit.
                with jax.ensure_compile_time_eval():
                    spec = spec(leaf)
            except Exception as e:
                raise TypeError(
                    f"{where_}: the mask function {_name(self.mask)} failed: {type(e).__name__}: "
                    f"{e}. It receives a jax.ShapeDtypeStruct: it may use the shape and "
                    "dtype, never the values."
                ) from e
        return _element_mask(spec, leaf, where_)

    def _strict_patterns(self):
        if self.strict:
            yield f"jf.elements({self.glob!r}, ...)", compile_glob(self.glob), self.glob

    def __eq__(self, other):
        return isinstance(other, _Elements) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def _key(self):
        return (self.glob, _freeze_index(self.mask), self.strict)

    def __repr__(self):
        m = self.mask
        shown = f"np.s_[{_index_repr(m)}]" if isinstance(m, (tuple, slice, int)) else _index_repr(m)
        return f"elements({self.glob!r}, {shown}{'' if self.strict else ', strict=False'})"


def _layer_index(index: Any) -> Any:
    """``jf.layers``' index as a hashable NumPy index along one axis."""
    if isinstance(index, range):
        return np.arange(index.start, index.stop, index.step, dtype=np.intp)
    if isinstance(index, tuple):
        index = list(index)
    index = _to_numpy(index)
    if isinstance(index, (slice, int, np.integer)) and not isinstance(index, (bool, np.bool_)):
        return index
    if isinstance(index, np.ndarray) and index.ndim == 1 and (
        index.dtype == np.bool_ or np.issubdtype(index.dtype, np.integer)
    ):
        return index
    raise TypeError(
        "jf.layers takes the layers as an int, a slice, a range, a list of ints or a 1-D "
        f"bool array (True = selected), got {index!r}."
    )


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class _Layers(Selector):
    glob: str
    index: Any
    axis: int = 0
    strict: bool = True

    def leaf_mask(self, path, leaf):
        if not compile_glob(self.glob).fullmatch(path):
            return False
        where_ = f"{self!r} at path {path!r}"
        if not is_array(leaf):
            raise TypeError(f"{where_}: a layer selection needs an array leaf, got "
                            f"{type(leaf).__name__}.")
        if not -leaf.ndim <= self.axis < leaf.ndim:
            raise ValueError(
                f"{where_}: the leaf has shape {tuple(leaf.shape)}, with no axis {self.axis} "
                "to hold layers. Is it stacked (one array per parameter, a layer axis)?"
            )
        axis = self.axis % leaf.ndim
        selected = np.zeros(leaf.shape[axis], dtype=bool)
        try:
            selected[self.index] = True
        except IndexError as e:
            raise ValueError(
                f"{where_}: layers {_index_repr(self.index)} do not fit the "
                f"{leaf.shape[axis]} layers on axis {axis} (shape {tuple(leaf.shape)}): {e}"
            ) from None
        shape = [1] * leaf.ndim
        shape[axis] = -1
        # A read-only broadcast view: no copy of a mask as large as the stack.
        return simplify(np.broadcast_to(selected.reshape(shape), leaf.shape))

    def _strict_patterns(self):
        if self.strict:
            yield repr(self), compile_glob(self.glob), self.glob

    def __eq__(self, other):
        return isinstance(other, _Layers) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def _key(self):
        return (self.glob, _freeze_index(self.index), self.axis, self.strict)

    def __repr__(self):
        i = self.index
        shown = f"np.s_[{_index_repr(i)}]" if isinstance(i, slice) else _index_repr(i)
        extra = (f", axis={self.axis}" if self.axis else "") + (
            "" if self.strict else ", strict=False")
        return f"layers({self.glob!r}, {shown}{extra})"


@dataclasses.dataclass(frozen=True, repr=False)
class _Constant(Selector):
    value: bool

    def leaf_mask(self, path, leaf):
        return self.value

    def __repr__(self):
        return "everything" if self.value else "nothing"


_OPS: dict[str, Callable[..., Mask]] = {"|": mask_or, "&": mask_and, "~": mask_not}


@dataclasses.dataclass(frozen=True, repr=False)
class _Combined(Selector):
    """``|`` / ``&`` of any number of selectors, or ``~`` of one: masks combined per leaf."""

    op: str
    parts: tuple[Selector, ...]

    @classmethod
    def of(cls, op: str, *parts: Selector) -> _Combined:
        # n-ary: (a | b) | c is one union of three (each strict pattern still checked alone)
        flat: list[Selector] = []
        for p in parts:
            if op != "~" and isinstance(p, _Combined) and p.op == op:
                flat.extend(p.parts)
            else:
                flat.append(p)
        return cls(op, tuple(flat))

    @property
    def per_leaf(self) -> bool:
        return all(p.per_leaf for p in self.parts)

    def _masks(self, flat):
        columns = [p._masks(flat) for p in self.parts]
        return [_OPS[self.op](*row) for row in zip(*columns, strict=True)]

    def leaf_mask(self, path, leaf):
        # The same evaluation, on a tree of this one leaf (tree-only parts refused).
        if not self.per_leaf:
            raise TypeError(
                f"{self!r}: a mask tree or mask function needs the whole tree; use a "
                "selector (jf.paths, jf.regex, jf.where, jf.elements) where leaves are "
                "seen one at a time"
            )
        return self._masks(Flat.of({path: leaf}))[0]

    def _strict_patterns(self):
        for p in self.parts:
            yield from p._strict_patterns()

    def __repr__(self):
        if self.op == "~":
            return f"~{self.parts[0]!r}"
        out = repr(self.parts[0])
        for p in self.parts[1:]:  # a & ~b reads a - b ('-' binds tighter than '&')
            if self.op == "&" and isinstance(p, _Combined) and p.op == "~":
                out += f" - {p.parts[0]!r}"
            else:
                out += f" {self.op} {p!r}"
        return f"({out})"


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class _MaskTree(Selector):
    """What optax takes as a mask: a bool tree (a prefix of params) or params -> that."""

    spec: Any

    def _masks(self, flat):
        with jax.ensure_compile_time_eval():  # shape-only jnp code stays concrete
            spec = call_or_tree(self.spec, flat.tree)  # an Equinox mask tree is callable
        values = broadcast_prefix(spec, flat.tree, what="mask", is_hole=is_placeholder)
        return [
            _bool_mask(m, shape_dtype(x), f"mask at path {p!r}")
            for (p, x), m in zip(flat.entries, values, strict=True)
        ]

    @property
    def per_leaf(self) -> bool:
        return False

    def leaf_mask(self, path, leaf):
        raise TypeError(
            "a mask tree or mask function needs the whole tree; use a selector "
            "(jf.paths, jf.regex, jf.where, jf.elements) where leaves are seen one "
            "at a time"
        )

    def __post_init__(self):
        if not is_function(self.spec):  # concrete jax arrays as NumPy: hashable by value
            object.__setattr__(self, "spec", jax.tree.map(_to_numpy, self.spec))

    def _key(self):
        if is_function(self.spec):
            return ("fn", self.spec)
        leaves, treedef = jax.tree_util.tree_flatten(self.spec)
        return ("tree", treedef, tuple(map(_freeze_index, leaves)))

    def __eq__(self, other):
        return isinstance(other, _MaskTree) and (
            self.spec is other.spec or self._key() == other._key())

    def __hash__(self):
        try:
            return hash(self._key())
        except TypeError:  # a leaf that is not a mask: evaluation will say so
            return id(self.spec)

    def __repr__(self):
        return f"mask({_name(self.spec) if is_function(self.spec) else self.spec!r})"


# --------------------------------------------------------------------------
# Public constructors.


def paths(*globs: str, strict: bool = True) -> Selector:
    """Leaves whose path matches any of the globs (full match).

    A glob is split at ``/`` into segments, matched against the path's segments:

    - ``**`` as a whole segment matches any number of segments, none included
      (``a/**`` is ``a`` and everything below it; ``**/bias`` is every ``bias``).
      Elsewhere (``a**``) it is a plain ``*``.
    - ``*`` matches any characters of one segment (maybe none), ``?`` one
      character; neither ever matches ``/``.
    - ``[..]`` is a class of one character, with Python's ``fnmatch`` rules:
      ``[!..]`` negates, ``^`` is a literal (``[^b]`` is ``^`` or ``b``), a ``]``
      first in the class is a member, ``a-z`` is a range. A class never matches
      ``/``: it cannot span segments (``a[/]b`` is the literal ``a[/]b``).
    - To match a literal ``*``, ``?`` or ``[``, put it in a class (``[*]``);
      ``glob.escape(key)`` does this for a whole key.

    Matching takes at most ``(len(glob) + 1) * (len(path) + 1)`` steps, however
    many ``**`` the glob holds. A tree in which two leaves spell the same path
    (a key ``"enc/w"`` and nested keys ``enc`` → ``w``) is refused with a
    ``ValueError`` naming both.

    Args:
      *globs: patterns on ``'/'``-joined key paths.
      strict: if True (default), evaluating on a tree where a glob matches
        nothing raises a ``ValueError`` naming the closest paths.

    >>> import jax.numpy as jnp
    >>> import jfreeze as jf
    >>> params = {"backbone": {"layers": [{"w": jnp.ones(2)}]}, "head": {"w": jnp.ones(2)}}
    >>> jf.paths("backbone/**")(params)
    {'backbone': {'layers': [{'w': True}]}, 'head': {'w': False}}
    >>> jf.paths("**/[!h]*")({"x": {"w": 1.0, "h": 2.0}, "w*": 3.0})
    {'w*': True, 'x': {'h': False, 'w': True}}
    >>> import glob
    >>> jf.paths(glob.escape("w*"))({"x": {"w": 1.0, "h": 2.0}, "w*": 3.0})
    {'w*': True, 'x': {'h': False, 'w': False}}
    """
    if not globs or not all(isinstance(g, str) for g in globs):
        raise TypeError(f"jf.paths takes one or more glob strings, got {globs!r}")
    return _Paths(tuple(globs), strict)


def regex(pattern: str, *, strict: bool = True) -> Selector:
    """Leaves whose path fully matches the regular expression ``pattern``.

    >>> import jax.numpy as jnp
    >>> import jfreeze as jf
    >>> params = {"layers_0": {"w": jnp.ones(1)}, "layers_7": {"w": jnp.ones(1)}}
    >>> jf.regex(r"layers_[0-3]/.*")(params)
    {'layers_0': {'w': True}, 'layers_7': {'w': False}}
    """
    if not isinstance(pattern, str):
        raise TypeError(f"jf.regex takes a string, got {pattern!r}")
    try:
        _compile_regex(pattern)  # fail now on a malformed expression
    except re.error as e:
        raise ValueError(f"jf.regex({pattern!r}) is not a regular expression: {e}") from None
    return _Regex(pattern, strict)


def where(predicate: Callable[[str, Any], Any]) -> Selector:
    """Leaves (or elements) for which ``predicate(path, leaf)`` is true.

    ``leaf`` is a ``jax.ShapeDtypeStruct``: the predicate may use the path, shape
    and dtype but never values. (A leaf that is not an array, such as an
    unfiltered Equinox module's activation function, is passed as it is.)
    It returns a bool, or a bool array (NumPy or jax) broadcastable to the
    leaf to select elements; anything else (``None`` from a forgotten
    ``return``, an int, a float array) is a ``TypeError`` naming the path.
    It runs outside any trace, so ``jnp`` code on the shape works under
    ``jax.jit``.

    A predicate on the dtype sees the updates' dtype when an optimizer
    evaluates it on gradients: with f32 params and bf16 gradients it may answer
    differently there (``Selector.masks(updates, like=params)`` reports that as
    a ``ValueError`` naming the path). Prefer the path or shape, or a dtype
    *kind* (``jnp.issubdtype(leaf.dtype, jnp.floating)``).

    >>> import jax.numpy as jnp
    >>> import jfreeze as jf
    >>> params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    >>> jf.where(lambda path, leaf: leaf.ndim == 1)(params)
    {'b': True, 'w': False}
    """
    if not callable(predicate):
        raise TypeError(f"jf.where takes a function (path, leaf) -> bool, got {predicate!r}")
    return _Where(predicate)


def elements(glob: str, mask: Any, *, strict: bool = True) -> Selector:
    """Some elements of the leaves matching ``glob``.

    What ``mask`` may be (or a mask function return):

    - a bool, or a bool array (NumPy or jax) broadcastable to the leaf:
      ``True`` = selected;
    - a NumPy index expression, with NumPy's meaning: ints, slices, ``...``,
      integer arrays or lists of ints (``np.s_[np.array([0, 2])]``,
      ``[0, 2]``), and tuples of these (``np.s_[:, [0, 3]]``; ``None`` only
      inside a tuple);
    - a function of the leaf (a ``jax.ShapeDtypeStruct``) returning one of the
      above. It runs outside any trace, so ``jnp`` code on the shape works
      under ``jax.jit``.

    Anything else — ``None`` from a forgotten ``return`` (NumPy would read it as
    ``np.newaxis`` and select the whole leaf), a float array, a string — is a
    ``TypeError`` naming the path. Jax arrays and lists are stored as NumPy
    arrays, so the selector is hashable and compares by value.

    Args:
      glob: which leaves, as in :func:`paths`.
      mask: what to select in each of them (see above).
      strict: as in :func:`paths`.

    >>> import jax.numpy as jnp, numpy as np
    >>> import jfreeze as jf
    >>> jf.elements("w", np.s_[:, 0])({"w": jnp.ones((2, 2))})["w"]
    array([[ True, False],
           [ True, False]])
    >>> jf.elements("b", np.s_[np.array([0, 2])])({"b": jnp.ones(3)})["b"]
    array([ True, False,  True])
    >>> jf.elements("b", jnp.array([True, False])) == jf.elements("b", np.array([True, False]))
    True
    """
    if not isinstance(glob, str):
        raise TypeError(f"jf.elements takes a glob string first, got {glob!r}")
    return _Elements(glob, mask, strict)


def layers(glob: str, index: Any, *, axis: int = 0, strict: bool = True) -> Selector:
    """Whole layers of stacked leaves: the slices ``index`` along ``axis``.

    A scanned model keeps one array per parameter with a layer axis (linen
    ``nn.scan``, ``nnx.vmap``, ``eqx.filter_vmap``; MaxText stacks on axis 1).
    ``jf.layers`` selects some layers of every leaf matching ``glob``. It is an
    element-wise selection like :func:`elements` (and composes the same way),
    and one that :func:`freeze` recognises: the frozen layers get no optimizer
    state and the inner optimizer sees only the trainable layers, stacked. So
    does any element selection that picks whole slices along one axis.
    Run the stack with :func:`scan` (``jf.flax.scan`` for linen) so that the
    frozen layers get no weight gradients either.

    Args:
      glob: which leaves, as in :func:`paths`.
      index: which layers: an int, a slice, a ``range``, a list of ints
        (negative ones count from the end) or a 1-D bool array.
      axis: the layer axis of the matching leaves (negative counts from the end).
      strict: as in :func:`paths`.

    A matching leaf without that axis, or an index out of range, is a
    ``ValueError`` naming the path.

    >>> import jax.numpy as jnp
    >>> import jfreeze as jf
    >>> params = {"layers": {"w": jnp.ones((4, 2)), "b": jnp.ones((4,))}, "head": jnp.ones(2)}
    >>> jf.layers("layers/**", range(2))(params)["layers"]["b"]
    array([ True,  True, False, False])
    >>> jf.layers("layers/**", [0, -1])(params)["layers"]["w"][:, 0]
    array([ True, False, False,  True])
    """
    if not isinstance(glob, str):
        raise TypeError(f"jf.layers takes a glob string first, got {glob!r}")
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"jf.layers: axis must be an int, got {axis!r}")
    return _Layers(glob, _layer_index(index), int(axis), strict)


#: Selects every leaf.
everything: Selector = _Constant(True)
#: Selects no leaf.
nothing: Selector = _Constant(False)


def as_selector(frozen: FrozenSpec) -> Selector:
    """A selector from what ``frozen=`` accepts everywhere.

    A :class:`Selector` as it is; otherwise what optax takes as a mask: a bool
    mask tree (a prefix of the params tree, a scalar bool included) or a
    function ``params -> mask tree``.

    >>> import jfreeze as jf
    >>> jf.as_selector({"a": True, "b": False})({"a": {"w": 1.0}, "b": 2.0})
    {'a': {'w': True}, 'b': False}
    """
    if isinstance(frozen, Selector):
        return frozen
    if isinstance(frozen, (str, re.Pattern)):
        raise TypeError(
            f"frozen={frozen!r}: a string is ambiguous here; write "
            f"jf.paths({frozen!r}) or jf.regex({frozen!r})."
        )
    return _MaskTree(frozen)

