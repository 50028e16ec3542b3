"""jf.check_frozen_compute: is frozen weight-gradient compute really gone from a step?"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jfreeze as jf
import jfreeze._autodiff_hook

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


# --------------------------------------------------------------------------
# Every path to autodiff is seen: the same leaking step written with each API is
# flagged, its clean version is ok, and what cannot be verified is never ok.

from jax import value_and_grad as bound_value_and_grad  # noqa: E402 (bound before the check)

MODULE_GRAD = jax.grad(_loss)  # a gradient function built before the check


def _small():
    rng = np.random.default_rng(2)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    return {"emb": {"w": normal(8, 16)}, "body": {"w": normal(16, 16)},
            "head": {"w": normal(16, 4)}}, normal(16, 8)


def _reverse(grad_of):
    """A freeze step whose gradients come from ``grad_of(params, x, y)``; ``leak`` logs
    the norm of all gradients (the trap), else of the trainable ones."""
    def step(params, state, x, y, *, leak):
        grads = grad_of(params, x, y)
        updates, state = TX.update(grads, state, params)
        kept = grads if leak else jf.split(grads, frozen=FROZEN)[0]
        return optax.apply_updates(params, updates), state, optax.tree.norm(kept)
    return step


def _vjp_grads(p, x, y):
    _, pullback = jax.vjp(lambda q: _loss(q, x, y), p)
    return pullback(jnp.ones(()))[0]


def _cvjp_matmul():
    @jax.custom_vjp
    def mm(h, w):
        return h @ w

    mm.defvjp(lambda h, w: (h @ w, (h, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))
    return mm


MM = _cvjp_matmul()


def _custom_vjp_loss(p, x, y):
    h = jnp.tanh(MM(jnp.tanh(MM(x, p["emb"]["w"])), p["body"]["w"]))
    return optax.softmax_cross_entropy_with_integer_labels(MM(h, p["head"]["w"]), y).mean()


REVERSE = {
    "jax.value_and_grad": lambda p, x, y: jax.value_and_grad(_loss)(p, x, y)[1],
    "from jax import value_and_grad": lambda p, x, y: bound_value_and_grad(_loss)(p, x, y)[1],
    "jax.grad bound at module level": lambda p, x, y: MODULE_GRAD(p, x, y),
    "jax.vjp": _vjp_grads,
    "jax.jacrev": lambda p, x, y: jax.jacrev(_loss)(p, x, y),
    "custom_vjp": lambda p, x, y: jax.grad(_custom_vjp_loss)(p, x, y),
    "jax.grad of a jitted loss": lambda p, x, y: jax.grad(jax.jit(_loss))(p, x, y),
}


@pytest.mark.parametrize("api", list(REVERSE))
def test_every_reverse_mode_api_leaking_is_flagged_clean_is_ok(api):
    step = _reverse(REVERSE[api])
    params, state = _params(), TX.init(_params())
    leaky = jf.check_frozen_compute(functools.partial(step, leak=True), params, state, X, Y,
                                    frozen=FROZEN, explain=False)
    assert leaky.ok is False and leaky.ratio > 1.3 and leaky.differentiated == 2, leaky
    clean = jf.check_frozen_compute(functools.partial(step, leak=False), params, state, X, Y,
                                    frozen=FROZEN)
    assert clean.ok is True and clean.differentiated == 2, clean
    assert clean.ratio == pytest.approx(1.0, abs=0.01) and clean.unverified == ()


def _forward_step(kind, leak):
    """A metric from forward-mode derivatives: of every leaf (leak) or of the trainable
    part only (frozen leaves closed over, never differentiated)."""
    def step(params, x, y):
        trainable, frozen = jf.split(params, frozen=FROZEN)
        wrt, f = (params, lambda q: _loss(q, x, y)) if leak else (
            trainable, lambda t: _loss(jf.merge(t, frozen), x, y))
        if kind == "jax.jacfwd":
            return optax.tree.norm(jax.jacfwd(f)(wrt))
        tangent = jax.tree.map(jnp.ones_like, wrt)
        if kind == "jax.jvp":
            return jax.jvp(f, (wrt,), (tangent,))[1]
        _, f_jvp = jax.linearize(f, wrt)
        return f_jvp(tangent)
    return step


@pytest.mark.parametrize("kind", ["jax.jvp", "jax.linearize", "jax.jacfwd"])
def test_every_forward_mode_api_leaking_is_flagged_clean_is_ok(kind):
    params, x = _small()
    leaky = jf.check_frozen_compute(_forward_step(kind, True), params, x, Y, frozen=FROZEN,
                                    explain=False)
    assert leaky.ok is False and leaky.ratio > 1.3 and leaky.differentiated == 2, leaky
    clean = jf.check_frozen_compute(_forward_step(kind, False), params, x, Y, frozen=FROZEN)
    assert clean.ok is True and clean.differentiated == 0, clean
    assert "never asks for the gradients" in clean.message


def test_nnx_grad_leaking_is_flagged_clean_is_ok():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.emb = nnx.Linear(32, 64, use_bias=False, rngs=rngs)
            self.body = nnx.Linear(64, 64, use_bias=False, rngs=rngs)
            self.head = nnx.Linear(64, 4, use_bias=False, rngs=rngs)

        def __call__(self, x):
            return self.head(jnp.tanh(self.body(jnp.tanh(self.emb(x)))))

    def loss(model, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    def step(model, x, y, *, leak):
        grads = nnx.grad(loss)(model, x, y)
        return optax.tree.norm(grads if leak else grads["head"])

    model, frozen = MLP(nnx.Rngs(0)), jf.paths("emb/**", "body/**")
    _assert_leak_flagged_and_clean_ok(step, model, frozen)


@pytest.mark.parametrize("api", ["filter_grad", "filter_value_and_grad"])
def test_equinox_filter_grad_leaking_is_flagged_clean_is_ok(api):
    eqx = pytest.importorskip("equinox")
    keys = jax.random.split(jax.random.key(0), 3)

    class MLP(eqx.Module):  # all leaves arrays: check_frozen_compute jit-traces the model
        emb: eqx.nn.Linear
        body: eqx.nn.Linear
        head: eqx.nn.Linear

        def __call__(self, x):
            return self.head(jnp.tanh(self.body(jnp.tanh(self.emb(x)))))

    model = MLP(*(eqx.nn.Linear(i, o, use_bias=False, key=k)
                  for (i, o), k in zip([(32, 64), (64, 64), (64, 4)], keys, strict=True)))

    def loss(model, x, y):
        logits = jax.vmap(model)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(model, x, y, *, leak):
        if api == "filter_grad":
            grads = eqx.filter_grad(loss)(model, x, y)
        else:
            grads = eqx.filter_value_and_grad(loss)(model, x, y)[1]
        grads = eqx.filter(grads, eqx.is_array)
        return optax.tree.norm(grads if leak else grads.head)

    frozen = jf.paths("emb/**", "body/**")
    _assert_leak_flagged_and_clean_ok(step, model, frozen)


JITTED_GRAD = jax.jit(jax.grad(_loss))  # its tracers are the inner jit's, not the step's


@pytest.mark.parametrize("leak", [True, False], ids=["leaking", "clean"])
def test_params_cast_before_differentiation_are_not_verified(leak):
    def grads_of(p, x, y):  # the differentiated bf16 copies are not the step's leaves
        return jax.grad(_loss)(jax.tree.map(lambda a: a.astype(jnp.bfloat16), p), x, y)

    report = _check(functools.partial(_reverse(grads_of), leak=leak), explain=False)
    assert report.ok is None, report  # never a pass
    assert report.message.startswith("not verified")
    assert "3 differentiated value(s) are not leaves of the step's arguments" in report.message


@pytest.mark.parametrize("leak", [True, False], ids=["leaking", "clean"])
def test_a_gradient_inside_an_inner_jit_is_not_verified(leak):
    # Traced afresh, its primals are the inner jit's tracers (not attributable); from
    # jit's cache (the step as written was traced first), autodiff ran unseen.
    step = functools.partial(_reverse(JITTED_GRAD), leak=leak)
    for _ in range(2):
        report = _check(step, explain=False)
        assert report.ok is None and report.unverified, report


def test_a_differentiation_path_the_hook_does_not_see_is_not_verified():
    # jax.interpreters.ad.jvp is bound at import: calling it bypasses the hooked
    # module attribute. The autodiff trace it starts is counted all the same.
    from jax._src.tree_util import FlatTree
    from jax.interpreters import ad

    def step(params, x, y):
        primals = FlatTree.flatten((params,))
        tangents = FlatTree.flatten((jax.tree.map(jnp.ones_like, params),))
        return ad.jvp(lambda p: _loss(p, x, y), primals, tangents)[1].unflatten()

    report = jf.check_frozen_compute(step, _params(), X, Y, frozen=FROZEN)
    assert report.ok is None and "path the check does not see" in report.message, report


def test_unknown_jax_internals_are_not_verified(monkeypatch):
    monkeypatch.setattr(jfreeze._autodiff_hook, "autodiff_internals", lambda: None)
    report = _check(clean_step)
    assert report.ok is None and report.unverified
    assert f"this JAX version ({jax.__version__})" in report.message
    assert _check(logging_step, explain=False).ok is None  # the reference equals the step


ELEMENTS = jf.paths("emb/**") | jf.elements("body/w", np.s_[:, 0])


@pytest.mark.parametrize("frozen", [ELEMENTS, jf.elements("body/w", np.s_[:, :8])],
                         ids=["whole_and_elements", "elements_only"])
def test_element_wise_frozen_leaves_are_reported_separately(frozen):
    # body/w is frozen element-wise: its weight gradient is needed for its trainable
    # columns. Counting it as a whole frozen leaf was a false alarm (ratio ~2 on a clean step).
    tx = jf.freeze(optax.adam(1e-3), frozen=frozen)

    def step(params, state, x, y):
        grads = jax.grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = _params()
    report = jf.check_frozen_compute(step, params, tx.init(params), X, Y, frozen=frozen)
    assert report.ok is True, report
    assert report.element_wise == 1 and report.differentiated == (1 if frozen is ELEMENTS else 0)
    assert report.ratio == pytest.approx(1.0, abs=0.01)
    assert "1 element-wise frozen leaves are differentiated in full" in report.message
    assert "needed for their trainable elements" in report.message


@pytest.mark.parametrize("leak", [True, False], ids=["leaking", "clean"])
def test_a_gradient_inside_lax_switch_that_closes_over_params_is_seen(leak):
    # Closed over, the params inside the branch are the step's own tracers.
    def step(params, state, x, y):
        def branch(_):
            grads = jax.grad(_loss)(params, x, y)
            return optax.tree.norm(grads if leak else grads["head"])
        return jax.lax.switch(jnp.int32(0), [branch, lambda _: jnp.float32(0)], None)

    report = _check(step, explain=False)
    assert report.ok is (not leak) and report.differentiated == 2, report


def _assert_leak_flagged_and_clean_ok(step, model, frozen):
    """``step(model, X, Y, leak=...)``: the leaking variant is flagged, the clean one is ok,
    and both differentiate the 2 frozen leaves (the check saw the differentiation)."""
    leaky = jf.check_frozen_compute(functools.partial(step, leak=True), model, X, Y,
                                    frozen=frozen, explain=False)
    assert leaky.ok is False and leaky.differentiated == 2, leaky
    clean = jf.check_frozen_compute(functools.partial(step, leak=False), model, X, Y,
                                    frozen=frozen)
    assert clean.ok is True and clean.differentiated == 2, clean
