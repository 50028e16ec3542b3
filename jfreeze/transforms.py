"""Gradient transformations (``freeze``, ``partition``) and the exact ``apply_updates``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jfreeze._routing import (
    FROZEN,
    TRAIN,
    WholeSlices,
    ZeroSlicesState,
    ZeroUpdatesState,
    as_transform,
    check_frozen_slices,
    constant,
    cuts,
    gather,
    layout,
    map_cut,
    neg_zero,
    refuse_lookahead,
    resolve_labels,
    routed,
    scatter,
    zero_updates,
)
from jfreeze._tree import Flat, Mask, compact, describe_paths, is_array, is_placeholder, path_str
from jfreeze.schedules import GradualUnfreezeState
from jfreeze.selectors import FrozenSpec, as_selector

__all__ = [
    "apply_updates",
    "freeze",
    "inner_state",
    "partition",
    "schedule_free_eval_params",
    "set_inner_state",
]

def _zero_elements(tree: Any, masks: list[Mask]) -> Any:
    """``jnp.where(mask, -0.0, x)`` on element-wise frozen leaves (never ``mask * x``)."""
    if all(isinstance(m, bool) for m in masks):
        return tree
    flat = Flat.of(tree)
    out = [
        x if isinstance(m, bool) else jnp.where(compact(m), neg_zero(x.dtype), x)
        for (_, x), m in zip(flat.entries, masks, strict=True)
    ]
    return flat.unflatten(out)


def _uncut(masks: list[Mask], cut: list[WholeSlices | None]) -> list[Mask]:
    """The masks left once the slab-frozen leaves are cut down to their trainable slices."""
    return [False if c is not None else m for m, c in zip(masks, cut, strict=True)]


def _shaped_like(tree: Any, updates: Any) -> bool:
    """An extra arg shaped like the updates (lbfgs's ``grad=``), gathered as they are;
    optax's ``mask_compatible_extra_args`` compares the structure only, the shapes
    tell a scalar ``value=`` from the gradient of a one-array params tree."""
    if jax.tree.structure(tree) != jax.tree.structure(updates):
        return False
    shapes = [jnp.shape(x) for x in jax.tree.leaves(tree)]
    return shapes == [jnp.shape(x) for x in jax.tree.leaves(updates)]


# Extra args that optax calls with (a subtree of) the params: sophia's obj_fn,
# the linesearches' (lbfgs's) value_fn.
_PARAMS_FNS = ("obj_fn", "value_fn")


def _filled_fns(
    extra_args: dict, params: Any, masks: list[Mask] | None = None,
    cut: list[WholeSlices | None] | None = None,
) -> dict:
    """``obj_fn`` / ``value_fn`` that accept the inner optimizer's masked params.

    Inside ``optax.partition`` the inner optimizer sees the other leaves as
    ``MaskedNode``, and only the trainable slices of a leaf frozen in whole
    slices (``cut``); the wrapped function puts the full params' leaves back
    there, the params' frozen slices around the trainable ones, and the params'
    values at element-wise frozen entries (so their gradient and curvature are
    zero) before calling the user's function.
    """
    if params is None or not any(callable(extra_args.get(k)) for k in _PARAMS_FNS):
        return extra_args
    pflat = Flat.of(params)
    n = len(pflat.entries)
    it = iter(zip(masks if masks is not None else [False] * n, cut or [None] * n, strict=True))
    slot_masks = [None if is_placeholder(x) else next(it) for x in pflat.slots]

    def fill(fn):
        @functools.wraps(fn)  # keeps fn's signature: linesearches inspect it for kwargs
        def filled(sub, *args, **kwargs):
            out = []
            given = pflat.treedef.flatten_up_to(sub)
            for s, x, mc in zip(given, pflat.slots, slot_masks, strict=True):
                if isinstance(s, optax.MaskedNode):
                    s = x
                elif mc is not None and mc[1] is not None:
                    s = scatter(s, mc[1], frozen_from=x)
                elif mc is not None and isinstance(mc[0], np.ndarray):
                    s = jnp.where(compact(mc[0]), x, s)
                out.append(s)
            return fn(pflat.treedef.unflatten(out), *args, **kwargs)

        return filled

    return {k: fill(v) if k in _PARAMS_FNS and callable(v) else v for k, v in extra_args.items()}


def _state_mismatch(init: Callable, updates: Any, state: Any) -> str | None:
    """How ``state`` differs from what ``init(updates)`` builds, by param path.

    Finds the params-shaped trees inside the state (moments, accumulators) by the
    updates' key paths, and compares the paths under them: present or not,
    routed (``MaskedNode``: frozen or another label), a hole (``None``), or an
    array of another shape. ``None`` if nothing differs there.
    """
    try:
        expected = jax.eval_shape(init, updates)
    except Exception:  # a diagnosis must never hide the real error
        return None
    keys = {
        tuple(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_placeholder)[0]
        if p
    }
    new = _by_prefix(expected, keys)
    old = _by_prefix(state, keys, set(new))
    if not old:
        return None
    parts = _differences(new, old)
    if not parts and _structure(expected) != _structure(state):
        parts.append(
            "the state was built for a tree with the same paths but other node types (NamedTuple "
            "or dataclass fields reordered, a list where there is now a tuple, ...); the updates "
            f"are {_structure(updates)}. Build the state with tx.init on the "
            "tree you update"
        )
    return "; ".join(parts) or None


def _kind(x: Any) -> Any:
    if x is None:
        return "hole"
    if isinstance(x, optax.MaskedNode):
        return "routed"
    return getattr(x, "shape", ())


def _by_prefix(tree: Any, keys: set, prefixes: set | None = None) -> dict:
    """``{state prefix: {param path: kind}}`` for the params-shaped subtrees of a state:
    found by the params' key paths ``keys``, or at the given ``prefixes``."""
    found: dict = {}
    for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_placeholder)[0]:
        p = tuple(p)
        for i in range(len(p)):
            if (p[i:] in keys) if prefixes is None else (p[:i] in prefixes):
                found.setdefault(p[:i], {})[path_str(p[i:])] = _kind(x)
                break
    return found


def _differences(new: dict, old: dict) -> list[str]:
    """What differs between the state's params-shaped subtrees and those init builds."""
    only_old, only_new, routed_, unrouted, holes, shapes = (set() for _ in range(6))
    for prefix, want in new.items():
        have = old.get(prefix, {})
        only_old |= have.keys() - want.keys()
        only_new |= want.keys() - have.keys()
        for p in want.keys() & have.keys():
            a, b = have[p], want[p]
            if a == b:
                continue
            if b == "hole":
                holes.add(p)
            elif b == "routed":
                routed_.add(p)
            elif a == "routed":
                unrouted.add(p)
            elif a != "hole":
                shapes.add(f"{p!r} ({a} at init, {b} now)")
    parts = []
    for names, what in [
        (only_old, "only in the tree given to init"),
        (only_new, "only in the updates"),
        (unrouted, "routed away (frozen, or another label) at init but not now"),
        (routed_, "routed away (frozen, or another label) now but not at init"),
    ]:
        if names:
            parts.append(f"paths {what}: {describe_paths(sorted(names))}")
    if shapes:
        parts.append("leaves whose shape changed: " + ", ".join(sorted(shapes)[:5]))
    if holes:
        parts.append(
            f"the updates have no leaf at {describe_paths(sorted(holes))} (None, e.g. the "
            "trainable half of jf.split) where the state has one. Build the state from the "
            "tree you update, tx.init(trainable), or pass full updates"
        )
    return parts


def _structure(tree: Any) -> Any:
    return jax.tree_util.tree_structure(tree, is_leaf=is_placeholder)


def _update_checked(who: str, tx, updates, state, params, extra_args):
    """``tx.update``; a failure that is a changed tree is reported by path."""
    try:
        return tx.update(updates, state, params, **extra_args)
    except (ValueError, TypeError) as e:
        why = _state_mismatch(tx.init, updates, state)
        if why is None:
            raise  # the inner optimizer's own error (e.g. adamw without params=)
        raise ValueError(
            f"{who}: the optimizer state does not match the updates (tx.init was given "
            f"another tree, or the selection changed): {why}."
        ) from e


def freeze(inner: Any, *, frozen: FrozenSpec) -> optax.GradientTransformationExtraArgs:
    """Wraps an optimizer so that the ``frozen`` leaves and elements never move.

    Whole frozen leaves are routed away *before* ``inner``: they get no optimizer
    state and are never seen by clipping, weight decay, ``optax.MultiSteps``
    accumulators or gradient norms, so trainable leaves evolve exactly as if
    ``inner`` ran on them alone. Element-wise frozen entries are zeroed with
    ``jnp.where`` in the gradient before ``inner`` and in the update after it,
    except frozen layers of a stack (whole slices along one axis), which are cut
    away before ``inner`` (see below).
    The update of every frozen leaf and element is ``-0.0`` (``-0-0j``).

    **Bits.** To keep every bit of frozen params, apply the updates with
    :func:`jfreeze.apply_updates` (same ``frozen=``), which selects instead of
    adding. ``optax.apply_updates`` adds ``-0.0``, and an add keeps ``±0.0``
    (complex parts too), ``±inf``, ordinary values and f32/f16 quiet-NaN
    payloads, but XLA (measured on CPU, jax 0.10) may flush the rest:
    subnormal f32/bf16 values (and f32 parts of complex64) become ``±0.0``,
    signalling NaNs are quieted (f32 ``0x7f800001 -> 0x7fc00001``, f16
    ``0x7c01 -> 0x7e01``) and bf16 NaNs lose their payload (``0x7fc1 ->
    0x7fc0``). It does so eagerly and whenever the add is really computed:
    element-wise frozen entries, and updates passed into a jitted apply. Only
    whole frozen leaves updated and applied inside one ``jax.jit`` were kept,
    because XLA removes ``x + (-0.0)``; that is an optimisation, not a promise.
    f16 subnormals were kept in every case.

    **Wrap order.** ``jf.freeze`` must be the outermost transform. Wrapped
    from outside, the frozen leaves reach the wrapper: ``optax.chain(jf.freeze(
    scale_by_adam()), optax.scale(-lr))`` turns the ``-0.0`` update into
    ``+0.0`` (``-0.0`` params become ``+0.0`` eagerly); ``optax.MultiSteps(
    jf.freeze(...))`` keeps accumulators for frozen leaves (NaN if a frozen
    gradient is) and its skipped steps update by ``+0.0``;
    ``optax.apply_if_finite(jf.freeze(...))`` checks the frozen gradients too,
    so one NaN frozen gradient skips every step. Write ``jf.freeze(
    optax.chain(...))``, ``jf.freeze(optax.MultiSteps(...))``,
    ``jf.freeze(optax.apply_if_finite(...))``. The one wrapper that goes
    outside is ``optax.lookahead``, whose params are ``LookaheadParams(fast,
    slow)`` while its gradients are shaped like ``fast``: write
    ``optax.lookahead(jf.freeze(...), ...)`` (``jf.freeze`` then sees
    ``params.fast``, with the model's paths) and apply with
    ``jf.apply_updates(params, updates, frozen=jf.paths("*/<pattern>"))``;
    the other way round is a ``TypeError`` saying so.

    **The inner state.** :func:`inner_state` gives the wrapped optimizer's
    state (``inject_hyperparams``' learning rate, a step count),
    :func:`set_inner_state` replaces it, and
    :func:`schedule_free_eval_params` computes schedule-free's evaluation
    params with the frozen leaves passed through.

    **Frozen layers of a stack.** A leaf frozen in whole slices along one axis
    (:func:`jfreeze.layers`, or any element selection of whole layers, rows or
    columns, e.g. ``jf.elements("w", np.s_[:, 0])``) is cut down to its
    trainable slices before ``inner`` (static slices, concatenated in order)
    and put back together after it (frozen slices ``-0.0``): ``inner`` holds
    state shaped like the trainable slices only (Adam: 2 x their bytes), sees
    neither their gradients nor their values, and ``init`` records which slices
    are frozen, so updating with another selection is a ``ValueError`` naming
    the path. :func:`inner_state` then holds arrays shaped like the trainable
    slices. Trainable slices evolve as if ``inner`` ran on them alone, with
    every optimizer below.

    **Element-wise freezing and whole-leaf statistics.** A partly frozen leaf
    whose frozen entries are *not* whole slices along one axis (a diagonal,
    single elements, a block) still reaches ``inner`` whole (frozen entries'
    gradients are zeroed, their values are not hidden), so optimizers that
    scale a leaf's update by its *parameters'* norm or RMS see the frozen
    values: with ``optax.lamb``, ``optax.lars`` and ``optax.adafactor``
    (parameter scale) the trainable entries' updates change when frozen values
    change, and a NaN frozen entry makes them NaN; ``optax.novograd`` (weight
    decay in its moment) can hold NaN state for a NaN frozen entry, without
    changing trainable updates. Element-wise SGD, momentum, Adam(W), Lion,
    RMSProp, Adagrad, AdaBelief and global-norm clipping do not depend on
    frozen values. Whole frozen leaves never reach ``inner``.

    Unlike ``optax.freeze(mask)``, which only zeroes updates and wraps no
    optimizer, this wraps ``inner`` (as ``optax.selective_transform`` does) and
    accepts element-wise selections; unlike ``optax.masked``, unselected
    updates are never passed through raw. ``obj_fn`` (``optax.contrib.sophia``)
    and ``value_fn`` (``optax.lbfgs`` and the linesearches) extra args are
    called by ``inner`` with the frozen leaves and elements filled back in from
    ``params``; extra args shaped like the updates (lbfgs's ``grad=``) are
    routed like them.

    Args:
      inner: an optax transformation, or anything with optax's ``init`` /
        ``update`` (e.g. ``optax.MultiSteps``).
      frozen: a selector, or what optax takes: a bool mask tree (a prefix of
        params) or a function ``params -> mask tree``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra args reach ``inner``.
      ``update`` raises a ``ValueError`` naming the paths if the updates'
      tree (or what the selection freezes) differs from the one given to
      ``init``.

    >>> import jax, jax.numpy as jnp, numpy as np, optax
    >>> import jfreeze as jf
    >>> params = {"backbone": jnp.ones(3), "head": jnp.ones(2)}
    >>> frozen = jf.paths("backbone")
    >>> tx = jf.freeze(optax.adamw(0.1), frozen=frozen)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> new = jf.apply_updates(params, updates, frozen=frozen)
    >>> new["backbone"] is params["backbone"], bool((new["head"] < 1).all())
    (True, True)
    >>> stack = {"layers": jnp.ones((4, 3))}              # frozen layers: no state
    >>> tx = jf.freeze(optax.adam(0.1), frozen=jf.layers("layers", [0, 1]))
    >>> jf.inner_state(tx.init(stack))[0].mu["layers"].shape
    (2, 3)
    """
    sel = as_selector(frozen)
    inner = as_transform(inner)

    def init_fn(params):
        refuse_lookahead(params, "jf.freeze")
        flat, masks = sel.masks(params)
        cut = cuts(flat, masks)
        rest = _uncut(masks, cut)
        return routed(inner, rest, flat, layout(flat, cut)).init(
            map_cut(flat, cut, params, gather))

    def update_fn(updates, state, params=None, **extra_args):
        refuse_lookahead(params, "jf.freeze")
        # like=params: a selector that answers differently on the updates (e.g. a dtype
        # test on bf16 gradients) is an error, never a leaf routed another way than at init.
        flat, masks = sel.masks(updates, like=params)
        cut = cuts(flat, masks)
        frozen_slices = layout(flat, cut)
        check_frozen_slices(state, frozen_slices, "jf.freeze")
        rest = _uncut(masks, cut)  # element masks that are not slabs: jnp.where
        extra_args = _filled_fns(extra_args, params, masks, cut)
        # Static gather of the trainable slices (updates, params, lbfgs's grad=).
        sub = functools.partial(map_cut, flat, cut, fn=gather)
        extra_args = {k: sub(tree=v) if _shaped_like(v, updates) else v
                      for k, v in extra_args.items()}
        tx = routed(inner, rest, flat, frozen_slices)
        new, state = _update_checked("jf.freeze", tx, sub(tree=_zero_elements(updates, rest)),
                                     state, sub(tree=params), extra_args)
        new = map_cut(flat, cut, new, scatter)  # frozen slices: -0.0
        return _zero_elements(new, rest), state

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
        k: zero_updates() if v is None else as_transform(v, f"transform {k!r}")
        for k, v in transforms.items()
    }

    def make(tree):
        # A function, never the label tree itself (optax calls a callable one).
        return optax.partition(
            txs, constant(_label_tree(labels, tree, txs)), mask_compatible_extra_args=True
        )

    def init_fn(params):
        refuse_lookahead(params, "jf.partition")
        return make(params).init(params)

    def update_fn(updates, state, params=None, **extra_args):
        refuse_lookahead(params, "jf.partition")
        extra_args = _filled_fns(extra_args, params)
        return _update_checked("jf.partition", make(updates), updates, state, params, extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _paths_and_holes(tree: Any) -> set[str]:
    flat = Flat.of(tree)
    return set(flat.paths) | set(flat.holes)


def apply_updates(params: Any, updates: Any, *, frozen: FrozenSpec) -> Any:
    """``optax.apply_updates`` that keeps every bit of the ``frozen`` leaves and elements.

    An add cannot keep every bit: XLA flushes subnormals to zero and quiets
    signalling NaNs, so ``p + (-0.0)`` may differ from ``p`` (see
    :func:`freeze`). Here whole frozen leaves are returned as they are (the same
    objects; their update may be anything, ``None`` or ``float0`` included),
    element-wise frozen entries are selected with ``jnp.where(mask, p, p + u)``,
    and trainable leaves are computed by ``optax.apply_updates`` itself, so
    they are exactly what it gives. Leaves that are not arrays and get no update
    (an Equinox module's activation functions) are kept, as in
    ``eqx.apply_updates``. Use the ``frozen=`` given to :func:`freeze`.

    Args:
      params: the parameter tree.
      updates: the updates, shaped like ``params`` (``None`` where ``params``
        holds ``None``; anything at whole frozen leaves).
      frozen: what is frozen: a selector, a bool mask tree or a mask function,
        as everywhere.

    Returns:
      The new params, the same tree structure as ``params``.

    >>> import jax, jax.numpy as jnp, numpy as np, optax
    >>> import jfreeze as jf
    >>> tiny = jnp.array([1e-45, 1.0])                   # a subnormal: XLA's add flushes it
    >>> params = {"backbone": tiny, "head": jnp.ones(2)}
    >>> frozen = jf.paths("backbone") | jf.elements("head", np.s_[0])
    >>> tx = jf.freeze(optax.sgd(0.5), frozen=frozen)
    >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params))
    >>> new = jf.apply_updates(params, updates, frozen=frozen)
    >>> new["backbone"] is params["backbone"], new["head"]
    (True, Array([1. , 0.5], dtype=float32))
    >>> optax.apply_updates(params, updates)["backbone"]  # an add: 1e-45 is flushed
    Array([0., 1.], dtype=float32)
    """
    flat, masks = as_selector(frozen).masks(params)
    try:
        slots = flat.treedef.flatten_up_to(updates)
    except (ValueError, TypeError):
        have, want = _paths_and_holes(updates), _paths_and_holes(params)
        raise ValueError(
            "jf.apply_updates: the updates do not have the structure of the params; "
            f"paths only in the params: {describe_paths(sorted(want - have)) or 'none'}; "
            f"only in the updates: {describe_paths(sorted(have - want)) or 'none'}."
        ) from None
    ups = [u for x, u in zip(flat.slots, slots, strict=True) if not is_placeholder(x)]
    out = []
    for (path, p), u, m in zip(flat.entries, ups, masks, strict=True):
        if m is True or (is_placeholder(u) and not is_array(p)):
            out.append(p)  # frozen, or not an array (an Equinox activation): kept as is
            continue
        what = "trainable" if m is False else "partly frozen"
        if is_placeholder(u) or getattr(u, "dtype", None) == jax.dtypes.float0:
            kind = "None" if u is None else type(u).__name__ if is_placeholder(u) else "float0"
            raise ValueError(
                f"jf.apply_updates: the {what} leaf at path {path!r} has no update ({kind}); "
                "only frozen leaves may lack one."
            )
        new: Any = optax.apply_updates(p, u)
        if jnp.shape(new) != jnp.shape(p):  # optax's add broadcasts p up to u's shape
            raise ValueError(
                f"jf.apply_updates: the update at path {path!r} has shape {jnp.shape(u)}, "
                f"which would turn the {what} leaf of shape {jnp.shape(p)} into "
                f"{jnp.shape(new)}; updates must be shaped like the params."
            )
        out.append(new if m is False else _select(compact(m), p, new))
    return flat.unflatten(out)


def _select(mask: np.ndarray, p: Any, new: Any) -> jax.Array:
    """``jnp.where(mask, p, new)`` bit for bit: XLA's CPU select on bf16 goes
    through f32 and drops NaN payloads, so real floats are selected as uints."""
    p = jnp.asarray(p)
    if not jnp.issubdtype(p.dtype, jnp.floating):
        return jnp.where(mask, p, new)  # complex and ints: measured exact
    uint = jnp.dtype(f"uint{8 * p.dtype.itemsize}")
    as_uint = lambda x: jax.lax.bitcast_convert_type(x, uint)  # noqa: E731
    return jax.lax.bitcast_convert_type(jnp.where(mask, as_uint(p), as_uint(new)), p.dtype)


# --------------------------------------------------------------------------
# Reaching into the state: the inner optimizer's state and schedule-free evaluation.


def _jfreeze_states_in(state: Any) -> list[str]:
    """Where jfreeze states sit inside a wrapper's state: ``state[0]``, ``state.fast_state``."""
    kinds = (optax.PartitionState, GradualUnfreezeState)
    found = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, kinds) and x is not state)[0]
    return [f"state{jax.tree_util.keystr(p, simple=False)}" for p, x in found
            if isinstance(x, kinds)]


def _inner_key(state: Any, label: Any, who: str) -> tuple[Any, Hashable]:
    """The ``optax.PartitionState`` inside a jfreeze state, and the key of ``label``'s state."""
    gradual = isinstance(state, GradualUnfreezeState)
    part = state.inner if gradual else state
    if not isinstance(part, optax.PartitionState):
        inside = _jfreeze_states_in(state)
        raise TypeError(
            f"{who} takes the state of jf.freeze, jf.partition or jf.gradual_unfreeze, got "
            f"{type(state).__name__}. "
            + (f"It holds one at {', '.join(inside)}: pass that (and, for set_inner_state, "
               "put the result back there)." if inside else
               "Inside a wrapper (optax.chain, optax.MultiSteps, optax.lookahead), pass the "
               "wrapper's field that holds it (e.g. state.fast_state).")
        )
    states: Mapping[Any, Any] = part.inner_states
    keys = list(states)
    if label is None:
        # jf.freeze (and jf.gradual_unfreeze): 'trainable' is the one inner state.
        if TRAIN in keys and set(keys) <= {TRAIN, FROZEN}:
            return part, TRAIN
        # A frozen label's state is a ZeroUpdatesState; a stateless optimizer's
        # (optax.scale) is optax's own, and is a label as any other.
        frozen_states = (ZeroUpdatesState, ZeroSlicesState)
        live = [k for k in keys if not isinstance(states[k].inner_state, frozen_states)]
        if len(live) == 1:
            return part, live[0]
        raise ValueError(
            f"{who}: this state holds one inner state per label ({', '.join(map(repr, keys))}); "
            "pass the label, e.g. jf.inner_state(state, label)."
        )
    key = f"thaw@{label}" if gradual and isinstance(label, int) else label
    if key not in keys:
        raise ValueError(
            f"{who}: no inner state for label {label!r}; labels: {', '.join(map(repr, keys))}."
        )
    return part, key


def inner_state(state: Any, label: Hashable | None = None) -> Any:
    """The state of the optimizer wrapped by :func:`freeze`, :func:`partition` or
    :func:`jfreeze.gradual_unfreeze`, as that optimizer would hold it alone.

    Use it where optax code reads an optimizer's own state: ``inject_hyperparams``'
    ``.hyperparams["learning_rate"]`` (read it, or set it in place as optax's
    docs do), a step count, ``optax.tree_utils.tree_get(jf.inner_state(state, label),
    ...)`` per label. Params-shaped fields (moments, schedule-free's ``z``) hold
    ``optax.MaskedNode()`` at the leaves routed away from this optimizer
    (frozen, or another label), and arrays shaped like the trainable slices at
    leaves frozen in whole slices (``jf.layers``). The returned object *is* the one inside
    ``state``; for a new state with it replaced, see :func:`set_inner_state`.
    With one inner optimizer (``jf.freeze``, ``jf.gradual_unfreeze``)
    ``optax.tree_utils.tree_get`` / ``tree_set`` also work on the whole state.

    Args:
      state: the state of ``jf.freeze``, ``jf.partition`` or
        ``jf.gradual_unfreeze``.
      label: which inner optimizer: a ``jf.partition`` label; with
        ``gradual_unfreeze(per_stage=True)`` the thaw step (an int). ``None``
        where there is one (``jf.freeze``, ``jf.gradual_unfreeze``, a
        ``jf.partition`` with one non-frozen label).

    Returns:
      The inner optimizer's state.

    >>> import jax.numpy as jnp, optax
    >>> import jfreeze as jf
    >>> params = {"backbone": jnp.ones(3), "head": jnp.ones(2)}
    >>> tx = jf.freeze(optax.inject_hyperparams(optax.adam)(learning_rate=0.1),
    ...                frozen=jf.paths("backbone"))
    >>> state = tx.init(params)
    >>> jf.inner_state(state).hyperparams["learning_rate"]
    Array(0.1, dtype=float32)
    >>> jf.inner_state(state).hyperparams["learning_rate"] = 0.01   # as in optax
    >>> jf.inner_state(state).inner_state[0].mu
    {'backbone': MaskedNode(), 'head': Array([0., 0.], dtype=float32)}
    """
    part, key = _inner_key(state, label, "jf.inner_state")
    return part.inner_states[key].inner_state


def set_inner_state(state: Any, new: Any, label: Hashable | None = None) -> Any:
    """``state`` with the inner optimizer's state (see :func:`inner_state`) replaced by ``new``.

    Functional, like ``optax.tree_utils.tree_set``: ``state`` is not changed.
    ``new`` must have the tree structure of the state it replaces (a
    ``ValueError`` says so otherwise), e.g. the result of ``tree_set`` on it.

    Args:
      state: the state of ``jf.freeze``, ``jf.partition`` or ``jf.gradual_unfreeze``.
      new: the new inner state.
      label: as in :func:`inner_state`.

    Returns:
      A new state of the same structure.

    >>> import jax.numpy as jnp, optax
    >>> import jfreeze as jf
    >>> params = {"body": jnp.ones(2), "head": jnp.ones(2)}
    >>> adam = optax.inject_hyperparams(optax.adam)
    >>> tx = jf.partition({"body": adam(1e-4), "head": adam(1e-2)},
    ...                   {"body": "body", "head": "head"})
    >>> state = tx.init(params)
    >>> head = optax.tree_utils.tree_set(jf.inner_state(state, "head"), learning_rate=1e-3)
    >>> state = jf.set_inner_state(state, head, "head")
    >>> float(jf.inner_state(state, "head").hyperparams["learning_rate"])
    0.001
    """
    part, key = _inner_key(state, label, "jf.set_inner_state")
    old = part.inner_states[key]
    before, after = jax.tree.structure(old.inner_state), jax.tree.structure(new)
    if before != after:
        raise ValueError(
            f"jf.set_inner_state: the new state of label {key!r} has another tree structure "
            f"than the one it replaces: {after} instead of {before}."
        )
    part = part._replace(inner_states={**part.inner_states, key: old._replace(inner_state=new)})
    return state._replace(inner=part) if isinstance(state, GradualUnfreezeState) else part


def schedule_free_eval_params(state: Any, params: Any, *, frozen: FrozenSpec) -> Any:
    """``optax.contrib.schedule_free_eval_params`` through a jfreeze state.

    Every ``optax.contrib.schedule_free`` state inside ``state`` (one for
    ``jf.freeze``, one per label or stage for ``jf.partition`` and
    ``jf.gradual_unfreeze(per_stage=True)``, also inside ``optax.MultiSteps``
    or a chain) gives the evaluation params of the leaves it trains, computed
    by optax's own function; every other leaf, and every ``frozen`` leaf and
    element, is ``params``' own (the same object, or its bits selected).
    Frozen elements must be named: the schedule-free sequence ``z`` moves
    there under weight decay even though their update is ``-0.0``.

    Args:
      state: the state of ``jf.freeze``, ``jf.partition`` or
        ``jf.gradual_unfreeze`` (or any optax state holding a
        ``ScheduleFreeState``).
      params: the current (training) params, the full tree.
      frozen: the ``frozen=`` given to :func:`freeze` (``jf.nothing`` for a
        ``jf.partition`` whose frozen labels are ``None``).

    Returns:
      The params to evaluate, shaped like ``params``.

    >>> import jax, jax.numpy as jnp, optax
    >>> import jfreeze as jf
    >>> params = {"backbone": jnp.ones(2), "head": jnp.ones(2)}
    >>> frozen = jf.paths("backbone")
    >>> tx = jf.freeze(optax.contrib.schedule_free_sgd(0.5), frozen=frozen)
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...     updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    ...     params = jf.apply_updates(params, updates, frozen=frozen)
    >>> jf.schedule_free_eval_params(state, params, frozen=frozen)
    {'backbone': Array([1., 1.], dtype=float32), 'head': Array([0.25, 0.25], dtype=float32)}
    """
    who = "jf.schedule_free_eval_params"
    flat, masks = as_selector(frozen).masks(params)
    found = optax.tree_utils.tree_get_all_with_path(state, "ScheduleFreeState")
    if not found:
        raise ValueError(
            f"{who}: the state holds no optax.contrib.schedule_free state (ScheduleFreeState); "
            f"got {type(state).__name__}."
        )
    out: list[Any] = list(flat.leaves)
    owner: list[str | None] = [None] * len(out)
    cut = cuts(flat, masks)
    for where_, sf in found:
        for i, x in _eval_leaves(flat, cut, sf, who):
            here = jax.tree_util.keystr(where_)
            if owner[i] is not None:
                raise ValueError(f"{who}: two schedule-free states train the leaf at path "
                                 f"{flat.paths[i]!r}: {owner[i]} and {here}.")
            owner[i], out[i] = here, x
    for i, ((_, p), m) in enumerate(zip(flat.entries, masks, strict=True)):
        if m is True:
            out[i] = p
        elif m is not False:
            out[i] = _select(compact(m), p, out[i])
    return flat.unflatten(out)


def _eval_leaves(
    flat: Flat, cut: list[WholeSlices | None], sf: Any, who: str
) -> list[tuple[int, Any]]:
    """``(leaf index, eval value)`` for the leaves one schedule-free state trains;
    a leaf frozen in whole slices (``cut``) is cut to its trainable slices for
    optax's function and put back together around the params' frozen slices."""
    try:
        z = flat.treedef.flatten_up_to(sf.z)
    except (ValueError, TypeError):
        have, want = _paths_and_holes(sf.z), _paths_and_holes(flat.tree)
        raise ValueError(
            f"{who}: the params do not have the structure of the state's z; paths only in the "
            f"params: {describe_paths(sorted(want - have)) or 'none'}; only in the state: "
            f"{describe_paths(sorted(have - want)) or 'none'}."
        ) from None
    real = [i for i, s in enumerate(flat.slots) if not is_placeholder(s)]
    by_slot = dict(zip(real, cut, strict=True))
    # optax's own function, on the params with MaskedNode where z has one.
    sub = []
    for i, (s, zi) in enumerate(zip(flat.slots, z, strict=True)):
        if not is_placeholder(s) and not is_placeholder(zi):
            c = by_slot[i]
            s = s if c is None else gather(s, c)
            if jnp.shape(s) != jnp.shape(zi):
                raise ValueError(
                    f"{who}: the state's z at path {flat.paths[real.index(i)]!r} has shape "
                    f"{jnp.shape(zi)}, the params {jnp.shape(s)} there; pass the frozen= given "
                    "to jf.freeze (a leaf frozen in whole slices holds state for the trainable "
                    "slices only).")
        sub.append(s if is_placeholder(s) else (optax.MaskedNode() if is_placeholder(zi) else s))
    ev = flat.treedef.flatten_up_to(optax.contrib.schedule_free_eval_params(
        sf, flat.treedef.unflatten(sub)))
    out = []
    for n, i in enumerate(real):
        c = by_slot[i]
        if not is_placeholder(ev[i]):
            out.append((n, ev[i] if c is None else scatter(ev[i], c, flat.slots[i])))
    return out
