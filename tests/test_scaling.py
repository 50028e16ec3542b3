"""jf.scale_by_label and jf.layerwise_decay: per-label learning-rate multipliers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jfreeze as jf


def _params():
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    return {
        "embed": normal(4, 3),
        "layers_0": {"w": normal(3, 3), "b": jnp.full(3, -0.0, jnp.float32)},
        "layers_1": {"w": normal(3, 3), "b": jnp.zeros(3, jnp.float32)},
        "head": {"w": normal(3, 2)},
    }


def _grads(params):
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32)), params)


def _bits(x):
    return np.asarray(x).view(np.uint32)


MULTS = {"backbone": 0.1, "head": 1.0}
LABELS = jf.labels({"head": jf.paths("head/**")}, default="backbone")


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_multipliers_scale_updates_exactly(jit):
    params, grads = _params(), _grads(_params())
    base = optax.adamw(1e-2) if jit else optax.sgd(1e-2, momentum=0.9)  # eager: fewer ops
    scaled = optax.chain(base, jf.scale_by_label(MULTS, LABELS))

    def updates(tx):
        fn = lambda g, p: tx.update(g, tx.init(p), p)[0]
        return (jax.jit(fn) if jit else fn)(grads, params)

    want, got = updates(base), updates(scaled)
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        name = jax.tree_util.keystr(path)
        w = want
        for k in path:
            w = w[k.key]
        m = 1.0 if "head" in name else 0.1
        if jit:  # XLA folds the -lr and m into one constant: 1 ulp apart at most
            np.testing.assert_allclose(g, m * w, rtol=2e-7, atol=0, err_msg=name)
        else:
            np.testing.assert_array_equal(_bits(g), _bits(m * w), err_msg=name)


def test_same_as_a_per_label_learning_rate():
    params, grads = _params(), _grads(_params())
    scaled = optax.chain(optax.sgd(0.5), jf.scale_by_label(MULTS, LABELS))
    per_label = optax.partition({"backbone": optax.sgd(0.05), "head": optax.sgd(0.5)}, LABELS)
    a = scaled.update(grads, scaled.init(params), params)[0]
    b = per_label.update(grads, per_label.init(params), params)[0]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)


def test_state_free():
    tx = jf.scale_by_label(MULTS, LABELS)
    assert jax.tree.leaves(tx.init(_params())) == []


@pytest.mark.parametrize("order", ["inside_freeze", "after_freeze"])
def test_composes_with_freeze_frozen_bits_kept_under_jit(order):
    frozen = jf.paths("layers_0/**", "embed")
    scale = jf.scale_by_label(MULTS, LABELS)
    if order == "inside_freeze":  # the frozen leaves are routed away before the multipliers
        tx = jf.freeze(optax.chain(optax.adam(0.1), scale), frozen=frozen)
    else:  # frozen updates are -0.0, and -0.0 * m is -0.0
        tx = optax.chain(jf.freeze(optax.adam(0.1), frozen=frozen), scale)
    params = _params()
    state = tx.init(params)
    traces = [0]

    @jax.jit
    def step(params, state, grads):
        traces[0] += 1
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    p = params
    for _ in range(3):
        p, state = step(p, state, _grads(params))
    assert traces[0] == 1
    for path in ("embed", "layers_0/w", "layers_0/b"):
        a, b = params, p
        for k in path.split("/"):
            a, b = a[k], b[k]
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=path)
    assert not np.array_equal(p["layers_1"]["w"], params["layers_1"]["w"])
    # The backbone moves at a tenth of the head's pace (Adam's first steps are ~lr).
    d_body = np.abs(p["layers_1"]["w"] - params["layers_1"]["w"]).mean()
    d_head = np.abs(p["head"]["w"] - params["head"]["w"]).mean()
    assert 0.05 < d_body / d_head < 0.2


def test_layerwise_decay_multipliers_and_labels():
    params = _params()
    mults, label_fn = jf.layerwise_decay(params, decay=0.5, bottom=jf.paths("embed"))
    assert mults == {"bottom": 0.125, "layers_0": 0.25, "layers_1": 0.5, "top": 1.0}
    assert label_fn(params) == {
        "embed": "bottom",
        "layers_0": {"w": "layers_0", "b": "layers_0"},
        "layers_1": {"w": "layers_1", "b": "layers_1"},
        "head": {"w": "top"},
    }
    # Shape structs work as well (jax.eval_shape of an init).
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    assert jf.layerwise_decay(shapes, decay=0.5).multipliers == {
        "layers_0": 0.25, "layers_1": 0.5, "top": 1.0}
    grads = _grads(params)
    tx = jf.scale_by_label(mults, label_fn)
    u = tx.update(grads, tx.init(params))[0]
    np.testing.assert_array_equal(_bits(u["embed"]), _bits(0.125 * grads["embed"]))
    np.testing.assert_array_equal(_bits(u["layers_0"]["w"]), _bits(0.25 * grads["layers_0"]["w"]))


def test_layerwise_decay_list_stacks_and_nested_names():
    params = {
        "encoder": {"layers": [{"w": jnp.ones(2), "mlp": {"layers_0": jnp.ones(2)}}
                               for _ in range(3)]},
        "head": jnp.ones(2),
    }
    mults, label_fn = jf.layerwise_decay(params, decay=0.8)
    assert list(mults) == ["layers_0", "layers_1", "layers_2", "top"]
    np.testing.assert_allclose(mults["layers_0"], 0.8**3)
    labels = label_fn(params)
    # The outermost index counts: encoder/layers/2/mlp/layers_0 is in layer 2.
    assert labels["encoder"]["layers"][2] == {"w": "layers_2", "mlp": {"layers_0": "layers_2"}}
    assert labels["head"] == "top"
    blocks = {"encoderblock_0": jnp.ones(1), "encoderblock_1": jnp.ones(1)}
    assert jf.layerwise_decay(blocks, decay=0.5, layers="encoderblock").multipliers[
        "encoderblock_0"] == 0.25


def test_errors_name_paths():
    params = _params()
    with pytest.raises(ValueError, match=r"label 'head' has no multiplier.*'head/w'"):
        jf.scale_by_label({"backbone": 0.1}, LABELS).init(params)
    with pytest.raises(ValueError, match="not a freeze"):
        jf.scale_by_label({"backbone": 0.0, "head": 1.0}, LABELS)
    with pytest.raises(ValueError, match="positive"):
        jf.scale_by_label({"backbone": -0.1, "head": 1.0}, LABELS)
    with pytest.raises(TypeError, match="Python number"):
        jf.scale_by_label({"backbone": "0.1", "head": 1.0}, LABELS)
    with pytest.raises(ValueError, match="no path has a 'blocks'"):
        jf.layerwise_decay(params, decay=0.5, layers="blocks")
    with pytest.raises(ValueError, match="'embed'"):  # a typo in bottom= names the closest path
        jf.layerwise_decay(params, decay=0.5, bottom=jf.paths("embde"))
    with pytest.raises(ValueError, match="decay"):
        jf.layerwise_decay(params, decay=1.5)
