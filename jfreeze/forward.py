"""Forward-pass helpers: reuse without update, and differentiating only what trains."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jfreeze._tree import compact, leaves_with_paths
from jfreeze.selectors import FrozenSpec, as_selector, everything

__all__ = ["merge", "split", "stop_gradient"]


def stop_gradient(tree: Any, *, frozen: FrozenSpec = everything) -> Any:
    """``jax.lax.stop_gradient`` on the ``frozen`` leaves and elements of ``tree``.

    The values pass through unchanged, so gradients still flow through the
    activations computed from them; only the gradient *into* the frozen
    parameters is zero. Element-wise selections use ``jnp.where`` (never a
    multiplicative mask, which turns ``inf * 0`` into NaN). With no selector,
    everything is stopped; a single array is a tree of one leaf.

    >>> import jax, jax.numpy as jnp
    >>> import jfreeze as jf
    >>> w = jnp.array([1.0, 2.0])
    >>> jax.grad(lambda w: jf.stop_gradient(w).sum() + w.sum())(w)
    Array([1., 1.], dtype=float32)
    >>> f = lambda w: (jf.stop_gradient(w, frozen=jf.elements("", [True, False])) ** 2).sum()
    >>> jax.grad(f)(w)
    Array([0., 4.], dtype=float32)
    """
    flat, masks = as_selector(frozen).masks(tree)
    out = []
    for (_, x), m in zip(flat.entries, masks, strict=True):
        if m is True:
            x = jax.lax.stop_gradient(x)
        elif m is not False:
            x = jnp.where(compact(m), jax.lax.stop_gradient(x), x)
        out.append(x)
    return flat.unflatten(out)


def split(tree: Any, *, frozen: FrozenSpec) -> tuple[Any, Any]:
    """Splits ``tree`` into ``(trainable, frozen)`` trees, ``None`` where the other holds a leaf.

    Differentiate the trainable part only and the frozen weight gradients are
    never built, whatever the step returns (even the global norm of its
    gradients). Leaves are returned as they are, so frozen bits are kept, eagerly
    too. Splitting needs whole leaves: an element-wise selection is an error.

    >>> import jax, jax.numpy as jnp, optax
    >>> import jfreeze as jf
    >>> params = {"backbone": jnp.ones(2), "head": jnp.ones(2)}
    >>> trainable, frozen = jf.split(params, frozen=jf.paths("backbone"))
    >>> trainable
    {'backbone': None, 'head': Array([1., 1.], dtype=float32)}
    >>> loss = lambda t, f: (jf.merge(t, f)["head"] * f["backbone"]).sum()
    >>> grads = jax.grad(loss)(trainable, frozen)   # only the head's gradient
    >>> optax.tree.norm(grads)                      # cheap norm for logging
    Array(1.4142135, dtype=float32)
    """
    flat, masks = as_selector(frozen).masks(tree)
    train, froz = [], []
    for (path, x), m in zip(flat.entries, masks, strict=True):
        if not isinstance(m, bool):
            raise ValueError(
                f"jf.split: the selection takes only some elements of the leaf at path "
                f"{path!r}; a leaf cannot be split. Use jf.stop_gradient(..., frozen=...) "
                "in the forward pass and jf.freeze(...) in the optimizer for elements."
            )
        train.append(None if m else x)
        froz.append(x if m else None)
    return flat.unflatten(train), flat.unflatten(froz)


def merge(trainable: Any, frozen: Any) -> Any:
    """Inverse of :func:`split`: takes each leaf from whichever tree holds it.

    >>> import jfreeze as jf
    >>> jf.merge({"a": 1.0, "b": None}, {"a": None, "b": 2.0})
    {'a': 1.0, 'b': 2.0}
    """
    a, adef = leaves_with_paths(trainable, is_leaf=_is_none)
    b, bdef = leaves_with_paths(frozen, is_leaf=_is_none)
    if adef != bdef:
        only_a = sorted(set(p for p, _ in a) - set(p for p, _ in b))
        only_b = sorted(set(p for p, _ in b) - set(p for p, _ in a))
        where_ = (
            f"path {only_a[0]!r} is only in the trainable tree" if only_a
            else f"path {only_b[0]!r} is only in the frozen tree" if only_b
            else "the node types differ"
        )
        raise ValueError(f"jf.merge: the two trees do not have the same structure: {where_}.")
    out = []
    for (path, x), (_, y) in zip(a, b, strict=True):
        if x is not None and y is not None:
            raise ValueError(
                f"jf.merge: both trees hold a leaf at path {path!r}; split puts None "
                "where the other part holds the leaf."
            )
        out.append(y if x is None else x)
    return adef.unflatten(out)


def _is_none(x: Any) -> bool:
    return x is None
