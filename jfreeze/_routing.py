"""Private: what the transforms share (``freeze``, ``partition``, ``gradual_unfreeze``,
``scale_by_label``): duck-typed inner transforms, ``-0.0`` updates, routing whole
leaves by label with ``optax.partition``, and resolving label trees by path.

Invariants: a routed-away leaf never reaches the inner transform (no state, not
seen by clipping, decay, accumulation or norms); its update is ``-0.0``
(``-0-0j``); optax is never handed a callable label tree (an Equinox module is
callable), only a function returning it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jfreeze._tree import (
    Flat,
    Mask,
    broadcast_prefix,
    call_or_tree,
    describe_paths,
    is_placeholder,
)

__all__ = [
    "FROZEN",
    "TRAIN",
    "ZeroUpdatesState",
    "as_transform",
    "constant",
    "neg_zero",
    "refuse_lookahead",
    "resolve_labels",
    "routed",
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


def zero_updates() -> optax.GradientTransformation:
    """Like ``optax.set_to_zero`` but with -0.0 (-0-0j), the update whose add
    changes the fewest bits (see ``jf.freeze`` for what an add still changes)."""

    def zero(u):
        if u.dtype == jax.dtypes.float0:  # an int leaf's gradient: nothing to zero
            return u
        return jnp.full_like(u, neg_zero(u.dtype))

    def update(updates, state, params=None):
        del params
        return jax.tree.map(zero, updates), state

    return optax.GradientTransformation(lambda params: ZeroUpdatesState(), update)


def constant(tree: Any) -> Callable[[Any], Any]:
    """A function returning ``tree``: optax.partition / optax.masked *call* a label
    or mask tree that is callable, and an Equinox module is."""
    return lambda _: tree


def routed(inner: Any, masks: list[Mask], flat: Flat) -> optax.GradientTransformationExtraArgs:
    """``inner`` on the leaves whose mask is not ``True``; ``-0.0`` on the others.

    Whole frozen leaves are routed away before ``inner`` sees anything: no state,
    not seen by clipping, decay, accumulation or norms (``optax.partition``).
    Extra args shaped like the updates (lbfgs's ``grad=``) are routed alike.
    """
    labels = flat.unflatten([FROZEN if m is True else TRAIN for m in masks])
    return optax.partition(
        {TRAIN: inner, FROZEN: zero_updates()}, constant(labels),
        mask_compatible_extra_args=True,
    )


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
