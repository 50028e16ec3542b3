"""jfreeze.flax: frozen linen modules, reuse without update, TrainState, NNX filters, BatchNorm."""

from __future__ import annotations

import functools
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import jfreeze as jf
from jfreeze._tree import leaves_with_paths

F = jf.flax


# --------------------------------------------------------------------------
# helpers


def bits_equal(a, b) -> bool:
    """Bitwise equality of two trees of arrays (never allclose)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        u = np.dtype(f"u{x.dtype.itemsize}") if x.dtype.kind == "f" else x.dtype
        if not np.array_equal(x.view(u), y.view(u)):
            return False
    return True


def nonzero(tree):
    return jax.tree.map(lambda g: bool(jnp.any(g != 0)), tree)


def flops(fn, *args) -> float:
    ca = jax.jit(fn).lower(*args).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca["flops"])


def copy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


X = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)


class MLP(nn.Module):
    width: int = 4

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(self.width)(x)


class Probe(nn.Module):
    """trainable Dense -> (frozen) MLP -> trainable Dense: gradients must pass through."""

    freeze: bool = True
    width: int = 4

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.width)(x)
        body = F.frozen(MLP) if self.freeze else MLP
        x = body(self.width)(x)
        return nn.Dense(2)(x).sum()


# --------------------------------------------------------------------------
# linen: frozen class


def test_import_jfreeze_does_not_import_flax():
    code = ("import sys, jfreeze; assert 'flax' not in sys.modules, 'flax imported'; "
            "jfreeze.flax; assert 'flax' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_frozen_class_keeps_param_tree_and_init():
    ref = Probe(freeze=False).init(jax.random.key(0), X)
    got = Probe(freeze=True).init(jax.random.key(0), X)
    assert jax.tree.structure(got) == jax.tree.structure(ref)
    assert bits_equal(got, ref)  # same paths ("MLP_0"), same values: checkpoints load as they are
    assert F.frozen(MLP) is F.frozen(MLP) and F.frozen(MLP).__name__ == "MLP"


@pytest.mark.parametrize("jit", [False, True])
def test_frozen_class_grads_zero_and_flow_through(jit):
    params = Probe().init(jax.random.key(0), X)["params"]
    grad = jax.grad(lambda p: Probe().apply({"params": p}, X))
    g = (jax.jit(grad) if jit else grad)(params)
    assert jax.tree.all(jax.tree.map(lambda x: bool((x == 0).all()), g["MLP_0"]))
    # before the frozen module (needs gradient through it) and after it: unchanged
    ref = jax.grad(lambda p: Probe(freeze=False).apply({"params": p}, X))(params)
    for name in ("Dense_0", "Dense_1"):
        assert bits_equal(g[name], ref[name]) or all(
            np.allclose(a, b, rtol=1e-6)
            for a, b in zip(jax.tree.leaves(g[name]), jax.tree.leaves(ref[name]), strict=True)
        )
        assert all(jax.tree.leaves(nonzero(g[name])))


def test_frozen_class_compiled_flops_equal_trainable_only():
    # The frozen weight gradients are never computed: same FLOPs as differentiating
    # only the trainable leaves of the plain module (jf.split), well under full.
    x = jnp.ones((32, 64))
    params = Probe(width=64).init(jax.random.key(0), x)["params"]
    frozen_loss = lambda p: Probe(width=64).apply({"params": p}, x)
    plain_loss = lambda p: Probe(freeze=False, width=64).apply({"params": p}, x)
    t, f = jf.split(params, frozen=jf.paths("MLP_0/**"))
    f_frozen = flops(jax.grad(frozen_loss), params)
    f_split = flops(lambda t, f: jax.grad(lambda t: plain_loss(jf.merge(t, f)))(t), t, f)
    f_full = flops(jax.grad(plain_loss), params)
    assert f_frozen <= f_split * 1.01
    assert f_frozen < 0.85 * f_full


class SetupMLP(nn.Module):
    """setup-style, a param defined in setup, and a second public method."""

    def setup(self):
        self.d = nn.Dense(4)
        self.scale = self.param("scale", nn.initializers.ones, ())

    def __call__(self, x):
        return self.encode(x) * 2.0

    def encode(self, x):
        return self.d(x) * self.scale


class SetupNet(nn.Module):
    mode: str

    def setup(self):
        self.pre = nn.Dense(3)
        if self.mode in ("class", "encode"):
            self.body = F.frozen(SetupMLP)()
        elif self.mode == "instance":
            self.body = F.frozen(SetupMLP())  # unbound instance made in setup
        else:
            self.body = SetupMLP()

    def __call__(self, x):
        h = self.pre(x)
        if self.mode == "method":
            return self.run_body(h).sum()
        if self.mode == "encode":
            return self.body.encode(h).sum()
        if self.mode == "call":
            return F.frozen(self.body)(h).sum()  # bound instance: this call only
        if self.mode == "bound_method":
            return F.frozen(self.body.encode)(h).sum()
        return self.body(h).sum()

    @F.frozen
    def run_body(self, h):
        return self.body(h)


@pytest.mark.parametrize("mode", ["class", "instance", "method", "encode", "call", "bound_method"])
def test_frozen_forms_in_setup_modules(mode):
    ref = SetupNet("plain").init(jax.random.key(1), X)
    v = SetupNet(mode).init(jax.random.key(1), X)
    assert jax.tree.structure(v) == jax.tree.structure(ref) and bits_equal(v, ref)
    g = jax.jit(jax.grad(lambda p: SetupNet(mode).apply({"params": p}, X)))(v["params"])
    assert not any(jax.tree.leaves(nonzero(g["body"])))
    assert all(jax.tree.leaves(nonzero(g["pre"])))


def test_frozen_orphan_field_and_top_level_instances():
    class Holder(nn.Module):
        body: nn.Module

        @nn.compact
        def __call__(self, x):
            return self.body(nn.Dense(3)(x)).sum()

    h = Holder(body=F.frozen(MLP()))
    v = h.init(jax.random.key(0), X)
    assert set(v["params"]) == {"Dense_0", "body"}
    g = jax.grad(lambda p: h.apply({"params": p}, X))(v["params"])
    assert not any(jax.tree.leaves(nonzero(g["body"])))
    assert all(jax.tree.leaves(nonzero(g["Dense_0"])))

    top = F.frozen(MLP())
    v = top.init(jax.random.key(0), X)
    g = jax.grad(lambda p: top.apply({"params": p}, X).sum())(v["params"])
    assert not any(jax.tree.leaves(nonzero(g)))


def test_frozen_errors():
    with pytest.raises(TypeError, match="Module class"):
        F.frozen(3)
    with pytest.raises(TypeError, match="every method"):
        F.frozen(MLP, method="encode")
    with pytest.raises(TypeError, match="bound module"):
        F.frozen(MLP(), method="encode")
    with pytest.raises(TypeError, match="method= is for module instances"):
        F.frozen(lambda self, x: x, method="encode")


# --------------------------------------------------------------------------
# linen: reuse without update (situation 5)


class Reuse(nn.Module):
    """One linear layer applied twice; the second use is frozen (or not)."""

    how: str = "call"  # "call": frozen(bound instance); "method": decorated method; "none"

    def setup(self):
        self.layer = nn.Dense(3, use_bias=False)

    def __call__(self, x):
        h = jnp.tanh(self.layer(x))
        if self.how == "call":
            return F.frozen(self.layer)(h)
        if self.how == "method":
            return self.second_use(h)
        return self.layer(h)

    @F.frozen
    def second_use(self, h):
        return self.layer(h)


def analytic_first_use_grad(W, x, G):
    """d/dW of sum(G * tanh(x W) W'), W' = W held constant (numpy, by hand)."""
    W, x, G = (np.asarray(a, np.float64) for a in (W, x, G))
    h = np.tanh(x @ W)
    return x.T @ ((G @ W.T) * (1 - h**2)), h.T @ G  # first use, second use


@pytest.mark.parametrize("how, jit", [("call", False), ("method", True)])
def test_reuse_without_update_matches_analytic(how, jit):
    x = jax.random.normal(jax.random.key(2), (5, 3))
    G = jax.random.normal(jax.random.key(3), (5, 3))
    params = Reuse(how).init(jax.random.key(0), x)["params"]
    W = params["layer"]["kernel"]
    plain = Reuse("none").init(jax.random.key(0), x)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(plain)

    def loss(p, x):
        return (G * Reuse(how).apply({"params": p}, x)).sum()

    grad = jax.grad(loss, argnums=(0, 1))
    grad = jax.jit(grad) if jit else grad
    gp, gx = grad(params, x)
    first, second = analytic_first_use_grad(W, x, G)
    np.testing.assert_allclose(gp["layer"]["kernel"], first, rtol=1e-5, atol=1e-6)
    # the plain double use learns from both; the frozen one from the first only
    gfull, gx_full = jax.grad(lambda p, x: (G * Reuse("none").apply({"params": p}, x)).sum(),
                              argnums=(0, 1))(params, x)
    np.testing.assert_allclose(gfull["layer"]["kernel"], first + second, rtol=1e-5, atol=1e-6)
    # gradients still flow through the second use's activations: input gradient unchanged
    np.testing.assert_allclose(gx, gx_full, rtol=1e-6, atol=1e-7)
    # and the pure-function way (jf.stop_gradient) agrees
    def pure(p, x):
        h = jnp.tanh(x @ p["kernel"])
        return (G * (h @ jf.stop_gradient(p)["kernel"])).sum()

    np.testing.assert_allclose(jax.grad(pure)(params["layer"], x)["kernel"], gp["layer"]["kernel"],
                               rtol=1e-6)


# --------------------------------------------------------------------------
# TrainState


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, name="backbone")(x))
        return nn.Dense(3, name="head")(x)


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _data():
    x = jax.random.normal(jax.random.key(4), (16, 8))
    return x, jnp.arange(16) % 3


def _plain_step(state, x, y, norm):
    loss = lambda p: _ce(state.apply_fn({"params": p}, x), y)
    grads = jax.grad(loss)(state.params)
    return state.apply_gradients(grads=grads), (optax.global_norm(grads) if norm else 0.0)


def _our_step(state, x, y, norm):
    loss = lambda t: _ce(state.apply_fn({"params": state.merged(t)}, x), y)
    grads = jax.grad(loss)(state.params)  # the trainable leaves only
    return state.apply_gradients(grads=grads), (optax.global_norm(grads) if norm else 0.0)


def test_trainstate_plain_with_freeze_and_helper_under_jit():
    x, y = _data()
    params = Net().init(jax.random.key(0), x)["params"]
    params["backbone"]["bias"] = params["backbone"]["bias"].at[0].set(-0.0)  # signed zero kept
    frozen = jf.paths("backbone/**")
    tx = optax.adamw(1e-2, weight_decay=0.5)
    # flax's own TrainState just works with tx=jf.freeze(...)
    plain = train_state.TrainState.create(apply_fn=Net().apply, params=params,
                                          tx=jf.freeze(tx, frozen=frozen))
    # the helper holds the frozen leaves beside the optimizer
    ours = F.TrainState.create(apply_fn=Net().apply, params=params, tx=tx, frozen=frozen)
    assert ours.params["backbone"] == {"bias": None, "kernel": None}
    assert ours.frozen_params["head"] == {"bias": None, "kernel": None}
    assert bits_equal(ours.merged(), params)
    # optimizer state only for the trainable leaves: adam's mu and nu, plus a counter
    head_bytes = sum(a.nbytes for a in jax.tree.leaves(params["head"]))
    for st in (plain, ours):
        assert jf.summary(params, opt_state=st.opt_state).opt_state_bytes == 2 * head_bytes + 4

    before = copy(params)
    jp = jax.jit(functools.partial(_plain_step, norm=False))
    jo = jax.jit(functools.partial(_our_step, norm=False), donate_argnums=0)
    ps, os_ = plain, ours
    for _ in range(4):
        ps, _ = jp(ps, x, y)
        os_, _ = jo(os_, x, y)
    # frozen leaves keep their bits, -0.0 included; trainable ones move, identically in both
    assert bits_equal(ps.params["backbone"], before["backbone"])
    assert bits_equal(os_.merged()["backbone"], before["backbone"])
    jf.assert_frozen(before, ps.params, frozen=frozen)
    pairs = zip(jax.tree.leaves(ps.params["head"]), jax.tree.leaves(before["head"]), strict=True)
    assert all(bool((np.asarray(a) != b).any()) for a, b in pairs)
    np.testing.assert_allclose(os_.params["head"]["kernel"], ps.params["head"]["kernel"],
                               rtol=1e-6, atol=1e-7)


def test_trainstate_helper_compiled_cost():
    # Returning the gradient norm brings the frozen gradients back with the plain
    # TrainState; with the helper there are none to bring back.
    frozen = jf.paths("backbone/**")
    x, y = jnp.ones((64, 256)), jnp.arange(64) % 3
    params = Net().init(jax.random.key(0), x)["params"]
    tx = optax.adam(1e-3)
    plain = train_state.TrainState.create(apply_fn=Net().apply, params=params,
                                          tx=jf.freeze(tx, frozen=frozen))
    ours = F.TrainState.create(apply_fn=Net().apply, params=params, tx=tx, frozen=frozen)
    f_plain = flops(functools.partial(_plain_step, norm=False), plain, x, y)
    f_plain_norm = flops(functools.partial(_plain_step, norm=True), plain, x, y)
    step = jax.jit(functools.partial(_our_step, norm=True), donate_argnums=0)
    compiled = step.lower(ours, x, y).compile()
    ca = compiled.cost_analysis()
    f_ours_norm = float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])
    assert f_ours_norm <= f_plain * 1.01
    assert f_plain_norm > 1.5 * f_ours_norm
    # donation passes the frozen buffers through instead of copying them
    frozen_bytes = sum(a.nbytes for a in jax.tree.leaves(params["backbone"]))
    assert compiled.memory_analysis().alias_size_in_bytes >= frozen_bytes


# --------------------------------------------------------------------------
# BatchNorm and other collections (linen)


class BNBackbone(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.relu(x)


class BNModel(nn.Module):
    backbone_train: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        backbone = F.frozen(BNBackbone, collections=("params", "batch_stats"))(name="backbone")
        h = backbone(x, train=self.backbone_train)  # frozen part runs in inference mode
        h = nn.BatchNorm(use_running_average=not train, name="head_bn")(h)
        return nn.Dense(3, name="head")(h)


def test_frozen_backbone_batch_stats_fixed_while_head_trains():
    x, y = _data()
    v = BNModel().init(jax.random.key(0), x, train=False)
    frozen = jf.paths("backbone/**")
    state = train_state.TrainState.create(apply_fn=BNModel().apply, params=v["params"],
                                          tx=jf.freeze(optax.adamw(1e-2), frozen=frozen))

    @jax.jit
    def step(state, batch_stats, x, y):
        def loss(p):
            logits, upd = state.apply_fn({"params": p, "batch_stats": batch_stats}, x, train=True,
                                         mutable=["batch_stats"])
            return _ce(logits, y), upd["batch_stats"]
        grads, batch_stats = jax.grad(loss, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads), batch_stats

    bs = v["batch_stats"]
    before = copy(v)
    for i in range(4):
        state, bs = step(state, bs, x * (1 + i), y)
    assert bits_equal(bs["backbone"], before["batch_stats"]["backbone"])
    assert bits_equal(state.params["backbone"], before["params"]["backbone"])
    pairs = zip(jax.tree.leaves(bs["head_bn"]), jax.tree.leaves(before["batch_stats"]["head_bn"]),
                strict=True)
    assert all(bool((np.asarray(a) != b).any()) for a, b in pairs)
    # a frozen BatchNorm run in training mode would update its statistics: an error, not drift
    with pytest.raises(Exception, match=r"batch_stats.*immutable"):
        BNModel(backbone_train=True).apply(v, x, train=True, mutable=["batch_stats"])


# --------------------------------------------------------------------------
# NNX


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.backbone = nnx.List([nnx.Linear(3, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs)])
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        for layer in self.backbone:
            x = layer(x)
        return self.head(nnx.relu(x))


def _pure(model, *filters):
    return copy(nnx.to_pure_dict(nnx.state(model, *filters)))


def test_nnx_filter_paths_spelled_like_jfreeze():
    model = NNXNet(nnx.Rngs(0))
    seen = []
    filt = F.nnx_filter(jf.where(lambda p, leaf: seen.append(p) or True), model=model)
    seen.clear()  # the construction-time check ran it once per variable
    nnx.state(model, filt)
    pure_paths = [p for p, _ in leaves_with_paths(nnx.to_pure_dict(nnx.state(model)))[0]]
    assert sorted(seen) == sorted(pure_paths)
    assert "backbone/0/kernel" in seen
    filt = F.nnx_filter(jf.paths("backbone/**"), model=model)
    assert repr(filt) == "nnx_filter(paths('backbone/**'))"


def test_nnx_optimizer_and_diffstate_train_only_selected():
    model = NNXNet(nnx.Rngs(0))
    frozen = jf.paths("backbone/**")
    trainable = nnx.All(nnx.Param, nnx.Not(F.nnx_filter(frozen, model=model)))
    opt = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.5), wrt=trainable)
    # optimizer state only for the selected variables
    mu = nnx.to_pure_dict(nnx.state(opt.opt_state))[0]["mu"]
    assert jax.tree.map(jnp.shape, mu) == {"head": {"bias": (2,), "kernel": (8, 2)}}

    model.train()
    model.backbone.eval()  # the frozen BatchNorm uses its running statistics and never updates them
    before = _pure(model)

    @nnx.jit
    def step(model, opt, x, y):
        loss = lambda m: ((m(x) - y) ** 2).mean()
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, trainable))(model)
        opt.update(model, grads)
        return grads

    x, y = jax.random.normal(jax.random.key(1), (16, 3)), jnp.ones((16, 2))
    for _ in range(3):
        grads = step(model, opt, x, y)
    assert set(nnx.to_pure_dict(grads)) == {"head"}
    after = _pure(model)
    assert bits_equal(after["backbone"], before["backbone"])  # params and batch stats, bitwise
    pairs = zip(jax.tree.leaves(after["head"]), jax.tree.leaves(before["head"]), strict=True)
    assert all(bool((a != b).any()) for a, b in pairs)


def test_nnx_custom_variable_type_freezes():
    class Frozen(nnx.Variable):
        """A variable type nnx.Param filters (and so optimizers and grads) never see."""

    model = NNXNet(nnx.Rngs(0))
    lin = model.backbone[0]
    lin.kernel = Frozen(lin.kernel.get_value())
    lin.bias = Frozen(lin.bias.get_value())
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    mu = nnx.to_pure_dict(nnx.state(opt.opt_state))[0]["mu"]
    assert 0 not in mu["backbone"]  # no state for the Frozen variables
    model.backbone.eval()
    before = _pure(model)

    @nnx.jit
    def step(model, opt, x):
        grads = nnx.grad(lambda m: (m(x) ** 2).mean())(model)  # default: nnx.Param only
        opt.update(model, grads)

    for _ in range(3):
        step(model, opt, jnp.ones((4, 3)))
    after = _pure(model)
    assert bits_equal(after["backbone"][0], before["backbone"][0])
    assert not bits_equal(after["head"], before["head"])
    # the same freeze expressed as a selector gives the same set of trainable params
    frozen = F.nnx_filter(jf.paths("backbone/0/**"), model=model)
    assert nnx.to_flat_state(nnx.state(model, nnx.Param)).paths == nnx.to_flat_state(nnx.state(
        model, nnx.All(nnx.Param, nnx.Not(frozen)))).paths


def test_nnx_filter_errors():
    model = NNXNet(nnx.Rngs(0))
    with pytest.raises(ValueError, match="'backbone/\\*\\*'"):  # typo named with the closest path
        F.nnx_filter(jf.paths("backbon/**"), model=model)
    with pytest.raises(ValueError, match="head/kernel"):
        F.nnx_filter(jf.elements("head/kernel", np.s_[:, 0]), model=model)
    with pytest.raises(ValueError, match="head/kernel"):  # also when met one variable at a time
        nnx.state(model, F.NNXFilter(jf.elements("head/kernel", np.s_[:, 0])))
    with pytest.raises(TypeError, match="selector"):
        F.nnx_filter({"head": True}, model=model)


def test_nnx_filter_typo_never_trains_silently():
    # The check cannot be skipped: model= is required, so a typo is always an error.
    model = NNXNet(nnx.Rngs(0))
    with pytest.raises(TypeError, match="model"):
        F.nnx_filter(jf.paths("backbon/**"))
    # a typo inside a combination is named too, whatever the other parts match
    with pytest.raises(ValueError, match="backbon"):
        F.nnx_filter(jf.paths("head/**") | jf.paths("backbon/**"), model=model)
    with pytest.raises(ValueError, match="backbon"):
        F.nnx_filter(~jf.regex("backbon/.*"), model=model)


def test_nnx_filter_tree_only_selector_fails_at_construction():
    # A mask tree inside a combination has no per-variable answer: refused when built,
    # not at the first nnx.state / nnx.Optimizer call.
    model = NNXNet(nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"one at a time|whole tree"):
        F.nnx_filter(jf.paths("head/**") | {"head": True, "backbone": False}, model=model)


def test_nnx_optimizer_with_elementwise_freeze():
    model = NNXNet(nnx.Rngs(0))
    sel = jf.elements("head/kernel", np.s_[:, 0])
    opt = nnx.Optimizer(model, jf.freeze(optax.adam(1e-2), frozen=sel), wrt=nnx.Param)
    before = _pure(model)
    x = jax.random.normal(jax.random.key(1), (4, 3))  # BatchNorm of equal rows is 0
    grads = nnx.grad(lambda m: (m(x) ** 2).mean())(model)
    opt.update(model, grads)
    assert bits_equal(_pure(model)["head"]["kernel"][:, 0], before["head"]["kernel"][:, 0])
    assert not bits_equal(_pure(model)["head"]["kernel"][:, 1], before["head"]["kernel"][:, 1])
