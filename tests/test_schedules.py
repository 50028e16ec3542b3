"""jf.gradual_unfreeze: thaw on schedule inside one compiled step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import _glob_escape, bits, leaf_paths, materialize, property_settings, skeletons

import jfreeze as jf

HEAD, BODY, EMB = jf.paths("head/**"), jf.paths("body/**"), jf.paths("emb")
THAW_AT = 3


def _params():
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    return {
        "emb": normal(6, 5),
        "body": {"w": normal(5, 5), "b": jnp.full(5, -0.0, jnp.float32)},
        "head": {"w": normal(5, 3), "b": jnp.zeros(3, jnp.float32)},
    }


def _loss(p, x, y):
    h = jnp.tanh(x @ p["emb"])
    h = jnp.tanh(h @ p["body"]["w"] + p["body"]["b"])
    return jnp.mean((h @ p["head"]["w"] + p["head"]["b"] - y) ** 2)


def _batch(i):
    rng = np.random.default_rng(100 + i)
    return (jnp.asarray(rng.standard_normal((8, 6), np.float32)),
            jnp.asarray(rng.standard_normal((8, 3), np.float32)))


def _bits(x):
    return np.asarray(x).view(np.uint32)


def _run(tx, n, *, jit=True, params=None, record=None):
    """n steps; returns params after each step and the number of traces."""
    params = _params() if params is None else params
    state = tx.init(params)
    traces = [0]

    def step(params, state, x, y):
        traces[0] += 1  # a Python side effect: runs once per trace
        grads = jax.grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step) if jit else step
    history = []
    for i in range(n):
        params, state = step(params, state, *_batch(i))
        history.append((params, state))
    return history, traces[0]


def _tx(inner, **kw):
    return jf.gradual_unfreeze(inner, thaw={0: HEAD, THAW_AT: BODY}, **kw)


INNERS = {"adam": lambda: optax.adam(0.1), "momentum": lambda: optax.sgd(0.1, momentum=0.9)}
N = THAW_AT + 2


@functools.cache
def _cached_run(inner: str, per_stage: bool):
    return _run(_tx(INNERS[inner](), per_stage=per_stage), N)


def test_bits_kept_before_thaw_training_after_one_compilation():
    p0 = _params()
    history, traces = _cached_run("adam", False)
    assert traces == 1
    for t, (p, _state) in enumerate(history):
        # emb is thawed by no stage: frozen for good, bit for bit.
        np.testing.assert_array_equal(_bits(p["emb"]), _bits(p0["emb"]))
        assert not np.array_equal(p["head"]["w"], p0["head"]["w"])
        moved = not np.array_equal(p["body"]["w"], p0["body"]["w"])
        assert moved == (t >= THAW_AT), t
        if t < THAW_AT:
            for leaf in ("w", "b"):  # -0.0 bias included: bits, not values
                np.testing.assert_array_equal(_bits(p["body"][leaf]), _bits(p0["body"][leaf]))
    assert int(history[-1][1].count) == N


def test_eagerly_too_and_bitwise_equal_to_a_fresh_start():
    # Eagerly both runs execute the same ops one by one: equal bit for bit.
    inner = optax.sgd(0.1, momentum=0.9)
    tx = jf.gradual_unfreeze(inner, thaw={0: HEAD, 1: BODY})
    p0 = _params()
    history, _ = _run(tx, 2, jit=False)
    (p1, _), (p2, _) = history
    jf.assert_frozen(p0, p1, frozen=BODY | EMB)  # values: eager apply_updates adds -0.0
    np.testing.assert_array_equal(_bits(p1["body"]["b"]), _bits(p0["body"]["b"]))  # bits too
    jf.assert_frozen(p0, p2, frozen=EMB)
    assert not np.array_equal(p2["body"]["w"], p0["body"]["w"])
    for (p, _), q in zip(history, _reference("momentum", thaw_at=1, n=2, jit=False), strict=True):
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True):
            np.testing.assert_array_equal(_bits(a), _bits(b))


def test_moments_stay_at_initial_values_until_thaw_and_frozen_leaves_have_no_state():
    history, _ = _cached_run("adam", False)
    state = history[THAW_AT - 1][1]  # after the last step before the thaw
    adam = state.inner.inner_states["trainable"].inner_state[0]
    assert isinstance(adam.mu["emb"], optax.MaskedNode)  # routed away: no state
    for moment in (adam.mu, adam.nu):
        assert not np.asarray(moment["body"]["w"]).any()  # zeros, as at init
        assert np.asarray(moment["head"]["w"]).any()
    params = _params()
    trainable_bytes = sum(x.nbytes for k, x in jax.tree_util.tree_leaves_with_path(params)
                          if "emb" not in jax.tree_util.keystr(k))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    assert state_bytes == 2 * trainable_bytes + 4 + 4  # mu, nu, adam's count, our count


@functools.cache
def _reference(inner: str, thaw_at: int = THAW_AT, n: int = N, jit: bool = True):
    """head's optimizer from step 0, body's *fresh* optimizer from step thaw_at."""
    opt = INNERS[inner]()
    p = _params()
    head_state = opt.init(p["head"])
    body_state = None

    def grads_of(p, x, y):
        return jax.grad(_loss)(p, x, y)

    grads_of, update = (jax.jit(grads_of), jax.jit(opt.update)) if jit else (grads_of, opt.update)
    history = []
    for i in range(n):
        g = grads_of(p, *_batch(i))
        u, head_state = update(g["head"], head_state, p["head"])
        p = {**p, "head": optax.apply_updates(p["head"], u)}
        if i >= thaw_at:
            if body_state is None:
                body_state = opt.init(p["body"])
            u, body_state = update(g["body"], body_state, p["body"])
            p = {**p, "body": optax.apply_updates(p["body"], u)}
        history.append(p)
    return history


def _assert_same_run(got, want):
    # Different compiled programs (one step vs. separate pieces) may round differently.
    for (p, _), q in zip(got, want, strict=True):
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("per_stage", [False, True], ids=["shared", "per_stage"])
def test_momentum_equals_a_fresh_start_at_the_thaw_step(per_stage):
    history, traces = _cached_run("momentum", per_stage)
    assert traces == 1
    _assert_same_run(history, _reference("momentum"))


def test_adam_per_stage_equals_a_fresh_start_and_compiles_once():
    history, traces = _cached_run("adam", True)
    assert traces == 1
    _assert_same_run(history, _reference("adam"))


def _first_thawed_step_over_lr(history):
    """Median |first update of body after its thaw| / lr (a fresh Adam's is ~1: lr * sign(g))."""
    before = history[THAW_AT - 1][0]["body"]["w"]
    after = history[THAW_AT][0]["body"]["w"]
    return float(np.median(np.abs(np.asarray(after - before, np.float64)))) / 0.1


def test_adam_shared_count_scales_the_first_thawed_update_as_documented():
    b1, b2, t = 0.9, 0.999, THAW_AT + 1
    predicted = ((1 - b1) / (1 - b1**t)) / np.sqrt((1 - b2) / (1 - b2**t))
    # A count shared with the head: bias correction for step t, moments from one step.
    shared = _first_thawed_step_over_lr(_cached_run("adam", False)[0])
    np.testing.assert_allclose(shared, predicted, rtol=1e-3)
    assert abs(shared - 1) > 0.3
    # Per-stage state: the thawed leaves start a fresh Adam.
    fresh = _first_thawed_step_over_lr(_cached_run("adam", True)[0])
    np.testing.assert_allclose(fresh, 1, rtol=1e-3)


def test_element_wise_thaw():
    # Column 0 of the head trains from the start, column 1 from step 2, column 2 never.
    thaw = {0: jf.elements("head/w", np.s_[:, 0]), 2: jf.elements("head/w", np.s_[:, 1])}
    p0 = _params()
    history, traces = _run(jf.gradual_unfreeze(optax.adam(0.1), thaw=thaw), 3)
    assert traces == 1
    w0 = p0["head"]["w"]
    for t, (p, _) in enumerate(history):
        w = p["head"]["w"]
        assert not np.array_equal(w[:, 0], w0[:, 0])
        assert np.array_equal(_bits(w[:, 1]), _bits(w0[:, 1])) == (t < 2)
        np.testing.assert_array_equal(_bits(w[:, 2]), _bits(w0[:, 2]))
        for path in ("emb", "body", "head/b"):  # thawed by no stage
            jf.assert_frozen(p0, p, frozen=jf.paths(path, path + "/**", strict=False))


def test_thawed_everything_and_list_form():
    history, _ = _run(jf.gradual_unfreeze(optax.sgd(0.1), thaw=[(1, jf.everything)]), 2)
    p0 = _params()
    assert np.array_equal(history[0][0]["emb"], p0["emb"])
    assert not np.array_equal(history[1][0]["emb"], p0["emb"])


@pytest.mark.parametrize("per_stage", [False, True], ids=["shared", "per_stage"])
def test_readme_pattern_a_later_stage_that_overlaps_does_not_delay_the_earlier_one(per_stage):
    # The README's {0: head, 2000: jf.everything}, at steps {0, 2}: jf.everything
    # re-selects the head, which must still train from step 0 (not from step 2).
    tx = jf.gradual_unfreeze(optax.sgd(0.1), thaw={0: HEAD, 2: jf.everything},
                             per_stage=per_stage)
    reference = jf.gradual_unfreeze(optax.sgd(0.1), thaw={0: HEAD, 2: BODY | EMB},
                                    per_stage=per_stage)
    p0 = _params()
    history, _ = _run(tx, 3)
    for t, ((p, _), (q, _)) in enumerate(zip(history, _run(reference, 3)[0], strict=True)):
        assert not np.array_equal(p["head"]["w"], p0["head"]["w"]), t  # trains from step 0
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True):
            np.testing.assert_array_equal(_bits(a), _bits(b))
        for now, then in ((p["emb"], p0["emb"]), (p["body"]["w"], p0["body"]["w"])):
            assert np.array_equal(_bits(now), _bits(then)) == (t < 2), t  # thaw at step 2


def test_clipping_inside_sees_only_thawed_gradients():
    # Before the body thaws, the global norm inside `inner` is the head's alone.
    inner = optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(1.0))
    p = _params()
    tx = _tx(inner)

    @jax.jit
    def head_update_norm(p, x, y):
        u, _ = tx.update(jax.grad(_loss)(p, x, y), tx.init(p), p)
        return optax.tree.norm(u["head"]), optax.tree.norm(u["body"])

    head, body = head_update_norm(p, *_batch(0))
    np.testing.assert_allclose(head, 1e-3, rtol=1e-5)
    assert body == 0


def test_errors():
    with pytest.raises(ValueError, match="empty"):
        jf.gradual_unfreeze(optax.sgd(1.0), thaw={})
    with pytest.raises(TypeError, match="Python ints"):
        jf.gradual_unfreeze(optax.sgd(1.0), thaw={1.5: HEAD})
    with pytest.raises(ValueError, match="given twice"):
        jf.gradual_unfreeze(optax.sgd(1.0), thaw=[(1, HEAD), (1, BODY)])
    with pytest.raises(ValueError, match=r"not in \[0"):
        jf.gradual_unfreeze(optax.sgd(1.0), thaw={-1: HEAD})
    tx = jf.gradual_unfreeze(optax.sgd(1.0), thaw={0: jf.paths("haed/**")})
    with pytest.raises(ValueError, match="'head/\\*\\*'"):  # a typo names the closest paths
        tx.init(_params())


@st.composite
def _trees_and_thaws(draw):
    """Random params and random, possibly overlapping thaw stages at steps 0, 1 and 2.

    Each stage selects, per leaf, nothing, the whole leaf or some elements, drawn
    independently of the other stages (sometimes ``jf.everything``), so a later stage
    often re-selects what an earlier one thawed. The reference: an element trains from
    the first step whose stage selects it (-1: never).
    """
    skeleton = draw(skeletons(max_leaves=4))
    paths = leaf_paths(skeleton)
    leaves = jax.tree.leaves(skeleton)
    steps = [np.full(leaf.shape, -1) for leaf in leaves]
    thaw = {}
    for k in draw(st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=3, unique=True)):
        parts, chosen = [], []
        if draw(st.integers(0, 5)) == 0:
            parts, chosen = [jf.everything], [np.ones(leaf.shape, bool) for leaf in leaves]
        else:
            for path, leaf in zip(paths, leaves, strict=True):
                size = int(np.prod(leaf.shape, dtype=int))
                kind = draw(st.sampled_from(["none", "whole"] + (["elements"] if size > 1 else [])))
                m = np.full(leaf.shape, kind == "whole")
                if kind == "whole":
                    parts.append(jf.paths(_glob_escape(path)))
                elif kind == "elements":
                    m = np.array(draw(st.lists(st.booleans(), min_size=size, max_size=size)))
                    m = m.reshape(leaf.shape)
                    if m.any():
                        parts.append(jf.elements(_glob_escape(path), m))
                chosen.append(m)
        if not parts:
            continue
        thaw[k] = functools.reduce(lambda a, b: a | b, parts)
        for s, m in zip(steps, chosen, strict=True):
            s[m & ((s < 0) | (s > k))] = k  # the first step that selects an element wins
    assume(thaw)
    params = materialize(skeleton, np.random.default_rng(draw(st.integers(0, 2**16))))
    return params, thaw, steps, draw(st.booleans()), draw(st.booleans())


@property_settings(25)
@given(_trees_and_thaws())
def test_thaw_law_property(case):
    # Each element keeps its bits until its thaw step and moves from it on; sgd with a
    # constant gradient: p_k = p_0 - lr * g * (k - thaw) after k steps.
    # With thawed=True the gradients come from jf.thawed_value_and_grad of a loss whose
    # gradient is all ones: the same law must hold.
    params, thaw, steps, per_stage, thawed = case
    tx = jf.gradual_unfreeze(optax.sgd(0.5), thaw=thaw, per_stage=per_stage)
    grads = jax.tree.map(lambda x: np.ones_like(x), params)
    grad_fn = jf.thawed_value_and_grad(
        lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(p)), thaw)
    state, p = tx.init(params), params
    for k in range(1, 4):
        if thawed:
            _, grads = grad_fn(state.count, p)
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
        for x0, x, s in zip(jax.tree.leaves(params), jax.tree.leaves(p), steps, strict=True):
            x0, x = np.asarray(x0), np.asarray(x)
            still = (s < 0) | (k <= s)
            np.testing.assert_array_equal(bits(x)[still], bits(x0)[still])
            trained = np.clip(k - s, 0, None).astype(np.float32)
            np.testing.assert_allclose(x[~still], (x0 - 0.5 * trained)[~still], rtol=1e-6)


# --------------------------------------------------------------------------
# jf.thawed_value_and_grad: each stage differentiates only what has thawed.

STAGED = {0: HEAD, THAW_AT: BODY}


@pytest.mark.parametrize("jit", [True, False])
def test_thawed_value_and_grad_differentiates_only_what_has_thawed(jit):
    g = jf.thawed_value_and_grad(_loss, STAGED)
    g = jax.jit(g) if jit else g
    p, (x, y) = _params(), _batch(0)
    value, full = jax.value_and_grad(_loss)(p, x, y)
    for count in (0, THAW_AT - 1, THAW_AT, THAW_AT + 5):
        v, grads = g(count, p, x, y)
        np.testing.assert_allclose(v, value, rtol=1e-6)
        thawed = {"head": True, "body": count >= THAW_AT, "emb": False}
        for name, on in thawed.items():
            for a, b in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(full[name]), strict=True):
                if on:
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
                else:
                    assert not np.asarray(a).any(), (name, count)


def test_thawed_grads_train_like_plain_grads_in_one_compilation():
    tx = _tx(optax.adam(0.1))
    g = jf.thawed_value_and_grad(_loss, STAGED)
    traces = [0]

    @jax.jit
    def step(params, state, x, y):
        traces[0] += 1
        _, grads = g(state.count, params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = _params(), tx.init(_params())
    for i, (reference, _) in enumerate(_cached_run("adam", False)[0]):
        params, state = step(params, state, *_batch(i))
        np.testing.assert_array_equal(_bits(params["emb"]), _bits(_params()["emb"]))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert traces == [1]


def test_thawed_value_and_grad_skips_the_gradients_of_layers_not_yet_thawed():
    # A constant count keeps one branch of the switch: its compiled FLOPs are that stage's.
    g = jf.thawed_value_and_grad(_loss, STAGED)
    p, (x, y) = _params(), _batch(0)

    def flops(fn):
        return jax.jit(fn).lower(p, x, y).compile().cost_analysis()["flops"]

    def grad_of(names):
        def fn(p, x, y):
            sub_loss = lambda sub: _loss({**p, **sub}, x, y)
            return jax.value_and_grad(sub_loss)({n: p[n] for n in names})
        return fn

    assert flops(lambda p, x, y: g(0, p, x, y)) == flops(grad_of(["head"]))
    assert flops(lambda p, x, y: g(THAW_AT, p, x, y)) == flops(grad_of(["head", "body"]))
    full = flops(jax.value_and_grad(_loss))
    assert flops(grad_of(["head"])) < flops(grad_of(["head", "body"])) < full


@pytest.mark.parametrize("slices", [True, False], ids=["whole_slices", "elements"])
def test_thawed_value_and_grad_element_wise_and_aux(slices):
    # Whole slices (a column) thawed: only they are differentiated, zeros elsewhere.
    # Other element-wise thaws: the leaf is differentiated whole from its first
    # element's step, the elements not yet thawed are zeros.
    thawed = np.zeros((5, 3), bool)
    thawed[:, 1] = True
    if not slices:
        thawed[0, 1] = False  # no longer a whole column
    thaw = {2: jf.elements("head/w", thawed)}
    def loss(p, x, y, *, reduce):  # a non-array keyword argument (a function) passes through
        return _loss(p, x, y), reduce(x)

    g = jf.thawed_value_and_grad(loss, thaw, has_aux=True)
    p, (x, y) = _params(), _batch(0)
    full = jax.grad(_loss)(p, x, y)
    (_v0, aux), g0 = g(1, p, x, y, reduce=jnp.sum)
    assert not any(np.asarray(a).any() for a in jax.tree.leaves(g0))  # nothing thawed yet
    np.testing.assert_allclose(aux, x.sum())
    _, g2 = g(2, p, x, y, reduce=jnp.sum)
    want = np.where(thawed, full["head"]["w"], 0.0)
    np.testing.assert_allclose(g2["head"]["w"], want, rtol=1e-5, atol=1e-7)
    assert not np.asarray(g2["head"]["b"]).any()


def test_thawed_value_and_grad_errors():
    with pytest.raises(ValueError, match=r"jf.thawed_value_and_grad: thaw= is empty"):
        jf.thawed_value_and_grad(_loss, {})
    with pytest.raises(TypeError, match="Python ints"):
        jf.thawed_value_and_grad(_loss, {"3": HEAD})
    g = jf.thawed_value_and_grad(lambda p: p["w"].sum() * 1.0, {0: jf.paths("step", "w")})
    with pytest.raises(TypeError, match="path 'step' thaws at step 0 but has dtype int32"):
        g(0, {"w": jnp.ones(2), "step": jnp.zeros((), jnp.int32)})
    g = jf.thawed_value_and_grad(_loss, {0: jf.paths("haed/**")})
    with pytest.raises(ValueError, match="'head/\\*\\*'"):  # a typo names the closest paths
        g(0, _params(), *_batch(0))
