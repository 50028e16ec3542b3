"""Real Equinox models (callable pytree nodes) through jfreeze.

An Equinox module is callable, and optax *calls* a callable label or mask tree:
no label or mask tree of the params' type may reach optax. Paths spell module
attributes by name and list indices as numbers: ``layers/0/weight``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from strategies import bits

import jfreeze as jf

eqx = pytest.importorskip("equinox")


class Block(eqx.Module):
    """A small transformer block: attention + LayerNorm + Linear."""

    attn: eqx.nn.MultiheadAttention
    norm: eqx.nn.LayerNorm
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.attn = eqx.nn.MultiheadAttention(2, 8, key=k1)
        self.norm = eqx.nn.LayerNorm(8)
        self.out = eqx.nn.Linear(8, 8, key=k2)

    def __call__(self, x):
        x = x + self.attn(x, x, x)
        return jax.vmap(self.out)(jax.vmap(self.norm)(x))


def mlp():
    return eqx.nn.MLP(3, 2, 4, 2, key=jax.random.key(0))


def block():
    return Block(jax.random.key(1))


def batch(model):
    x = jax.random.normal(jax.random.key(2), (5, 3) if isinstance(model, eqx.nn.MLP) else (5, 8))
    return x, jnp.ones(())


def loss(model, x, y):
    out = jax.vmap(model)(x) if isinstance(model, eqx.nn.MLP) else model(x)
    return jnp.mean((out - y) ** 2)


# What is frozen in each model, and the paths that spell it.
FROZEN = {
    "mlp": (mlp, jf.paths("layers/0/**") | jf.elements("layers/1/weight", np.s_[0])),
    "block": (block, jf.paths("attn/**", "norm/bias") | jf.elements("out/weight", np.s_[:, 0])),
}


def frozen_masks(params, sel):
    return jax.tree.leaves(sel(params))


def assert_frozen_bits(before, after, sel):
    masks = frozen_masks(before, sel)
    for x, y, m in zip(jax.tree.leaves(before), jax.tree.leaves(after), masks, strict=True):
        m = np.broadcast_to(np.asarray(m), np.shape(x))
        np.testing.assert_array_equal(bits(y)[m], bits(x)[m])


def test_equinox_paths_are_attribute_names():
    params = eqx.filter(mlp(), eqx.is_array)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    assert [jf.path_str(p) for p, _ in flat][:2] == ["layers/0/weight", "layers/0/bias"]
    with pytest.raises(ValueError, match="Closest paths: 'layers/0/weight'"):
        jf.paths("layers/0/weigth")(params)


@pytest.mark.parametrize("model", list(FROZEN))
@pytest.mark.parametrize("how", ["freeze", "partition", "nothing"])
def test_training_step_under_filter_jit(model, how):
    make, sel = FROZEN[model]
    m = make()
    params, static = eqx.partition(m, eqx.is_array)
    if how == "freeze":
        tx = jf.freeze(optax.adamw(1e-2), frozen=sel)
    elif how == "nothing":
        tx, sel = jf.freeze(optax.adamw(1e-2), frozen=jf.nothing), jf.nothing
    else:
        whole = jf.paths("layers/0/**") if model == "mlp" else jf.paths("attn/**", "norm/bias")
        tx = jf.partition({"f": None, "t": optax.adamw(1e-2)},
                          jf.labels({"f": whole}, default="t"))
        sel = whole
    state = tx.init(params)
    x, y = batch(m)

    @eqx.filter_jit
    def step(params, state):
        value, grads = eqx.filter_value_and_grad(
            lambda p: loss(eqx.combine(p, static), x, y))(params)
        updates, state = tx.update(grads, state, params)
        return jf.apply_updates(params, updates, frozen=sel), state, value

    new = params
    for _ in range(3):
        new, state, _value = step(new, state)
    assert_frozen_bits(params, new, sel)
    moved = [not np.array_equal(bits(a), bits(b))
             for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new), strict=True)]
    trainable = [m is not True for m in frozen_masks(params, sel)]
    assert any(moved) and all(not mv for mv, t in zip(moved, trainable, strict=True) if not t)
    assert isinstance(eqx.combine(new, static), type(m))


@pytest.mark.parametrize("model", list(FROZEN))
def test_split_merge_and_differentiate_only_the_trainable_half(model):
    make, _sel = FROZEN[model]
    whole = jf.paths("layers/0/**") if model == "mlp" else jf.paths("attn/**", "norm/bias")
    m = make()
    params, static = eqx.partition(m, eqx.is_array)
    trainable, frozen = jf.split(params, frozen=whole)
    tx = jf.freeze(optax.adam(1e-2), frozen=jf.nothing)
    state = tx.init(trainable)  # the trainable half of an Equinox model
    x, y = batch(m)

    @eqx.filter_jit
    def step(trainable, state):
        grads = eqx.filter_grad(
            lambda t: loss(eqx.combine(jf.merge(t, frozen), static), x, y))(trainable)
        updates, state = tx.update(grads, state, trainable)
        return eqx.apply_updates(trainable, updates), state

    trainable, state = step(trainable, state)
    merged = jf.merge(trainable, frozen)
    assert_frozen_bits(params, merged, whole)
    assert isinstance(eqx.combine(merged, static), type(m))


def test_labels_feed_plain_optax_multi_transform():
    # Pass the label *function*; optax would call a label tree that is a module.
    params = eqx.filter(mlp(), eqx.is_array)
    label_fn = jf.labels({"frozen": jf.paths("layers/0/**")}, default="train")
    tx = optax.multi_transform({"frozen": optax.set_to_zero(), "train": optax.adam(1e-2)},
                               label_fn)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert float(jnp.abs(updates.layers[0].weight).sum()) == 0.0
    assert isinstance(label_fn(params), eqx.nn.MLP)
    assert label_fn(params).layers[0].weight == "frozen"


@pytest.mark.parametrize("per_stage", [False, True])
def test_gradual_unfreeze(per_stage):
    m = mlp()
    params, static = eqx.partition(m, eqx.is_array)
    tx = jf.gradual_unfreeze(optax.sgd(0.1), per_stage=per_stage,
                             thaw={0: jf.paths("layers/2/**"), 2: jf.paths("layers/1/**")})
    state = tx.init(params)
    x, y = batch(m)
    grad = eqx.filter_jit(eqx.filter_grad(lambda p: loss(eqx.combine(p, static), x, y)))
    new = params
    history = []
    for _ in range(3):
        updates, state = tx.update(grad(new), state, new)
        new = eqx.apply_updates(new, updates)
        history.append(new)
    np.testing.assert_array_equal(bits(history[1].layers[1].weight), bits(params.layers[1].weight))
    assert not np.array_equal(history[2].layers[1].weight, params.layers[1].weight)
    np.testing.assert_array_equal(bits(new.layers[0].weight), bits(params.layers[0].weight))


def test_summary_and_element_wise_selection():
    params = eqx.filter(block(), eqx.is_array)
    s = jf.summary(params, frozen=jf.paths("attn/**") | jf.elements("out/weight", np.s_[0]))
    attn = sum(x.size for x in jax.tree.leaves(params.attn))
    assert s.frozen == attn + 8 and s.total == s.trainable + s.frozen
    assert "attn" in str(s)
    mask = jf.elements("out/weight", np.s_[0])(params).out.weight
    assert mask.shape == (8, 8) and mask[0].all() and not mask[1:].any()


def test_assert_frozen_passes_and_catches_a_move():
    params = eqx.filter(mlp(), eqx.is_array)
    sel = jf.paths("layers/0/**")
    jf.assert_frozen(params, params, frozen=sel)
    moved = eqx.tree_at(lambda p: p.layers[0].bias, params, params.layers[0].bias + 1)
    with pytest.raises(AssertionError, match="layers/0/bias"):
        jf.assert_frozen(params, moved, frozen=sel)


def test_summary_of_an_unfiltered_model_counts_arrays_only():
    # Activation functions are leaves of an unfiltered MLP: they are not parameters.
    model = mlp()
    s = jf.summary(model, frozen=jf.paths("layers/0/**"))
    arrays = eqx.filter(model, eqx.is_array)
    assert s.total == sum(x.size for x in jax.tree.leaves(arrays))
    assert s.frozen == sum(x.size for x in jax.tree.leaves(arrays.layers[0]))
    assert "activation" not in str(s)


def test_apply_updates_on_a_whole_model_keeps_its_non_array_leaves():
    # eqx.apply_updates' habit: updates built for the arrays (None at the activations)
    # apply to the whole module, activations kept as they are.
    model = mlp()
    sel = jf.paths("layers/0/**")
    tx = jf.freeze(optax.adam(1e-2), frozen=sel)
    params = eqx.filter(model, eqx.is_array)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    new = jf.apply_updates(model, updates, frozen=sel)
    assert new.activation is model.activation
    jf.assert_frozen(params, eqx.filter(new, eqx.is_array), frozen=sel)
    assert not bits_equal_leaf(new.layers[1].weight, model.layers[1].weight)


def bits_equal_leaf(a, b):
    return bool((bits(a) == bits(b)).all())
