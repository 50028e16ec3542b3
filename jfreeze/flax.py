"""Flax adapters: frozen linen modules, a frozen-aware ``TrainState``, NNX filters.

This module imports Flax, so ``import jfreeze`` does not load it; ``jf.flax``
loads it on first use.

- :func:`frozen` — a linen module class, module instance or method whose
  parameters get no gradient (``nn.map_variables`` with
  ``jax.lax.stop_gradient``). The parameter tree keeps its ordinary paths, so
  checkpoints and jfreeze selectors still match. Applied to one *call* of a
  shared module it gives reuse without update (situation 5).
- :class:`TrainState` — ``flax.training.train_state.TrainState`` holding the
  frozen parameters beside the optimizer rather than in it, so the step
  differentiates the trainable ones only (the plain ``TrainState`` with
  ``tx=jf.freeze(...)`` works too).
- :func:`save_train_state` / :func:`restore_train_state` — a whole train
  state (either kind; ``step``, ``batch_stats``, any extra field) in a
  trainable-only checkpoint, frozen parts by reference.
- :func:`nnx_filter` — a jfreeze selector as an NNX filter, for
  ``nnx.Optimizer(model, tx, wrt=...)`` and ``nnx.DiffState``.
- :func:`scan` / :func:`nnx_scan` — a scanned layer stack (``nn.scan``, or an
  ``nnx.vmap``-built stack) run by ``jf.scan``, so frozen layers get no weight
  gradients; ``jf.flax.scan`` keeps ``nn.scan``'s parameter tree.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from flax.core import unfreeze
from flax.core.scope import in_filter
from flax.training import train_state as _train_state

from jfreeze._tree import describe_paths, path_str, shape_dtype, simplify
from jfreeze.checkpoint import restore_trainable, save_trainable
from jfreeze.forward import merge, split
from jfreeze.scanning import scan as scan_stack
from jfreeze.selectors import FrozenSpec, Selector, as_selector, checked_leaf_mask

__all__ = [
    "NNXFilter",
    "TrainState",
    "frozen",
    "nnx_filter",
    "nnx_scan",
    "restore_train_state",
    "save_train_state",
    "scan",
]

CollectionFilter = Any  # what flax takes: a name, a list/tuple of names, True


# --------------------------------------------------------------------------
# linen: frozen modules, instances and methods.


def _stop_gradient(variables: Any) -> Any:
    return jax.lax.stop_gradient(variables)


def _run_frozen(mdl: nn.Module, fn: Callable, collections: CollectionFilter,
                args: tuple, kwargs: dict) -> Any:
    """Runs ``fn(mdl, *args, **kwargs)`` with ``collections`` seen through stop_gradient.

    Variables are created normally when ``params`` is mutable (``init``); at
    ``apply`` the mapped collections are read-only inside, so a frozen part that
    tries to write one (a BatchNorm in training mode, when ``batch_stats`` is
    mapped) raises instead of drifting.
    """
    init = mdl.is_mutable_collection("params")
    lifted = nn.map_variables(fn, collections, trans_in_fn=_stop_gradient, init=init)
    return lifted(mdl, *args, **kwargs)


def _frozen_method(fn: Callable, collections: CollectionFilter) -> Callable:
    @functools.wraps(fn)
    def frozen_method(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _run_frozen(self, fn, collections, args, kwargs)

    frozen_method.__jfreeze_frozen__ = True  # type: ignore[attr-defined]
    return frozen_method


def _module_methods(cls: type) -> dict[str, Callable]:
    """``__call__`` and the public methods a user module class defines (or inherits
    from user classes): every way of running it, so no method trains by accident."""
    found: dict[str, Callable] = {}
    for klass in cls.__mro__:
        if klass is nn.Module or not issubclass(klass, nn.Module):
            break
        is_dc = dataclasses.is_dataclass(klass)
        fields = {f.name for f in dataclasses.fields(klass)} if is_dc else set()
        for name, attr in vars(klass).items():
            if name in found or name in fields or name == "setup":
                continue
            if name != "__call__" and name.startswith("_"):
                continue
            if inspect.isfunction(attr) and not hasattr(attr, "nowrap"):
                found[name] = attr
    return found


@functools.cache
def _frozen_class(cls: type, collections: CollectionFilter) -> type:
    methods = {
        name: fn if getattr(fn, "__jfreeze_frozen__", False) else _frozen_method(fn, collections)
        for name, fn in _module_methods(cls).items()
    }
    # Same __name__: linen auto-names submodules after their class ("MLP_0"), so
    # the parameter tree, checkpoints and selectors are those of the plain class.
    new = type(cls.__name__, (cls,), {**methods, "__module__": cls.__module__})
    new.__qualname__ = f"frozen({cls.__qualname__})"
    new.__jfreeze_frozen_of__ = cls  # type: ignore[attr-defined]
    return new


@dataclasses.dataclass(frozen=True)
class _FrozenCall:
    """One call of a bound module with its variables seen through stop_gradient."""

    module: nn.Module
    fn: Callable
    collections: CollectionFilter

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _run_frozen(self.module, self.fn, self.collections, args, kwargs)

    def __repr__(self) -> str:
        return f"frozen({type(self.module).__name__} {self.module.name!r}, {self.fn.__name__})"


def _collections_key(collections: CollectionFilter) -> CollectionFilter:
    if isinstance(collections, list):
        return tuple(collections)
    return collections


def frozen(
    target: Any,
    *,
    method: str | Callable | None = None,
    collections: CollectionFilter = "params",
) -> Any:
    """A linen module (class, instance or method) whose parameters get no gradient.

    The parameters exist and are initialised exactly as without ``frozen``, with
    the same paths, so checkpoints and jfreeze selectors still match; the module
    sees them through ``jax.lax.stop_gradient`` (``nn.map_variables``), so their
    gradient is zero and, under ``jax.jit``, never computed, while gradients
    still flow *through* the module to whatever is before it. Freezing in the
    forward pass does not stop an optimizer from moving the parameters (weight
    decay, momentum): also use ``jf.freeze(...)`` or :class:`TrainState`.

    Args:
      target: what to freeze:

        - a module **class**: a subclass (same name, so same auto-names) whose
          ``__call__`` and public methods all run frozen;
        - an unbound module **instance** (made in ``setup`` before assignment,
          or passed as a field): the same module as an instance of that class;
        - a bound module **instance** (a submodule in ``__call__``), or one of
          its bound methods (``self.body.encode``): a callable that runs it
          with frozen parameters. Only these calls are frozen: the module's
          other calls still train it, which is reuse without update
          (situation 5);
        - a **method**, as a decorator in a class body: every parameter the
          method uses, its submodules' included, is frozen while it runs.
      method: for a bound instance, the method to run (name or function);
        default ``__call__``.
      collections: the variable collections seen frozen; default ``"params"``.
        Pass ``("params", "batch_stats")`` to also make a frozen backbone's
        BatchNorm statistics read-only: run it with
        ``use_running_average=True``, and it raises if it tries to update them.

    Returns:
      A module class, a module instance or a callable, as above.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import jfreeze as jf
    >>> class Probe(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         x = nn.Dense(3)(x)                      # trains
    ...         x = jf.flax.frozen(nn.Dense)(3)(x)      # frozen, still "Dense_1"
    ...         return x.sum()
    >>> params = Probe().init(jax.random.key(0), jnp.ones((1, 2)))["params"]
    >>> grads = jax.grad(lambda p: Probe().apply({"params": p}, jnp.ones((1, 2))))(params)
    >>> jax.tree.map(lambda g: bool(g.any()), grads)
    {'Dense_0': {'bias': True, 'kernel': True}, 'Dense_1': {'bias': False, 'kernel': False}}
    """
    collections = _collections_key(collections)
    if inspect.ismethod(target) and isinstance(target.__self__, nn.Module):
        # frozen(self.body.encode): the bound module, run through that method
        if method is not None:
            raise TypeError("jf.flax.frozen(module.method, method=...): the method is given twice")
        return frozen(target.__self__, method=target.__func__, collections=collections)
    if isinstance(target, type) and issubclass(target, nn.Module):
        if method is not None:
            raise TypeError(
                "jf.flax.frozen(cls, method=...): every method of a frozen class is frozen")
        return _frozen_class(target, collections)
    if isinstance(target, nn.Module):
        return _frozen_instance(target, method, collections)
    if callable(target):
        if method is not None:
            raise TypeError("jf.flax.frozen(fn, method=...): method= is for module instances")
        return _frozen_method(target, collections)
    raise TypeError(
        f"jf.flax.frozen takes a linen Module class, a Module instance or a method, got {target!r}"
    )


def _frozen_instance(target: nn.Module, method: str | Callable | None,
                     collections: CollectionFilter) -> Any:
    """An unbound module as an instance of the frozen class; a bound one as a frozen call."""
    cls = type(target)
    if target.scope is None:  # unbound: becomes an instance of the frozen class
        if method is not None:
            raise TypeError(
                "jf.flax.frozen(module, method=...) needs a bound module (a submodule "
                "used inside __call__); an unbound module is frozen as a whole."
            )
        fields = {
            f.name: getattr(target, f.name)
            for f in dataclasses.fields(target)
            if f.init and f.name not in ("parent", "name")
        }
        return frozen(cls, collections=collections)(
            **fields, parent=target.parent, name=target.name
        )
    if method is None:
        fn = cls.__call__
    elif isinstance(method, str):
        fn = getattr(cls, method)
    else:
        fn = method.__func__ if inspect.ismethod(method) else method
    return _FrozenCall(target, fn, collections)


# --------------------------------------------------------------------------
# linen: a scanned stack whose frozen layers get no weight gradients.


@dataclasses.dataclass(frozen=True)
class _ScanSpec:
    """What the drop-in needs at apply of the ``nn.scan`` keywords."""

    target: type
    frozen: FrozenSpec
    variable_axes: dict
    variable_broadcast: CollectionFilter
    split_rngs: dict
    in_axes: Any
    out_axes: Any
    length: int | None
    reverse: bool
    unroll: int | bool

    def axis_of(self, col: str) -> int | None:
        """The stacking axis of collection ``col``; None if it is broadcast."""
        for filt, axis in self.variable_axes.items():
            if in_filter(filt, col):
                if not isinstance(axis, int):
                    raise NotImplementedError(
                        f"jf.flax.scan: variable_axes[{filt!r}] = {axis!r}; only an int axis "
                        "(the same in and out) is supported.")
                return axis
        if in_filter(self.variable_broadcast, col):
            return None
        raise ValueError(
            f"jf.flax.scan({self.target.__name__}): collection {col!r} is neither in "
            "variable_axes nor in variable_broadcast.")

    def splits(self, name: str) -> bool:
        return any(in_filter(filt, name) and split for filt, split in self.split_rngs.items())


def scan(target: type, *, frozen: FrozenSpec, variable_axes: Any = None,
         variable_broadcast: CollectionFilter = False, split_rngs: Any = None,
         in_axes: Any = 0, out_axes: Any = 0, length: int | None = None,
         reverse: bool = False, unroll: int | bool = 1, **kwargs: Any) -> type:
    """``nn.scan`` whose frozen layers get no weight gradients, with the same parameters.

    A drop-in for ``nn.scan(target, variable_axes={"params": 0}, ...)`` with one
    more keyword: the module class it returns is used exactly like the
    ``nn.scan`` one, has the same name (so the same auto-name) and creates the
    same variables at ``init``, so a checkpoint of the unfrozen model loads as
    is. At ``apply`` it runs the stacked layers with :func:`jfreeze.scan`: the
    layers ``frozen`` selects are run as their own scans under
    ``jax.lax.stop_gradient``, so the compiled step computes none of their
    weight gradients (a frozen run at the input has no backward pass at all).
    Freezing in the forward pass does not stop an optimizer from moving the
    parameters: also use ``jf.freeze(tx, frozen=...)`` with the same selector.

    Args:
      target: the linen module class of one layer; its ``__call__(carry, *xs)``
        returns ``(carry, y)``, as for ``nn.scan``.
      frozen: what is frozen, as in ``jf.freeze``: evaluated on the whole
        ``params`` tree the module sees (the model's), as ``jf.freeze`` evaluates
        it, so the selector given to ``jf.freeze(..., frozen=...)`` works as is,
        strict patterns for other parts of the model included:
        ``jf.paths("embed/**") | jf.layers("decoder/layers/**", range(8))``
        (``axis=1`` for a stack kept on axis 1, ``variable_axes={"params": 1}``).
      variable_axes, variable_broadcast, split_rngs, in_axes, out_axes, length,
        reverse, unroll, **kwargs: as for ``nn.scan``. At ``apply``, int axes
        and ``nn.broadcast`` inputs are supported; collections stacked in
        ``variable_axes`` other than ``params`` may be mutable (``batch_stats``,
        ``intermediates``); RNG streams are split per layer as ``split_rngs``
        says, but not into the same keys as ``nn.scan`` (dropout masks differ).
        ``variable_carry``, ``methods`` and ``data_transform`` are not supported
        (a ``NotImplementedError``).

    Returns:
      A linen module class, a subclass of ``nn.scan(target, ...)``.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import jfreeze as jf
    >>> class Block(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, h, _):
    ...         return jnp.tanh(nn.Dense(2)(h)), None
    >>> frozen = jf.layers("layers/**", [0, 1])        # bottom 2 of 3
    >>> class Net(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         Stack = jf.flax.scan(Block, frozen=frozen, variable_axes={"params": 0},
    ...                              split_rngs={"params": True}, length=3)
    ...         return Stack(name="layers")(x, None)[0].sum()
    >>> params = Net().init(jax.random.key(0), jnp.ones((1, 2)))["params"]
    >>> jax.tree.map(jnp.shape, params)        # the nn.scan parameters
    {'layers': {'Dense_0': {'bias': (3, 2), 'kernel': (3, 2, 2)}}}
    >>> g = jax.grad(lambda p: Net().apply({"params": p}, jnp.ones((1, 2))))(params)
    >>> g["layers"]["Dense_0"]["bias"].any(axis=1)
    Array([False, False,  True], dtype=bool)
    """
    if not (isinstance(target, type) and issubclass(target, nn.Module)):
        raise TypeError(f"jf.flax.scan takes a linen Module class, got {target!r}")
    for key in ("variable_carry", "methods", "data_transform"):
        if kwargs.get(key):
            raise NotImplementedError(
                f"jf.flax.scan({target.__name__}, {key}=...) is not supported; use nn.scan "
                "(frozen layers then get weight gradients: mask them with jf.freeze).")
    variable_axes = dict(variable_axes or {})
    split_rngs = dict(split_rngs or {})
    base = nn.scan(target, variable_axes=variable_axes, variable_broadcast=variable_broadcast,
                   split_rngs=split_rngs, in_axes=in_axes, out_axes=out_axes, length=length,
                   reverse=reverse, unroll=unroll, **kwargs)
    spec = _ScanSpec(target, frozen, variable_axes, variable_broadcast, split_rngs, in_axes,
                     out_axes, length, reverse, unroll)
    return _frozen_scan_class(base, spec)


def _frozen_scan_class(base: type, spec: _ScanSpec) -> type:
    class FrozenScan(base):  # type: ignore[valid-type, misc]
        def __call__(self, carry: Any, *args: Any, **kwargs: Any) -> Any:
            # init (params being created) is nn.scan's, so the variables are nn.scan's
            if self.is_mutable_collection("params") or "params" not in self.variables:
                return super().__call__(carry, *args, **kwargs)
            return _apply_stack(self, spec, carry, args, kwargs)

    # Same __name__: linen auto-names submodules after their class ("ScanBlock_0").
    FrozenScan.__name__ = base.__name__
    FrozenScan.__qualname__ = f"jf.flax.scan({spec.target.__qualname__})"
    FrozenScan.__module__ = spec.target.__module__
    return FrozenScan


def _apply_stack(mdl: nn.Module, spec: _ScanSpec, carry: Any, args: tuple,
                 kwargs: dict) -> Any:
    """``mdl``'s stack run by ``jf.scan``, one layer = ``target.apply`` on a slice."""
    variables = dict(unfreeze(nn.meta.unbox(mdl.variables)))
    axes = {col: spec.axis_of(col) for col in variables}
    stacked = {c: _to_front(v, axes[c]) for c, v in variables.items() if axes[c] is not None}
    shared = {c: v for c, v in variables.items() if axes[c] is None}
    named = {c for c in spec.variable_axes if isinstance(c, str)} | set(stacked)
    mutable = sorted(c for c in named if c != "params" and mdl.is_mutable_collection(c))
    if any(mdl.is_mutable_collection(c) for c in shared):
        raise NotImplementedError(
            f"jf.flax.scan at {_where(mdl)}: a mutable broadcast collection "
            f"({sorted(shared)}) is not supported at apply.")
    n = spec.length or _stack_len(stacked["params"])
    xs_args, shared_args = _split_args(spec.in_axes, args)
    split_keys, shared_keys = _layer_rngs(mdl, spec, n)
    layer = spec.target(**_fields(mdl, spec.target), parent=None)

    def body(c: Any, xs: Any) -> Any:
        layer_vars, layer_args, layer_keys = xs
        call = [s if a is None else a for a, s in zip(layer_args, shared_args, strict=True)]
        out = layer.apply({**shared, **layer_vars}, c, *call, rngs={**shared_keys, **layer_keys},
                          mutable=mutable or False, **kwargs)
        (c, y), new = out if mutable else (out, {})
        return c, (y, new)

    mask = _params_mask(mdl, spec.frozen, variables["params"], axes["params"])
    frozen_xs = ({c: mask if c == "params" else False for c in stacked}, False, False)
    carry, (ys, new) = scan_stack(body, carry, (stacked, xs_args, split_keys), n,
                                  frozen=frozen_xs, reverse=spec.reverse, unroll=spec.unroll)
    for col, tree in dict(new).items():
        for name, value in dict(tree).items():
            mdl.put_variable(col, name, _from_front(value, spec.axis_of(col)))
    return carry, _from_front(ys, spec.out_axes)


def _where(mdl: nn.Module) -> str:
    return f"path {'/'.join(mdl.scope.path)!r}" if mdl.scope is not None else "an unbound module"


def _to_front(tree: Any, axis: Any) -> Any:
    return tree if axis == 0 else jax.tree.map(lambda a: jnp.moveaxis(a, axis, 0), tree)


def _from_front(tree: Any, axis: Any) -> Any:
    if axis is nn.broadcast or not isinstance(axis, int):
        raise NotImplementedError(f"jf.flax.scan: out_axes={axis!r}; only int axes are supported")
    return tree if axis == 0 else jax.tree.map(lambda a: jnp.moveaxis(a, 0, axis), tree)


def _stack_len(params: Any) -> int:
    leaves = jax.tree.leaves(params)
    return int(leaves[0].shape[0])


def _split_args(in_axes: Any, args: tuple) -> tuple[tuple, tuple]:
    """Per argument: scanned (moved to axis 0) or broadcast; ``None`` in the other tuple."""
    per_arg = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    if len(per_arg) != len(args):
        raise ValueError(f"jf.flax.scan: in_axes={in_axes!r} for {len(args)} arguments")
    scanned, shared = [], []
    for axis, arg in zip(per_arg, args, strict=True):
        if axis is nn.broadcast:
            scanned.append(None)
            shared.append(arg)
        elif isinstance(axis, int):
            scanned.append(_to_front(arg, axis))
            shared.append(None)
        else:
            raise NotImplementedError(
                f"jf.flax.scan: in_axes entry {axis!r}; an int or nn.broadcast per argument "
                "is supported.")
    return tuple(scanned), tuple(shared)


def _layer_rngs(mdl: nn.Module, spec: _ScanSpec, n: int) -> tuple[dict, dict]:
    """A key per layer for the streams ``split_rngs`` splits, one shared key for the others."""
    names = sorted(getattr(mdl.scope, "rngs", {}) or {})
    split = {k: jax.random.split(mdl.make_rng(k), n) for k in names if spec.splits(k)}
    shared = {k: mdl.make_rng(k) for k in names if not spec.splits(k)}
    return split, shared


def _fields(mdl: nn.Module, target: type) -> dict[str, Any]:
    return {f.name: getattr(mdl, f.name) for f in dataclasses.fields(target)
            if f.init and f.name not in ("parent", "name")}


def _params_mask(mdl: nn.Module, frozen: FrozenSpec, params: Any, axis: Any) -> Any:
    """``frozen`` on the stacked params, layer axis first.

    Evaluated as ``jf.freeze`` evaluates it, on all the params the module can
    see (the whole model, or what a lifted transform around it holds), so a
    strict pattern for another part of the model is no error here.
    """
    scope = mdl.scope
    if scope is None:  # never: the drop-in runs inside a bound module's method
        raise TypeError("jf.flax.scan: the module is not bound")
    mask = _mask_from_root(scope.root, scope.path, frozen)
    if mask is None:  # the stack's own params, paths prefixed by the module's path
        prefix = "/".join(scope.path)
        sel = as_selector(frozen)
        mask = sel({prefix: params})[prefix] if prefix else sel(params)

    def front(m: Any, p: Any) -> Any:
        if isinstance(m, bool) or axis == 0:
            return m
        return np.moveaxis(np.broadcast_to(m, np.shape(p)), axis, 0)

    return jax.tree.map(front, mask, params)


def _mask_from_root(root: Any, path: tuple, frozen: FrozenSpec) -> Any:
    """The mask of the subtree at ``path`` of the root scope's params; None if not there."""
    visible = unfreeze(nn.meta.unbox(root.variables().get("params", {})))
    prefix = "/".join(root.path)
    sel = as_selector(frozen)
    mask = sel({prefix: visible})[prefix] if prefix else sel(visible)
    for key in path[len(root.path):]:
        if not isinstance(mask, dict) or key not in mask:
            return None
        mask = mask[key]
    return mask


def nnx_scan(f: Callable[[Any, Any], tuple[Any, Any]], init: Any, stack: Any, *,
             frozen: FrozenSpec, path: str | None = None, reverse: bool = False,
             unroll: int | bool = 1) -> tuple[Any, Any]:
    """:func:`jfreeze.scan` over an NNX stack (built by ``nnx.vmap``), one layer at a time.

    ``f(carry, layer) -> (carry, y)`` gets each layer as an NNX module
    (``nnx.merge`` of the stack's graph with that layer's slice of its state),
    as in the body of an ``nnx.scan`` over layers; the frozen layers' state is
    seen through ``jax.lax.stop_gradient``, so under ``nnx.grad`` their weight
    gradients are never computed. Updates ``f`` makes to non-``Param`` state
    (batch statistics, counters) are written back to ``stack``; parameters are
    read-only inside.

    Args:
      f: the body, ``(carry, layer) -> (carry, y)``.
      init: the initial carry.
      stack: the NNX module whose state is stacked on axis 0 (``nnx.vmap``).
      frozen, path, reverse, unroll: as in :func:`jfreeze.scan`, ``frozen``
        evaluated on ``nnx.state(stack)`` (at ``path`` in the model, so the
        selector given to ``jf.freeze`` on ``nnx.state(model)`` works).

    Returns:
      ``(carry, ys)``, ``ys`` stacked in layer order.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import jfreeze as jf
    >>> make = nnx.vmap(lambda key: nnx.Linear(2, 2, rngs=nnx.Rngs(key)))
    >>> stack = make(jax.random.split(jax.random.key(0), 3))
    >>> def loss(stack):
    ...     h, _ = jf.flax.nnx_scan(lambda h, layer: (layer(h), None), jnp.ones(2), stack,
    ...                             frozen=jf.layers("layers/**", [0]), path="layers")
    ...     return h.sum()
    >>> nnx.grad(loss)(stack).bias[...].any(axis=1)
    Array([False,  True,  True], dtype=bool)
    """
    graphdef, state = nnx.split(stack)

    def body(carry: Any, layer_state: Any) -> Any:
        layer = nnx.merge(graphdef, layer_state)
        carry, y = f(carry, layer)
        return carry, (y, nnx.state(layer, nnx.Not(nnx.Param)))

    carry, (ys, updated) = scan_stack(body, init, state, frozen=frozen, path=path,
                                      reverse=reverse, unroll=unroll)
    if jax.tree.leaves(updated):
        nnx.update(stack, updated)
    return carry, ys


# --------------------------------------------------------------------------
# TrainState with the frozen parameters beside the optimizer.


class TrainState(_train_state.TrainState):
    """``flax.training.train_state.TrainState`` with the frozen parameters held apart.

    ``create(..., frozen=sel)`` splits the parameters (:func:`jfreeze.split`):
    ``params`` holds the trainable leaves (``None`` where a leaf is frozen) and
    is all the optimizer sees, and ``frozen_params`` the frozen ones. The step
    differentiates ``state.params`` only, so the frozen weight gradients are
    never built, even when the step returns the gradients or their norm (with a
    plain ``TrainState`` and ``tx=jf.freeze(...)``, that brings them back).
    ``apply_gradients`` is the inherited one. Jit the step with
    ``donate_argnums=0`` so the frozen buffers are passed through, not copied.

    Element-wise freezing cannot split a leaf: for it use the plain
    ``TrainState`` with ``tx=jf.freeze(..., frozen=jf.elements(...))``.

    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> import jfreeze as jf
    >>> model = nn.Sequential([nn.Dense(4), nn.Dense(2)])
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> state = jf.flax.TrainState.create(apply_fn=model.apply, params=params,
    ...                                   tx=optax.adam(1e-2), frozen=jf.paths("layers_0/**"))
    >>> def loss(trainable, x):
    ...     return state.apply_fn({"params": state.merged(trainable)}, x).sum()
    >>> grads = jax.grad(loss)(state.params, jnp.ones((1, 3)))
    >>> jax.tree.map(jnp.shape, grads)    # no frozen gradient is ever built
    {'layers_0': {'bias': None, 'kernel': None}, 'layers_1': {'bias': (2,), 'kernel': (4, 2)}}
    >>> new = state.apply_gradients(grads=grads)
    >>> jf.assert_frozen(state.merged(), new.merged(), frozen=jf.paths("layers_0/**"))
    """

    frozen_params: Any = struct.field(pytree_node=True, default=None)

    @classmethod
    def create(cls, *, apply_fn: Callable, params: Any, tx: Any,
               frozen: FrozenSpec | None = None, **kwargs: Any) -> TrainState:
        """Splits ``params`` by ``frozen`` and initialises ``tx`` on the trainable part.

        Args:
          apply_fn: usually ``model.apply``.
          params: the full parameter tree.
          tx: the optimizer for the trainable parameters (a plain optax one).
          frozen: what is frozen (a selector, bool mask tree or mask function);
            None: nothing.
          **kwargs: other fields, as in flax's ``TrainState.create``.
        """
        if frozen is None:
            trainable, frozen_params = params, jax.tree.map(lambda _: None, params)
        else:
            trainable, frozen_params = split(params, frozen=frozen)
        return super().create(apply_fn=apply_fn, params=trainable, tx=tx,
                              frozen_params=frozen_params, **kwargs)

    def merged(self, trainable: Any = None) -> Any:
        """The full parameter tree: ``trainable`` (default ``self.params``) and the frozen
        leaves."""
        return merge(self.params if trainable is None else trainable, self.frozen_params)


_NOT_COLLECTIONS = ("params", "opt_state", "frozen_params")


def _state_parts(state: Any) -> tuple[Any, dict[str, Any]]:
    """The full params of a train state, and its other pytree fields by name."""
    if not isinstance(state, _train_state.TrainState):
        raise TypeError(
            "expected a flax TrainState (flax.training.train_state.TrainState, "
            f"jf.flax.TrainState or a subclass), got {type(state).__name__}"
        )
    params = state.merged() if isinstance(state, TrainState) else state.params
    others = {
        f.name: getattr(state, f.name) for f in dataclasses.fields(state)
        if f.metadata.get("pytree_node", True) and f.name not in _NOT_COLLECTIONS
    }
    return params, others


def save_train_state(directory: Any, state: Any, *, frozen: FrozenSpec,
                     **kwargs: Any) -> dict:
    """Saves a Flax ``TrainState`` trainable-only: :func:`jfreeze.save_trainable` on its fields.

    The params (for :class:`TrainState`, the merged tree) and the optimizer
    state go where ``save_trainable`` puts them; every other pytree field
    (``step``, ``batch_stats``, any field a subclass adds) is a collection, its
    frozen leaves saved by reference: ``frozen`` applies to each by path, so the
    ``batch_stats`` of a frozen ``backbone/**`` are frozen as its weights are.
    ``apply_fn`` and ``tx`` are code, not saved.

    Args:
      directory: where to write.
      state: ``flax.training.train_state.TrainState`` (or a subclass, e.g. with
        ``batch_stats``) or :class:`TrainState`.
      frozen: what is frozen in the params (and, by path, in the other fields).
      **kwargs: as :func:`jfreeze.save_trainable` takes them (``collection_frozen``,
        ``frozen_source``, ``include_frozen``, ``force``, ...).

    Returns:
      The manifest written.

    >>> import os, tempfile, jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> import jfreeze as jf
    >>> class State(jf.flax.TrainState):
    ...     batch_stats: dict | None = None
    >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=False)])
    >>> v = model.init(jax.random.key(0), jnp.ones((2, 3)))
    >>> frozen = jf.paths("layers_0/**")
    >>> state = State.create(apply_fn=model.apply, params=v["params"], tx=optax.adam(1e-2),
    ...                      frozen=frozen, batch_stats=v["batch_stats"])
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     m = jf.flax.save_train_state(os.path.join(tmp, "c"), state, frozen=frozen)
    ...     back = jf.flax.restore_train_state(os.path.join(tmp, "c"), state, frozen=frozen)
    >>> sorted(m["collections"]), back.step
    (['batch_stats', 'step'], 0)
    """
    _refuse_collections_kwarg(kwargs, "save_train_state")
    params, others = _state_parts(state)
    return save_trainable(directory, params, state.opt_state, frozen=frozen,
                          collections=others, **kwargs)


def _refuse_collections_kwarg(kwargs: dict, who: str) -> None:
    if "collections" in kwargs:
        raise TypeError(
            f"jf.flax.{who} takes no collections=: every pytree field of the state besides "
            "params and opt_state is a collection already; add a field to the TrainState "
            "subclass, or use jf.save_trainable / jf.restore_trainable on the trees."
        )


def restore_train_state(directory: Any, state: Any, *, frozen: FrozenSpec,
                        **kwargs: Any) -> Any:
    """Restores a :func:`save_train_state` checkpoint into ``state``, a template.

    ``state`` is a fresh train state of the same class: its frozen leaves
    (params and collections, e.g. the pretrained backbone's weights and
    ``batch_stats``) are kept, after their fingerprints are checked; everything
    else (``step``, trainable params, optimizer state, trainable statistics) is
    read back by path, with every check of :func:`jfreeze.restore_trainable`
    (errors name the collection and path). A :class:`TrainState` is split
    again by ``frozen``.

    Args:
      directory: the checkpoint.
      state: the template (e.g. ``TrainState.create(...)`` on freshly loaded
        pretrained weights).
      frozen: what is frozen, as when saved.
      **kwargs: ``collection_frozen``, ``verify_frozen``, as
        :func:`jfreeze.restore_trainable` takes them.

    Returns:
      ``state`` with the restored fields (``state.replace(...)``).
    """
    _refuse_collections_kwarg(kwargs, "restore_train_state")
    params, others = _state_parts(state)
    params, opt_state, others = restore_trainable(
        directory, params, state.opt_state, frozen=frozen, collections=others, **kwargs)
    if isinstance(state, TrainState):
        trainable, frozen_params = split(params, frozen=frozen)
        return state.replace(params=trainable, frozen_params=frozen_params,
                             opt_state=opt_state, **others)
    return state.replace(params=params, opt_state=opt_state, **others)


# --------------------------------------------------------------------------
# NNX filters.


def _value(x: Any) -> Any:
    """The array inside an NNX variable (``get_value()`` since flax 0.12, ``.value`` before)."""
    if isinstance(x, nnx.Variable):
        return x.get_value() if hasattr(x, "get_value") else x.value
    return x


@dataclasses.dataclass(frozen=True)
class NNXFilter:
    """An NNX filter ``(path, value) -> bool`` made from a jfreeze selector.

    Built by :func:`nnx_filter`; combine it with NNX's own filters
    (``nnx.All(nnx.Param, f)``, ``nnx.Not(f)``).
    """

    selector: Selector

    def __post_init__(self) -> None:
        if not self.selector.per_leaf:  # refused when built, not at first use
            raise TypeError(
                "jf.flax.nnx_filter takes a selector (jf.paths, jf.regex, jf.where, ...): an "
                "NNX filter sees one variable at a time, and a mask tree or mask function "
                "(alone or inside a combination) needs the whole tree."
            )

    def __call__(self, path: tuple, value: Any) -> bool:
        p = path_str(path)
        with jax.ensure_compile_time_eval():  # shape-only jnp code stays concrete
            m = simplify(checked_leaf_mask(self.selector, p, shape_dtype(_value(value))))
        if not isinstance(m, bool):
            raise ValueError(
                f"jf.flax.nnx_filter({self.selector!r}) selects only some elements of the "
                f"variable at path {p!r}; an NNX filter takes or leaves whole variables. "
                "To freeze elements, pass tx=jf.freeze(tx, frozen=jf.elements(...)) to "
                "nnx.Optimizer and filter whole variables with wrt."
            )
        return m

    def __repr__(self) -> str:
        return f"nnx_filter({self.selector!r})"


def nnx_filter(selector: Selector, *, model: Any) -> NNXFilter:
    """A jfreeze selector as an NNX filter, with paths spelled as jfreeze spells them.

    NNX filters see one variable at a time, so a pattern that matches nothing
    cannot be caught by the filter itself. The filter is therefore always built
    for a ``model``: the selector is checked against its variables now, and a
    typo raises (naming the closest paths) as strict patterns do elsewhere in
    jfreeze; it never trains everything silently. Element-wise selections
    cannot be NNX filters (an error); freeze elements with ``jf.freeze`` as the
    optimizer's ``tx``. The selector sees each variable's value as a
    ``jax.ShapeDtypeStruct``; combine with ``nnx.Param`` etc. for the type.

    Args:
      selector: a jfreeze selector (``jf.paths``, ``jf.regex``, ``jf.where``,
        and their combinations).
      model: the NNX module (or graph node) the filter is for; required, so
        that every strict pattern is checked against real paths.

    Returns:
      An :class:`NNXFilter`, usable wherever NNX takes a filter:
      ``nnx.Optimizer(model, tx, wrt=...)``, ``nnx.DiffState(0, ...)``,
      ``nnx.state``, ``nnx.split``.

    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import jfreeze as jf
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.backbone = nnx.Linear(2, 3, rngs=rngs)
    ...         self.head = nnx.Linear(3, 1, rngs=rngs)
    >>> model = Net(nnx.Rngs(0))
    >>> frozen = jf.flax.nnx_filter(jf.paths("backbone/**"), model=model)
    >>> trainable = nnx.All(nnx.Param, nnx.Not(frozen))
    >>> opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=trainable)
    >>> sorted(nnx.to_flat_state(nnx.state(model, trainable)).paths)  # what trains
    [('head', 'bias'), ('head', 'kernel')]
    >>> jf.flax.nnx_filter(jf.paths("backbon/**"), model=model)
    Traceback (most recent call last):
    ValueError: jf.paths('backbon/**') matches no leaf of the tree. ... 'backbone/**', ...
    """
    filt = NNXFilter(as_selector(selector))
    _check_on_model(filt, model)
    return filt


def _check_on_model(filt: NNXFilter, model: Any) -> None:
    """Evaluates the filter's selector strictly on the variables of an NNX ``model``.

    The filter is first run on every variable, so a selector that cannot answer
    one variable at a time fails here, not at first use; then the usual jfreeze
    errors: a pattern that matches no variable (naming the closest paths), or
    an element-wise selection (naming the path).
    """
    selector = filt.selector
    flat = nnx.to_flat_state(nnx.state(model))
    for p, v in flat:
        filt(p, v)  # a part without leaf_mask, or a bad answer: a TypeError naming the path
    # A flat dict keyed by the path strings spells every path exactly as the
    # NNX filter does, so strictness is checked on the same strings.
    by_path = {path_str(p): shape_dtype(_value(v)) for p, v in flat}
    flat_sel, masks = selector.masks(by_path)
    partial = [p for p, m in zip(flat_sel.paths, masks, strict=True) if not isinstance(m, bool)]
    if partial:
        raise ValueError(
            f"jf.flax.nnx_filter({selector!r}) selects only some elements of "
            f"{describe_paths(partial)}; an NNX filter takes or leaves whole variables. "
            "To freeze elements, pass tx=jf.freeze(tx, frozen=jf.elements(...)) to nnx.Optimizer."
        )
