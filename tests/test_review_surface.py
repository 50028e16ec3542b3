"""Regressions from a review of summary, selectors, labels and nnx_filter."""

from __future__ import annotations

import dataclasses
import fnmatch
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jfreeze as jf
from jfreeze._globs import compile_glob

PARAMS = {"a": {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}, "h": {"w": jnp.ones(3)}}


# --------------------------------------------------------------------------
# Selector subclasses: leaf_mask's answer is checked, with the path in the error.


@dataclasses.dataclass(frozen=True)
class Returns(jf.Selector):
    value: object

    def leaf_mask(self, path, leaf):
        v = self.value
        return v(leaf) if callable(v) else v


@pytest.mark.parametrize(
    "value, error",
    [
        (None, TypeError),
        (1, TypeError),
        (np.float32(1.0), TypeError),
        (lambda leaf: np.ones(leaf.shape, np.float32), TypeError),
        (lambda leaf: np.ones((5,), bool), ValueError),  # all True: was silently True
    ],
    ids=["None", "int", "float", "float_array", "wrong_shape"],
)
@pytest.mark.parametrize(
    "use",
    ["call", "combined", "labels", "summary"],
)
def test_a_selector_subclass_answering_badly_is_an_error_naming_the_path(value, error, use):
    sel = Returns(value)
    run = {
        "call": lambda: sel(PARAMS),
        "combined": lambda: (sel | jf.nothing)(PARAMS),
        "labels": lambda: jf.labels({"x": sel}, default="y")(PARAMS),
        "summary": lambda: jf.summary(PARAMS, frozen=sel),
    }[use]
    with pytest.raises(error, match=r"at path 'a/(b|w)'"):
        run()


def test_a_selector_subclass_answering_badly_is_an_error_in_nnx_filter():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"at path '(bias|kernel)'"):
        jf.flax.nnx_filter(Returns(None), model=model)


def test_a_selector_subclass_may_answer_np_bool_and_broadcastable_arrays():
    assert Returns(np.True_)(PARAMS) == {"a": {"b": True, "w": True}, "h": {"w": True}}
    out = Returns(lambda leaf: np.arange(leaf.shape[-1]) < 1)(PARAMS)
    assert out["a"]["w"].shape == (2, 3)  # broadcast to the leaf's shape
    np.testing.assert_array_equal(out["a"]["w"], [[True, False, False]] * 2)


def test_a_selector_subclass_without_leaf_mask_is_a_type_error_naming_the_path():
    class NoLeafMask(jf.Selector):
        pass

    with pytest.raises(TypeError, match=r"NoLeafMask does not implement leaf_mask.*'a/b'"):
        NoLeafMask()(PARAMS)


# --------------------------------------------------------------------------
# Constructors and combinators.


def test_a_malformed_regex_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match=r"jf.regex\('\('\)"):
        jf.regex("(")
    with pytest.raises(TypeError, match=r"jf\.regex takes a string"):
        jf.regex(3)  # type: ignore[arg-type]


def test_double_negation_is_the_selector_itself():
    a = jf.paths("a/**")
    assert ~~a == a
    assert hash(~~a) == hash(a)


def test_masks_combine_with_a_selector_on_either_side():
    a = jf.paths("a/**")
    assert (True | a)(PARAMS) == (a | True)(PARAMS)
    assert ({"a": False, "h": True} | a)(PARAMS) == jf.everything(PARAMS)
    assert ({"a": True, "h": True} & a)(PARAMS) == a(PARAMS)
    assert ({"a": True, "h": True} - a)(PARAMS) == (~a)(PARAMS)


def test_an_empty_list_index_selects_nothing():
    assert jf.elements("a/b", [])(PARAMS)["a"]["b"] is False
    assert jf.elements("a/b", [], strict=True) == jf.elements("a/b", np.array([], np.intp))


# --------------------------------------------------------------------------
# Globs against a reference matcher (fnmatch on each segment, ** for any segments).


def _reference(glob: str, path: str) -> bool:
    gs, ps = glob.split("/"), path.split("/")

    def match(i: int, j: int) -> bool:
        if i == len(gs):
            return j == len(ps)
        if gs[i] == "**":
            return any(match(i + 1, k) for k in range(j, len(ps) + 1))
        return j < len(ps) and fnmatch.fnmatchcase(ps[j], gs[i]) and match(i + 1, j + 1)

    return match(0, 0)


_GLOB_CHARS = st.sampled_from(["a", "b", "*", "?", "[", "]", "!", "^", "-", "/", "**", "/**/"])
_PATH_CHARS = st.sampled_from(["a", "b", "*", "?", "[", "]", "!", "^", "-", "/", "."])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_GLOB_CHARS, max_size=8).map("".join),
    st.lists(_PATH_CHARS, max_size=8).map("".join),
)
def test_globs_match_as_fnmatch_does_segment_by_segment(glob, path):
    assert compile_glob(glob).fullmatch(path) == _reference(glob, path)


# --------------------------------------------------------------------------
# summary.


def test_summary_keeps_distinct_labels_apart():
    params = {"a": jnp.ones(2), "b": jnp.ones(3), "c": jnp.ones(4)}
    s = jf.summary(params, labels={"a": 1, "b": "1", "c": True})
    rows = [(r.name, r.params) for r in s.rows if r.kind == "label"]
    assert rows == [("1", 2), ("'1'", 3), ("True", 4)], rows


def test_summary_counts_python_numbers_as_jax_would_store_them():
    s = jf.summary({"a": 1.0, "b": 2, "c": 1j, "d": jnp.ones(2)}, frozen=jf.paths("a"))
    assert (s.total, s.frozen) == (5, 1)
    assert s.total_bytes == 4 + 4 + 8 + 8
    assert s.frozen_bytes == 4


def test_summary_of_an_nnx_state_with_rng_keys():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
            self.drop = nnx.Dropout(0.1, rngs=nnx.Rngs(1))

    s = jf.summary(nnx.state(Net()), frozen=jf.paths("lin/**"))
    assert s.frozen == 6
    assert "drop" in str(s)
    assert "<table" in s._repr_html_()


def test_where_on_a_non_array_leaf_says_so():
    with pytest.raises(TypeError, match=r"'act'.*not an array.*custom_jvp"):
        jf.where(lambda p, leaf: leaf.ndim == 2)({"w": jnp.ones(2), "act": jax.nn.relu})


def test_summary_html_escapes_keys():
    s = jf.summary({"<b>&": jnp.ones(2), "x": {"<i>": jnp.ones(2)}}, frozen=jf.paths("x/**"),
                   depth=2)
    html = s._repr_html_()
    assert "<b>" not in html and "<i>" not in html
    assert "&lt;b&gt;&amp;" in html
    assert re.search(r"&lt;i&gt;", html)


def _eqx_mlp_and_label_tree():
    eqx = pytest.importorskip("equinox")
    mlp = eqx.filter(eqx.nn.MLP(2, 2, 4, 2, key=jax.random.PRNGKey(0)), eqx.is_array)
    label_fn = jf.labels({"a": jf.paths("layers/0/**")}, default="b")
    return mlp, label_fn, label_fn(mlp)


def test_summary_takes_an_equinox_label_tree_which_is_callable():
    mlp, label_fn, label_tree = _eqx_mlp_and_label_tree()
    assert callable(label_tree)
    by_tree = jf.summary(mlp, labels=label_tree)
    by_fn = jf.summary(mlp, labels=label_fn)
    assert [(r.name, r.params) for r in by_tree.rows] == [(r.name, r.params) for r in by_fn.rows]
    assert ("a", 12) in [(r.name, r.params) for r in by_tree.rows]


def test_partition_takes_an_equinox_label_tree_which_is_callable():
    import optax

    mlp, _, label_tree = _eqx_mlp_and_label_tree()
    jf.partition({"a": optax.sgd(1.0), "b": None}, label_tree).init(mlp)


def test_an_equinox_mask_tree_is_a_tree_not_a_mask_function():
    # The Equinox recipe: jax.tree.map(lambda _: False, model) + eqx.tree_at(..., True).
    eqx = pytest.importorskip("equinox")
    import optax

    mlp, _, _ = _eqx_mlp_and_label_tree()
    mask = eqx.tree_at(lambda m: m.layers[0].weight, jax.tree.map(lambda _: False, mlp), True)
    sel = jf.as_selector(mask)
    assert sel(mlp).layers[0].weight is True and sel(mlp).layers[0].bias is False
    assert jf.summary(mlp, frozen=mask).frozen == 8
    tx = jf.freeze(optax.sgd(1.0), frozen=mask)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, mlp), tx.init(mlp), mlp)
    assert not np.any(np.asarray(updates.layers[0].weight))
    assert np.all(np.asarray(updates.layers[1].weight) == -1)
    assert sel == jf.as_selector(mask) and hash(sel) == hash(jf.as_selector(mask))


def test_a_strict_pattern_on_an_empty_tree_says_the_tree_is_empty():
    with pytest.raises(ValueError, match=r"jf.paths\('a'\) matches no leaf.*has no leaves"):
        jf.paths("a")({})


def test_assert_frozen_on_an_unfiltered_equinox_module_and_prng_keys():
    eqx = pytest.importorskip("equinox")
    mlp = eqx.nn.MLP(2, 2, 4, 2, key=jax.random.PRNGKey(0))
    jf.assert_frozen(mlp, mlp, frozen=jf.everything)  # activations compared as objects
    moved = eqx.tree_at(lambda m: m.activation, mlp, jax.nn.tanh)
    with pytest.raises(AssertionError, match=r"'activation'"):
        jf.assert_frozen(mlp, moved, frozen=jf.everything)
    keys = {"k": jax.random.key(0), "w": jnp.ones(2)}
    jf.assert_frozen(keys, keys, frozen=jf.everything)
    with pytest.raises(AssertionError, match=r"'k' \(1 of 2 frozen elements"):
        jf.assert_frozen(keys, {**keys, "k": jax.random.key(1)}, frozen=jf.everything)
    with pytest.raises(TypeError, match=r"path 'w'.*ShapeDtypeStruct"):
        jf.assert_frozen(jax.eval_shape(lambda: keys), keys, frozen=jf.paths("w"))


def test_summary_shows_an_empty_key():
    s = str(jf.summary({"a": {"": jnp.ones(2), "c": jnp.ones(1)}}, frozen=jf.paths("a/")))
    assert re.search(r"^\s+''\s+1\s+2\s+0\s+2", s, re.M), s


@dataclasses.dataclass(frozen=True)
class FirstColumn(jf.Selector):
    def leaf_mask(self, path, leaf):
        return jnp.arange(leaf.shape[-1]) < 1  # jnp on the shape, as jf.where allows


def test_a_selector_subclass_using_jnp_on_the_shape_works_under_jit():
    import optax

    tx = jf.freeze(optax.sgd(1.0), frozen=FirstColumn())
    state = tx.init(PARAMS)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    eager, _ = tx.update(grads, state, PARAMS)
    jitted, _ = jax.jit(tx.update)(grads, state, PARAMS)
    for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(e, j)
        assert np.all(np.asarray(j)[..., 0] == 0) and np.all(np.asarray(j)[..., 1:] == -1)
    assert jax.jit(lambda p: jf.stop_gradient(p, frozen=FirstColumn()))(PARAMS) is not None


def test_labels_refuses_none_as_default():
    with pytest.raises(TypeError, match="None is not a label"):
        jf.labels({"a": jf.paths("a/**")}, default=None)


def test_summary_names_the_path_of_an_unhashable_label():
    with pytest.raises(TypeError, match=r"label at path 'a' is not hashable"):
        jf.summary({"a": jnp.ones(2)}, labels={"a": np.array("x")})
