"""Learning-rate multipliers per label, and layer-wise learning-rate decay labels."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Hashable, Mapping
from typing import Any, NamedTuple

import numpy as np
import optax

from jfreeze._routing import constant, resolve_labels
from jfreeze._tree import Flat, closest, describe_paths
from jfreeze.labeling import Labels
from jfreeze.labeling import labels as make_labels
from jfreeze.selectors import FrozenSpec, where

__all__ = ["LayerwiseDecay", "layerwise_decay", "scale_by_label"]


def _check_multiplier(label: Hashable, m: Any) -> float:
    if isinstance(m, (bool, np.bool_)) or not isinstance(m, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"jf.scale_by_label: the multiplier of {label!r} must be a Python number, got "
            f"{type(m).__name__}"
        )
    m = float(m)
    if m == 0.0:
        raise ValueError(
            f"jf.scale_by_label: the multiplier of {label!r} is 0. A zero multiplier is not a "
            "freeze (the inner optimizer keeps state and weight decay for those leaves, and "
            "NaN * 0 is NaN): use jf.freeze(..., frozen=...) or jf.partition({..: None})."
        )
    if not math.isfinite(m) or m < 0:
        raise ValueError(
            f"jf.scale_by_label: the multiplier of {label!r} is {m}; multipliers are positive "
            "and finite (a negative one would ascend the loss)."
        )
    return m


def scale_by_label(
    multipliers: Mapping[Hashable, float], labels: Any
) -> optax.GradientTransformationExtraArgs:
    """Multiplies each leaf's update by the multiplier of its label (state-free).

    Chain it after an optimizer to get per-label learning rates, as the
    ``lr_mults`` / backbone multipliers of big_vision and scenic:
    ``optax.chain(optax.adamw(1e-3), jf.scale_by_label({"backbone": 0.1,
    "head": 1.0}, label_fn))`` trains the backbone at ``1e-4`` (its weight
    decay scaled alike, as a per-label learning rate would). Built from
    ``optax.partition`` of ``optax.scale``.

    It composes with freezing either way round: a frozen update is ``-0.0``,
    and ``-0.0 * m`` is ``-0.0``, so frozen bits are kept. Inside
    ``jf.freeze(...)`` the frozen leaves are routed away before it; a
    multiplier whose label no leaf carries is therefore allowed (it is unused),
    while a label without a multiplier is an error naming its paths.

    Args:
      multipliers: ``{label: positive number}``.
      labels: a label tree (or a prefix of params), or a function ``params ->
        label tree`` such as :func:`jfreeze.labels` (for multipliers per
        selector) or the labels of :func:`layerwise_decay`.

    >>> import jax.numpy as jnp, optax
    >>> import jfreeze as jf
    >>> params = {"backbone": jnp.ones(2), "head": jnp.ones(2)}
    >>> label_fn = jf.labels({"backbone": jf.paths("backbone")}, default="head")
    >>> mults = {"backbone": 0.1, "head": 1.0}
    >>> tx = optax.chain(optax.sgd(1.0), jf.scale_by_label(mults, label_fn))
    >>> updates, _ = tx.update({"backbone": jnp.ones(2), "head": jnp.ones(2)}, tx.init(params))
    >>> updates
    {'backbone': Array([-0.1, -0.1], dtype=float32), 'head': Array([-1., -1.], dtype=float32)}
    """
    if not isinstance(multipliers, Mapping) or not multipliers:
        raise TypeError("jf.scale_by_label takes a non-empty dict {label: multiplier}")
    mults = {k: _check_multiplier(k, v) for k, v in multipliers.items()}

    def make(tree):
        tree_labels, carriers = resolve_labels(
            labels, tree, mults, who="jf.scale_by_label", noun="multiplier"
        )
        txs = {k: optax.scale(mults[k]) for k in carriers}
        return optax.partition(txs, constant(tree_labels))  # never the (callable) tree

    def init_fn(params):
        return make(params).init(params)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        return make(updates).update(updates, state, params)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@dataclasses.dataclass(frozen=True, repr=False)
class _InLayer:
    """``jf.where`` predicate: the *outermost* ``name_<i>`` or ``name/<i>`` segment has index i."""

    name: str
    index: int

    def __call__(self, path: str, leaf: Any) -> bool:
        return _layer_index(self.name, path) == self.index

    def __repr__(self):
        return f"layer({self.name!r}, {self.index})"


def _layer_regex(name: str) -> re.Pattern:
    return re.compile(rf"(?:^|/){re.escape(name)}(?:_|/)(\d+)(?=/|$)")


def _layer_index(name: str, path: str) -> int | None:
    found = _layer_regex(name).search(path)
    return None if found is None else int(found.group(1))


class LayerwiseDecay(NamedTuple):
    """What :func:`layerwise_decay` returns; unpacks into :func:`scale_by_label`'s arguments."""

    multipliers: dict[str, float]
    labels: Labels


def layerwise_decay(
    params: Any,
    *,
    decay: float,
    layers: str = "layers",
    bottom: FrozenSpec | None = None,
) -> LayerwiseDecay:
    """Layer-wise learning-rate decay multipliers (BEiT/ELECTRA style) for a layer stack.

    Finds the stack from the path segments ``<layers>_<i>`` (``layers_0 ..
    layers_N-1``, flax linen style) or ``<layers>/<i>`` (a list of layers). With
    N layers, leaves of layer ``i`` get ``decay ** (N - i)``; leaves outside the
    stack (the head, a final norm) get ``1``; the ``bottom`` leaves (embeddings)
    get ``decay ** (N + 1)``. The labels are ``"bottom"``, ``"<layers>_<i>"`` and
    ``"top"``. Only paths, shapes and dtypes are used, so ``params`` may be a
    tree of ``jax.ShapeDtypeStruct`` (``jax.eval_shape(model.init, ...)``).

    Args:
      params: the parameter tree (arrays or shape structs).
      decay: the per-layer factor, e.g. ``0.75``.
      layers: the stack's name in the paths (``"layers"``, ``"blocks"``,
        ``"encoderblock"``, ``"h"``, ...). With nested stacks, the outermost
        index counts.
      bottom: the leaves below the stack (embeddings), a selector.

    Returns:
      ``(multipliers, labels)``: pass them to :func:`scale_by_label`, or scale
      the multipliers further (e.g. a backbone factor) before.

    >>> import jax.numpy as jnp, optax
    >>> import jfreeze as jf
    >>> params = {"embed": jnp.ones(2), "layers_0": {"w": jnp.ones(2)},
    ...           "layers_1": {"w": jnp.ones(2)}, "head": jnp.ones(2)}
    >>> mults, label_fn = jf.layerwise_decay(params, decay=0.5, bottom=jf.paths("embed"))
    >>> mults
    {'bottom': 0.125, 'layers_0': 0.25, 'layers_1': 0.5, 'top': 1.0}
    >>> label_fn(params)["layers_1"]
    {'w': 'layers_1'}
    >>> tx = optax.chain(optax.adam(1e-3), jf.scale_by_label(mults, label_fn))
    """
    decay = float(decay)
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"jf.layerwise_decay: decay={decay} is not in (0, 1]")
    flat = Flat.of(params)
    found = sorted({i for p in flat.paths if (i := _layer_index(layers, p)) is not None})
    if not found:
        near = closest(f"{layers}_0/**", flat.paths)
        raise ValueError(
            f"jf.layerwise_decay: no path has a {layers!r}_<i> or {layers!r}/<i> segment. "
            f"Closest paths: {describe_paths(near)}. Pass layers= the stack's name."
        )
    n = found[-1] + 1
    rules: dict[Hashable, FrozenSpec] = {}
    mults: dict[str, float] = {}
    if bottom is not None:
        rules["bottom"] = bottom
        mults["bottom"] = decay ** (n + 1)
    for i in found:
        rules[f"{layers}_{i}"] = where(_InLayer(layers, i))
        mults[f"{layers}_{i}"] = decay ** (n - i)
    mults["top"] = 1.0
    label_fn = make_labels(rules, default="top")
    label_fn(params)  # check now: a bottom= typo is an error here, naming the closest paths
    return LayerwiseDecay(mults, label_fn)
