"""Gradient transformations: ``freeze`` and ``partition``, composed from optax."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jfreeze.labels import resolve_labels
from jfreeze.paths import describe_paths
from jfreeze.selectors import FrozenSpec, Mask, _Flat, as_selector, compact

__all__ = ["freeze", "partition"]

_TRAIN, _FROZEN = "trainable", "frozen"


def _as_transform(tx: Any, what: str = "inner") -> optax.GradientTransformationExtraArgs:
    """Anything with optax's init/update (e.g. optax.MultiSteps), by duck typing."""
    if isinstance(tx, optax.GradientTransformation):
        return optax.with_extra_args_support(tx)
    if callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None)):
        return optax.GradientTransformationExtraArgs(tx.init, tx.update)
    raise TypeError(f"{what} must be an optax GradientTransformation (init/update), got {tx!r}")


def _zero_updates() -> optax.GradientTransformation:
    """Like ``optax.set_to_zero`` but with -0.0, so ``p + update`` keeps p's bits.

    ``+0.0`` turns a ``-0.0`` parameter into ``+0.0`` when applied eagerly
    (under jit XLA drops the add); ``x + (-0.0) == x`` bit for bit for every x.
    """

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _zero_elements(tree: Any, masks: list[Mask]) -> Any:
    """``jnp.where(mask, -0.0, x)`` on element-wise frozen leaves (never ``mask * x``)."""
    if all(isinstance(m, bool) for m in masks):
        return tree
    flat = _Flat.of(tree)
    out = [
        x if isinstance(m, bool) else jnp.where(compact(m), jnp.array(-0.0, x.dtype), x)
        for (_, x), m in zip(flat.entries, masks)
    ]
    return flat.unflatten(out)


def _routed(inner, masks: list[Mask], flat: _Flat) -> optax.GradientTransformationExtraArgs:
    # Whole frozen leaves are routed away before `inner` sees anything: no state,
    # not seen by clipping, decay, accumulation or norms (optax.partition).
    labels = flat.unflatten([_FROZEN if m is True else _TRAIN for m in masks])
    return optax.partition({_TRAIN: inner, _FROZEN: _zero_updates()}, labels)


def freeze(inner: Any, *, frozen: FrozenSpec) -> optax.GradientTransformationExtraArgs:
    """Wraps an optimizer so that the ``frozen`` leaves and elements never move.

    Whole frozen leaves are routed away *before* ``inner``: they get no optimizer
    state and are never seen by clipping, weight decay, ``optax.MultiSteps``
    accumulators or gradient norms, so trainable leaves evolve exactly as if
    ``inner`` ran on them alone. Element-wise frozen entries are zeroed with
    ``jnp.where`` in the gradient before ``inner`` and in the update after it.
    Frozen updates are ``-0.0``, so ``optax.apply_updates`` keeps frozen bits,
    under ``jax.jit`` and eagerly.

    Unlike ``optax.freeze(mask)``, which only zeroes updates and wraps no
    optimizer, this wraps ``inner`` (as ``optax.selective_transform`` does) and
    accepts element-wise selections; unlike ``optax.masked``, unselected
    updates are never passed through raw.

    Args:
      inner: an optax transformation, or anything with optax's ``init`` /
        ``update`` (e.g. ``optax.MultiSteps``).
      frozen: a selector, or what optax takes: a bool mask tree (a prefix of
        params) or a function ``params -> mask tree``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args reach ``inner``.

    >>> import jax, jax.numpy as jnp, optax
    >>> import jfreeze as jf
    >>> params = {"backbone": jnp.ones(3), "head": jnp.ones(2)}
    >>> tx = jf.freeze(optax.adamw(0.1), frozen=jf.paths("backbone"))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> bool((new["backbone"] == params["backbone"]).all()), bool((new["head"] < 1).all())
    (True, True)
    """
    sel = as_selector(frozen)
    inner = _as_transform(inner)

    def init_fn(params):
        flat, masks = sel.masks(params)
        return _routed(inner, masks, flat).init(params)

    def update_fn(updates, state, params=None, **extra_args):
        flat, masks = sel.masks(updates)
        updates = _zero_elements(updates, masks)
        try:
            updates, state = _routed(inner, masks, flat).update(updates, state, params, **extra_args)
        except ValueError as e:
            if not flat.holes:
                raise
            raise ValueError(
                f"jf.freeze: the updates have no leaf at {describe_paths(flat.holes)} (None, e.g. "
                "the trainable half of jf.split), but the optimizer state does not match that tree. "
                "Build the state from the tree you update, tx.init(trainable), or pass full updates."
            ) from e
        return _zero_elements(updates, masks), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _label_tree(labels: Any, tree: Any, transforms: Mapping) -> Any:
    """Full label tree for ``tree``, checked against ``transforms``."""
    tree_labels, carriers = resolve_labels(
        labels, tree, transforms, who="jf.partition", noun="transform",
        hint=" Map it to None to freeze those leaves.",
    )
    unused = [k for k in transforms if k not in carriers]
    if unused:
        raise ValueError(
            f"jf.partition: the transforms for {', '.join(map(repr, unused))} are used "
            f"by no leaf; labels present: {', '.join(map(repr, carriers))}."
        )
    return tree_labels


def partition(
    transforms: Mapping[Hashable, Any],
    labels: Any | Callable[[Any], Any],
) -> optax.GradientTransformationExtraArgs:
    """Like ``optax.partition``, where a ``None`` transform means frozen.

    Frozen labels get no state and a ``-0.0`` update (bits kept). Every label in
    the tree must have a transform and every transform must be used, else a
    ``ValueError`` names the label and the paths carrying it. For element-wise
    freezing, wrap the result in :func:`freeze`.

    Args:
      transforms: ``{label: transform or None}``.
      labels: a label tree (or a prefix of params), or a function
        ``params -> label tree`` such as :func:`jfreeze.labels`.

    >>> import jax, jax.numpy as jnp, optax
    >>> import jfreeze as jf
    >>> params = {"body": jnp.ones(2), "head": jnp.ones(2), "stem": jnp.ones(2)}
    >>> label_fn = jf.labels({"head": jf.paths("head"), "frozen": jf.paths("stem")},
    ...                      default="body")
    >>> tx = jf.partition({"head": optax.adam(1e-2), "body": optax.adam(1e-4),
    ...                    "frozen": None}, label_fn)
    >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params))
    >>> updates["stem"]
    Array([-0., -0.], dtype=float32)
    """
    if not isinstance(transforms, Mapping) or not transforms:
        raise TypeError("jf.partition takes a non-empty dict {label: transform or None}")
    txs = {
        k: _zero_updates() if v is None else _as_transform(v, f"transform {k!r}")
        for k, v in transforms.items()
    }

    def init_fn(params):
        return optax.partition(txs, _label_tree(labels, params, txs)).init(params)

    def update_fn(updates, state, params=None, **extra_args):
        tx = optax.partition(txs, _label_tree(labels, updates, txs))
        return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
