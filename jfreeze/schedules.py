"""Gradual unfreezing: a freeze that changes with the step count, inside one compiled step."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jfreeze._routing import (
    WholeSlices,
    as_transform,
    check_frozen_slices,
    constant,
    cuts,
    gather,
    layout,
    map_cut,
    neg_zero,
    refuse_lookahead,
    routed,
    scatter,
    zero_updates,
)
from jfreeze._tree import Flat, Mask, compact, simplify
from jfreeze.selectors import Selector, as_selector

__all__ = ["GradualUnfreezeState", "gradual_unfreeze", "thawed_value_and_grad"]

_NEVER = np.iinfo(np.int64).max  # thaw step of a leaf (or element) that no stage thaws
_INT32_MAX = int(np.iinfo(np.int32).max)


class GradualUnfreezeState(NamedTuple):
    """State of :func:`gradual_unfreeze`: the step count and the inner state."""

    count: jax.Array  # int32: how many updates have been applied
    inner: Any


def _stages(thaw: Any, name: str = "jf.gradual_unfreeze") -> tuple[tuple[int, Selector], ...]:
    """``{step: selection}`` or ``[(step, selection), ...]`` as sorted, checked pairs."""
    items = list(thaw.items()) if isinstance(thaw, Mapping) else list(thaw)
    if not items:
        raise ValueError(f"{name}: thaw= is empty; give {{step: selection, ...}}")
    out: dict[int, Selector] = {}
    for item in items:
        try:
            step, sel = item
        except (TypeError, ValueError):
            raise TypeError(
                f"{name}: thaw= takes {{step: selection}} or [(step, selection), "
                f"...]; got the entry {item!r}"
            ) from None
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
            raise TypeError(
                f"{name}: thaw steps are Python ints (the schedule is static), "
                f"got {step!r}"
            )
        if not 0 <= int(step) <= _INT32_MAX:
            raise ValueError(f"{name}: thaw step {step} is not in [0, 2**31 - 1]")
        if int(step) in out:
            raise ValueError(f"{name}: thaw step {step} is given twice")
        out[int(step)] = as_selector(sel)
    return tuple(sorted(out.items()))


def _thaw_steps(stages: Sequence[tuple[int, Selector]], flat: Flat) -> list[Any]:
    """Per leaf: the step from which it trains (int, ``_NEVER``, or an int64 array of them)."""
    steps: list[Any] = [_NEVER] * len(flat.entries)
    # Later stages first, so that an earlier stage overwrites: a leaf thaws at the
    # first step whose selection takes it, and stays thawed.
    for step, sel in reversed(stages):
        for i, m in enumerate(sel.evaluate(flat)):
            if m is True:
                steps[i] = step
            elif m is not False:
                steps[i] = np.where(m, step, steps[i]).astype(np.int64)
    out = []
    for s in steps:
        if isinstance(s, np.ndarray) and (s == s.flat[0]).all():
            s = int(s.flat[0])
        out.append(s)
    return out


def _gate(x: Any, is_open: Any) -> Any:
    """``x`` where the leaf (or element) has thawed, ``-0.0`` elsewhere (keeps bits)."""
    return jnp.where(is_open, x, neg_zero(x.dtype))


def _is_open(count: jax.Array, step: Any) -> Any:
    """Traced bool (scalar or small compacted array): has this leaf/element thawed?"""
    if not isinstance(step, np.ndarray):
        return count >= step
    never = compact(step == _NEVER)
    steps = jnp.asarray(compact(np.where(step == _NEVER, 0, step)).astype(np.int32))
    is_open = count >= steps
    return is_open if not never.any() else jnp.logical_and(is_open, ~never)


def _gate_tree(tree: Any, flat: Flat, opens: list[Any]) -> Any:
    if all(o is None for o in opens):
        return tree
    pairs = zip(Flat.of(tree).leaves, opens, strict=True)
    leaves = [x if o is None else _gate(x, o) for x, o in pairs]
    return flat.unflatten(leaves)


def _held(inner: optax.GradientTransformationExtraArgs, is_open: jax.Array):
    """``inner`` whose state is kept at its initial value until ``is_open``."""

    def update(updates, state, params=None, **extra_args):
        new_updates, new_state = inner.update(updates, state, params, **extra_args)
        new_state = optax.tree.where(is_open, new_state, state)
        return jax.tree.map(lambda u: _gate(u, is_open), new_updates), new_state

    return optax.GradientTransformationExtraArgs(inner.init, update)


def gradual_unfreeze(
    inner: Any,
    *,
    thaw: Mapping[int, Any] | Sequence[tuple[int, Any]],
    per_stage: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Thaws parts of the model at given steps, inside one compiled step (ULMFiT-style).

    ``thaw={0: head, 1000: top_block, 2000: jf.everything}`` trains the head
    from the start, the top block from step 1000 on and everything from step
    2000 on. A leaf (or element) trains from the first step whose selection
    takes it and stays trainable; what no stage takes is frozen for good and,
    as in :func:`jfreeze.freeze`, routed away before ``inner`` (no state): whole
    leaves, and the slices of a stack that no stage thaws (``jf.layers``; the
    state then holds the other slices only).

    The step count lives in the state (a :class:`GradualUnfreezeState`), so
    the schedule is a traced ``count >= step`` comparison: one compilation for
    the whole run, no re-initialisation. Until a leaf thaws, its gradient is
    zeroed before ``inner`` and its update after (``jnp.where``, never a
    multiplicative mask): its update is ``-0.0``, which ``optax.apply_updates``
    adds, keeping its bits as far as an add does (ordinary values, ``±0.0``,
    ``±inf``; see :func:`jfreeze.freeze` for the subnormals and NaN payloads an
    add may flush; the gate is traced, so :func:`jfreeze.apply_updates` can
    select only what no stage thaws), and its moments stay at their
    initial values (zero for sgd/momentum/adam/adamw/lion/rmsprop, whose state
    updates map zero gradients to zero; adafactor, for one, adds an epsilon).

    One compilation has a compute price if the step uses plain
    ``jax.value_and_grad``: ``jnp.where`` on a traced step is not dead code, so
    the step computes the weight gradients of every leaf that ever thaws from
    step 0 (in ``examples/gradual_unfreezing.py``, 2.22x the FLOPs of the head's
    gradients during the first stage). :func:`thawed_value_and_grad` with the
    same ``thaw=`` differentiates only what has thawed. Leaves no stage thaws
    are routed away and their gradients are dead code, as with
    :func:`jfreeze.freeze`.

    Shared versus per-stage state: by default there is one ``inner`` state for
    all leaves, so a step counter inside ``inner`` is shared, and global
    transforms (``clip_by_global_norm``) see every thawed leaf at once. Adam's
    bias correction then treats a leaf thawed at step T as if its moments had
    been averaging zeros for T steps: with the default betas its first update
    is 0.58x a fresh Adam's for T = 3 or 30, 1.6x for T = 300, 2.5x for
    T = 1000 and ``(1 - b1) / sqrt(1 - b2)`` = 3.2x for large T; ten steps
    later it is up to 6.6x, and 1.26x still after 1000 steps (measured with
    unit-mean gradients). With ``per_stage=True`` each thaw
    stage gets its own ``inner`` state, held at its initial value until the
    stage thaws, so a thawed leaf trains exactly as a fresh ``inner`` started at
    its thaw step (bias correction, and any schedule inside ``inner``, restart
    there). The price: transforms that look across leaves (global-norm
    clipping, ``optax.MultiSteps``) see one stage's leaves at a time. For
    sgd and momentum the two modes are identical.

    Args:
      inner: an optax transformation, or anything with optax's
        ``init``/``update``. The count counts ``update`` calls.
      thaw: ``{step: selection}`` (or a list of ``(step, selection)`` pairs):
        from ``step`` on, the selected leaves or elements train. A selection
        is anything ``frozen=`` accepts, here pointing at what thaws.
      per_stage: one ``inner`` state per stage, started at its thaw step (see
        above). An element-wise leaf belongs to the stage of its first thawed
        element.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`GradualUnfreezeState`.

    >>> import jax.numpy as jnp, optax
    >>> import jfreeze as jf
    >>> params = {"body": jnp.ones(2), "head": jnp.ones(2)}
    >>> tx = jf.gradual_unfreeze(optax.sgd(0.5), thaw={0: jf.paths("head"), 2: jf.paths("body")})
    >>> state = tx.init(params)
    >>> grads = {"body": jnp.ones(2), "head": jnp.ones(2)}
    >>> for _ in range(3):
    ...     updates, state = tx.update(grads, state, params)
    ...     params = optax.apply_updates(params, updates)
    >>> params["head"], params["body"], state.count       # body trained in step 2 only
    (Array([-0.5, -0.5], dtype=float32), Array([0.5, 0.5], dtype=float32), Array(3, dtype=int32))
    """
    stages = _stages(thaw)
    inner = as_transform(inner)

    def init_fn(params):
        refuse_lookahead(params, "jf.gradual_unfreeze")
        flat = Flat.of(params)
        count = jnp.zeros([], jnp.int32)
        steps = _thaw_steps(stages, flat)
        cut = cuts(flat, [_never(s) for s in steps])
        tx = _inner_tx(inner, flat, steps, cut, count, per_stage)
        return GradualUnfreezeState(count=count, inner=tx.init(map_cut(flat, cut, params, gather)))

    def update_fn(updates, state, params=None, **extra_args):
        refuse_lookahead(params, "jf.gradual_unfreeze")
        flat = Flat.of(updates)
        steps = _thaw_steps(stages, flat)
        # Slices no stage thaws (layers of a stack) are cut away before inner, as in
        # jf.freeze: no state, not seen by norms or clipping.
        cut = cuts(flat, [_never(s) for s in steps])
        check_frozen_slices(state.inner, layout(flat, cut), "jf.gradual_unfreeze")
        count = state.count
        opens = [None if _settled(s) else _is_open(count, s) for s in steps]
        sub = functools.partial(map_cut, flat, cut, fn=gather)
        updates = sub(tree=_gate_tree(updates, flat, opens))
        tx = _inner_tx(inner, flat, steps, cut, count, per_stage)
        updates, inner_state = tx.update(updates, state.inner, sub(tree=params), **extra_args)
        updates = _gate_tree(map_cut(flat, cut, updates, scatter), flat, opens)
        new_count = cast(jax.Array, optax.safe_increment(count))
        return updates, GradualUnfreezeState(new_count, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _never(step: Any) -> Mask:
    """The leaf's (or its elements') mask of what no stage thaws."""
    return simplify(step == _NEVER) if isinstance(step, np.ndarray) else step == _NEVER


def _settled(step: Any) -> bool:
    """Trains from the start, or never: no gate needed (``routed`` handles never)."""
    return isinstance(step, int) and step in (0, _NEVER)


def _stage_of(step: Any) -> str:
    """The stage label of a leaf's thaw step(s): ``thaw@<first step>`` or ``frozen``."""
    if isinstance(step, np.ndarray):
        step = int(step.min())
    return "frozen" if step == _NEVER else f"thaw@{step}"


def _inner_tx(
    inner: optax.GradientTransformationExtraArgs, flat: Flat, steps: list[Any],
    cut: list[WholeSlices | None], count: jax.Array, per_stage: bool,
) -> optax.GradientTransformationExtraArgs:
    """``inner`` with what no stage thaws routed away (whole leaves; slices are
    ``cut`` away by the caller, and recorded in the frozen label's state); with
    ``per_stage``, one ``inner`` per stage, each held at its initial state until
    its step."""
    frozen_slices = layout(flat, cut)
    if not per_stage:
        never: list[Mask] = [isinstance(s, int) and s == _NEVER for s in steps]
        return routed(inner, never, flat, frozen_slices)
    labels = [_stage_of(s) for s in steps]
    txs: dict[Any, Any] = {"frozen": zero_updates(frozen_slices)} if frozen_slices else {}
    for k in labels:
        if k == "frozen":
            txs[k] = zero_updates(frozen_slices)
        elif k not in txs:
            step = int(k.removeprefix("thaw@"))
            txs[k] = inner if step == 0 else _held(inner, count >= step)
    # A function returning the label tree, never the (maybe callable) tree itself.
    return optax.with_extra_args_support(optax.partition(txs, constant(flat.unflatten(labels))))


def _held_at(step: Any, bound: int) -> Mask:
    """What of a leaf has not thawed once the thaw step ``bound`` has passed."""
    if isinstance(step, np.ndarray):
        return simplify(step > bound)
    return step > bound


def _cut_down(x: Any, cut: WholeSlices | None) -> Any:
    return x if cut is None else gather(x, cut)


def _thawed_grad(g: Any, held: Mask, cut: WholeSlices | None, zeros: Any) -> Any:
    """A leaf's gradient with zeros where it has not thawed: put around its thawed
    slices (``cut``), or selected element-wise."""
    if cut is not None:
        return scatter(g, cut, frozen_from=zeros)
    if isinstance(held, np.ndarray):
        return jnp.where(compact(held), jnp.zeros((), g.dtype), g)
    return g


def thawed_value_and_grad(
    fun: Callable[..., Any], thaw: Mapping[int, Any] | Sequence[tuple[int, Any]], *,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """``jax.value_and_grad(fun)`` that differentiates only what has thawed by ``count``.

    The gradient-side partner of :func:`gradual_unfreeze` (give both the same
    ``thaw=``). One compiled step with plain ``jax.value_and_grad`` computes the
    weight gradients of every leaf that will ever thaw, from step 0 on, because
    ``gradual_unfreeze`` masks them with a traced ``jnp.where``. The returned
    function instead picks, with ``jax.lax.switch`` on ``count``, a branch per
    stage that differentiates only the leaves thawed so far; XLA runs one branch
    per step, so a stage pays for its own gradients only. Still one compilation.

    ``g(count, params, *args, **kwargs)`` returns ``(value, grads)`` (``((value,
    aux), grads)`` with ``has_aux``), ``grads`` shaped like ``params``, with zeros
    for leaves not thawed at ``count`` (``gradual_unfreeze`` ignores them). Pass
    the count the optimizer will use, ``GradualUnfreezeState.count``. A stack
    thawed layer by layer (:func:`jfreeze.layers`, or any element selection of
    whole slices along one axis) is differentiated in its thawed slices only,
    zeros elsewhere; another leaf thawed element-wise is differentiated whole
    from its first element's step, with zeros at the elements not yet thawed.

    >>> import jax, jax.numpy as jnp
    >>> import jfreeze as jf
    >>> params = {"body": jnp.ones(2), "head": jnp.ones(2)}
    >>> loss = lambda p, x: jnp.sum(p["head"] * p["body"] * x)
    >>> g = jf.thawed_value_and_grad(loss, thaw={0: jf.paths("head"), 2: jf.paths("body")})
    >>> g(0, params, 3.0)[1]["body"], g(2, params, 3.0)[1]["body"]
    (Array([0., 0.], dtype=float32), Array([3., 3.], dtype=float32))
    """
    name = "jf.thawed_value_and_grad"
    stages = _stages(thaw, name)

    def value_and_grad(count, params, *args, **kwargs):
        flat = Flat.of(params)
        steps = _thaw_steps(stages, flat)
        first = [int(np.min(s)) if isinstance(s, np.ndarray) else s for s in steps]
        for (path, x), step in zip(flat.entries, first, strict=True):
            if step != _NEVER and not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
                raise TypeError(f"{name}: the leaf at path {path!r} thaws at step {step} but has "
                                f"dtype {jnp.result_type(x)}; only float leaves have gradients.")
        # Every step at which something thaws, element-wise ones included.
        bounds = sorted({int(t) for s in steps for t in np.unique(s) if t != _NEVER})

        def branch(k: int):  # k = how many thaw steps have passed
            held = [_held_at(s, bounds[k - 1] if k else -1) for s in steps]
            idx = [i for i, m in enumerate(held) if m is not True]
            cut = cuts(flat, held)  # layers not thawed yet: not differentiated at all

            # Everything is closed over, not passed as switch operands: args and kwargs
            # may hold non-arrays, and the leaves stay the step's own params (so
            # jf.check_frozen_compute can tell which ones are differentiated).
            def run():
                def f(sub):
                    full = list(leaves)
                    for i, x in zip(idx, sub, strict=True):
                        c = cut[i]
                        full[i] = x if c is None else scatter(x, c, frozen_from=leaves[i])
                    return fun(flat.unflatten(full), *args, **kwargs)

                primals = [_cut_down(leaves[i], cut[i]) for i in idx]
                out, sub_grads = jax.value_and_grad(f, has_aux=has_aux)(primals)
                grads = [jnp.zeros_like(x) for x in leaves]
                for i, g in zip(idx, sub_grads, strict=True):
                    grads[i] = _thawed_grad(g, held[i], cut[i], grads[i])
                return out, flat.unflatten(grads)

            return run

        k = jnp.sum(jnp.asarray(count) >= jnp.asarray(bounds, jnp.int32)) if bounds else 0
        leaves = [x for _, x in flat.entries]
        return jax.lax.switch(k, [branch(k) for k in range(len(bounds) + 1)])

    return value_and_grad
