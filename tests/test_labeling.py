"""jf.labels: pure label functions that plain optax accepts; jf.partition with None."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from strategies import MODES, bits

import jfreeze as jf


def make_params():
    return {
        "backbone": {"kernel": jnp.array([[1.0, -0.0], [2.0, 3.0]]),
                     "bias": jnp.array([-0.0, 1.0])},
        "head": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)},
        "norm": {"scale": jnp.ones(2)},
    }


LABEL_FN = jf.labels(
    {
        "frozen": jf.paths("backbone/**"),
        "decay": jf.paths("**/kernel"),
        "head": jf.paths("head/**"),
    },
    default="other",
)


def test_first_matching_rule_wins_and_default_fills_the_rest():
    assert LABEL_FN(make_params()) == {
        "backbone": {"kernel": "frozen", "bias": "frozen"},  # not 'decay': frozen came first
        "head": {"kernel": "decay", "bias": "head"},
        "norm": {"scale": "other"},
    }


def test_labels_are_pure_static_and_work_on_shape_dtype_structs():
    params = make_params()
    structs = jax.eval_shape(lambda p: p, params)
    assert LABEL_FN(structs) == LABEL_FN(params)
    assert LABEL_FN(params) == LABEL_FN(params)
    hash(LABEL_FN)
    assert repr(jf.labels({"f": jf.paths("a")}, default="t")) == (
        "labels({'f': paths('a')}, default='t')")


def test_rules_accept_mask_trees_and_mask_functions():
    fn = jf.labels({"frozen": {"backbone": True, "head": False, "norm": False}}, default="train")
    assert fn(make_params())["backbone"] == {"kernel": "frozen", "bias": "frozen"}
    assert fn(make_params())["head"] == {"kernel": "train", "bias": "train"}


def _step(tx, params, mode, steps=2):
    def run(params):
        state = tx.init(params)
        for _ in range(steps):
            grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params, state

    return mode(run)(params)


@pytest.mark.parametrize("mode", MODES)
def test_label_fn_feeds_plain_optax_partition_and_multi_transform(mode):
    txs = {"frozen": optax.set_to_zero(), "head": optax.adam(0.1), "decay": optax.adamw(0.1),
           "other": optax.sgd(0.1)}
    params = make_params()
    for make in (optax.partition, optax.multi_transform):
        new, _ = _step(make(txs, LABEL_FN), params, mode)
        # values equal (plain set_to_zero adds +0.0, so bits are not promised)
        np.testing.assert_array_equal(new["backbone"]["kernel"], params["backbone"]["kernel"])
        assert not np.array_equal(new["head"]["kernel"], params["head"]["kernel"])
        np.testing.assert_allclose(new["norm"]["scale"], 1 - 2 * 0.1 * 0.5)


@pytest.mark.parametrize("mode", MODES)
def test_jf_partition_none_means_frozen_bits_kept_no_state(mode):
    params = make_params()
    tx = jf.partition(
        {"frozen": None, "head": optax.adam(0.1), "decay": optax.adamw(0.1),
         "other": optax.sgd(0.1)},
        LABEL_FN,
    )
    new, state = _step(tx, params, mode)
    for k in ("kernel", "bias"):
        np.testing.assert_array_equal(bits(new["backbone"][k]), bits(params["backbone"][k]))
    # the same as plain optax.partition for trainable leaves
    ref, _ = _step(optax.partition(
        {"frozen": optax.set_to_zero(), "head": optax.adam(0.1), "decay": optax.adamw(0.1),
         "other": optax.sgd(0.1)}, LABEL_FN), params, mode)
    for path in (("head", "kernel"), ("head", "bias"), ("norm", "scale")):
        np.testing.assert_array_equal(new[path[0]][path[1]], ref[path[0]][path[1]])
    # no optimizer state for frozen leaves
    paths = [jf.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert paths and not [p for p in paths if "backbone" in p]


def test_jf_partition_accepts_a_label_tree_prefix():
    params = make_params()
    tx = jf.partition({"f": None, "t": optax.sgd(1.0)}, {"backbone": "f", "head": "t", "norm": "t"})
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert float(jnp.abs(updates["backbone"]["kernel"]).sum()) == 0
    np.testing.assert_array_equal(updates["head"]["kernel"], -np.ones((2, 2)))
    minus_zero = np.full((2, 2), -0.0, np.float32)
    np.testing.assert_array_equal(bits(updates["backbone"]["kernel"]), bits(minus_zero))


def test_jf_partition_composes_with_element_wise_freeze():
    params = make_params()
    tx = jf.freeze(
        jf.partition({"frozen": None, "head": optax.adam(0.1), "decay": optax.adamw(0.1),
                      "other": optax.sgd(0.1)}, LABEL_FN),
        frozen=jf.elements("head/kernel", np.s_[:, 0]),
    )
    new, _ = _step(tx, params, jax.jit)
    np.testing.assert_array_equal(bits(new["head"]["kernel"][:, 0]),
                                  bits(params["head"]["kernel"][:, 0]))
    assert (np.asarray(new["head"]["kernel"][:, 1]) != 1).all()
    np.testing.assert_array_equal(bits(new["backbone"]["kernel"]),
                                  bits(params["backbone"]["kernel"]))
