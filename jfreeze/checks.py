"""Checking that frozen weight gradients are really gone from a compiled step."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.extend as jex

from jfreeze.paths import path_str
from jfreeze.selectors import FrozenSpec, _Flat, as_selector

__all__ = ["check_frozen_compute", "ComputeReport"]

_MAX_GROUPS = 16  # output groups examined to name the outputs that use frozen gradients


@dataclasses.dataclass(frozen=True)
class ComputeReport:
    """What :func:`check_frozen_compute` found; ``str(report)`` explains it.

    Attributes:
      flops: compiled FLOPs of the step as written.
      ideal_flops: compiled FLOPs of the same step with the frozen leaves not
        differentiated (``stop_gradient`` on them inside each ``jax.grad``).
      ratio: ``flops / ideal_flops``.
      ok: whether ``flops <= ideal_flops * (1 + rtol)``.
      differentiated: how many whole frozen leaves the step differentiates
        (0: it never asks for their gradients, e.g. it uses ``jf.split``).
      leaking_outputs: output paths (``/``-joined, one or two levels deep)
        whose computation pulls frozen weight gradients back in.
      message: the verdict, the likely cause and the fix.
    """

    flops: float
    ideal_flops: float
    ratio: float
    ok: bool
    differentiated: int
    leaking_outputs: tuple[str, ...]
    message: str

    def __str__(self) -> str:
        return self.message


def _cost(cost: Any) -> dict | None:
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return cost or None


def _flops(fn: Callable, args: tuple, *, compiled: bool = True) -> float:
    """FLOPs from XLA's cost analysis: of the compiled program, or (cheaper, for the
    per-output attribution) of the lowered one, which is already pruned to what the
    outputs need."""
    lowered = jax.jit(fn).lower(*args)
    cost = None if compiled else _cost(lowered.cost_analysis())
    if cost is None:
        cost = _cost(lowered.compile().cost_analysis())
    if cost is None:
        raise RuntimeError(
            "jf.check_frozen_compute: this backend gives no compiled cost analysis; "
            "run the check on CPU, GPU or TPU."
        )
    return float(cost.get("flops", 0.0))  # a program with no arithmetic has no "flops" key


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _frozen_not_differentiated(frozen_ids: set[int], seen: set[int]) -> Iterator[None]:
    """While tracing, ``jax.grad`` / ``value_and_grad`` / ``vjp`` stop the gradient of
    the frozen leaves (recognised by the identity of their jit tracers).

    A differentiated function whose arguments hold none of them is left as is.
    """
    names = ("grad", "value_and_grad", "vjp")
    originals = {n: getattr(jax, n) for n in names}

    def stopped(fun: Callable, positions: list[int], flat_count: int, treedef: Any) -> Callable:
        # `fun` with stop_gradient on the frozen leaves among its flattened args.
        def wrapped(*args):
            leaves, tdef = jax.tree_util.tree_flatten(args)
            if tdef != treedef or len(leaves) != flat_count:
                return fun(*args)
            for i in positions:
                leaves[i] = jax.lax.stop_gradient(leaves[i])
            return fun(*jax.tree_util.tree_unflatten(tdef, leaves))

        return wrapped

    def frozen_positions(args: tuple, diff_argnums: set[int] | None) -> tuple[list[int], Any, int]:
        positions, offset = [], 0
        for k, arg in enumerate(args):
            leaves = jax.tree_util.tree_leaves(arg)
            if diff_argnums is None or k in diff_argnums:
                for j, x in enumerate(leaves):
                    if id(x) in frozen_ids:
                        positions.append(offset + j)
                        seen.add(id(x))
            offset += len(leaves)
        return positions, jax.tree_util.tree_structure(args), offset

    def make_grad(name: str) -> Callable:
        original = originals[name]

        def patched(fun, argnums=0, *a, **k):
            def call(*args, **kwargs):
                nums = {argnums} if isinstance(argnums, int) else set(argnums)
                nums = {n % len(args) for n in nums}
                positions, treedef, count = frozen_positions(args, nums)
                f = stopped(fun, positions, count, treedef) if positions else fun
                return original(f, argnums, *a, **k)(*args, **kwargs)

            return call

        return patched

    def patched_vjp(fun, *primals, **k):
        positions, treedef, count = frozen_positions(primals, None)
        f = stopped(fun, positions, count, treedef) if positions else fun
        return originals["vjp"](f, *primals, **k)

    with _PATCH_LOCK:
        jax.grad = make_grad("grad")
        jax.value_and_grad = make_grad("value_and_grad")
        jax.vjp = patched_vjp
        try:
            yield
        finally:
            for n, f in originals.items():
                setattr(jax, n, f)


def _groups(paths: list[str], idx: list[int], depth: int) -> dict[str, list[int]]:
    """Output leaf indices ``idx`` grouped by the first ``depth`` segments of their paths."""
    groups: dict[str, list[int]] = {}
    for i in idx:
        groups.setdefault("/".join(paths[i].split("/")[:depth]) or "(output)", []).append(i)
    return groups


def _traced(fn: Callable, args: tuple) -> tuple[Callable, list]:
    """``fn`` traced once: a function of the flattened args returning the flat outputs
    (so each output group is lowered without re-running the user's Python), and the
    outputs' ``(path, shape)`` pairs."""
    closed, out = jax.make_jaxpr(fn, return_shape=True)(*args)
    return jex.core.jaxpr_as_fun(closed), jax.tree_util.tree_flatten_with_path(out)[0]


def _only(run: Callable, idx: list[int] | None = None) -> Callable:
    def picked(*leaves):
        outs = run(*leaves)
        return list(outs) if idx is None else [outs[i] for i in idx]

    return picked


def check_frozen_compute(
    step_fn: Callable,
    params: Any,
    *args: Any,
    frozen: FrozenSpec,
    rtol: float = 0.01,
    explain: bool = True,
    compiled: bool = True,
) -> ComputeReport:
    """Compiles ``step_fn(params, *args)`` and reports whether frozen weight gradients survive.

    XLA drops a frozen leaf's weight gradient when nothing uses it (as with
    :func:`jfreeze.freeze`), and keeps it when something does: returning raw
    gradients or ``optax.tree.norm(grads)`` for logging, or a global transform
    (``clip_by_global_norm``) chained outside the freeze. This check compares
    the compiled FLOPs (``cost_analysis``) of the step as written with those of
    the same step in which each ``jax.grad`` / ``jax.value_and_grad`` /
    ``jax.vjp`` that the step calls on the frozen leaves sees them through
    ``stop_gradient``: the step as it would be if frozen weight gradients were
    never computed. (Closing the frozen leaves over as constants would not do:
    ``jax.grad`` differentiates whatever values it is handed.) When the step
    costs more, it lowers each output group alone to name those that use
    frozen gradients.

    How frozen leaves are recognised: by the identity of the traced arrays that
    ``step_fn`` passes to ``jax.grad`` (and friends, looked up on the ``jax``
    module while tracing, as flax.nnx does). A gradient function built before
    the check, or leaves transformed before being differentiated (e.g. cast),
    are not seen: the report then says the step differentiates no frozen leaf.
    Pass the un-jitted step (a ``jax.jit`` wrapper is unwrapped). While the
    reference is traced, ``jax.grad``, ``jax.value_and_grad`` and ``jax.vjp``
    are wrapped on the ``jax`` module (and restored, whatever happens); calls
    that hold no frozen leaf pass through unchanged.

    Args:
      step_fn: the training step, ``step_fn(params, *args)``, un-jitted.
      params: its first argument; ``frozen`` is evaluated on it (for a Flax
        ``TrainState`` use paths such as ``"params/backbone/**"``).
      *args: the other arguments (optimizer state, batch, ...).
      frozen: what is frozen (anything ``frozen=`` takes). Element-wise frozen
        leaves need their gradient and are not counted.
      rtol: the relative FLOPs excess tolerated.
      explain: when FLOPs are in excess, find the outputs responsible (two
        lowerings per output examined: the top-level outputs, then one level
        down inside those that use frozen gradients).
      compiled: compare compiled FLOPs. False compares the lowered programs'
        FLOPs instead (JAX has already pruned what no output needs; XLA's own
        simplifications are not applied): no compilation, for large models.

    Returns:
      A :class:`ComputeReport`.

    >>> import jax, jax.numpy as jnp, optax
    >>> import jfreeze as jf
    >>> params = {"body": jnp.ones((64, 64)), "head": jnp.ones((64, 1))}
    >>> x = jnp.ones((32, 64))
    >>> loss = lambda p: (jnp.tanh(x @ p["body"]) @ p["head"]).sum()
    >>> def step(p):
    ...     g = jax.grad(loss)(p)
    ...     return {"body": p["body"], "head": p["head"] - g["head"]}, optax.tree.norm(g)
    >>> report = jf.check_frozen_compute(step, params, frozen=jf.paths("body"))
    >>> report.ok, report.leaking_outputs, round(report.ratio, 1)
    (False, ('1',), 2.0)
    """
    sel = as_selector(frozen)
    step_fn = getattr(step_fn, "__wrapped__", step_fn) if hasattr(step_fn, "lower") else step_fn
    flat, masks = sel.masks(params)
    frozen_index = [i for i, m in enumerate(masks) if m is True]
    all_args = (params, *args)

    seen: set[int] = set()

    def ideal(p, *rest):
        entries = _Flat.of(p).entries
        ids = {id(entries[i][1]) for i in frozen_index}
        with _frozen_not_differentiated(ids, seen):
            return step_fn(p, *rest)

    # Each variant is traced once (the user's Python runs twice in all); XLA's cost
    # analysis of the compiled programs gives the headline figures.
    leaves = tuple(jax.tree_util.tree_leaves(all_args))
    run, out = _traced(step_fn, all_args)
    run_ideal, _ = _traced(ideal, all_args)
    differentiated = len(seen)
    flops = _flops(_only(run), leaves, compiled=compiled)
    ideal_flops = _flops(_only(run_ideal), leaves, compiled=compiled)
    ratio = flops / ideal_flops if ideal_flops else (float("inf") if flops else 1.0)
    ok = flops <= ideal_flops * (1 + rtol)

    leaking: list[str] = []
    shapes: dict[str, list] = {}
    if not ok and explain:
        # Which outputs pull frozen gradients in: top-level outputs first, then one level
        # down inside those that do (lowered, not compiled: already pruned to each output).
        paths = [path_str(p) for p, _ in out]

        def leaks(idx: list[int]) -> bool:
            as_written = _flops(_only(run, idx), leaves, compiled=False)
            return as_written > _flops(_only(run_ideal, idx), leaves, compiled=False) * (1 + rtol)

        top = _groups(paths, list(range(len(out))), 1)
        if len(top) <= _MAX_GROUPS:
            for name, idx in top.items():
                if not leaks(idx):
                    continue
                sub = _groups(paths, idx, 2)
                if len(sub) == 1 or len(sub) > _MAX_GROUPS:
                    found = {name: idx}
                else:
                    found = {k: v for k, v in sub.items() if leaks(v)} or {name: idx}
                for k, v in found.items():
                    leaking.append(k)
                    shapes[k] = [out[i][1] for i in v]
    program = "compiled step" if compiled else "step (lowered, not compiled)"
    figures = f"{flops:.4g} FLOPs vs {ideal_flops:.4g} with frozen leaves not differentiated"
    if ok and differentiated == 0:
        message = (
            f"ok: the step never asks for the gradients of the {len(frozen_index)} frozen "
            f"leaves ({figures}). If it differentiates through a gradient function built "
            "outside the step, or transforms params before jax.grad, this check cannot see it."
        )
    elif ok:
        message = (
            f"ok: frozen weight gradients are dead code in the {program} ({figures}, "
            f"ratio {ratio:.3f}; {differentiated} frozen leaves are differentiated and dropped)."
        )
    else:
        head = f"frozen weight gradients survive in the {program}: {figures} ({ratio:.2f}x)."
        logging = (
            "returning raw gradients or their global norm (optax.tree.norm(grads)) for "
            "logging: log the norm of the trainable gradients instead, "
            "optax.tree.norm(jf.split(grads, frozen=...)[0]), or differentiate only the "
            "trainable part (trainable, frozen = jf.split(params, frozen=...))"
        )
        optimizer = (
            "an optimizer that reads frozen gradients: not wrapped in jf.freeze / "
            "jf.partition (optax.masked passes frozen gradients through), or a global "
            "transform (clip_by_global_norm, MultiSteps) chained outside the freeze; wrap "
            "the whole chain: jf.freeze(optax.chain(...), frozen=...)"
        )
        scalar = [g for g in leaking if all(x.ndim == 0 for x in shapes[g])]
        arrays = [g for g in leaking if g not in scalar]
        if leaking:
            used = f" They are used by the output(s) {', '.join(map(repr, leaking))}."
            causes = ([logging] if scalar else []) + (
                ["returning the raw gradients", optimizer] if arrays else []
            )
        else:
            used, causes = "", [logging, optimizer]
        cause = used + " Likely cause: " + "; or ".join(causes) + "."
        message = head + cause
    return ComputeReport(
        flops=flops,
        ideal_flops=ideal_flops,
        ratio=ratio,
        ok=ok,
        differentiated=differentiated,
        leaking_outputs=tuple(leaking),
        message=message,
    )

