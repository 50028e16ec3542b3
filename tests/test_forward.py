"""Forward-pass helpers: stop_gradient (whole leaves and elements), split and merge."""

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
        "backbone": {"kernel": jnp.array([[1.0, -0.0], [jnp.nan, 2.0]]),
                     "bias": jnp.array([-0.0, jnp.nan])},
        "head": {"kernel": jnp.array([[0.5], [-1.0]]), "bias": jnp.array([0.25])},
    }


def loss(params, x):
    backbone = jax.tree.map(jnp.nan_to_num, params["backbone"])
    h = jnp.tanh(x @ backbone["kernel"] + backbone["bias"])
    return jnp.sum(h @ params["head"]["kernel"] + params["head"]["bias"]) ** 2


@pytest.mark.parametrize("mode", MODES)
def test_stop_gradient_whole_leaves(mode):
    params, x = make_params(), jnp.ones((3, 2))
    sel = jf.paths("backbone/**")
    grads = mode(jax.grad(lambda p: loss(jf.stop_gradient(p, frozen=sel), x)))(params)
    full = mode(jax.grad(loss))(params, x)
    for k in ("kernel", "bias"):
        assert (np.asarray(grads["backbone"][k]) == 0).all()
        np.testing.assert_array_equal(grads["head"][k], full["head"][k])
    assert (np.asarray(full["backbone"]["kernel"]) != 0).any()


@pytest.mark.parametrize("mode", MODES)
def test_stop_gradient_keeps_values_bit_for_bit(mode):
    params = make_params()
    sel = jf.paths("backbone/bias") | jf.elements("backbone/kernel", np.s_[:, 0])
    out = mode(lambda p: jf.stop_gradient(p, frozen=sel))(params)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(bits(a), bits(b))


@pytest.mark.parametrize("mode", MODES)
def test_stop_gradient_elements_uses_where_so_inf_gives_no_nan(mode):
    w = jnp.array([jnp.inf, 1.0, 2.0])
    frozen = np.array([True, False, False])

    def f(w):
        return jnp.sum(jf.stop_gradient(w, frozen=jf.elements("", frozen)) ** 2)

    np.testing.assert_array_equal(mode(jax.grad(f))(w), [0.0, 2.0, 4.0])

    # The trap a multiplicative mask falls into: 0 * inf = NaN in the gradient.
    def trap(w):
        m = jnp.asarray(frozen, w.dtype)
        return jnp.sum((m * jax.lax.stop_gradient(w) + (1 - m) * w) ** 2)

    assert np.isnan(mode(jax.grad(trap))(w)[0])


@pytest.mark.parametrize("mode", MODES)
def test_stop_gradient_without_selector_stops_everything_single_array(mode):
    w = jnp.array([1.0, 2.0])
    np.testing.assert_array_equal(mode(jax.grad(lambda w: jf.stop_gradient(w).sum()))(w), [0, 0])
    tree = {"a": w, "b": [w]}
    total = lambda t: sum(x.sum() for x in jax.tree.leaves(jf.stop_gradient(t)))
    grads = mode(jax.grad(total))(tree)
    assert all((np.asarray(g) == 0).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("mode", MODES)
def test_reuse_without_update(mode):
    # A shared layer applied twice; its weights learn only from the first use,
    # while gradients still flow through the second use's activations.
    layer = lambda w, h: jnp.tanh(h @ w)
    rng = np.random.default_rng(0)
    params = {"shared": jnp.asarray(rng.standard_normal((3, 3)), jnp.float32),
              "pre": jnp.asarray(rng.standard_normal((3, 3)), jnp.float32)}
    x = jnp.ones((2, 3))

    def f(params):
        h = layer(params["pre"], x)
        h = layer(params["shared"], h)
        frozen = jf.stop_gradient(params, frozen=jf.paths("shared"))
        return jnp.sum(layer(frozen["shared"], h) ** 2)

    def reference(params, second_use):  # the second use as a separate argument
        h = layer(params["pre"], x)
        h = layer(params["shared"], h)
        return jnp.sum(layer(second_use, h) ** 2)

    got = mode(jax.grad(f))(params)
    want = mode(jax.grad(reference))(params, params["shared"])
    # (float tolerance: two differently fused programs; the difference tested
    # below is O(1))
    np.testing.assert_allclose(got["shared"], want["shared"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["pre"], want["pre"], rtol=1e-5, atol=1e-7)  # through 2nd use
    everything = jax.grad(lambda p: reference(p, p["shared"]))(params)
    assert not np.allclose(got["shared"], everything["shared"])


@pytest.mark.parametrize("mode", MODES)
def test_split_merge_roundtrip_keeps_bits(mode):
    params = make_params()
    sel = jf.paths("backbone/**", "head/bias")
    trainable, frozen = jf.split(params, frozen=sel)
    assert trainable["backbone"] == {"kernel": None, "bias": None}
    assert frozen["head"]["kernel"] is None
    assert trainable["head"]["kernel"] is params["head"]["kernel"]  # returned as they are
    assert frozen["backbone"]["bias"] is params["backbone"]["bias"]
    merged = mode(lambda t, f: jf.merge(t, f))(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(bits(a), bits(b))


@pytest.mark.parametrize("mode", MODES)
def test_differentiate_only_the_trainable_split(mode):
    params, x = make_params(), jnp.ones((3, 2))
    sel = jf.paths("backbone/**")
    trainable, frozen = jf.split(params, frozen=sel)

    @mode
    def step(trainable, frozen):
        grads = jax.grad(lambda t: loss(jf.merge(t, frozen), x))(trainable)
        return grads, optax.tree.norm(grads)

    grads, norm = step(trainable, frozen)
    assert grads["backbone"] == {"kernel": None, "bias": None}
    full = jax.grad(loss)(params, x)
    for k in ("kernel", "bias"):
        np.testing.assert_allclose(grads["head"][k], full["head"][k], rtol=1e-6)
    np.testing.assert_allclose(norm, optax.tree.norm(full["head"]), rtol=1e-6)


def test_split_accepts_what_frozen_takes():
    params = make_params()
    for spec in ({"backbone": True, "head": False}, lambda p: {"backbone": True, "head": False}):
        trainable, frozen = jf.split(params, frozen=spec)
        assert trainable["backbone"]["kernel"] is None and frozen["head"]["bias"] is None
    trainable, frozen = jf.split(params, frozen=True)
    assert all(x is None for x in jax.tree.leaves(trainable, is_leaf=lambda x: x is None))
