"""Private: what the transforms share (``freeze``, ``partition``, ``gradual_unfreeze``,
``scale_by_label``): duck-typed inner transforms, ``-0.0`` updates, routing whole
leaves by label with ``optax.partition``, cutting leaves frozen in whole slices
(layers of a stack) down to their trainable slices, and resolving label trees by path.

Invariants: a routed-away leaf, or frozen slice, never reaches the inner
transform (no state, not seen by clipping, decay, accumulation or norms); its
update is ``-0.0`` (``-0-0j``); slices are cut and put back with static slices
and one concatenate (no gather), and the frozen label's state records which
(``ZeroSlicesState``); optax is never handed a callable label tree (an Equinox
module is callable), only a function returning it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jfreeze._tree import (
    Flat,
    Mask,
    broadcast_prefix,
    call_or_tree,
    describe_paths,
    is_placeholder,
    runs,
    slab,
)

__all__ = [
    "FROZEN",
    "TRAIN",
    "WholeSlices",
    "ZeroSlicesState",
    "ZeroUpdatesState",
    "as_transform",
    "check_frozen_slices",
    "constant",
    "cuts",
    "gather",
    "layout",
    "layout_change",
    "map_cut",
    "neg_zero",
    "refuse_lookahead",
    "resolve_labels",
    "routed",
    "scatter",
    "zero_updates",
]

TRAIN, FROZEN = "trainable", "frozen"


def as_transform(tx: Any, what: str = "inner") -> optax.GradientTransformationExtraArgs:
    """Anything with optax's init/update (e.g. optax.MultiSteps), by duck typing."""
    if isinstance(tx, optax.GradientTransformation):
        return optax.with_extra_args_support(tx)
    if callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None)):
        return optax.GradientTransformationExtraArgs(tx.init, tx.update)
    raise TypeError(f"{what} must be an optax GradientTransformation (init/update), got {tx!r}")


def refuse_lookahead(params: Any, who: str) -> None:
    """A ``TypeError`` saying which way round ``optax.lookahead`` goes, if ``params``
    are ``optax.LookaheadParams``: a jfreeze transform inside lookahead sees
    ``params.fast`` and gradients of the same tree; outside it, the gradients are
    shaped like ``params.fast`` but the params are ``(fast, slow)``, so no pattern
    can name the same paths in both."""
    if isinstance(params, optax.LookaheadParams):
        raise TypeError(
            f"{who} got optax.LookaheadParams (fast, slow) as params: lookahead goes outside, "
            f"optax.lookahead({who}(...), sync_period, slow_step_size). There "
            f"{who} sees params.fast, and its patterns are the model's paths (no 'fast/' or "
            "'slow/' prefix). Keep every frozen bit of both halves with "
            "jf.apply_updates(params, updates, frozen=jf.paths('*/<pattern>'))."
        )


def neg_zero(dtype: Any) -> Any:
    """``-0.0`` of ``dtype``; ``-0-0j`` for complex, as ``-0+0j`` flips a ``-0.0``
    imaginary part to ``+0.0`` when added."""
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.array(complex(-0.0, -0.0), dtype)
    return jnp.array(-0.0, dtype)


class ZeroUpdatesState(optax.EmptyState):
    """The state of a frozen label (:func:`zero_updates`): an ``optax.EmptyState`` (it is
    one, and prints as one), marked so that ``jf.inner_state`` tells a frozen label from a
    stateless optimizer (``optax.scale``) without a label."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "EmptyState()"


class ZeroSlicesState:
    """The state of a frozen label when some leaves are frozen in whole slices
    (:func:`cuts`): no arrays, only which slices are frozen, as static data, so
    that an update with another selection is an error naming the path (a state
    shaped like the trainable slices cannot tell which slices it was built for).
    ``jf.inner_state`` treats it as a frozen label's state."""

    __slots__ = ("layout",)

    def __init__(self, layout: tuple) -> None:
        self.layout = layout

    def __eq__(self, other: object) -> bool:
        return type(other) is ZeroSlicesState and other.layout == self.layout

    def __hash__(self) -> int:
        return hash(self.layout)

    def __repr__(self) -> str:
        return "ZeroSlicesState(" + ", ".join(
            f"{p!r}: axis {a}, {_indices(f)}" for p, a, f in self.layout) + ")"


jax.tree_util.register_pytree_node(
    ZeroSlicesState, lambda s: ((), s.layout), lambda layout, _: ZeroSlicesState(layout))


def zero_updates(frozen_slices: tuple = ()) -> optax.GradientTransformation:
    """Like ``optax.set_to_zero`` but with -0.0 (-0-0j), the update whose add
    changes the fewest bits (see ``jf.freeze`` for what an add still changes).
    With a ``frozen_slices`` layout (:func:`layout`) its state records it."""

    def zero(u):
        if u.dtype == jax.dtypes.float0:  # an int leaf's gradient: nothing to zero
            return u
        return jnp.full_like(u, neg_zero(u.dtype))

    def update(updates, state, params=None):
        del params
        return jax.tree.map(zero, updates), state

    def init(params) -> Any:  # optax's OptState alias does not admit a custom node
        del params
        return ZeroSlicesState(frozen_slices) if frozen_slices else ZeroUpdatesState()

    return optax.GradientTransformation(init, update)


def constant(tree: Any) -> Callable[[Any], Any]:
    """A function returning ``tree``: optax.partition / optax.masked *call* a label
    or mask tree that is callable, and an Equinox module is."""
    return lambda _: tree


def routed(
    inner: Any, masks: list[Mask], flat: Flat, frozen_slices: tuple = ()
) -> optax.GradientTransformationExtraArgs:
    """``inner`` on the leaves whose mask is not ``True``; ``-0.0`` on the others.

    Whole frozen leaves are routed away before ``inner`` sees anything: no state,
    not seen by clipping, decay, accumulation or norms (``optax.partition``).
    Extra args shaped like the updates (lbfgs's ``grad=``) are routed alike.
    ``frozen_slices``: the :func:`layout` of the slab-frozen leaves, kept in the
    frozen label's state.
    """
    labels = flat.unflatten([FROZEN if m is True else TRAIN for m in masks])
    return optax.partition(
        {TRAIN: inner, FROZEN: zero_updates(frozen_slices)}, constant(labels),
        mask_compatible_extra_args=True,
    )


# --------------------------------------------------------------------------
# Leaves frozen in whole slices (layers of a stack): a static gather before the
# inner optimizer and a static scatter after, so it holds state for the trainable
# slices only and its statistics (norms, RMS, clipping) see nothing else.

#: ``(axis, frozen)``: a leaf frozen in whole slices along ``axis``, ``frozen[i]``
#: for slice ``i``.
WholeSlices = tuple[int, np.ndarray]


def cuts(flat: Flat, masks: list[Mask]) -> list[WholeSlices | None]:
    """Per real leaf: its :data:`WholeSlices` if its mask is a slab (``_tree.slab``) and it
    is a float array or NNX Variable (an int leaf's ``float0`` gradient keeps
    ``jnp.where`` zeroing, so init and update decide alike), else ``None``."""
    out: list[WholeSlices | None] = []
    for x, m in zip(flat.structs, masks, strict=True):
        s = slab(m)
        dtype = getattr(x, "dtype", None)
        ok = s is not None and dtype is not None and bool(jnp.issubdtype(dtype, jnp.inexact))
        out.append(s if ok else None)
    return out


def layout(flat: Flat, cut: list[WholeSlices | None]) -> tuple:
    """``((path, axis, frozen slices as a tuple of bools), ...)``: static, hashable."""
    return tuple((p, c[0], tuple(bool(b) for b in c[1]))
                 for p, c in zip(flat.paths, cut, strict=True) if c is not None)


def _indices(frozen: tuple) -> str:
    return ("frozen slices [" + ", ".join(str(i) for i, b in enumerate(frozen) if b)
            + f"] of {len(frozen)}")


def layout_change(before: tuple, now: tuple) -> str | None:
    """What differs between two :func:`layout` records, by path; ``None`` if nothing."""
    old, new = ({p: (a, f) for p, a, f in lay} for lay in (before, now))
    parts = []
    for p in sorted(old.keys() | new.keys()):
        if old.get(p) != new.get(p):
            at = lambda c: "no slices" if c is None else f"axis {c[0]}, {_indices(c[1])}"  # noqa: E731
            parts.append(f"{p!r} ({at(old.get(p))} at init, {at(new.get(p))} now)")
    return "; ".join(parts) or None


def check_frozen_slices(state: Any, now: tuple, who: str) -> None:
    """A ``ValueError`` naming the paths whose frozen slices (:func:`layout`) differ
    from those recorded at ``init``: a state shaped like the trainable slices cannot
    tell by its shapes alone (freezing layer 1 instead of layer 0 keeps them)."""
    states = getattr(state, "inner_states", None)
    if not isinstance(states, dict):
        return  # not a jfreeze state: the inner optimizer, or the state check, says so
    held = getattr(states.get(FROZEN), "inner_state", None)
    if not isinstance(held, ZeroSlicesState):
        held = ZeroUpdatesState()  # nothing recorded: nothing was cut at init
    why = layout_change(held.layout if isinstance(held, ZeroSlicesState) else (), now)
    if why:
        raise ValueError(
            f"{who}: the optimizer state does not match the updates (tx.init was given "
            "another tree, or the selection changed): leaves frozen in whole slices differ: "
            f"{why}. The state holds the trainable slices only; build it with tx.init on "
            "the selection you update with."
        )


def gather(x: Any, cut: WholeSlices) -> Any:
    """The trainable slices of ``x``, in order: static slices, one concatenate. An
    NNX Variable (``nnx.Optimizer`` inits on them) stays one, holding them."""
    if not isinstance(x, (jax.Array, np.ndarray)) and callable(getattr(x, "replace", None)):
        value = x.get_value() if callable(getattr(x, "get_value", None)) else x.value
        return x.replace(gather(value, cut))
    axis, frozen = cut
    parts = [jax.lax.slice_in_dim(x, a, b, axis=axis) for a, b, v in runs(frozen) if not v]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis)


def scatter(sub: Any, cut: WholeSlices, frozen_from: Any = None) -> jax.Array:
    """A full leaf from its trainable slices ``sub`` (see :func:`gather`); the
    frozen slices are ``frozen_from``'s (copied: every bit kept), or ``-0.0``
    (``-0-0j``) of ``sub``'s dtype without it."""
    axis, frozen = cut
    parts, at = [], 0
    for a, b, v in runs(frozen):
        if not v:
            parts.append(jax.lax.slice_in_dim(sub, at, at + b - a, axis=axis))
            at += b - a
        elif frozen_from is not None:
            parts.append(jax.lax.slice_in_dim(frozen_from, a, b, axis=axis))
        else:
            shape = list(jnp.shape(sub))
            shape[axis] = b - a
            parts.append(jnp.full(shape, neg_zero(sub.dtype), sub.dtype))
    return jnp.concatenate(parts, axis)


def map_cut(flat: Flat, cut: list[WholeSlices | None], tree: Any, fn: Callable) -> Any:
    """``fn(leaf, cut)`` at the cut leaves of ``tree`` (shaped like ``flat.tree``);
    a tree of another structure (``None`` params) is returned as is."""
    if tree is None or all(c is None for c in cut):
        return tree
    try:
        slots = flat.treedef.flatten_up_to(tree)
    except (ValueError, TypeError):
        return tree  # the inner optimizer (or the state check) reports it
    it = iter(cut)
    out = []
    for ref, s in zip(flat.slots, slots, strict=True):
        c = None if is_placeholder(ref) else next(it)
        out.append(s if c is None or is_placeholder(s) else fn(s, c))
    return flat.treedef.unflatten(out)


def resolve_labels(
    labels: Any, tree: Any, known: Mapping, *, who: str, noun: str, hint: str = ""
) -> tuple[Any, dict]:
    """The full label tree for ``tree``, and which paths carry each label.

    ``labels`` is a label tree (or a prefix of ``tree``) or a function of the
    tree. A label not in ``known`` is a ``ValueError`` naming the label and the
    paths carrying it; it is checked first, as the likely typo.

    >>> resolve_labels({"a": "x", "b": "y"}, {"a": 1.0, "b": [2.0, 3.0]}, {"x": 0, "y": 0},
    ...                who="demo", noun="entry")
    ({'a': 'x', 'b': ['y', 'y']}, {'x': ['a'], 'y': ['b/0', 'b/1']})
    """
    spec = call_or_tree(labels, tree)  # an Equinox label tree is callable, yet a tree
    flat = Flat.of(tree)
    values = broadcast_prefix(spec, tree, what="label tree", is_hole=is_placeholder)
    carriers: dict[Any, list[str]] = {}
    for path, label in zip(flat.paths, values, strict=True):
        try:
            carriers.setdefault(label, []).append(path)
        except TypeError:
            raise TypeError(f"the label at path {path!r} is not hashable: {label!r}") from None
    for label, where_ in carriers.items():
        if label not in known:
            raise ValueError(
                f"{who}: label {label!r} has no {noun}; it is carried by "
                f"{describe_paths(where_)}. Known labels: {', '.join(map(repr, known))}.{hint}"
            )
    return flat.unflatten(values), carriers
