"""Hypothesis strategies (random param trees and jfreeze selections), and the two
helpers every test file uses: ``MODES`` (run a check under jax.jit and eagerly)
and ``bits`` (compare floats bit for bit).

A *skeleton* is a nested tree of dicts, lists and tuples whose leaves are
:class:`Leaf` placeholders (a shape); :func:`materialize` turns it into float32
arrays. Shapes come from a small fixed pool so that eager op compilation is
cached across examples and jit retraces stay cheap.

A :class:`Selection` pairs a jfreeze selector (whole leaves via ``jf.paths`` /
``jf.regex``, elements via ``jf.elements``, sometimes spelled as a complement
with ``~``) with the ground-truth mask of each leaf, computed independently of
jfreeze: ``False`` (trainable), ``True`` (whole leaf frozen) or a NumPy bool
array of the leaf's shape (some elements frozen, never all or none).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
from typing import Any

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings

import jfreeze as jf

#: ``@pytest.mark.parametrize("mode", MODES)``: ``mode(f)`` is ``jax.jit(f)`` or ``f``.
MODES = [pytest.param(jax.jit, id="jit"), pytest.param(lambda f: f, id="eager")]


def bits(x) -> np.ndarray:
    """The bit pattern of a float array (so -0.0 != +0.0 and NaN == same NaN)."""
    x = np.asarray(x)
    return x.view(np.dtype(f"uint{8 * x.dtype.itemsize}"))


SHAPES = [(), (2,), (3,), (2, 3)]
KEYS = ["a", "b", "w", "kernel", "bias"]


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A placeholder leaf of a skeleton tree (not a pytree node)."""

    shape: tuple[int, ...]


def skeletons(max_leaves: int = 5) -> st.SearchStrategy:
    """Nested dicts / lists / tuples (1-3 children each) of :class:`Leaf`."""
    leaf = st.sampled_from(SHAPES).map(Leaf)

    def extend(children):
        return st.one_of(
            st.dictionaries(st.sampled_from(KEYS), children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3).map(tuple),
        )

    return st.recursive(leaf, extend, max_leaves=max_leaves)


def leaf_paths(tree: Any) -> list[str]:
    """Path strings of a tree's leaves, in flatten order (jfreeze spelling)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [jf.path_str(p) for p, _ in flat]


def materialize(skeleton: Any, rng: np.random.Generator) -> Any:
    """Random float32 NumPy arrays of the skeleton's shapes."""
    return jax.tree.map(
        lambda leaf: rng.standard_normal(leaf.shape).astype(np.float32), skeleton
    )


@dataclasses.dataclass
class Selection:
    """A selector and the ground-truth mask of each leaf (flatten order)."""

    selector: jf.Selector
    masks: list  # per leaf: False, True, or np bool array (partial)

    def kind(self, i: int) -> str:
        m = self.masks[i]
        return "frozen" if m is True else "trainable" if m is False else "elements"

    def frozen_elements(self, i: int, shape) -> np.ndarray:
        """Bool array of the frozen elements of leaf ``i``."""
        m = self.masks[i]
        return np.broadcast_to(np.asarray(m, dtype=bool), shape)


def _glob_escape(path: str) -> str:
    return re.sub(r"([*?\[\]])", r"[\1]", path)


@st.composite
def selections(draw, skeleton: Any) -> Selection:
    """A random whole-leaf + element-wise selection of ``skeleton``'s leaves."""
    flat = jax.tree.leaves(skeleton)
    paths = leaf_paths(skeleton)
    masks: list = []
    for leaf in flat:
        size = int(np.prod(leaf.shape, dtype=int))
        kinds = ["trainable", "frozen"] + (["elements"] if size > 1 else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "elements":
            bits = draw(st.lists(st.booleans(), min_size=size, max_size=size))
            m = np.array(bits, dtype=bool).reshape(leaf.shape)
            # An element mask selecting all (none) of a leaf is a whole-leaf
            # freeze (no freeze): that is the ground truth jfreeze must follow.
            masks.append(True if m.all() else False if not m.any() else m)
        else:
            masks.append(kind == "frozen")

    def whole(ps: list[str]) -> jf.Selector:
        if not ps:
            return jf.nothing
        if draw(st.booleans()):
            return jf.paths(*map(_glob_escape, ps))
        return jf.regex("|".join(re.escape(p) for p in ps))

    element_leaves = [(p, m) for p, m in zip(paths, masks) if isinstance(m, np.ndarray)]
    if draw(st.booleans()):
        # Direct: frozen = whole frozen leaves | frozen elements.
        parts = [whole([p for p, m in zip(paths, masks) if m is True])]
        parts += [jf.elements(_glob_escape(p), m) for p, m in element_leaves]
        selector = functools.reduce(operator.or_, parts)
    else:
        # Complement: frozen = ~(trainable leaves | trainable elements).
        parts = [whole([p for p, m in zip(paths, masks) if m is False])]
        parts += [jf.elements(_glob_escape(p), ~m) for p, m in element_leaves]
        selector = ~functools.reduce(operator.or_, parts)
    return Selection(selector, masks)


@st.composite
def trees_and_selections(draw, max_leaves: int = 5):
    """``(params, selection, rng)``: NumPy float32 params and a selection."""
    skeleton = draw(skeletons(max_leaves))
    selection = draw(selections(skeleton))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    return materialize(skeleton, rng), selection, rng


def property_settings(max_examples: int, *, shrink: bool = True):
    """Modest, deadline-free hypothesis settings.

    Under jit every example is a fresh compile, so shrinking a failure can take
    many minutes: pass ``shrink=False`` there (the failing example is still
    printed in full).
    """
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(
        max_examples=max_examples,
        deadline=None,
        phases=phases,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
