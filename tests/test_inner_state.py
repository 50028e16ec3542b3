"""Optimizers that read their own state, through jfreeze: jf.inner_state, jf.set_inner_state,
jf.schedule_free_eval_params, and optax.lookahead the right way round."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from strategies import MODES, bits

import jfreeze as jf

STEPS = 4
BACKBONE = jf.paths("backbone/**")


def _params():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 3)).astype(np.float32)
    w[0, :] = [np.float32(1e-45), -0.0, np.float32(np.nan)]  # bits an add may change
    return {
        "backbone": {"w": jnp.asarray(w)},
        "head": {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                 "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32)},
    }


def _grads(step: int, tree):
    """Deterministic gradients shaped like ``tree`` (the same for every run)."""
    rng = np.random.default_rng(100 + step)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), tree)


def _eager(f):
    return f


def _assert_bits(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(bits(np.asarray(x)), bits(np.asarray(y)))


def _run(tx, params, grads_of, apply, mode, hook=None):
    """``STEPS`` updates; ``hook(step, state)`` may change the state between steps."""
    update = mode(tx.update)
    state = tx.init(params)
    for i in range(STEPS):
        if hook is not None:
            state = hook(i, state)
        updates, state = update(grads_of(i), state, params)
        params = apply(params, updates)
    return params, state


# --------------------------------------------------------------------------
# Schedule-free.


@pytest.mark.parametrize("mode", MODES)
def test_schedule_free_inside_freeze_matches_it_on_the_trainable_leaves(mode):
    params = _params()
    sf = lambda: optax.contrib.schedule_free_adamw(0.1, weight_decay=0.1)
    tx = jf.freeze(sf(), frozen=BACKBONE)
    new, state = _run(tx, params, lambda i: _grads(i, params),
                      lambda p, u: jf.apply_updates(p, u, frozen=BACKBONE), mode)
    ref, ref_state = _run(sf(), params["head"], lambda i: _grads(i, params)["head"],
                          optax.apply_updates, mode)
    assert not np.allclose(new["head"]["w"], params["head"]["w"])  # it trains
    _assert_bits(new["head"], ref)
    ev = mode(lambda s, p: jf.schedule_free_eval_params(s, p, frozen=BACKBONE))(state, new)
    ref_ev = optax.contrib.schedule_free_eval_params(ref_state, ref)
    _assert_bits(ev["head"], ref_ev)
    _assert_bits(ev["backbone"], params["backbone"])
    assert not np.array_equal(ev["head"]["w"], new["head"]["w"])  # eval params are not y


def test_plain_optax_eval_fails_on_a_freeze_state_and_jf_names_the_way():
    params = _params()
    state = jf.freeze(optax.contrib.schedule_free_sgd(0.1), frozen=BACKBONE).init(params)
    with pytest.raises(AttributeError):
        optax.contrib.schedule_free_eval_params(state, params)
    with pytest.raises(ValueError, match=r"no optax\.contrib\.schedule_free state"):
        jf.schedule_free_eval_params(jf.freeze(optax.adam(0.1), frozen=BACKBONE).init(params),
                                     params, frozen=BACKBONE)


@pytest.mark.parametrize("slices", [False, True], ids=["elements", "whole_slices"])
def test_schedule_free_eval_keeps_frozen_elements_bits(slices):
    params = _params()
    where = np.zeros(params["head"]["w"].shape, bool)
    where[:, 0] = True
    if not slices:
        where[-1, 0] = False  # not a whole column: the leaf reaches the optimizer whole
    frozen = BACKBONE | jf.elements("head/w", where)
    tx = jf.freeze(optax.contrib.schedule_free_adamw(0.1, weight_decay=0.5), frozen=frozen)
    new, state = _run(tx, params, lambda i: _grads(i, params),
                      lambda p, u: jf.apply_updates(p, u, frozen=frozen), _eager)
    ev = jf.schedule_free_eval_params(state, new, frozen=frozen)
    _assert_bits(np.asarray(ev["head"]["w"])[where], np.asarray(params["head"]["w"])[where])
    assert ev["backbone"]["w"] is new["backbone"]["w"]
    if slices:  # the state holds the trainable column only: frozen= must say which
        with pytest.raises(ValueError, match=r"z at path 'head/w' has shape \(3, 1\)"):
            jf.schedule_free_eval_params(state, new, frozen=BACKBONE)
        return
    # Weight decay moved z at the frozen entries: without frozen= they would not be kept.
    loose = jf.schedule_free_eval_params(state, new, frozen=BACKBONE)
    assert not np.array_equal(np.asarray(loose["head"]["w"])[where],
                              np.asarray(params["head"]["w"])[where])


@pytest.mark.parametrize("mode", MODES)
def test_schedule_free_per_label_in_partition(mode):
    params = _params()
    sf = lambda: optax.contrib.schedule_free_adamw(0.1)
    labels = {"backbone": "frozen", "head": {"w": "head", "b": "bias"}}
    tx = jf.partition({"head": sf(), "bias": optax.adam(0.1), "frozen": None}, labels)
    new, state = _run(tx, params, lambda i: _grads(i, params), optax.apply_updates, mode)
    ref, ref_state = _run(sf(), params["head"]["w"], lambda i: _grads(i, params)["head"]["w"],
                          optax.apply_updates, mode)
    ev = jf.schedule_free_eval_params(state, new, frozen=jf.nothing)
    _assert_bits(ev["head"]["w"], optax.contrib.schedule_free_eval_params(ref_state, ref))
    assert ev["head"]["b"] is new["head"]["b"]  # adam's leaf: its params are its eval params
    assert ev["backbone"]["w"] is new["backbone"]["w"]


def test_schedule_free_per_stage_in_gradual_unfreeze():
    params = _params()
    tx = jf.gradual_unfreeze(optax.contrib.schedule_free_sgd(0.1), per_stage=True,
                             thaw={0: jf.paths("head/w"), 2: jf.paths("head/b")})
    new, state = _run(tx, params, lambda i: _grads(i, params), optax.apply_updates, _eager)
    ev = jf.schedule_free_eval_params(state, new, frozen=jf.nothing)
    assert int(jf.inner_state(state, 0).step_count) == STEPS + 1
    assert int(jf.inner_state(state, 2).step_count) == STEPS - 2 + 1  # held until step 2
    assert ev["backbone"]["w"] is new["backbone"]["w"]
    assert not np.array_equal(ev["head"]["b"], new["head"]["b"])


# --------------------------------------------------------------------------
# Hyperparameters: read and set a learning rate as with plain optax.


def _set_lr_at_2(setter):
    return lambda i, state: setter(state) if i == 2 else state


@pytest.mark.parametrize("mode", MODES)
def test_learning_rate_set_through_freeze_changes_the_next_update_as_in_optax(mode):
    params = _params()
    adam = lambda: optax.inject_hyperparams(optax.adam)(learning_rate=0.1)

    def set_inner(state):
        jf.inner_state(state).hyperparams["learning_rate"] = jnp.asarray(0.01)  # optax's habit
        return state

    def set_ref(state):
        state.hyperparams["learning_rate"] = jnp.asarray(0.01)
        return state

    tx = jf.freeze(adam(), frozen=BACKBONE)
    new, state = _run(tx, params, lambda i: _grads(i, params),
                      lambda p, u: jf.apply_updates(p, u, frozen=BACKBONE), mode,
                      _set_lr_at_2(set_inner))
    ref, _ = _run(adam(), params["head"], lambda i: _grads(i, params)["head"],
                  optax.apply_updates, mode, _set_lr_at_2(set_ref))
    unchanged, _ = _run(adam(), params["head"], lambda i: _grads(i, params)["head"],
                        optax.apply_updates, mode)
    _assert_bits(new["head"], ref)
    assert not np.array_equal(ref["w"], unchanged["w"])
    assert float(jf.inner_state(state).hyperparams["learning_rate"]) == pytest.approx(0.01)
    # optax's own tree_get / tree_set reach it too (one inner optimizer).
    assert float(optax.tree_utils.tree_get(state, "learning_rate")) == pytest.approx(0.01)
    state = optax.tree_utils.tree_set(state, learning_rate=jnp.asarray(0.5))
    assert float(jf.inner_state(state).hyperparams["learning_rate"]) == 0.5


@pytest.mark.parametrize("mode", MODES)
def test_learning_rate_per_label_with_set_inner_state(mode):
    params = _params()
    adam = optax.inject_hyperparams(optax.adam)
    labels = {"backbone": "frozen", "head": {"w": "w", "b": "b"}}
    tx = jf.partition({"w": adam(0.1), "b": adam(0.2), "frozen": None}, labels)

    def set_w(state):  # functional, and inside the jitted step under jit
        def f(state):
            w = optax.tree_utils.tree_set(jf.inner_state(state, "w"), learning_rate=0.01)
            return jf.set_inner_state(state, w, "w")
        return mode(f)(state)

    new, state = _run(tx, params, lambda i: _grads(i, params),
                      lambda p, u: jf.apply_updates(p, u, frozen=BACKBONE), mode,
                      _set_lr_at_2(set_w))

    def set_ref(state):
        return optax.tree_utils.tree_set(state, learning_rate=0.01)

    ref_w, _ = _run(adam(0.1), params["head"]["w"], lambda i: _grads(i, params)["head"]["w"],
                    optax.apply_updates, mode, _set_lr_at_2(set_ref))
    ref_b, _ = _run(adam(0.2), params["head"]["b"], lambda i: _grads(i, params)["head"]["b"],
                    optax.apply_updates, mode)
    _assert_bits(new["head"]["w"], ref_w)
    _assert_bits(new["head"]["b"], ref_b)
    assert float(jf.inner_state(state, "b").hyperparams["learning_rate"]) == pytest.approx(0.2)
    _assert_bits(new["backbone"], params["backbone"])


def test_inner_state_of_gradual_unfreeze():
    params = _params()
    tx = jf.gradual_unfreeze(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                             thaw={0: jf.paths("head/**")})
    state = tx.init(params)
    state = jf.set_inner_state(
        state, optax.tree_utils.tree_set(jf.inner_state(state), learning_rate=0.3))
    assert isinstance(state, jf.GradualUnfreezeState)
    assert float(optax.tree_utils.tree_get(state, "learning_rate")) == pytest.approx(0.3)
    updates, _ = tx.update(_grads(0, params), state, params)
    np.testing.assert_allclose(updates["head"]["b"], -0.3 * _grads(0, params)["head"]["b"],
                               rtol=1e-6)


def test_inner_state_errors_name_the_labels():
    params = _params()
    adam = optax.adam(0.1)
    labels = {"backbone": "a", "head": "b"}
    state = jf.partition({"a": adam, "b": adam}, labels).init(params)
    with pytest.raises(ValueError, match=r"one inner state per label.*'a', 'b'"):
        jf.inner_state(state)
    with pytest.raises(ValueError, match="no inner state for label 'c'; labels: 'a', 'b'"):
        jf.inner_state(state, "c")
    with pytest.raises(TypeError, match=r"jf\.freeze, jf\.partition or jf\.gradual_unfreeze"):
        jf.inner_state(adam.init(params))
    with pytest.raises(ValueError, match="another tree structure"):
        jf.set_inner_state(state, adam.init(params), "a")
    # One non-frozen label: no label needed.
    state = jf.partition({"a": adam, "f": None}, {"backbone": "f", "head": "a"}).init(params)
    assert jf.inner_state(state) is jf.inner_state(state, "a")


def test_a_stateless_label_is_a_label_not_a_frozen_one():
    """optax.scale's state is an EmptyState, as a frozen label's is: without a label,
    jf.inner_state returned the other label's state as if it were the only one."""
    params = _params()
    labels = {"backbone": "s", "head": "a"}
    state = jf.partition({"s": optax.scale(-0.1), "a": optax.adam(0.1)}, labels).init(params)
    with pytest.raises(ValueError, match=r"one inner state per label.*'s', 'a'"):
        jf.inner_state(state)
    with pytest.raises(ValueError, match=r"one inner state per label"):
        jf.set_inner_state(state, jf.inner_state(state, "a"))
    # One stateless non-frozen label beside a frozen one: it is the one.
    state = jf.partition({"s": optax.scale(-0.1), "f": None},
                         {"backbone": "f", "head": "s"}).init(params)
    assert jf.inner_state(state) is jf.inner_state(state, "s")
    assert isinstance(jf.inner_state(state, "f"), optax.EmptyState)
    assert repr(jf.inner_state(state, "f")) == "EmptyState()"


@pytest.mark.parametrize("wrap, where", [
    (lambda tx: optax.chain(tx, optax.scale(1.0)), r"state\[0\]"),
    (lambda tx: optax.MultiSteps(tx, 2), r"state\.inner_opt_state"),
    (lambda tx: optax.lookahead(tx, 2, 0.5), r"state\.fast_state"),
], ids=["chain", "MultiSteps", "lookahead"])
def test_a_wrapped_jfreeze_state_is_named_by_its_path(wrap, where):
    params = _params()
    tx = wrap(jf.freeze(optax.adam(0.1), frozen=BACKBONE))
    state = tx.init(optax.LookaheadParams.init_synced(params)
                    if "lookahead" in where else params)
    for fn in (jf.inner_state, lambda s: jf.set_inner_state(s, None)):
        with pytest.raises(TypeError, match=rf"holds one at {where}"):
            fn(state)


# --------------------------------------------------------------------------
# Lookahead: optax.lookahead(jf.freeze(...)), never the other way round.


@pytest.mark.parametrize("mode", MODES)
def test_lookahead_outside_freeze_matches_lookahead_on_the_trainable_leaves(mode):
    params = optax.LookaheadParams.init_synced(_params())
    tx = optax.lookahead(jf.freeze(optax.adam(0.1), frozen=BACKBONE),
                         sync_period=2, slow_step_size=0.5)
    both = jf.paths("*/backbone/**")
    new, _ = _run(tx, params, lambda i: _grads(i, params.fast),
                  lambda p, u: jf.apply_updates(p, u, frozen=both), mode)
    sub = optax.LookaheadParams.init_synced(params.fast["head"])
    ref, _ = _run(optax.lookahead(optax.adam(0.1), sync_period=2, slow_step_size=0.5), sub,
                  lambda i: _grads(i, params.fast)["head"], optax.apply_updates, mode)
    _assert_bits(new.fast["head"], ref.fast)
    _assert_bits(new.slow["head"], ref.slow)
    _assert_bits(new.fast["backbone"], params.fast["backbone"])
    _assert_bits(new.slow["backbone"], params.slow["backbone"])
    assert not np.array_equal(new.slow["head"]["w"], params.slow["head"]["w"])  # synced


@pytest.mark.parametrize("make", [
    lambda inner: jf.freeze(inner, frozen=BACKBONE),
    lambda inner: jf.freeze(inner, frozen=jf.paths("*/backbone/**")),
    lambda inner: jf.partition({"a": inner, "f": None}, {"fast": "a", "slow": "f"}),
    lambda inner: jf.gradual_unfreeze(inner, thaw={0: jf.paths("head/**")}),
])
def test_lookahead_inside_a_jfreeze_transform_is_one_clear_error(make):
    params = optax.LookaheadParams.init_synced(_params())
    tx = make(optax.lookahead(optax.adam(0.1), sync_period=2, slow_step_size=0.5))
    with pytest.raises(TypeError, match=r"lookahead goes outside, optax\.lookahead\(jf\.") as e:
        tx.init(params)
    assert "params.fast" in str(e.value)
    with pytest.raises(TypeError, match="lookahead goes outside"):
        tx.update(_grads(0, params.fast), None, params)
