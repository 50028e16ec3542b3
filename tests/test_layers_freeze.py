"""Frozen layers of a stack (jf.layers, or any element selection of whole slices along
one axis): the inner optimizer sees, and keeps state for, the trainable slices only.

The reference is always the plain optax optimizer run on the trainable sub-stack,
cut by hand with NumPy (``np.delete``), never with jfreeze's own gather.
"""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from strategies import MODES, bits, property_settings, random_array, special_values
from test_transforms import OPTIMIZERS

import jfreeze as jf

STEPS = 3
# Examples per (optimizer, mode): under jit every example is a fresh compile.
EXAMPLES = {"jit": 2, "eager": 3}


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _special(x: np.ndarray, where: np.ndarray, rng) -> np.ndarray:
    """``x`` with bit patterns an add may change (subnormals, NaN payloads, -0.0) at ``where``."""
    x = x.copy()
    x[where] = special_values(rng, x.dtype.name, x.shape)[where]
    return x


def _poison(g: np.ndarray, where: np.ndarray) -> np.ndarray:
    g = g.copy()
    g[where] = np.nan
    return g


@st.composite
def stacks(draw, dtypes=("float32",)):
    """A stacked params tree, its layer axis, the frozen layers and how to spell them.

    ``stack/w`` and ``stack/b`` share the layer axis: axis 0, or MaxText's axis 1
    (a leading dimension), or a negative axis counted from the end.
    """
    n = draw(st.integers(2, 6))
    frozen = sorted(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n - 1)))
    pre = tuple(draw(st.lists(st.integers(1, 3), max_size=1)))
    post_w = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    post_b = tuple(draw(st.lists(st.integers(1, 3), max_size=1)))
    if draw(st.booleans()):  # a negative axis: the same number of dims after it
        post_b, axis = post_w, -(len(post_w) + 1)
    else:
        axis = len(pre)
    spelling = draw(st.sampled_from(["list", "negative", "bools"]))
    index = {
        "list": list(frozen),
        "negative": [i - n for i in frozen],
        "bools": np.isin(np.arange(n), frozen),
    }[spelling]
    dtype = draw(st.sampled_from(dtypes))
    shapes = {"b": (*pre, n, *post_b), "w": (*pre, n, *post_w)}
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    params = {
        "emb": random_array(rng, (2,)),  # a whole frozen leaf next to the stack
        "head": random_array(rng, (3,)),
        "stack": {k: random_array(rng, s, dtype) for k, s in shapes.items()},
    }
    sel = jf.layers("stack/*", index, axis=axis) | jf.paths("emb")
    return params, sel, len(pre), frozen, rng


def _frozen_elements(x, layer_axis, frozen):
    where = np.zeros(x.shape, bool)
    idx = [slice(None)] * x.ndim
    idx[layer_axis] = frozen
    where[tuple(idx)] = True
    return where


def _case(params, layer_axis, frozen, rng):
    """Special bits in the frozen slices, NaN gradients there; STEPS gradient trees."""
    stack = {k: _special(x, _frozen_elements(x, layer_axis, frozen), rng)
             for k, x in params["stack"].items()}
    params = {**params, "stack": stack}
    grads = []
    for _ in range(STEPS):
        g = jax.tree.map(lambda x: random_array(rng, x.shape, x.dtype.name), params)
        g["stack"] = {k: _poison(x, _frozen_elements(x, layer_axis, frozen))
                      for k, x in g["stack"].items()}
        g["emb"] = np.full(2, np.nan, np.float32)
        grads.append(g)
    return params, grads


def _sub(tree, layer_axis, frozen):
    """The reference tree: the trainable sub-stack (cut with NumPy), no whole frozen
    leaf. As jax arrays: optax fed NumPy bf16 computes in another precision."""
    return {"head": jnp.asarray(tree["head"]),
            "stack": {k: jnp.asarray(np.delete(np.asarray(x), frozen, axis=layer_axis))
                      for k, x in tree["stack"].items()}}


def _run(tx, params, grads, mode, frozen=None):
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        if frozen is None:
            return optax.apply_updates(p, u), s
        return jf.apply_updates(p, u, frozen=frozen), s

    state = mode(tx.init)(params)
    step = mode(step)
    for g in grads:
        params, state = step(params, state, g)
    return params, state


def check_stack(mode, make_inner, params, sel, layer_axis, frozen, rng):
    params, grads = _case(params, layer_axis, frozen, rng)
    new, state = _run(jf.freeze(make_inner(), frozen=sel), params, grads, mode, sel)
    ref_params = _sub(params, layer_axis, frozen)
    ref, _ = _run(make_inner(), ref_params, [_sub(g, layer_axis, frozen) for g in grads], mode)
    # Frozen: every bit (NaN payloads, subnormals, -0.0), whole leaf and slices.
    np.testing.assert_array_equal(bits(new["emb"]), bits(params["emb"]))
    for k, x in params["stack"].items():
        fz = _frozen_elements(x, layer_axis, frozen)
        np.testing.assert_array_equal(bits(new["stack"][k])[fz], bits(x)[fz], err_msg=k)
    # Trainable: the inner optimizer on the sub-stack alone (bit for bit eagerly).
    got = _sub(new, layer_axis, frozen)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref),
                            strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.isfinite(a).all(), path  # no NaN from a frozen slice reaches it
        if mode is jax.jit:  # two programs may fold constants differently (~1 ulp a step)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=str(path))
        else:
            np.testing.assert_array_equal(bits(a), bits(b), err_msg=str(path))
    # State: exactly what inner.init builds on the sub-stack.
    inner = jf.inner_state(state)
    want = make_inner().init(ref_params)
    assert [np.shape(x) for x in jax.tree.leaves(inner)] == [
        np.shape(x) for x in jax.tree.leaves(want)]
    assert nbytes(inner) == nbytes(want) == nbytes(state)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_frozen_layers_law_property(name, mode, request):
    mode_id = request.node.callspec.id.split("-")[-1]
    make_inner = OPTIMIZERS[name][0]
    # Eagerly MultiSteps' lax.cond is traced and compiled at every call.
    examples = 1 if (name, mode_id) == ("multisteps_adam", "eager") else EXAMPLES[mode_id]

    @property_settings(examples, shrink=mode_id == "eager")
    @given(stacks())
    def prop(case):
        params, sel, layer_axis, frozen, rng = case
        check_stack(mode, make_inner, params, sel, layer_axis, frozen, rng)

    prop()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["sgd_momentum", "adam"])
def test_frozen_layers_every_dtype_property(name, mode, request):
    mode_id = request.node.callspec.id.split("-")[-1]
    make_inner = OPTIMIZERS[name][0]

    @property_settings(3, shrink=False)
    @given(stacks(dtypes=("bfloat16", "float16", "complex64")))
    def prop(case):
        params, sel, layer_axis, frozen, rng = case
        params, grads = _case(params, layer_axis, frozen, rng)
        new, _ = _run(jf.freeze(make_inner(), frozen=sel), params, grads, mode, sel)
        ref, _ = _run(make_inner(), _sub(params, layer_axis, frozen),
                      [_sub(g, layer_axis, frozen) for g in grads], mode)
        for k, x in params["stack"].items():
            fz = _frozen_elements(x, layer_axis, frozen)
            np.testing.assert_array_equal(bits(new["stack"][k])[fz], bits(x)[fz], err_msg=k)
            got = np.delete(np.asarray(new["stack"][k]), frozen, axis=layer_axis)
            want = np.asarray(ref["stack"][k])
            if mode_id == "eager":
                np.testing.assert_array_equal(bits(got), bits(want), err_msg=k)
            else:
                np.testing.assert_allclose(got.astype(np.complex128), want.astype(np.complex128),
                                           rtol=2e-2, atol=1e-3, err_msg=k)

    prop()


# --------------------------------------------------------------------------
# State bytes, inner_state, schedule-free, extra args, errors.

STACK = {"layers": {"w": np.random.default_rng(0).standard_normal((12, 16, 16), np.float32),
                    "b": np.zeros((12, 16), np.float32)},
         "head": np.ones((16, 4), np.float32)}


def test_adam_state_bytes_are_the_trainable_slices_only():
    frozen = jf.layers("layers/**", range(8))
    trainable = nbytes(STACK["head"]) + nbytes(STACK["layers"]) * 4 // 12
    state = jf.freeze(optax.adam(1e-3), frozen=frozen).init(STACK)
    assert nbytes(state) == 2 * trainable + 4  # mu, nu and the int32 count
    # A mask that is not whole slices (layers 0-7 of b but one element) keeps b's full state.
    not_slices = jf.layers("layers/**", range(8)) - jf.elements("layers/b", np.s_[0, 0])
    full = jf.freeze(optax.adam(1e-3), frozen=not_slices).init(STACK)
    w_trainable = nbytes(STACK["layers"]["w"]) * 4 // 12
    b = nbytes(STACK["layers"]["b"])
    assert nbytes(full) == 2 * (nbytes(STACK["head"]) + w_trainable + b) + 4


@pytest.mark.parametrize("mode", MODES)
def test_inner_state_and_set_inner_state_with_a_layers_selection(mode):
    frozen = jf.layers("layers/**", [0, 1, 4])
    tx = jf.freeze(optax.inject_hyperparams(optax.adam)(learning_rate=0.1), frozen=frozen)
    state = mode(tx.init)(STACK)
    mu = jf.inner_state(state).inner_state[0].mu
    assert mu["layers"]["w"].shape == (9, 16, 16) and mu["layers"]["b"].shape == (9, 16)
    new = optax.tree_utils.tree_set(jf.inner_state(state), learning_rate=0.0)
    state = jf.set_inner_state(state, new)
    grads = jax.tree.map(np.ones_like, STACK)
    updates, state = mode(tx.update)(grads, state, STACK)
    assert float(jf.inner_state(state).hyperparams["learning_rate"]) == 0.0
    assert not np.asarray(updates["layers"]["w"]).any()  # lr 0: nothing moves
    assert jf.inner_state(state).inner_state[0].mu["layers"]["w"].shape == (9, 16, 16)


@pytest.mark.parametrize("mode", MODES)
def test_schedule_free_eval_params_with_a_layers_selection(mode):
    p0 = {"w": np.random.default_rng(1).standard_normal((5, 3), np.float32)}
    p0["w"][0] = [np.nan, -0.0, 1e-45]  # frozen bits that an add would not keep
    frozen, keep = jf.layers("w", [0, 3]), [1, 2, 4]
    make = lambda: optax.contrib.schedule_free_adamw(0.1, weight_decay=0.1)
    grads = [{"w": np.full((5, 3), s + 1.0, np.float32)} for s in range(3)]
    tx, ref = jf.freeze(make(), frozen=frozen), make()
    p, state = _run(tx, p0, grads, mode, frozen)
    sub, rstate = _run(ref, {"w": p0["w"][keep]}, [{"w": g["w"][keep]} for g in grads], mode)
    ev = mode(lambda s, p: jf.schedule_free_eval_params(s, p, frozen=frozen))(state, p)
    rev = optax.contrib.schedule_free_eval_params(rstate, sub)
    ev_w = np.asarray(ev["w"])
    np.testing.assert_array_equal(bits(ev_w[[0, 3]]), bits(p0["w"][[0, 3]]))
    if mode is jax.jit:
        np.testing.assert_allclose(ev_w[keep], rev["w"], rtol=1e-6)
    else:
        np.testing.assert_array_equal(bits(ev_w[keep]), bits(rev["w"]))
    with pytest.raises(ValueError, match=r"z at path 'w' has shape \(3, 3\)"):
        jf.schedule_free_eval_params(state, p, frozen=jf.nothing)


def _loss(p):
    return jnp.sum(jnp.tanh(p["w"]) ** 2 * jnp.arange(1.0, 4.0)) + jnp.sum((p["w"] - 0.3) ** 2)


@pytest.mark.parametrize("mode", MODES)
def test_lbfgs_with_frozen_layers_equals_lbfgs_on_the_trainable_layers(mode):
    # grad= is cut like the updates; value_fn gets the frozen layers back.
    w0 = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    frozen = jf.layers("w", [0, 2])
    tx, ref = jf.freeze(optax.lbfgs(), frozen=frozen), optax.lbfgs()

    def alone(sub):  # the trainable layers 1 and 3, the frozen ones closed over
        s = sub["w"]
        return _loss({"w": jnp.concatenate([w0[0:1], s[0:1], w0[2:3], s[1:2]])})

    def step(p, state, sub, rstate):
        value, grad = jax.value_and_grad(_loss)(p)
        updates, state = tx.update(grad, state, p, value=value, grad=grad, value_fn=_loss)
        rvalue, rgrad = jax.value_and_grad(alone)(sub)
        rupdates, rstate = ref.update(rgrad, rstate, sub, value=rvalue, grad=rgrad, value_fn=alone)
        return (jf.apply_updates(p, updates, frozen=frozen), state,
                optax.apply_updates(sub, rupdates), rstate)

    p, sub = {"w": jnp.asarray(w0)}, {"w": jnp.asarray(w0[[1, 3]])}
    state, rstate = tx.init(p), ref.init(sub)
    for _ in range(2):  # eagerly the linesearch is slow
        p, state, sub, rstate = mode(step)(p, state, sub, rstate)
    w = np.asarray(p["w"])
    np.testing.assert_array_equal(bits(w[[0, 2]]), bits(w0[[0, 2]]))
    np.testing.assert_array_equal(bits(w[[1, 3]]), bits(sub["w"]))
    assert _loss(p) < _loss({"w": w0})


@pytest.mark.parametrize("update_with, match", [
    ([1], r"'layers/w' \(axis 0, frozen slices \[0\] of 3 at init, axis 0, frozen slices "
          r"\[1\] of 3 now\)"),
    ([0, 1], r"'layers/w' \(axis 0, frozen slices \[0\] of 3 at init, axis 0, frozen slices "
             r"\[0, 1\] of 3"),
    (None, r"'layers/w' \(axis 0, frozen slices \[0\] of 3 at init, no slices now\)"),
])
@pytest.mark.parametrize("who", ["jf.freeze", "jf.gradual_unfreeze"])
def test_another_selection_of_frozen_layers_at_update_names_the_path(update_with, match, who):
    params = {"layers": {"w": np.ones((3, 2), np.float32)}, "head": np.ones(2, np.float32)}

    def make(index):
        sel = jf.paths("head") if index is None else jf.layers("layers/*", index)
        if who == "jf.freeze":
            return jf.freeze(optax.adam(0.1), frozen=sel)
        return jf.gradual_unfreeze(optax.adam(0.1), thaw={0: ~sel})

    state = make([0]).init(params)
    grads = jax.tree.map(np.ones_like, params)
    with pytest.raises(ValueError, match=f"{who}: the optimizer state does not match.*{match}"):
        make(update_with).update(grads, state, params)


def test_an_element_selection_of_whole_slices_is_cut_too():
    # jf.elements on whole columns is the same selection as jf.layers on axis 1.
    w = {"w": np.ones((4, 3), np.float32)}
    a = jf.freeze(optax.adam(0.1), frozen=jf.elements("w", np.s_[:, 0])).init(w)
    b = jf.freeze(optax.adam(0.1), frozen=jf.layers("w", 0, axis=1)).init(w)
    assert jf.inner_state(a)[0].mu["w"].shape == jf.inner_state(b)[0].mu["w"].shape == (4, 2)


# --------------------------------------------------------------------------
# Gradual unfreezing by layers: stage 0 trains layers 8-11, stage 1 adds 4-7.

GRADUAL = {"layers": {"w": np.random.default_rng(3).standard_normal((12, 3), np.float32)},
           "head": np.ones(3, np.float32)}
THAW = {0: jf.paths("head") | jf.layers("layers/w", range(8, 12)),
        2: jf.layers("layers/w", range(4, 8))}


def _gradual_loss(p):
    return jnp.sum(jnp.sin(p["layers"]["w"]).sum(0) * p["head"])


@pytest.mark.parametrize("per_stage", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_gradual_unfreeze_by_layers(mode, per_stage):
    tx = jf.gradual_unfreeze(optax.adam(0.1), thaw=THAW, per_stage=per_stage)
    grad = jf.thawed_value_and_grad(_gradual_loss, THAW)
    w0 = GRADUAL["layers"]["w"]

    def step(p, state):
        _, g = grad(state.count, p)
        u, state = tx.update(g, state, p)
        return optax.apply_updates(p, u), state, g

    p, state = GRADUAL, mode(tx.init)(GRADUAL)
    # Layers 0-3 never thaw: no state for them.
    mus = [x for x in jax.tree.leaves(state) if np.shape(x) == (8, 3)]
    assert mus and not [x for x in jax.tree.leaves(state) if np.shape(x) == (12, 3)]
    for t in range(4):
        p, state, g = mode(step)(p, state)
        w, g = np.asarray(p["layers"]["w"]), np.asarray(g["layers"]["w"])
        thawed = 8 if t < 2 else 4
        # Gradients only where thawed; the rest kept bit for bit.
        assert not g[:thawed].any() and (g[thawed:] != 0).all(), t
        np.testing.assert_array_equal(bits(w[:thawed]), bits(w0[:thawed]))
        assert (w[thawed:] != w0[thawed:]).all(), t


def test_thawed_value_and_grad_by_layers_equals_masked_jax_grad():
    full = jax.grad(_gradual_loss)(GRADUAL)["layers"]["w"]
    grad = jax.jit(jf.thawed_value_and_grad(_gradual_loss, THAW))
    for count, thawed in [(0, 8), (1, 8), (2, 4), (7, 4)]:
        _, g = grad(count, GRADUAL)
        want = np.where(np.arange(12)[:, None] >= thawed, full, 0.0)
        np.testing.assert_allclose(g["layers"]["w"], want, rtol=1e-6)


def test_nnx_optimizer_with_frozen_layers():
    # nnx.Optimizer inits on Variables and updates with arrays: both are cut alike.
    nnx = pytest.importorskip("flax.nnx")

    class Stack(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.arange(12.0).reshape(4, 3))

    model, w0 = Stack(), np.arange(12.0, dtype=np.float32).reshape(4, 3)
    opt = nnx.Optimizer(model, jf.freeze(optax.adam(0.1), frozen=jf.layers("w", [0, 1])),
                        wrt=nnx.Param)
    for _ in range(2):
        opt.update(model, nnx.grad(lambda m: (m.w[...] ** 2).sum())(model))
    w = np.asarray(model.w[...])
    np.testing.assert_array_equal(bits(w[:2]), bits(w0[:2]))
    assert (w[2:] < w0[2:]).all()
    assert [np.shape(x) for x in jax.tree.leaves(opt.opt_state) if np.ndim(x) == 2] == [(2, 3)] * 2
