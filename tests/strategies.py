"""Hypothesis strategies (random param trees and jfreeze selections), and the two
helpers every test file uses: ``MODES`` (run a check under jax.jit and eagerly)
and ``bits`` (compare floats bit for bit).

A *skeleton* is a nested tree of dicts, lists and tuples whose leaves are
:class:`Leaf` placeholders (a shape and a dtype); :func:`materialize` turns it
into arrays. Shapes come from a small fixed pool so that eager op compilation is
cached across examples and jit retraces stay cheap. ``skeletons(rich=True)``
adds the other tree kinds users have: NamedTuples, registered dataclasses, a
*callable* custom node (:class:`Module`, like an Equinox module) and ``None``
holes. :func:`special_values` gives the bit patterns an add may change
(subnormals, signalling and quiet NaNs with payloads, ``±0.0``, ``±inf``) for
float32, bfloat16, float16 and complex64.

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
import os
import pathlib
import re
import subprocess
import sys
from typing import Any, NamedTuple

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
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


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "complex64")

# Bit patterns an add may change (XLA flushes subnormals, quiets NaNs), and
# the ones it keeps: -0.0, +0.0, smallest and largest subnormal, a negative
# subnormal, signalling NaNs (+/-, with payload), quiet NaNs with payloads, +/-inf.
SPECIAL_BITS = {
    "float32": [0x80000000, 0x0, 0x1, 0x7FFFFF, 0x80000001, 0x7F800001, 0xFF800123,
                0x7FC12345, 0xFFC00001, 0x7F800000, 0xFF800000],
    "bfloat16": [0x8000, 0x0, 0x1, 0x7F, 0x8001, 0x7F81, 0xFF81, 0x7FC1, 0xFFC1, 0x7F80, 0xFF80],
    "float16": [0x8000, 0x0, 0x1, 0x3FF, 0x8001, 0x7C01, 0xFC01, 0x7E01, 0xFE01, 0x7C00, 0xFC00],
}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A placeholder leaf of a skeleton tree (not a pytree node)."""

    shape: tuple[int, ...]
    dtype: str = "float32"


class Pair(NamedTuple):
    first: Any
    second: Any


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w", "b"], meta_fields=[])
@dataclasses.dataclass
class Block:
    w: Any
    b: Any


class Module:
    """A *callable* custom pytree node with named attributes, like an Equinox
    module: optax calls a callable label/mask tree, which must never happen."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def __call__(self, *args, **kwargs):
        raise AssertionError("a Module-shaped tree was called (a label tree reached optax?)")

    def __eq__(self, other):
        return type(other) is Module and vars(self) == vars(other)

    __hash__ = None


jax.tree_util.register_pytree_with_keys(
    Module,
    lambda m: ([(jax.tree_util.GetAttrKey(k), v) for k, v in sorted(vars(m).items())],
               tuple(sorted(vars(m)))),
    lambda names, children: Module(**dict(zip(names, children, strict=True))),
)


def skeletons(max_leaves: int = 5, *, rich: bool = False, dtypes=("float32",)) -> st.SearchStrategy:
    """Nested dicts / lists / tuples (1-3 children each) of :class:`Leaf`.

    ``rich``: also :class:`Pair` (NamedTuple), :class:`Block` (registered
    dataclass), :class:`Module` (callable custom node) and ``None`` holes in
    dicts (never a tree without leaves). ``dtypes``: the leaves' dtypes.
    """
    leaf = st.builds(Leaf, st.sampled_from(SHAPES), st.sampled_from(dtypes))

    def extend(children):
        kinds = [
            st.dictionaries(st.sampled_from(KEYS), children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3).map(tuple),
        ]
        if rich:
            kinds += [
                st.dictionaries(st.sampled_from(KEYS), st.one_of(children, st.none()),
                                min_size=1, max_size=3),
                st.builds(Pair, children, children),
                st.builds(Block, children, children),
                st.dictionaries(st.sampled_from(["weight", "bias", "layers"]), children,
                                min_size=1, max_size=3).map(lambda d: Module(**d)),
            ]
        return st.one_of(*kinds)

    trees = st.recursive(leaf, extend, max_leaves=max_leaves)
    return trees.filter(lambda t: len(jax.tree.leaves(t)) > 0) if rich else trees


def special_values(rng: np.random.Generator, dtype: str, shape) -> np.ndarray:
    """Random picks of :data:`SPECIAL_BITS` (complex64: for each part)."""
    if dtype == "complex64":
        re, im = (special_values(rng, "float32", shape) for _ in range(2))
        out = np.empty(shape, np.complex64)
        out.real, out.imag = re, im  # plain copies: the bits are kept
        return out
    pool = np.array(SPECIAL_BITS[dtype], np.dtype(f"uint{8 * jnp.dtype(dtype).itemsize}"))
    return np.asarray(pool[rng.integers(0, len(pool), shape)]).view(jnp.dtype(dtype))


def random_array(rng: np.random.Generator, shape, dtype: str = "float32") -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    if dtype == "complex64":
        return np.asarray(x + 1j * rng.standard_normal(shape), np.complex64)
    return np.asarray(x, jnp.dtype(dtype))


def leaf_paths(tree: Any) -> list[str]:
    """Path strings of a tree's leaves, in flatten order (jfreeze spelling)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [jf.path_str(p) for p, _ in flat]


def materialize(skeleton: Any, rng: np.random.Generator) -> Any:
    """Random NumPy arrays of the skeleton's shapes and dtypes."""
    return jax.tree.map(lambda leaf: random_array(rng, leaf.shape, leaf.dtype), skeleton)


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

    element_leaves = [
        (p, m) for p, m in zip(paths, masks, strict=True) if isinstance(m, np.ndarray)
    ]
    if draw(st.booleans()):
        # Direct: frozen = whole frozen leaves | frozen elements.
        parts = [whole([p for p, m in zip(paths, masks, strict=True) if m is True])]
        parts += [jf.elements(_glob_escape(p), m) for p, m in element_leaves]
        selector = functools.reduce(operator.or_, parts)
    else:
        # Complement: frozen = ~(trainable leaves | trainable elements).
        parts = [whole([p for p, m in zip(paths, masks, strict=True) if m is False])]
        parts += [jf.elements(_glob_escape(p), ~m) for p, m in element_leaves]
        selector = ~functools.reduce(operator.or_, parts)
    return Selection(selector, masks)


@st.composite
def trees_and_selections(draw, max_leaves: int = 5, *, rich: bool = False,
                         frozen_dtypes=("float32",)):
    """``(params, selection, rng)``: NumPy params and a selection.

    Leaves are float32, except whole frozen leaves, whose dtype is drawn from
    ``frozen_dtypes`` (they never reach the inner optimizer). ``rich``: see
    :func:`skeletons`.
    """
    skeleton = draw(skeletons(max_leaves, rich=rich))
    selection = draw(selections(skeleton))
    leaves, treedef = jax.tree.flatten(skeleton)
    leaves = [Leaf(x.shape, draw(st.sampled_from(frozen_dtypes))) if m is True else x
              for x, m in zip(leaves, selection.masks, strict=True)]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    return materialize(treedef.unflatten(leaves), rng), selection, rng


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


def run_on_host_devices(script: pathlib.Path, devices: int, marker: str, *args: str) -> str:
    """Runs ``script`` in a fresh process with ``devices`` CPU devices (XLA_FLAGS is read at
    jax import, so a mesh test needs its own process); asserts it exits 0 and prints ``marker``."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = flags.strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = pathlib.Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script), *args], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert marker in proc.stdout, proc.stdout
    return proc.stdout
