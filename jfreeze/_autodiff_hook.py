"""Private: the autodiff hook behind ``jf.check_frozen_compute``.

While the reference step is traced, the two functions of JAX's autodiff that
every public differentiation API reaches (``jax._src.interpreters.ad.linearize``
and ``.jvp``) are wrapped so that each differentiation sees the frozen leaves
through ``jax.lax.stop_gradient``. This is the only place jfreeze touches JAX
internals; it checks their layout first (:func:`autodiff_internals`) and, if it
differs, installs nothing so that the check reports "not verified".

For stacked leaves whose frozen part is whole layers, ``jax.lax.scan`` is
wrapped as well (:func:`scans_split`): a scan over such a stack runs as one scan
per run of frozen / trainable layers, the frozen slices under ``stop_gradient``
(what ``jf.scan`` does), and :func:`loops_reached` finds the stacks that reached
a loop some other way (so the check says it could not verify them).

Invariants: each patch is installed under a lock, only acts on the thread that
installed it, and is always restored; nothing is imported from here at
``import jfreeze`` time except this module itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.extend as jex
import numpy as np
from jax.core import Tracer

from jfreeze._tree import runs

__all__ = [
    "Seen",
    "autodiff_internals",
    "frozen_not_differentiated",
    "loops_reached",
    "scans_split",
    "unseen_differentiation",
]

_PATCH_LOCK = threading.Lock()
_SCAN_LOCK = threading.Lock()
_SCOPE = "jfreeze_check_seen"  # the name scope around each differentiation the hook saw
_UNSPLIT = "jfreeze_check_unsplit"  # scans_split's cuts of values that are not stacks


def autodiff_internals() -> tuple[Any, Any] | None:
    """``(jax._src.interpreters.ad, jax._src.api)`` if they look as the hook expects.

    Every public differentiation API of jax 0.10 reaches autodiff through two
    functions of ``jax._src.interpreters.ad``, looked up on that module at call
    time: ``ad.linearize(traceable, primals_ft, ...)`` (``vjp``, hence ``grad``,
    ``value_and_grad``, ``jacrev``, ``hessian``, ``nnx.grad``, ``eqx.filter_grad``;
    and ``linearize``) and ``ad.jvp(fun, primals, tangents, ...)`` (``jvp``,
    ``jacfwd``). Autodiff also names what it emits: each equation's name stack
    holds a ``jvp`` / ``transpose`` transform (``source_info_util.Transform``), so
    equations with one but without the hook's scope were differentiated by a path
    the hook did not see (an alias bound at import, a cached inner ``jax.jit``).
    None: another layout (another JAX version) -- the check then reports that
    it could not verify.
    """
    try:
        from jax._src import api, source_info_util
        from jax._src.interpreters import ad
    except ImportError:
        return None
    try:
        names = {
            "linearize": ["traceable", "primals_ft"],
            "jvp": ["fun", "primals", "tangents"],
        }
        for name, params in names.items():
            got = list(inspect.signature(getattr(ad, name)).parameters)
            if got[: len(params)] != params:
                return None
        if getattr(api, "ad", None) is not ad:
            return None
        if not isinstance(source_info_util.Transform, type):
            return None
    except (AttributeError, TypeError, ValueError):
        return None
    return ad, api


@dataclasses.dataclass
class Seen:
    """What the hook saw while the reference step was traced."""

    frozen: set[int]  # ids of values that stand for frozen leaves (inputs, and stopped copies)
    known: set[int]  # ids of other values the step was given (or that the hook passed on)
    keep: list  # the objects behind those ids, kept alive so no id is reused
    calls: int = 0  # differentiations seen
    stopped: set[int] = dataclasses.field(default_factory=set)  # input frozen leaves stopped
    unidentified: int = 0  # differentiated tracers that are neither of the above
    unseen: int = 0  # differentiations the hook could not wrap
    primals: set[int] = dataclasses.field(default_factory=set)  # ids of everything differentiated

    def register(self, x: Any, frozen: bool) -> None:
        (self.frozen if frozen else self.known).add(id(x))
        self.keep.append(x)


def _is_float(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.numpy.issubdtype(dtype, jax.numpy.inexact)


@contextlib.contextmanager
def frozen_not_differentiated(
    seen: Seen, inputs: set[int], stacks: dict[int, Any] | None = None
) -> Iterator[bool]:
    """While tracing on this thread, every differentiation sees the frozen leaves
    through ``stop_gradient`` (recognised by the identity of their tracers).

    Yields whether the hook is installed (False: unknown JAX internals).
    ``inputs``: ids of the step's own frozen leaves (to count ``stopped``).
    ``stacks``: ``{id: entry}`` of stacks for :func:`scans_split`; the values a
    differentiation hands its function in their place are added (same entry).
    """
    stacks = {} if stacks is None else stacks
    internals = autodiff_internals()
    if internals is None:
        yield False
        return
    ad, _ = internals
    owner = threading.get_ident()
    originals = {"linearize": ad.linearize, "jvp": ad.jvp}

    def stopped(fun: Callable, treedef: Any, positions: list[int], stack: dict) -> Callable:
        def wrapped(*args):
            leaves = treedef.flatten_up_to(args)
            with jax.named_scope(_SCOPE):  # marks what this differentiation emits
                for j, x in enumerate(leaves):
                    if j in positions:
                        leaves[j] = jax.lax.stop_gradient(x)
                    # nested differentiation (hessian, MAML) sees these values as primals
                    seen.register(leaves[j], j in positions)
                    if j in stack:  # a scan inside sees this value for the stack
                        stacks[id(leaves[j])] = stack[j]
                return fun(*treedef.unflatten(leaves))

        return wrapped

    def hooked(name: str) -> Callable:
        original = originals[name]

        def call(fun, primals, *rest, **kwargs):
            if threading.get_ident() != owner:
                return original(fun, primals, *rest, **kwargs)
            treedef = getattr(primals, "tree", None)
            if treedef is None:  # not the FlatTree of jax 0.10: cannot wrap, say so
                seen.unseen += 1
                return original(fun, primals, *rest, **kwargs)
            positions = []
            for j, x in enumerate(primals):
                seen.primals.add(id(x))
                if not _is_float(x) or id(x) in seen.known:
                    continue
                if id(x) in seen.frozen:
                    positions.append(j)
                    if id(x) in inputs:
                        seen.stopped.add(id(x))
                elif isinstance(x, Tracer):
                    seen.unidentified += 1  # derived inside the step: frozen or not?
            seen.calls += 1
            stack = {j: stacks[id(x)] for j, x in enumerate(primals) if id(x) in stacks}
            return original(stopped(fun, treedef, positions, stack), primals, *rest, **kwargs)

        return call

    with _PATCH_LOCK:
        ad.linearize, ad.jvp = hooked("linearize"), hooked("jvp")
        try:
            yield True
        finally:
            ad.linearize, ad.jvp = originals["linearize"], originals["jvp"]


def unseen_differentiation(jaxpr: Any, prefix: tuple = ()) -> int:
    """How many equations of ``jaxpr`` (nested jaxprs included) autodiff emitted
    outside the hook's scope. A nested jaxpr's name stacks are relative to its
    equation's, hence the prefix."""
    from jax._src import source_info_util

    count = 0
    for eqn in jaxpr.eqns:
        stack = prefix + tuple(eqn.source_info.name_stack.stack)
        if not any(getattr(e, "name", None) == _SCOPE for e in stack) and any(
            isinstance(e, source_info_util.Transform) and e.name in ("jvp", "transpose")
            for e in stack
        ):
            count += 1
        for sub in jex.core.jaxprs_in_params(eqn.params):
            count += unseen_differentiation(getattr(sub, "jaxpr", sub), stack)
    return count


@contextlib.contextmanager
def scans_split(
    stacks: dict[int, tuple[str, np.ndarray]], split: dict[str, np.ndarray]
) -> Iterator[None]:
    """While tracing on this thread, ``jax.lax.scan`` over a registered stack runs as
    one scan per run of layers frozen alike, frozen slices under ``stop_gradient``.

    ``stacks``: ``{id(array): (path, frozen layers as a bool per layer)}`` for the
    step's stacked leaves frozen by whole layers along axis 0. ``split``: filled
    with ``{path: frozen layers}`` for each stack a scan was split over.
    """
    original = jax.lax.scan
    owner = threading.get_ident()
    signature = inspect.signature(original)

    def scan(*args, **kwargs):
        if threading.get_ident() != owner:
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        leaves, treedef = jax.tree_util.tree_flatten(a["xs"])
        hits = {j: stacks[id(x)] for j, x in enumerate(leaves) if id(x) in stacks}
        if not hits:
            return original(*args, **kwargs)
        n = int(np.shape(leaves[0])[0])
        rest = {k: v for k, v in a.items() if k not in ("f", "init", "xs", "length")}
        cuts = sorted({0, n} | {start for _, sel in hits.values() for start, _, _ in runs(sel)})
        pieces = list(itertools.pairwise(cuts))
        carry, ys = a["init"], {}
        for start, stop in reversed(pieces) if rest.get("reverse") else pieces:
            part = []
            for j, x in enumerate(leaves):
                if j in hits:
                    path, sel = hits[j]
                    split[path] = sel
                    cut = jax.lax.slice_in_dim(x, start, stop)
                    part.append(jax.lax.stop_gradient(cut) if sel[start] else cut)
                    continue
                # a leaf that is not a registered stack (e.g. one moved or cast first) is
                # cut too; loops_reached sees through this cut (not a split by layers)
                with jax.named_scope(_UNSPLIT):
                    part.append(jax.lax.slice_in_dim(x, start, stop))
            carry, ys[start] = original(a["f"], carry, treedef.unflatten(part), stop - start,
                                        **rest)
        parts = [ys[start] for start, _ in pieces]
        return carry, jax.tree.map(lambda *p: jax.numpy.concatenate(p), *parts)

    with _SCAN_LOCK:
        jax.lax.scan = scan
        try:
            yield
        finally:
            jax.lax.scan = original


_LOOPS = frozenset({"scan", "while"})
_SLICING = frozenset({"slice", "dynamic_slice", "gather", "split"})  # take layers apart


def loops_reached(jaxpr: Any, watched: dict[Any, set[str]]) -> set[str]:
    """The names ``watched[var]`` of input variables of ``jaxpr`` whose whole value
    (or anything computed from it, short of slicing it) reaches an operand of a
    loop (``scan``, ``while``), nested jaxprs included. The cuts :func:`scans_split`
    makes of values that are not registered stacks do not count as slicing."""
    found: set[str] = set()
    names = dict(watched)
    for eqn in jaxpr.eqns:
        ins = [v for v in eqn.invars if not isinstance(v, jex.core.Literal)]
        came = set().union(*(names.get(v, set()) for v in ins))
        if not came or (eqn.primitive.name in _SLICING and not any(
                getattr(e, "name", None) == _UNSPLIT for e in eqn.source_info.name_stack.stack)):
            continue
        if eqn.primitive.name in _LOOPS:
            found |= came
            continue
        for sub in jex.core.jaxprs_in_params(eqn.params):
            sub = getattr(sub, "jaxpr", sub)
            offset = len(eqn.invars) - len(sub.invars)  # cond: the branch index first
            if offset < 0:
                continue
            inner = {sub.invars[k - offset]: names[v] for k, v in enumerate(eqn.invars)
                     if k >= offset and not isinstance(v, jex.core.Literal) and v in names}
            found |= loops_reached(sub, inner)
        for v in eqn.outvars:
            names[v] = came
    return found
