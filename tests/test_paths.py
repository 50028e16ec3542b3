"""One spelling of a key path: dict keys, indices, attribute names, joined with '/'."""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

import jfreeze as jf
from jfreeze.paths import broadcast_prefix, closest, leaves_with_paths

NT = collections.namedtuple("NT", ["kernel", "bias"])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Linear:
    w: jax.Array
    b: jax.Array
    name: str = dataclasses.field(default="lin", metadata=dict(static=True))


@struct.dataclass
class FlaxLinear:
    kernel: jax.Array
    act: str = struct.field(pytree_node=False, default="relu")


def paths_of(tree):
    return [p for p, _ in leaves_with_paths(tree)[0]]


@pytest.mark.parametrize(
    "tree, expected",
    [
        ({"backbone": {"kernel": 1.0}}, ["backbone/kernel"]),
        ({"layers": [1.0, 2.0]}, ["layers/0", "layers/1"]),
        ({"pair": (1.0, (2.0,))}, ["pair/0", "pair/1/0"]),
        ({"nt": NT(1.0, 2.0)}, ["nt/kernel", "nt/bias"]),
        ({"lin": Linear(jnp.ones(2), jnp.ones(1))}, ["lin/w", "lin/b"]),  # static field: no leaf
        ({"flax": FlaxLinear(jnp.ones(2))}, ["flax/kernel"]),
        ({3: 1.0, 10: 2.0}, ["3", "10"]),
        (jnp.ones(2), [""]),  # a single array: the empty path
        ([{"a": NT(1.0, [2.0])}], ["0/a/kernel", "0/a/bias/0"]),
    ],
    ids=["dict", "list", "tuple", "namedtuple", "register_dataclass", "flax_struct",
         "int_keys", "single_array", "nested"],
)
def test_path_spelling(tree, expected):
    assert paths_of(tree) == expected
    # jf.path_str spells raw jax key paths the same way
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert [jf.path_str(p) for p, _ in flat] == expected


def test_path_str_accepts_raw_keys_as_nnx_state_paths():
    assert jf.path_str(("encoder", "layers", 0, "kernel")) == "encoder/layers/0/kernel"


def test_same_spelling_in_selectors_errors_and_summary():
    params = {"enc": [NT(jnp.ones(2), jnp.ones(1))], "lin": Linear(jnp.ones(3), jnp.ones(1))}
    assert jf.paths("enc/0/kernel", "lin/w")(params) == {
        "enc": [NT(True, False)], "lin": Linear(True, False)
    }
    with pytest.raises(ValueError, match="'enc/0/kernel'"):
        jf.paths("enc/0/kernl")(params)
    s = jf.summary(params, frozen=jf.paths("lin/**"))
    assert {r.name for r in s.rows} == {"enc", "lin"}
    with pytest.raises(AssertionError, match="'lin/w'"):
        jf.assert_frozen(params, {**params, "lin": Linear(jnp.zeros(3), jnp.ones(1))},
                         frozen=jf.paths("lin/**"))


def test_closest_suggests_subtrees_and_leaves():
    paths = ["backbone/layers/0/kernel", "backbone/layers/0/bias", "head/kernel"]
    assert closest("backbon/**", paths)[0] == "backbone/**"
    assert closest("head/kernl", paths)[0] == "head/kernel"


def test_broadcast_prefix_scalars_and_subtrees():
    tree = {"a": [np.ones(2), np.ones(3)], "b": np.ones(1)}
    assert broadcast_prefix(True, tree, what="mask") == [True, True, True]
    assert broadcast_prefix({"a": False, "b": True}, tree, what="mask") == [False, False, True]
    with pytest.raises(ValueError, match="covers 2 leaves"):
        broadcast_prefix({"a": np.array([True, False]), "b": True}, tree, what="mask")
