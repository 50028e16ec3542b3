"""jf.check_frozen_compute: is frozen weight-gradient compute really gone from a step?"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jfreeze as jf

FROZEN = jf.paths("emb/**", "body/**")


def _params():
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    return {"emb": {"w": normal(32, 64)}, "body": {"w": normal(64, 64)},
            "head": {"w": normal(64, 4)}}


X = jnp.asarray(np.random.default_rng(1).standard_normal((16, 32), np.float32))
Y = jnp.arange(16) % 4


def _loss(p, x, y):
    h = jnp.tanh(jnp.tanh(x @ p["emb"]["w"]) @ p["body"]["w"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["head"]["w"], y).mean()


TX = jf.freeze(optax.adam(1e-3), frozen=FROZEN)


def clean_step(params, state, x, y):
    loss, grads = jax.value_and_grad(_loss)(params, x, y)
    updates, state = TX.update(grads, state, params)
    return optax.apply_updates(params, updates), state, {"loss": loss}


def logging_step(params, state, x, y):  # the trap: the norm of *all* gradients
    loss, grads = jax.value_and_grad(_loss)(params, x, y)
    updates, state = TX.update(grads, state, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return optax.apply_updates(params, updates), state, metrics


def trainable_norm_step(params, state, x, y):  # the cheap fix: norm of the trainable split
    loss, grads = jax.value_and_grad(_loss)(params, x, y)
    updates, state = TX.update(grads, state, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(jf.split(grads, frozen=FROZEN)[0])}
    return optax.apply_updates(params, updates), state, metrics


SPLIT_TX = optax.adam(1e-3)


def split_step(params, state, x, y):  # differentiate only the trainable part
    trainable, frozen = jf.split(params, frozen=FROZEN)
    grads = jax.grad(lambda t: _loss(jf.merge(t, frozen), x, y))(trainable)
    updates, state = SPLIT_TX.update(grads, state, trainable)
    new = jf.merge(optax.apply_updates(trainable, updates), frozen)
    return new, state, {"grad_norm": optax.tree.norm(grads)}


def _check(step, tx=TX, **kw):
    params = _params()
    return jf.check_frozen_compute(step, params, tx.init(params), X, Y, frozen=FROZEN, **kw)


@pytest.mark.parametrize("step", [clean_step, trainable_norm_step],
                         ids=["no_norm", "trainable_norm"])
def test_clean_freeze_step_passes(step):
    report = _check(step)
    assert report.ok, report
    assert report.differentiated == 2  # emb/w and body/w are differentiated, then dropped
    assert report.ratio == pytest.approx(1.0, abs=0.01)
    assert report.message.startswith("ok: frozen weight gradients are dead code")
    assert jax.grad is not None and "patched" not in jax.grad.__name__  # jax left as it was


def test_logging_the_full_gradient_norm_is_flagged_and_named():
    report = _check(jax.jit(logging_step))  # a jitted step is unwrapped
    assert not report.ok
    assert report.ratio > 1.3, report
    assert report.leaking_outputs == ("2/grad_norm",)
    assert "optax.tree.norm(grads)" in report.message and "jf.split" in report.message
    assert str(report) == report.message


def test_a_step_that_differentiates_only_the_trainable_part():
    params = _params()
    state = SPLIT_TX.init(jf.split(params, frozen=FROZEN)[0])
    report = jf.check_frozen_compute(split_step, params, state, X, Y, frozen=FROZEN)
    assert report.ok and report.differentiated == 0
    assert "never asks for the gradients" in report.message


def test_clipping_outside_the_freeze_is_flagged_as_the_optimizer():
    tx = optax.chain(optax.clip_by_global_norm(1.0), TX)  # frozen grads shrink the head's

    def step(params, state, x, y):
        grads = jax.grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    report = _check(step, tx=tx)
    assert not report.ok
    assert "0/head" in report.leaking_outputs and "0/emb" not in report.leaking_outputs
    assert "clip_by_global_norm" in report.message


def test_explain_off_and_errors_restore_jax():
    report = _check(logging_step, explain=False)
    assert not report.ok and report.leaking_outputs == ()
    lowered = _check(logging_step, explain=False, compiled=False)  # no compilation
    assert not lowered.ok and lowered.ratio == pytest.approx(report.ratio, rel=0.05)
    grad = jax.grad

    def broken(params, state, x, y):
        jax.grad(_loss)(params, x, y)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _check(broken)
    assert jax.grad is grad
