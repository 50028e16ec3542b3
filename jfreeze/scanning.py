"""Running a stack of layers so that frozen layers get no weight gradients: ``jf.scan``."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jfreeze._tree import Flat, Mask, compact, runs
from jfreeze.selectors import FrozenSpec, as_selector, nothing

__all__ = ["scan"]


def scan(
    f: Callable[[Any, Any], tuple[Any, Any]],
    init: Any,
    xs: Any = None,
    length: int | None = None,
    *,
    frozen: FrozenSpec,
    path: str | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
) -> tuple[Any, Any]:
    """``jax.lax.scan`` over a stack of layers whose ``frozen`` layers get no weight gradients.

    A drop-in for ``jax.lax.scan(f, init, xs, length, reverse=, unroll=)`` where
    ``xs`` holds stacked parameters (one array per parameter, layers on axis 0).
    Masking the stack (``jf.stop_gradient(xs, frozen=...)``) gives zero
    gradients to the frozen layers but still computes them, because one scan
    body serves every layer. ``jf.scan`` runs each maximal run of consecutive
    layers that are frozen alike as its own ``lax.scan`` over static slices,
    with the frozen leaves of that run under ``jax.lax.stop_gradient``, and
    threads the carry through the runs. The compiled step then computes no
    weight gradient for a frozen layer, only the input gradients that
    trainable layers below it need; a frozen run at the input, with nothing
    trainable before it, has no backward pass at all. Values and gradients
    equal those of ``lax.scan`` on the masked stack.

    Per leaf of ``xs``: a whole frozen leaf is stopped in every layer; a
    selection of whole layers (``jf.layers``, or any element mask selecting
    whole slices along axis 0) splits the scan into runs; any other element
    mask (a column of every layer's kernel) is applied with ``jnp.where`` per
    run, exactly but without saving compute.

    Args:
      f, init, xs, length, reverse, unroll: as in ``jax.lax.scan``.
      frozen: what is frozen, anything ``frozen=`` takes (a selector, a mask
        tree, a mask function), evaluated on ``xs``.
      path: where ``xs`` sits in the full parameter tree (``"decoder/layers"``):
        ``frozen`` is evaluated on ``{path: xs}``, so the selector given to
        ``jf.freeze`` on the full params works as is (a mask tree is then a
        prefix of ``{path: xs}``). Each strict pattern in ``frozen`` must match
        a leaf of ``xs``; for a selector with patterns for other parts of the
        model, pass its mask of the stack, ``frozen=sel(params)["decoder"]["layers"]``,
        without ``path``.

    Returns:
      ``(carry, ys)`` as ``jax.lax.scan``, ``ys`` stacked in layer order.

    Raises:
      ValueError: naming the path, when ``frozen`` selects something but
        ``xs`` is None, a strict pattern matches no leaf of ``xs``, or a leaf
        of ``xs`` has no layer axis of the stack's length.

    >>> import jax, jax.numpy as jnp
    >>> import jfreeze as jf
    >>> params = {"w": jnp.full((4, 2, 2), 0.5)}            # 4 stacked layers
    >>> layer = lambda h, p: (jnp.tanh(h @ p["w"]), None)
    >>> def loss(params):
    ...     h, _ = jf.scan(layer, jnp.ones(2), params, path="layers",
    ...                    frozen=jf.layers("layers/**", [0, 1]))
    ...     return h.sum()
    >>> g = jax.grad(loss)(params)["w"]
    >>> [bool(g[i].any()) for i in range(4)]
    [False, False, True, True]
    """
    tree, unwrap = ({path: xs}, lambda t: t[path]) if path else (xs, lambda t: t)
    if xs is None:
        if frozen is nothing or frozen is False:
            return jax.lax.scan(f, init, None, length, reverse=reverse, unroll=unroll)
        raise ValueError(
            f"jf.scan(frozen={frozen!r}) with xs=None{_at(path)}: there are no stacked "
            "layers to freeze. Pass the stacked parameters as xs (the frozen layers are "
            "their slices along axis 0), or frozen=jf.nothing."
        )
    flat, masks = _evaluate(frozen, tree, path)
    n = _stack_length(flat, length)
    plans = [_LeafPlan.of(m, n, x.shape) for m, x in zip(masks, flat.structs, strict=True)]
    cuts = sorted({start for p in plans for start, _, _ in runs(p.whole)} | {n})
    pieces = list(itertools.pairwise(cuts))
    if len(pieces) <= 1 and not any(p.frozen for p in plans):
        return jax.lax.scan(f, init, xs, length, reverse=reverse, unroll=unroll)
    # One lax.scan per run: a run's body treats its frozen leaves as constants, so autodiff
    # builds no weight gradient for them (one body for all layers would compute them all).
    carry, ys = init, {}
    for start, stop in reversed(pieces) if reverse else pieces:
        leaves = [p.cut(x, start, stop, n) for p, (_, x) in zip(plans, flat.entries, strict=True)]
        run_xs = unwrap(flat.unflatten(leaves))
        carry, ys[start] = jax.lax.scan(
            f, carry, run_xs, stop - start, reverse=reverse, unroll=unroll)
    parts = [ys[start] for start, _ in pieces]
    if len(parts) == 1:
        return carry, parts[0]
    return carry, jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *parts)


def _evaluate(frozen: FrozenSpec, tree: Any, path: str | None) -> tuple[Flat, list[Mask]]:
    sel = as_selector(frozen)
    try:
        flat, masks = sel.masks(tree)
    except ValueError as e:
        if not path or "matches no leaf" not in str(e):
            raise
        # a selector written for the whole model: say how to give it to the stack
        raise ValueError(
            f"{e} jf.scan sees only the stack at path {path!r}. For a selector with "
            "patterns for other parts of the model, pass its mask of the stack instead, "
            "without path=: frozen=sel(params)[...] (the stack's subtree)."
        ) from None
    _check_layer_axes(sel, flat)
    return flat, masks


def _layer_selections(sel: Any) -> Any:
    """The ``jf.layers`` parts of a selector (duck-typed: a glob, an index and an axis)."""
    if all(hasattr(sel, a) for a in ("glob", "index", "axis")):
        yield sel
    for part in getattr(sel, "parts", ()):
        yield from _layer_selections(part)


def _check_layer_axes(sel: Any, flat: Flat) -> None:
    """A ``jf.layers`` on another axis than the scanned one would freeze other slices."""
    for part in _layer_selections(sel):
        for p, x in zip(flat.paths, flat.structs, strict=True):
            ndim = len(getattr(x, "shape", ()))
            if ndim and part.axis % ndim != 0 and part.leaf_mask(p, x) is not False:
                raise ValueError(
                    f"jf.scan: {part!r} selects layers on axis {part.axis} of the leaf at "
                    f"path {p!r} (shape {tuple(x.shape)}), but jf.scan runs the layers on "
                    "axis 0. Move the stack's layer axis to 0 (jnp.moveaxis) and select "
                    "with axis=0; jf.flax.scan does this for variable_axes={'params': 1}."
                )


def _at(path: str | None) -> str:
    return f" (stack at path {path!r})" if path else ""


def _stack_length(flat: Flat, length: int | None) -> int:
    """The number of layers: axis 0 of every array of ``xs`` (and ``length``)."""
    seen: tuple[str, int] | None = ("length", length) if length is not None else None
    for path, x in flat.entries:
        for a in jax.tree.leaves(x):
            shape = tuple(np.shape(a))
            if not shape:
                raise ValueError(
                    f"jf.scan: the leaf at path {path!r} is a scalar, with no layer axis; "
                    "every leaf of xs is stacked along axis 0.")
            if seen is None:
                seen = (path, shape[0])
            elif shape[0] != seen[1]:
                raise ValueError(
                    f"jf.scan: the leaf at path {path!r} has {shape[0]} layers on axis 0 "
                    f"(shape {shape}), but {seen[0]!r} has {seen[1]}. jf.scan scans axis 0; "
                    "move a stack kept on another axis there first (jnp.moveaxis).")
    if seen is None:
        raise ValueError("jf.scan: xs has no arrays and no length is given.")
    return int(seen[1])


class _LeafPlan:
    """How one leaf of ``xs`` is frozen, layer by layer.

    ``whole[i]``: layer ``i`` of the leaf is frozen entirely (run boundaries
    come from these); ``elements``: the compact element mask, for layers that
    are only partly frozen (``jnp.where`` keeps their trainable elements).
    """

    def __init__(self, whole: np.ndarray, elements: np.ndarray | None):
        self.whole = whole
        self.elements = elements
        self.frozen = bool(whole.any()) or elements is not None

    @classmethod
    def of(cls, m: Mask, n: int, shape: tuple[int, ...]) -> _LeafPlan:
        if isinstance(m, bool):
            return cls(np.full(n, m), None)
        c = compact(np.broadcast_to(m, shape))
        per_layer = c.reshape(c.shape[0], -1) if c.ndim else c.reshape(1, 1)
        whole = np.broadcast_to(per_layer.all(axis=1), (n,)).copy()
        partial = bool((per_layer.any(axis=1) & ~per_layer.all(axis=1)).any())
        return cls(whole, c if partial else None)

    def cut(self, x: Any, start: int, stop: int, n: int) -> Any:
        """Layers ``start:stop`` of ``x``, frozen ones under stop_gradient."""
        if (start, stop) != (0, n):
            x = jax.tree.map(lambda a: jax.lax.slice_in_dim(a, start, stop, axis=0), x)
        if self.whole[start:stop].all():
            return jax.tree.map(jax.lax.stop_gradient, x)
        if self.elements is None:
            return x
        m = self.elements
        m = m[start:stop] if m.ndim and m.shape[0] > 1 else m
        if not m.any():
            return x
        return jax.tree.map(lambda a: jnp.where(m, jax.lax.stop_gradient(a), a), x)
