"""Scanned stacks in Flax linen (jf.flax.scan, a drop-in for nn.scan), NNX and Equinox.

The drop-in keeps nn.scan's parameter tree (a checkpoint of the unfrozen model loads as
is), gives the same outputs, the gradients of the masked nn.scan, and the ideal compute.
"""

from __future__ import annotations

import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jfreeze as jf

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.measure import hlo_matmul_flops  # noqa: E402

D, N = 16, 4


class Block(nn.Module):
    """A pre-LN transformer block of linen built-ins."""

    d: int = D
    attention: bool = True

    @nn.compact
    def __call__(self, h, _):
        if self.attention:  # self-attention (nn.SelfAttention's successor)
            h = h + nn.MultiHeadDotProductAttention(num_heads=2, deterministic=True)(
                nn.LayerNorm()(h))
        h = h + nn.Dense(self.d)(nn.LayerNorm()(h))
        self.sow("intermediates", "h", h)
        return h, h.mean()


class LNDense(Block):
    """The block without attention (a field the drop-in passes on to each layer)."""

    attention: bool = False


def _net(scan, block=Block, axis=0, **kw):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            stack = scan(block, variable_axes={"params": axis, "intermediates": 0},
                         split_rngs={"params": True}, length=N, **kw)
            h, ys = stack(name="layers")(x, None)
            return (h ** 2).sum() + ys.sum()
    return Net()


def _x(shape=(2, 3, D)):
    return jax.random.normal(jax.random.key(1), shape)


def _close(a, b):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-4), a, b)


def _matmul_flops(fn, *args):
    return hlo_matmul_flops(jax.jit(fn).lower(*args).compile().as_text())


# --------------------------------------------------------------------------
# linen: jf.flax.scan.


@pytest.mark.parametrize("axis, block", [(0, Block), (1, LNDense)])  # MaxText: axis 1
def test_same_parameters_outputs_and_masked_gradients_as_nn_scan(axis, block):
    frozen = jf.layers("layers/**", [0, 1], axis=axis)
    ref = _net(nn.scan, block=block, axis=axis)
    drop = _net(jf.flax.scan, block=block, axis=axis, frozen=frozen)
    x = _x()
    variables = ref.init(jax.random.key(0), x)
    # init is nn.scan's: the same tree, bit for bit
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
                 variables, drop.init(jax.random.key(0), x))
    assert variables["params"]["layers"]["Dense_0"]["kernel"].shape[axis] == N
    # a checkpoint of the unfrozen model applies as is, with the same outputs
    np.testing.assert_allclose(drop.apply(variables, x), ref.apply(variables, x), rtol=1e-6)
    p = variables["params"]
    g = jax.jit(jax.grad(lambda p: drop.apply({"params": p}, x)))(p)
    g_ref = jax.grad(lambda p: ref.apply({"params": jf.stop_gradient(p, frozen=frozen)}, x))(p)
    _close(g, g_ref)
    for leaf in jax.tree.leaves(g):
        moved = np.moveaxis(np.asarray(leaf), axis, 0)
        assert not moved[:2].any() and moved[2:].any()


def test_reverse_broadcast_inputs_and_non_contiguous_layers():
    frozen = jf.layers("layers/**", [0, 3])
    kw = dict(reverse=True, in_axes=nn.broadcast, block=LNDense)
    ref, drop = _net(nn.scan, **kw), _net(jf.flax.scan, frozen=frozen, **kw)
    x = _x()
    variables = ref.init(jax.random.key(0), x)
    np.testing.assert_allclose(drop.apply(variables, x), ref.apply(variables, x), rtol=1e-6)
    p = variables["params"]
    g = jax.grad(lambda p: drop.apply({"params": p}, x))(p)
    g_ref = jax.grad(lambda p: ref.apply({"params": jf.stop_gradient(p, frozen=frozen)}, x))(p)
    _close(g, g_ref)


def test_intermediates_are_stacked_as_nn_scan_stacks_them():
    frozen = jf.layers("layers/**", [0])
    ref, drop = _net(nn.scan, block=LNDense), _net(jf.flax.scan, block=LNDense, frozen=frozen)
    x = _x()
    variables = ref.init(jax.random.key(0), x)
    assert "MultiHeadDotProductAttention_0" not in variables["params"]["layers"]
    _, mine = drop.apply(variables, x, mutable=["intermediates"])
    _, theirs = ref.apply(variables, x, mutable=["intermediates"])
    _close(mine, theirs)


class _Remat(nn.Module):
    @nn.compact
    def __call__(self, h, x):
        return jnp.tanh(nn.Dense(D)(h) + x), None


def test_remat_target_scanned_inputs_no_length_and_a_vmapped_population():
    def net(scan, **kw):
        class Net(nn.Module):
            @nn.compact
            def __call__(self, x, xs):
                stack = scan(nn.remat(_Remat), variable_axes={"params": 0},
                             split_rngs={"params": True}, **kw)
                return stack(name="layers")(x, xs)[0].sum()
        return Net()

    x, xs = _x((2, D)), _x((N, 2, D))
    ref, drop = net(nn.scan), net(jf.flax.scan, frozen=jf.layers("layers/**", [0, 1]))
    variables = ref.init(jax.random.key(0), x, xs)
    np.testing.assert_allclose(drop.apply(variables, x, xs), ref.apply(variables, x, xs),
                               rtol=1e-6)
    g = jax.grad(lambda p: drop.apply({"params": p}, x, xs))(variables["params"])
    assert not g["layers"]["Dense_0"]["kernel"][:2].any()
    # frozen models as data (situation 1): a population vmapped, gradients to the input
    frozen_net = net(jf.flax.scan, frozen=jf.layers("layers/**", range(N)))
    population = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), variables["params"])
    probe = jax.vmap(lambda p, x: frozen_net.apply({"params": p}, x, xs), in_axes=(0, None))
    gx = jax.grad(lambda x: probe(population, x).sum())(x)
    ref_gx = sum(jax.grad(lambda x, i=i: ref.apply(
        {"params": jax.tree.map(lambda a, i=i: a[i], population)}, x, xs))(x) for i in range(2))
    np.testing.assert_allclose(gx, ref_gx, rtol=1e-4, atol=1e-5)


class _Dense(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(D, use_bias=False)(h)), None


@pytest.mark.parametrize("frozen_layers", [[0, 1, 2], [0, 3], list(range(N))])
def test_linen_flops_are_the_ideal(frozen_layers):
    x = _x((8, D))
    frozen = jf.layers("layers/**", frozen_layers)
    head = jnp.ones((D, D))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = jf.flax.scan(_Dense, frozen=frozen, variable_axes={"params": 0},
                                 split_rngs={"params": True}, length=N)
            return stack(name="layers")(x, None)[0]

    params = Net().init(jax.random.key(0), x)["params"]

    def loss(p, head):
        return ((Net().apply({"params": p}, x) @ head) ** 2).sum()

    dense = 2 * 8 * D * D
    trainable = [i for i in range(N) if i not in frozen_layers]
    first = min(trainable, default=N)
    above = [i for i in range(first, N) if i not in trainable]
    # stack forward + trainable: input and weight gradients + frozen above them: input
    # gradients; the head: forward, weight gradient and (if the stack trains) input gradient
    ideal = dense * (N + 2 * len(trainable) + len(above) + 2 + bool(trainable))
    got = _matmul_flops(jax.grad(loss, argnums=(0, 1)), params, head)
    # a one-layer run is no loop: XLA drops the lowest trainable layer's input gradient too
    assert ideal - dense * bool(trainable) <= got <= ideal


class _Dropout(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return nn.Dropout(0.5, deterministic=False)(nn.Dense(D)(h)), None


def test_dropout_keys_split_per_layer_and_frozen_layers_get_no_gradient():
    frozen = jf.layers("layers/**", [0, 1])

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = jf.flax.scan(_Dropout, frozen=frozen, variable_axes={"params": 0},
                                 split_rngs={"params": True, "dropout": True}, length=N)
            return stack(name="layers")(x, None)[0].sum()

    x = _x((8, D))
    params = Net().init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)["params"]
    loss = jax.jit(lambda p, k: Net().apply({"params": p}, x, rngs={"dropout": k}))
    assert loss(params, jax.random.key(2)) != loss(params, jax.random.key(3))
    g = jax.grad(loss)(params, jax.random.key(2))
    assert not g["layers"]["Dense_0"]["kernel"][:2].any()
    assert g["layers"]["Dense_0"]["kernel"][2:].any()


class _BN(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return nn.BatchNorm(use_running_average=False)(nn.Dense(D)(h)), None


def test_batch_stats_update_like_nn_scan():
    def net(scan, **kw):
        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                stack = scan(_BN, variable_axes={"params": 0, "batch_stats": 0},
                             split_rngs={"params": True}, length=N, **kw)
                return stack(name="layers")(x, None)[0].sum()
        return Net()

    x = _x((8, D))
    ref, drop = net(nn.scan), net(jf.flax.scan, frozen=jf.layers("layers/**", [0, 1]))
    variables = ref.init(jax.random.key(0), x)
    out, stats = drop.apply(variables, x, mutable=["batch_stats"])
    out_ref, stats_ref = ref.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(out, out_ref, rtol=1e-5)
    _close(stats, stats_ref)


def test_one_training_step_keeps_frozen_layers_bits():
    frozen = jf.layers("layers/**", [0, 1])
    model = _net(jf.flax.scan, block=LNDense, frozen=frozen)
    x = _x()
    params = model.init(jax.random.key(0), x)["params"]
    tx = jf.freeze(optax.adam(1e-2), frozen=frozen)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: model.apply({"params": p}, x))(params)
        updates, state = tx.update(grads, state, params)
        return jf.apply_updates(params, updates, frozen=frozen), state

    new, _ = step(params, state)
    jf.assert_frozen(params, new, frozen=frozen)
    assert not np.array_equal(new["layers"]["Dense_0"]["kernel"][2:],
                              params["layers"]["Dense_0"]["kernel"][2:])


def test_the_selector_of_jf_freeze_with_patterns_for_other_parts_works():
    frozen = jf.paths("embed/**") | jf.layers("layers/**", [0, 1])

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(D, name="embed")(x)
            stack = jf.flax.scan(LNDense, frozen=frozen, variable_axes={"params": 0},
                                 split_rngs={"params": True}, length=N)
            return stack(name="layers")(x, None)[0].sum()

    x = _x()
    params = Net().init(jax.random.key(0), x)["params"]
    g = jax.grad(lambda p: Net().apply({"params": p}, x))(params)
    for leaf in jax.tree.leaves(g["layers"]):
        assert not leaf[:2].any() and leaf[2:].any()


def test_linen_errors():
    with pytest.raises(TypeError, match="linen Module class"):
        jf.flax.scan(lambda c, x: (c, x), frozen=jf.nothing)
    with pytest.raises(NotImplementedError, match="variable_carry"):
        jf.flax.scan(Block, frozen=jf.nothing, variable_carry="cache")
    drop = _net(jf.flax.scan, frozen=jf.layers("layrs/**", [0]))
    variables = _net(nn.scan).init(jax.random.key(0), _x())
    with pytest.raises(ValueError, match=r"layrs.*'layers/"):
        drop.apply(variables, _x())


# --------------------------------------------------------------------------
# NNX: a stack built by nnx.vmap, run by jf.flax.nnx_scan (nnx.split / nnx.merge).


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.lin = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, h):
        return h + jnp.tanh(self.lin(self.norm(h)))


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        @nnx.vmap(in_axes=0, out_axes=0)
        def make(key):
            return NNXBlock(nnx.Rngs(key))

        self.layers = make(jax.random.split(rngs.params(), N))
        self.head = nnx.Linear(D, 1, rngs=rngs)

    def __call__(self, x, frozen):
        h, _ = jf.flax.nnx_scan(lambda h, layer: (layer(h), None), x, self.layers,
                                frozen=frozen, path="layers")
        return (self.head(h) ** 2).sum()


def _nnx_reference(model, x, frozen):
    """nnx.scan-free reference: a Python loop over the layers, frozen ones stopped."""
    graphdef, state = nnx.split(model.layers)
    state = jf.stop_gradient({"layers": state}, frozen=frozen)["layers"]
    h = x
    for i in range(N):
        h = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))(h)
    return (model.head(h) ** 2).sum()


def test_nnx_stack_in_nnx_grad():
    model = NNXNet(nnx.Rngs(0))
    x = _x((4, D))
    frozen = jf.layers("layers/**", [0, 1])
    g = nnx.grad(lambda m: m(x, frozen))(model)
    g_ref = nnx.grad(lambda m: _nnx_reference(m, x, frozen))(model)
    _close(nnx.state(g), nnx.state(g_ref))
    assert not g.layers.lin.kernel[...][:2].any() and g.layers.lin.kernel[...][2:].any()
    np.testing.assert_allclose(model(x, frozen), _nnx_reference(model, x, frozen), rtol=1e-5)


def test_nnx_training_step_with_jf_freeze_keeps_frozen_layers_bits():
    frozen = jf.layers("layers/**", [0, 1])
    model = NNXNet(nnx.Rngs(0))
    before = jax.tree.map(lambda a: a.copy(), nnx.state(model, nnx.Param))
    opt = nnx.Optimizer(model, jf.freeze(optax.adam(1e-2), frozen=frozen), wrt=nnx.Param)
    x = _x((2, D))

    @nnx.jit
    def step(model, opt):
        opt.update(model, nnx.grad(lambda m: m(x, frozen))(model))

    step(model, opt)
    after = nnx.state(model, nnx.Param)
    jf.assert_frozen(before, after, frozen=frozen)
    kernel = after["layers"]["lin"]["kernel"][...]
    assert not np.array_equal(kernel[2:], before["layers"]["lin"]["kernel"][...][2:])


def test_nnx_flops_frozen_prefix_has_no_backward():
    model = NNXNet(nnx.Rngs(0))
    x = _x((8, D))
    graphdef, params = nnx.split(model, nnx.Param)
    all_frozen = jf.layers("layers/**", range(N))

    def head_only(p):
        return nnx.merge(graphdef, p)(x, all_frozen)

    def loss_masked(p):
        return _nnx_reference(nnx.merge(graphdef, p), x, jf.nothing)

    mine = _matmul_flops(jax.grad(head_only), params)
    dense = 2 * 8 * D * D
    # the stack's forward, the head's forward and weight gradient (a D x 1 matmul each)
    assert mine == N * dense + 2 * 2 * 8 * D
    assert _matmul_flops(jax.grad(loss_masked), params) > 2.5 * N * dense


def test_nnx_scan_keeps_non_param_state_updates():
    class Counting(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(D, D, rngs=rngs)
            self.calls = nnx.BatchStat(jnp.zeros(()))

        def __call__(self, h):
            self.calls[...] += 1
            return self.lin(h)

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return Counting(nnx.Rngs(key))

    stack = make(jax.random.split(jax.random.key(0), N))
    jf.flax.nnx_scan(lambda h, layer: (layer(h), None), _x((2, D)), stack,
                     frozen=jf.layers("lin/**", [0]))
    np.testing.assert_array_equal(stack.calls[...], np.ones(N))


# --------------------------------------------------------------------------
# Equinox: a stack built by eqx.filter_vmap, run by jf.scan (partition / combine).


def test_equinox_stack_in_filter_grad():
    eqx = pytest.importorskip("equinox")
    keys = jax.random.split(jax.random.key(0), N)

    class Net(eqx.Module):
        layers: eqx.nn.Linear
        head: eqx.nn.Linear

        def __init__(self, key):
            self.layers = eqx.filter_vmap(lambda k: eqx.nn.Linear(D, D, key=k))(keys)
            self.head = eqx.nn.Linear(D, 1, key=key)

        def __call__(self, x, frozen):
            params, static = eqx.partition(self.layers, eqx.is_array)

            def body(h, p):
                return jnp.tanh(eqx.combine(p, static)(h)), None

            h, _ = jf.scan(body, x, params, frozen=frozen, path="layers")
            return self.head(h).sum()

    model = Net(jax.random.key(1))
    x = _x((D,))
    frozen = jf.layers("layers/**", [0, 1])
    g = eqx.filter_grad(lambda m: m(x, frozen))(model)
    masked = eqx.filter_grad(lambda m: eqx.tree_at(
        lambda m: m.layers, m, jf.stop_gradient({"layers": m.layers},
                                                frozen=frozen)["layers"])(x, jf.nothing))(model)
    _close(g, masked)
    assert not g.layers.weight[:2].any() and g.layers.weight[2:].any()
