"""Checking that frozen weight gradients are really gone from a compiled step."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.extend as jex
import numpy as np

from jfreeze._autodiff_hook import (
    Seen,
    frozen_not_differentiated,
    loops_reached,
    scans_split,
    unseen_differentiation,
)
from jfreeze._hlo import count as count_loops
from jfreeze._tree import Flat, leaves_with_paths, slab
from jfreeze.selectors import FrozenSpec, as_selector

__all__ = ["ComputeReport", "check_frozen_compute", "compiled_flops"]

_MAX_GROUPS = 16  # output groups examined to name the outputs that use frozen gradients


@dataclasses.dataclass(frozen=True)
class ComputeReport:
    """What :func:`check_frozen_compute` found; ``str(report)`` explains it.

    Attributes:
      flops: compiled FLOPs of the step as written.
      ideal_flops: compiled FLOPs of the same step with the frozen leaves not
        differentiated (``stop_gradient`` on them inside every differentiation).
      ratio: ``flops / ideal_flops``.
      ok: True: verified, no frozen weight gradient survives (``flops <=
        ideal_flops * (1 + rtol)`` and the check saw every differentiation and
        every differentiated value). False: frozen weight gradients survive
        (measured). None: could not verify (see ``unverified``); never read
        None as a pass.
      differentiated: how many whole frozen leaves the step differentiates
        (0: it never asks for their gradients, e.g. it uses ``jf.split``).
      element_wise: how many element-wise frozen leaves the step differentiates.
        Their weight gradients are needed (for their trainable elements) and are
        computed in full; they are not counted as frozen leaves.
      leaking_outputs: output paths (``/``-joined, one or two levels deep)
        whose computation pulls frozen weight gradients back in.
      frozen_layers: ``(path, frozen layer indices)`` of the stacked leaves
        (frozen by whole layers, ``jf.layers``) whose frozen layers get weight
        gradients because one ``jax.lax.scan`` (or ``nn.scan``) runs the whole
        stack; empty when none do.
      frozen_layer_flops: the FLOPs those frozen layers' weight gradients cost
        (measured: the reference step with only that fix, against the full one).
      unverified: why the check could not verify (empty when it could).
      message: the verdict, the likely cause and the fix.
    """

    flops: float
    ideal_flops: float
    ratio: float
    ok: bool | None
    differentiated: int
    element_wise: int
    leaking_outputs: tuple[str, ...]
    unverified: tuple[str, ...]
    message: str
    frozen_layers: tuple[tuple[str, tuple[int, ...]], ...] = ()
    frozen_layer_flops: float = 0.0

    def __str__(self) -> str:
        return self.message


def _cost(cost: Any) -> dict | None:
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return cost or None


def compiled_flops(
    fn: Callable, *args: Any, matmul_only: bool = False, **kwargs: Any
) -> float:
    """FLOPs of ``jax.jit(fn)(*args, **kwargs)``, every loop body counted by its trip count.

    The one FLOPs helper of jfreeze, its examples and benchmarks. XLA's compiled
    cost analysis counts the body of a ``while`` loop (``lax.scan``,
    ``fori_loop``, ``jf.scan``) once, whatever its trip count; this adds, for
    each loop, ``trips - 1`` more runs of its body (nested loops multiply), read
    from the optimized HLO where XLA records the trip counts. A loop-free
    program's figure is XLA's own. Dots and convolutions in loop bodies are
    counted exactly; their element-wise work as XLA counts it (one FLOP per
    arithmetic output element, transcendentals apart; a convolution with padding
    is counted over its whole window). A loop whose trip count XLA does not
    know (a ``while_loop`` with a data-dependent end) is counted once, with a
    ``RuntimeWarning`` naming it: the figure is then a lower bound.
    A ``jax.jit``-wrapped ``fn`` is lowered and compiled as it is, with its own
    ``compiler_options``, shardings and donations.

    Args:
      fn: the function; ``args`` and ``kwargs`` are its arguments.
      matmul_only: count only dots and convolutions (``2 * output elements *
        contracted elements`` each), loops by trip count: the figure to compare
        with an analytic matmul count.

    Returns:
      The FLOPs of one call.

    >>> import jax, jax.numpy as jnp
    >>> import jfreeze as jf
    >>> jf.compiled_flops(lambda a, b: a @ b, jnp.ones((4, 8)), jnp.ones((8, 2)))
    128.0
    >>> layer = lambda h, w: (h @ w, None)
    >>> jf.compiled_flops(lambda h, ws: jax.lax.scan(layer, h, ws)[0],
    ...                   jnp.ones((4, 8)), jnp.ones((3, 8, 8)), matmul_only=True)
    1536.0
    """
    lower = getattr(fn, "lower", None)  # a jitted fn keeps its own jit options
    lowered = (lower(*args, **kwargs) if callable(lower)
               else jax.jit(lambda a, k: fn(*a, **k)).lower(args, kwargs))
    counted = _count(lowered)
    if counted.unknown_trips:
        warnings.warn(
            "jf.compiled_flops: XLA does not know the trip count of the loop(s) "
            f"{', '.join(counted.unknown_trips)} (e.g. a while_loop whose end depends on "
            "values); each body is counted once, so the figure is a lower bound.",
            RuntimeWarning, stacklevel=2,
        )
    return float(counted.matmul) if matmul_only else counted.flops


@dataclasses.dataclass(frozen=True)
class _Counted:
    flops: float  # loops by trip count
    matmul: float
    unknown_trips: tuple[str, ...]  # loops counted once: trip count unknown


def _flops(fn: Callable, args: tuple, *, compiled: bool = True) -> _Counted:
    """FLOPs of the compiled program (XLA's cost analysis, loops by trip count from
    its optimized HLO), or (cheaper, for the per-output attribution) of the lowered
    one, already pruned to what the outputs need, whose loops count once."""
    return _count(jax.jit(fn).lower(*args), compiled=compiled)


def _count(lowered: Any, *, compiled: bool = True) -> _Counted:
    if not compiled:
        cost = _cost(lowered.cost_analysis())
        if cost is not None:
            looped = "stablehlo.while" in lowered.as_text()
            loops = ("the loops of the lowered program",) if looped else ()
            return _Counted(float(cost.get("flops", 0.0)), float("nan"), loops)
    exe = lowered.compile()
    cost = _cost(exe.cost_analysis())
    if cost is None:
        raise RuntimeError(
            "jf.check_frozen_compute: this backend gives no compiled cost analysis; "
            "run the check on CPU, GPU or TPU."
        )
    loops = count_loops(exe.as_text() or "")
    # a program with no arithmetic has no "flops" key
    return _Counted(float(cost.get("flops", 0.0)) + loops.extra_flops,
                    float(loops.matmul_flops), loops.unknown_trips)


def _groups(paths: list[str], idx: list[int], depth: int) -> dict[str, list[int]]:
    """Output leaf indices ``idx`` grouped by the first ``depth`` segments of their paths."""
    groups: dict[str, list[int]] = {}
    for i in idx:
        groups.setdefault("/".join(paths[i].split("/")[:depth]) or "(output)", []).append(i)
    return groups


def _traced(fn: Callable, args: tuple) -> tuple[Callable, list, Any]:
    """``fn`` traced once: a function of the flattened args returning the flat outputs
    (so each output group is lowered without re-running the user's Python), the
    outputs' ``(path, shape)`` pairs, and the jaxpr."""
    closed, out = jax.make_jaxpr(fn, return_shape=True)(*args)
    flat_out = leaves_with_paths(out)[0]
    return jex.core.jaxpr_as_fun(closed), flat_out, closed.jaxpr


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
    the same step in which every differentiation sees the frozen leaves through
    ``stop_gradient``: the step as it would be if frozen weight gradients were
    never computed. (Closing the frozen leaves over as constants would not do:
    ``jax.grad`` differentiates whatever values it is handed.) When the step
    costs more, it lowers each output group alone to name those that use
    frozen gradients.

    What it sees: while the reference is traced (on this thread; restored
    whatever happens), the two functions of JAX's autodiff that every public
    differentiation API reaches, ``jax._src.interpreters.ad.linearize`` and
    ``.jvp``, are wrapped: so ``grad``, ``value_and_grad``, ``vjp``, ``jacrev``,
    ``hessian``, ``jvp``, ``jacfwd``, ``linearize``, ``nnx.grad``,
    ``eqx.filter_grad``, gradient functions built before the check and losses
    with custom VJPs are all seen. Frozen leaves are recognised by the identity
    of the traced arrays handed to the differentiation.

    What it reports when it cannot verify: ``ok=None``, never ``ok=True``, with
    the reasons in ``unverified`` and the message, when the step differentiates
    values that are not leaves of its arguments (params cast or otherwise
    transformed first, passed through an inner ``jax.jit``, ``scan`` or
    ``vmap``, activations), when autodiff ran by a path the hook did not see
    (found from the name stacks of what autodiff emitted: a cached inner
    ``jax.jit``, an internal alias bound at import), or when this JAX version
    lacks the internals the hook expects (written for jax 0.10). A measured
    excess is reported as ``ok=False`` all the same.

    Element-wise frozen leaves (``jf.elements``) are differentiated in full: their
    weight gradients are needed for their trainable elements. They are not
    stopped and not counted as frozen leaves; ``element_wise`` counts them.

    Stacks (one array per parameter, layers on axis 0) frozen by whole layers
    (``jf.layers``, or an element mask selecting whole slices along axis 0) are
    the exception: run by one ``jax.lax.scan`` (or linen ``nn.scan``), the scan's
    backward pass computes every layer's weight gradient, frozen ones included.
    In the reference, each ``jax.lax.scan`` over such a stack runs as one scan
    per run of layers frozen alike, the frozen slices under ``stop_gradient`` (as
    ``jf.scan`` does), so the excess is measured: ``frozen_layers`` names the
    stacks and their frozen layers, ``frozen_layer_flops`` what their weight
    gradients cost, and the message gives the fix (``jf.scan``,
    ``jf.flax.scan``). A stack that reaches a loop the check cannot split (a
    ``lax.map``, a ``fori_loop`` indexing it, a scan imported under another
    name, the stack cast first) makes the report ``ok=None``.

    FLOPs count every loop body by its trip count (:func:`compiled_flops`); a
    loop whose trip count XLA does not know makes the report ``ok=None``.

    Pass the un-jitted step (a ``jax.jit`` wrapper is unwrapped).

    Args:
      step_fn: the training step, ``step_fn(params, *args)``, un-jitted.
      params: its first argument; ``frozen`` is evaluated on it (for a Flax
        ``TrainState`` use paths such as ``"params/backbone/**"``).
      *args: the other arguments (optimizer state, batch, ...).
      frozen: what is frozen (anything ``frozen=`` takes).
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
    >>> cast = lambda p: step(jax.tree.map(lambda a: a.astype(jnp.bfloat16), p))
    >>> jf.check_frozen_compute(cast, params, frozen=jf.paths("body")).ok is None  # not verified
    True
    """
    step_fn = getattr(step_fn, "__wrapped__", step_fn) if hasattr(step_fn, "lower") else step_fn
    flat, masks = as_selector(frozen).masks(params)
    all_args = (params, *args)
    leaves = tuple(jax.tree_util.tree_leaves(all_args))
    # Each variant is traced once; XLA's cost analysis of the compiled programs (loops
    # by trip count) gives the headline figures.
    run, out, _ = _traced(step_fn, all_args)
    ref = _Reference(step_fn, flat, masks, split_stacks=True)
    run_ideal, _, jaxpr = _traced(ref, all_args)
    unverified = ref.unverified(jaxpr)
    counted = _flops(_only(run), leaves, compiled=compiled)
    ideal = _flops(_only(run_ideal), leaves, compiled=compiled)
    unverified += _uncounted(counted, ideal)
    flops, ideal_flops = counted.flops, ideal.flops
    ratio = flops / ideal_flops if ideal_flops else (float("inf") if flops else 1.0)
    leak = flops > ideal_flops * (1 + rtol)
    # Frozen layers of stacks: measured apart, against the reference without the split.
    baseline, layer_flops = run_ideal, 0.0
    if leak and ref.split:
        baseline = _traced(_Reference(step_fn, flat, masks, split_stacks=False), all_args)[0]
        layer_flops = _flops(_only(baseline), leaves, compiled=compiled).flops - ideal_flops
        layer_flops = layer_flops if layer_flops > ideal_flops * rtol else 0.0
    ok = False if leak else (None if unverified else True)
    leaking: dict[str, list] = {}
    if leak and explain and flops - layer_flops > ideal_flops * (1 + rtol):
        leaking = _leaking_outputs(run, baseline, out, leaves, rtol)
    layers = tuple((p, tuple(int(i) for i in np.flatnonzero(sel)))
                   for p, sel in ref.split.items()) if layer_flops else ()
    figures = _Figures(flops, ideal_flops, ratio, compiled, len(ref.seen.stopped),
                       ref.element_wise, len(ref.frozen_index), ref.seen.calls,
                       layers, layer_flops, {p: len(sel) for p, sel in ref.split.items()},
                       len(ref.stacks_differentiated))
    return ComputeReport(
        flops=flops,
        ideal_flops=ideal_flops,
        ratio=ratio,
        ok=ok,
        differentiated=figures.differentiated,
        element_wise=figures.element_wise,
        leaking_outputs=tuple(leaking),
        unverified=tuple(unverified),
        message=_message(ok, figures, unverified, leaking),
        frozen_layers=layers,
        frozen_layer_flops=layer_flops,
    )


class _Reference:
    """The step with every differentiation seeing the frozen leaves through
    ``stop_gradient`` (the autodiff hook) and, with ``split_stacks``, every
    ``jax.lax.scan`` over a stack frozen by whole layers run as one scan per run
    of layers frozen alike (as ``jf.scan`` does): what it would cost if frozen
    weight gradients were never computed. Records what it saw while traced."""

    def __init__(self, step_fn: Callable, flat: Flat, masks: list, *, split_stacks: bool) -> None:
        self.step_fn = step_fn
        self.paths = [p for p, _ in flat.entries]
        self.frozen_index = {i for i, m in enumerate(masks) if m is True}
        self.element_index = {i for i, m in enumerate(masks) if m is not True and m is not False}
        # Leaves frozen by whole slices: along axis 0 (the axis a scan runs over) a
        # stack a scan can be split over; along another axis of a 3-D or larger leaf,
        # a stack kept on that axis (MaxText's axis 1), scanned after moving it. (A
        # matrix's frozen columns are not a stack: their gradient is needed anyway.)
        layers = {i: slab(masks[i]) for i in self.element_index}
        self.layered = {i for i, s in layers.items() if s is not None
                        and (s[0] == 0 or len(flat.structs[i].shape) >= 3)}
        self.stacks = {i: s[1] for i, s in layers.items() if s is not None and s[0] == 0}
        self.split_stacks = split_stacks
        self.split: dict[str, np.ndarray] = {}
        self.seen = Seen(frozen=set(), known=set(), keep=[])
        self.hooked = False
        self.element_wise = 0
        self.stacks_differentiated: set[int] = set()

    def __call__(self, p: Any, *rest: Any) -> Any:
        seen = self.seen
        # An entry may be a box around the array (an NNX Variable): its JAX leaves are
        # what differentiation is handed.
        arrays = [jax.tree_util.tree_leaves(x) for x in Flat.of(p).leaves]
        for i, xs in enumerate(arrays):
            for x in xs:
                seen.register(x, i in self.frozen_index)
        for x in jax.tree_util.tree_leaves(rest):
            seen.register(x, False)
        inputs = {id(x) for i in self.frozen_index for x in arrays[i]}
        stacks = {id(x): (self.paths[i], sel) for i, sel in self.stacks.items()
                  for x in arrays[i]} if self.split_stacks else {}
        hook = frozen_not_differentiated(seen, inputs, stacks)
        with hook as hooked, scans_split(stacks, self.split):
            self.hooked = hooked
            out = self.step_fn(p, *rest)
        self.element_wise = sum(
            any(id(x) in seen.primals for x in arrays[i]) for i in self.element_index
        )
        self.stacks_differentiated = {
            i for i in self.layered if any(id(x) in seen.primals for x in arrays[i])}
        self.offsets = np.cumsum([0] + [len(xs) for xs in arrays]).tolist()
        return out

    def unverified(self, jaxpr: Any) -> list[str]:
        """Why the check cannot verify this trace (empty when it can); frees the
        tracers kept while tracing."""
        if self.hooked:
            self.seen.unseen += unseen_differentiation(jaxpr)
        del self.seen.keep[:]  # the tracers of the reference trace are no longer needed
        watched = {jaxpr.invars[k]: {self.paths[i]} for i in self.stacks_differentiated
                   for k in range(self.offsets[i], self.offsets[i + 1])}
        missed = sorted(loops_reached(jaxpr, watched))
        return _unverified(self.hooked, self.seen) + ([
            f"the stacked leaves {', '.join(map(repr, missed))} (frozen by whole layers) "
            "reach a loop that the check could not split into runs of frozen and trainable "
            "layers (a scan not called as jax.lax.scan, e.g. lax.map, fori_loop or a name "
            "imported from jax.lax; or the stack transformed first, e.g. its layer axis "
            "moved to axis 0 or cast), so the weight "
            "gradients of their frozen layers cannot be measured; run the stack with "
            "jf.scan(f, init, xs, frozen=..., path=...)"
        ] if missed else [])


def _unverified(hooked: bool, seen: Seen) -> list[str]:
    """Why the check cannot verify (empty when it can)."""
    out = []
    if not hooked:
        out.append(
            f"this JAX version ({jax.__version__}) does not have the autodiff internals the "
            "check hooks (jax._src.interpreters.ad.linearize and .jvp, as in jax 0.10), so "
            "no differentiation in the step was seen"
        )
    if seen.unseen:
        out.append(
            "the step differentiates by a path the check does not see (e.g. a cached "
            "inner jax.jit, or a JAX-internal alias bound at import; "
            f"{seen.unseen} operation(s) emitted by autodiff outside the hook)"
        )
    if seen.unidentified:
        out.append(
            f"{seen.unidentified} differentiated value(s) are not leaves of the step's "
            "arguments (params transformed before being differentiated, e.g. cast; passed "
            "through an inner jax.jit, scan or vmap; or activations), so whether they are "
            "frozen cannot be told; differentiate the params leaves themselves, or only the "
            "trainable part (trainable, frozen = jf.split(params, frozen=...))"
        )
    return out


def _uncounted(*counted: _Counted) -> list[str]:
    """Loops whose bodies were counted once (so an excess inside them may hide)."""
    loops = sorted({name for c in counted for name in c.unknown_trips})
    if not loops:
        return []
    return [
        "the FLOPs count some loop bodies once, not once per iteration: "
        + ", ".join(loops) + " (a loop whose trip count XLA does not know, e.g. a "
        "while_loop with a data-dependent end; or compiled=False, whose lowered "
        "program carries no trip counts)"
    ]


def _leaking_outputs(
    run: Callable, run_ideal: Callable, out: list, leaves: tuple, rtol: float
) -> dict[str, list]:
    """``{output group: its shapes}`` for the outputs that pull frozen gradients in:
    top-level outputs first, then one level down inside those that do (lowered, not
    compiled: already pruned to each output)."""
    paths = [p for p, _ in out]

    def leaks(idx: list[int]) -> bool:
        as_written = _flops(_only(run, idx), leaves, compiled=False).flops
        ideal = _flops(_only(run_ideal, idx), leaves, compiled=False).flops
        return as_written > ideal * (1 + rtol)

    leaking: dict[str, list] = {}
    top = _groups(paths, list(range(len(out))), 1)
    if len(top) > _MAX_GROUPS:
        return leaking
    for name, idx in top.items():
        if not leaks(idx):
            continue
        sub = _groups(paths, idx, 2)
        if len(sub) == 1 or len(sub) > _MAX_GROUPS:
            found = {name: idx}
        else:
            found = {k: v for k, v in sub.items() if leaks(v)} or {name: idx}
        for k, v in found.items():
            leaking[k] = [out[i][1] for i in v]
    return leaking


@dataclasses.dataclass(frozen=True)
class _Figures:
    flops: float
    ideal_flops: float
    ratio: float
    compiled: bool
    differentiated: int  # whole frozen leaves differentiated (and stopped by the hook)
    element_wise: int
    frozen: int  # whole frozen leaves
    calls: int  # differentiations seen
    layers: tuple[tuple[str, tuple[int, ...]], ...] = ()  # stacks whose frozen layers leak
    layer_flops: float = 0.0  # what their weight gradients cost (measured)
    stack_sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    stacks: int = 0  # element-wise frozen leaves that are stacks frozen by whole layers


_LOGGING = (
    "returning raw gradients or their global norm (optax.tree.norm(grads)) for "
    "logging: log the norm of the trainable gradients instead, "
    "optax.tree.norm(jf.split(grads, frozen=...)[0]), or differentiate only the "
    "trainable part (trainable, frozen = jf.split(params, frozen=...))"
)
_OPTIMIZER = (
    "an optimizer that reads frozen gradients: not wrapped in jf.freeze / "
    "jf.partition (optax.masked passes frozen gradients through), or a global "
    "transform (clip_by_global_norm, MultiSteps) chained outside the freeze; wrap "
    "the whole chain: jf.freeze(optax.chain(...), frozen=...)"
)


_SCAN_FIX = (
    "run the stack with jf.scan(f, init, xs, frozen=..., path=...) in place of "
    "jax.lax.scan (one scan per run of frozen or trainable layers, frozen slices under "
    "stop_gradient), or for Flax linen jf.flax.scan(target, frozen=..., **nn.scan "
    "keyword arguments) in place of nn.scan"
)


def _layer_runs(layers: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` -> ``'0-2, 5'``."""
    out, start = [], 0
    for k in range(1, len(layers) + 1):
        if k == len(layers) or layers[k] != layers[k - 1] + 1:
            a, b = layers[start], layers[k - 1]
            out.append(f"{a}" if a == b else f"{a}-{b}")
            start = k
    return ", ".join(out)


def _stacks_message(f: _Figures) -> str:
    """Which stacks' frozen layers get weight gradients, their cost, and the fix."""
    named = "; ".join(
        f"{p!r} (frozen layers {_layer_runs(layers)} of {f.stack_sizes.get(p, '?')})"
        for p, layers in f.layers
    )
    return (
        f" Frozen layers of scanned stacks get weight gradients: {named}. One scan runs "
        "each whole stack, so its backward pass computes the weight gradient of every "
        f"layer, frozen ones included: {f.layer_flops:.4g} FLOPs "
        f"({f.layer_flops / f.flops:.0%} of the step; measured against the same step "
        f"with those scans split into runs of frozen and trainable layers). Fix: {_SCAN_FIX}."
    )


def _message(
    ok: bool | None, f: _Figures, unverified: list[str], leaking: dict[str, list]
) -> str:
    """The verdict, the likely cause and the fix."""
    program = "compiled step" if f.compiled else "step (lowered, not compiled)"
    figures = f"{f.flops:.4g} FLOPs vs {f.ideal_flops:.4g} with frozen leaves not differentiated"
    in_full = f.element_wise - f.stacks
    elements = (
        f" {in_full} element-wise frozen leaves are differentiated in full: their "
        "weight gradients are needed for their trainable elements (not counted as frozen "
        "leaves; jf.freeze keeps their frozen elements fixed)."
        if in_full else ""
    ) + (
        f" {f.stacks} stacked leaves frozen by whole layers are differentiated: each scan "
        "over them was compared with the same scan split into runs of frozen and "
        "trainable layers (as jf.scan runs them)."
        if f.stacks else ""
    )
    if ok is None:
        return (
            f"not verified ({figures}, ratio {f.ratio:.3f}): " + "; and ".join(unverified)
            + "." + elements
        )
    if ok and f.differentiated == 0:
        return (
            f"ok: the step never asks for the gradients of the {f.frozen} whole "
            f"frozen leaves ({figures}; {f.calls} differentiation(s) seen).{elements}"
        )
    if ok:
        return (
            f"ok: frozen weight gradients are dead code in the {program} ({figures}, "
            f"ratio {f.ratio:.3f}; {f.differentiated} frozen leaves are differentiated and "
            f"dropped).{elements}"
        )
    head = f"frozen weight gradients survive in the {program}: {figures} ({f.ratio:.2f}x)."
    if f.layers:
        head += _stacks_message(f)
        if not leaking and f.flops - f.layer_flops <= f.ideal_flops * 1.0001:
            return head + elements
    scalar = [g for g, shapes in leaking.items() if all(x.ndim == 0 for x in shapes)]
    arrays = [g for g in leaking if g not in scalar]
    if leaking:
        they = "Besides, other frozen weight gradients are" if f.layers else "They are"
        used = f" {they} used by the output(s) {', '.join(map(repr, leaking))}."
        causes = ([_LOGGING] if scalar else []) + (
            ["returning the raw gradients", _OPTIMIZER] if arrays else []
        )
    else:
        used, causes = "", [_LOGGING, _OPTIMIZER]
    cause = used + " Likely cause: " + "; or ".join(causes) + "."
    more = (" Besides, not all of it could be verified: " + "; and ".join(unverified) + "."
            if unverified else "")
    return head + cause + elements + more
