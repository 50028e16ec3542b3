"""jf.layers: whole layers of stacked leaves, and the slab recognition behind it."""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from strategies import property_settings

import jfreeze as jf
from jfreeze._tree import runs, slab


def stack(n=4, *rest):
    return {"layers": {"w": jnp.ones((n, *rest, 3)), "b": jnp.ones((n,))}, "head": jnp.ones(2)}


@st.composite
def stacks_and_layers(draw):
    n = draw(st.integers(2, 6))
    shape = (n, *draw(st.lists(st.integers(1, 3), max_size=2)))
    axis = draw(st.integers(0, len(shape) - 1))
    shape = np.moveaxis(np.empty(shape), 0, axis).shape  # the layer axis anywhere
    chosen = draw(st.lists(st.integers(-n, n - 1), max_size=n))
    return shape, axis, chosen


@given(stacks_and_layers(), st.sampled_from(["list", "bool", "range"]))
@property_settings(60)
def test_layers_is_elements_along_one_axis_property(case, spelling):
    shape, axis, chosen = case
    n = shape[axis]
    picked = np.zeros(n, bool)
    picked[chosen] = True
    index = {"list": chosen, "bool": picked,
             "range": range(n)[: int(picked.argmin()) if not picked.all() else n]}[spelling]
    if spelling == "range":
        picked = np.zeros(n, bool)
        picked[index] = True
    expected = np.zeros(shape, bool)
    expected[(slice(None),) * axis + (picked,)] = True
    tree = {"s": jnp.zeros(shape)}
    got = jf.layers("s", index, axis=axis)(tree)["s"]
    want = bool(expected.all()) if expected.all() or not expected.any() else expected
    np.testing.assert_array_equal(got, want)
    # The same selection spelled with jf.elements, and with a negative axis.
    assert np.array_equal(jf.elements("s", expected)(tree)["s"], got)
    assert np.array_equal(jf.layers("s", index, axis=axis - len(shape))(tree)["s"], got)
    if isinstance(got, np.ndarray):
        assert slab(got)[0] == axis or shape[axis] == 1
        np.testing.assert_array_equal(slab(got)[1], picked)


def test_layers_composes_and_compares_by_value():
    p = stack()
    bottom = jf.layers("layers/**", range(2))
    assert bottom == jf.layers("layers/**", [0, 1]) == jf.layers("layers/**", (0, 1))
    assert hash(bottom) == hash(jf.layers("layers/**", np.array([0, 1])))
    assert bottom != jf.layers("layers/**", [0, 1], axis=-1)
    trainable = (~bottom)(p)["layers"]["b"]
    np.testing.assert_array_equal(trainable, [False, False, True, True])
    both = (bottom | jf.layers("layers/b", [3]))(p)["layers"]["b"]
    np.testing.assert_array_equal(both, [True, True, False, True])
    assert (bottom - jf.paths("layers/w"))(p)["layers"]["w"] is False
    assert (jf.layers("layers/**", slice(None)))(p)["layers"]["b"] is True  # all layers: whole leaf
    assert repr(jf.layers("a/*", slice(0, 8), axis=1)) == "layers('a/*', np.s_[0:8], axis=1)"


def test_layers_errors_name_the_path():
    p = stack()
    with pytest.raises(ValueError, match=r"'layers/b'.*no axis 1"):
        jf.layers("layers/**", 0, axis=1)(p)
    with pytest.raises(ValueError, match=r"'layers/b'.*4 layers on axis 0"):
        jf.layers("layers/**", [4])(p)
    with pytest.raises(ValueError, match=r"matches no leaf.*Closest paths: 'layers/\*\*'"):
        jf.layers("layerz/**", 0)(p)
    assert jf.layers("layerz/**", 0, strict=False)(p)["layers"]["b"] is False
    with pytest.raises(TypeError, match="1-D bool array"):
        jf.layers("layers/**", 1.5)
    with pytest.raises(TypeError, match="axis must be an int"):
        jf.layers("layers/**", 0, axis="0")
    with pytest.raises(TypeError, match="glob string"):
        jf.layers(0, 0)


def test_layers_is_static_under_jit():
    sel = jf.layers("layers/**", [0, 2])

    @jax.jit
    def f(p):
        m = sel(p)["layers"]["b"]
        return jnp.where(m, 0.0, p["layers"]["b"])

    np.testing.assert_array_equal(f(stack()), [0.0, 1.0, 0.0, 1.0])


def test_slab_recognises_whole_slices_along_one_axis():
    column = jf.elements("w", np.s_[:, 0])({"w": jnp.ones((3, 2))})["w"]
    assert slab(column)[0] == 1
    np.testing.assert_array_equal(slab(column)[1], [True, False])
    block = jf.elements("w", np.s_[:2, :1])({"w": jnp.ones((3, 2))})["w"]
    assert slab(block) is None
    assert slab(True) is None and slab(False) is None
    assert slab(np.array([False, True, True]))[0] == 0


@given(st.lists(st.booleans(), min_size=1, max_size=12))
@property_settings(100)
def test_runs_cover_the_vector_in_maximal_runs(values):
    v = np.array(values)
    out = runs(v)
    assert out[0][0] == 0 and out[-1][1] == len(v)
    for (a, b, val), nxt in zip(out, [*out[1:], None], strict=True):
        assert a < b and (v[a:b] == val).all()
        if nxt is not None:
            assert nxt[0] == b and nxt[2] != val


def test_layer_masks_of_an_llm_sized_stack_are_never_materialised():
    # (32, 4096, 11008) bf16: 1.4e9 elements. A layer mask is a broadcast view, and the mask
    # algebra, jf.freeze's tracing, jf.scan and jf.summary read it through its compact form.
    shape = (32, 4096, 11008)
    p = {"w": jax.ShapeDtypeStruct(shape, jnp.bfloat16),
         "b": jax.ShapeDtypeStruct((32, 4096), jnp.float32)}
    sel = jf.layers("**", range(8)) | (jf.layers("w", [9]) - jf.layers("w", [0], axis=2))
    m = sel(p)["w"]
    assert m.shape == shape and not m.flags.owndata and m.strides[1] == 0
    assert slab(m) is None and slab(sel(p)["b"])[0] == 0
    s = jf.summary(p, frozen=jf.layers("**", range(8)))
    assert s.frozen == 8 * (4096 * 11008 + 4096) and s.total == 32 * (4096 * 11008 + 4096)
    tx = jf.freeze(optax.adam(1e-3), frozen=jf.layers("**", range(8)))
    state = jax.eval_shape(tx.init, p)
    assert jf.inner_state(state)[0].mu["w"].shape == (24, 4096, 11008)
    upd, _ = jax.eval_shape(tx.update, p, state, p)
    assert upd["w"].shape == shape
    out, _ = jax.eval_shape(
        lambda q: jf.scan(lambda h, layer: (h + layer["b"][0], None), jnp.zeros((), jnp.float32),
                          q, frozen=jf.layers("**", range(8))), p)
    assert out.shape == ()


def test_empty_leaves_select_all_as_before():
    # An empty leaf's element mask is vacuously everything (a whole-leaf True), as it was
    # before masks were read through their compact form.
    assert jf.layers("w", [])({"w": jnp.ones((0, 3))})["w"] is True
    assert jf.elements("w", np.s_[:, :1])({"w": jnp.ones((2, 0))})["w"] is True
    s = jf.summary({"w": jnp.ones((0, 3)), "b": jnp.ones(2)}, frozen=jf.layers("w", []))
    assert s.frozen == 0 and s.total == 2
