"""Every bad input is a clear ValueError/TypeError that names the key path."""

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


def make_params():
    return {
        "backbone": {"layers": [{"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}]},
        "enc": (jnp.ones(2), jnp.ones(3)),
        "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
    }


# --------------------------------------------------------------------------
# Patterns: strict by default, with the closest paths.


def test_glob_typo_names_pattern_and_closest_paths():
    with pytest.raises(ValueError) as e:
        jf.paths("backbon/**")(make_params())
    msg = str(e.value)
    assert "jf.paths('backbon/**') matches no leaf" in msg
    assert "Closest paths: 'backbone/**'" in msg
    assert "strict=False" in msg


def test_glob_typo_in_a_leaf_name():
    with pytest.raises(ValueError, match=r"'head/kernl'.*Closest paths: 'head/kernel'"):
        jf.paths("head/kernl")(make_params())


def test_regex_typo_names_pattern_and_closest_paths():
    with pytest.raises(ValueError) as e:
        jf.regex(r"backbone/layer/.*")(make_params())
    assert "jf.regex('backbone/layer/.*') matches no leaf" in str(e.value)
    assert "'backbone/layers/**'" in str(e.value)


def test_a_typo_never_silently_trains_everything():
    # reported when the transform is built on params, at init
    tx = jf.freeze(optax.adam(1e-3), frozen=jf.paths("backbon/**"))
    with pytest.raises(ValueError, match="backbon"):
        tx.init(make_params())
    with pytest.raises(ValueError, match="backbon"):
        jax.jit(tx.init)(make_params())


@pytest.mark.parametrize(
    "sel",
    [
        jf.paths("head/**", "nope/**"),  # each glob of one paths() on its own
        jf.paths("head/**") | jf.paths("nope/**"),
        jf.paths("head/**") - jf.regex("nope"),
        ~jf.paths("nope/**"),
        jf.everything & jf.elements("nope", np.s_[0]),
    ],
    ids=["paths_args", "or", "minus_regex", "not", "and_elements"],
)
def test_pattern_matching_nothing_inside_a_combination(sel):
    with pytest.raises(ValueError, match="'nope"):
        sel(make_params())


def test_strict_false_allows_a_pattern_that_matches_nothing():
    sel = jf.paths("head/**") | jf.paths("nope/**", strict=False) | jf.regex("x", strict=False)
    assert sel(make_params())["head"] == {"kernel": True, "bias": True}


def test_a_string_for_frozen_says_which_selector_to_write():
    with pytest.raises(TypeError, match=r"jf.paths\('backbone/\*\*'\)"):
        jf.freeze(optax.adam(1e-3), frozen="backbone/**")


# --------------------------------------------------------------------------
# Labels and partition.


def test_unknown_label_names_label_and_paths():
    tx = jf.partition({"train": optax.adam(1e-3), "frozen": None},
                      {"backbone": "frozen", "enc": "train", "head": "hed"})
    with pytest.raises(ValueError) as e:
        tx.init(make_params())
    msg = str(e.value)
    assert "label 'hed' has no transform" in msg
    assert "'head/bias', 'head/kernel'" in msg
    assert "Map it to None" in msg


def test_unknown_label_comes_before_the_unused_transform_error():
    # a typo'd label makes its transform unused too: the typo is what to report
    tx = jf.partition({"head": optax.adam(1e-3), "rest": None},
                      jf.labels({"hed": jf.paths("head/**")}, default="rest"))
    with pytest.raises(ValueError, match="label 'hed' has no transform"):
        tx.init(make_params())


def test_unused_transform():
    tx = jf.partition({"train": optax.adam(1e-3), "frozen": None, "extra": optax.sgd(1.0)},
                      jf.labels({"frozen": jf.paths("backbone/**")}, default="train"))
    with pytest.raises(ValueError, match="transforms for 'extra' are used by no leaf"):
        tx.init(make_params())


@pytest.mark.parametrize(
    "label_tree, path",
    [
        ({"backbone": "f", "enc": "t"}, "'head/"),  # missing key
        ({"backbone": "f", "enc": "t", "head": "t", "tail": "t"}, "'tail'"),  # extra key
        ({"backbone": "f", "enc": ["t", "t"], "head": "t"}, "'enc'"),  # list vs tuple
        ({"backbone": {"layers": ({"kernel": "f", "bias": "f"},)}, "enc": "t", "head": "t"},
         "'backbone/layers'"),  # tuple vs list, deeper
    ],
    ids=["missing_key", "extra_key", "list_vs_tuple", "tuple_vs_list_nested"],
)
def test_label_tree_of_the_wrong_structure(label_tree, path):
    tx = jf.partition({"f": None, "t": optax.sgd(1.0)}, label_tree)
    with pytest.raises(ValueError, match="label tree") as e:
        tx.init(make_params())
    assert path in str(e.value)


def test_element_wise_selector_in_labels():
    fn = jf.labels({"frozen": jf.elements("head/kernel", np.s_[:, 0])}, default="train")
    with pytest.raises(ValueError) as e:
        fn(make_params())
    assert "'head/kernel'" in str(e.value) and "jf.freeze" in str(e.value)


def test_labels_without_default_names_unmatched_leaves():
    with pytest.raises(ValueError, match=r"'enc/0', 'enc/1'.*default="):
        jf.labels({"f": jf.paths("backbone/**", "head/**")})(make_params())


# --------------------------------------------------------------------------
# Masks.


def test_mask_not_broadcastable():
    tx = jf.freeze(optax.adam(1e-3), frozen=jf.elements("head/kernel", np.ones(3, bool)))
    with pytest.raises(ValueError) as e:
        tx.init(make_params())
    assert "'head/kernel'" in str(e.value) and "(3,)" in str(e.value) and "(3, 2)" in str(e.value)


def test_non_boolean_mask_tree():
    mask = {"backbone": 1, "enc": 0, "head": 0}  # ints, as one might write
    with pytest.raises(TypeError, match=r"mask at path 'backbone/.*must be boolean.*int"):
        jf.freeze(optax.adam(1e-3), frozen=mask).init(make_params())


def test_non_boolean_element_mask():
    with pytest.raises(TypeError, match=r"'head/kernel'.*must be boolean.*float"):
        jf.elements("head/kernel", np.array([1.0, 0.0]))(make_params())


def test_mask_tree_of_the_wrong_structure():
    with pytest.raises(ValueError, match=r"mask has an entry at path 'tail'"):
        jf.freeze(optax.adam(1e-3), frozen={"backbone": True, "enc": False, "head": False,
                                           "tail": True}).init(make_params())
    with pytest.raises(ValueError, match=r"mask does not cover the params leaf at path 'head/"):
        jf.split(make_params(), frozen={"backbone": True, "enc": False})


def test_index_that_does_not_fit_the_leaf():
    with pytest.raises(ValueError, match=r"'head/bias'.*index 5 does not fit.*\(2,\)"):
        jf.elements("head/bias", np.s_[5])(make_params())


# --------------------------------------------------------------------------
# Selectors that would need values.


def test_where_that_reads_values():
    sel = jf.where(lambda path, leaf: leaf.sum() > 0)
    with pytest.raises(TypeError) as e:
        sel(make_params())
    msg = str(e.value)
    assert "at path 'backbone/layers/0/bias'" in msg and "never the values" in msg


def test_where_that_uses_traced_values_under_jit():
    # jnp code on the shape is fine under jit (evaluated outside the trace); a
    # predicate that closes over a traced value is not, and says where.
    sel = jf.where(lambda path, leaf: jnp.zeros(leaf.shape).sum() == 0)
    assert jax.jit(lambda p: jf.stop_gradient(p, frozen=sel))(make_params())

    def step(params, t):
        sel = jf.where(lambda path, leaf: t > 0)
        return jf.stop_gradient(params, frozen=sel)

    with pytest.raises(TypeError, match=r"at path 'backbone/layers/0/bias'.*traced values"):
        jax.jit(step)(make_params(), 1.0)


@pytest.mark.parametrize("leaf", ["a string", 1.5], ids=["str", "python_float"])
def test_elements_on_a_non_array_leaf(leaf):
    tree = {"w": jnp.ones(2), "meta": leaf}
    with pytest.raises(TypeError) as e:
        jf.elements("meta", np.s_[0])(tree)
    assert "at path 'meta'" in str(e.value) and "needs an array leaf" in str(e.value)


# --------------------------------------------------------------------------
# split, merge, freeze.


def test_split_with_element_wise_selection():
    with pytest.raises(ValueError) as e:
        jf.split(make_params(), frozen=jf.elements("head/kernel", np.s_[:, 0]))
    assert "'head/kernel'" in str(e.value) and "jf.stop_gradient" in str(e.value)


def test_merge_overlap():
    params = make_params()
    trainable, frozen = jf.split(params, frozen=jf.paths("head/**"))
    frozen["enc"] = params["enc"]
    with pytest.raises(ValueError, match="both trees hold a leaf at path 'enc/0'"):
        jf.merge(trainable, frozen)


def test_merge_structure_mismatch():
    trainable, frozen = jf.split(make_params(), frozen=jf.paths("head/**"))
    del frozen["enc"]
    with pytest.raises(ValueError, match="path 'enc/0' is only in the trainable tree"):
        jf.merge(trainable, frozen)


@pytest.mark.parametrize("inner", ["adam", optax.adam, 1e-3], ids=["str", "factory", "float"])
def test_freeze_with_a_non_transform(inner):
    with pytest.raises(TypeError, match="GradientTransformation"):
        jf.freeze(inner, frozen=jf.nothing)
    with pytest.raises(TypeError, match="transform 'a'"):
        jf.partition({"a": inner}, {"x": "a"})


def test_split_updates_against_state_built_from_full_params():
    params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    tx = jf.freeze(optax.adam(1e-2), frozen=jf.paths("a"))
    trainable, _ = jf.split(params, frozen=jf.paths("a"))
    with pytest.raises(ValueError, match=r"no leaf at 'a'.*tx.init\(trainable\)"):
        tx.update(trainable, tx.init(params), trainable)
    # Built from the trainable half, the same update works and leaves no hole behind.
    updates, _ = tx.update(trainable, tx.init(trainable), trainable)
    assert updates["a"] is None and updates["b"].shape == (2,)


# --------------------------------------------------------------------------
# What a mask function (or jf.where predicate) may return.


def test_mask_function_returning_none_names_the_path():
    # A forgotten `return`: None would be read as np.newaxis and freeze all 6.
    def forgot(leaf):
        np.arange(leaf.shape[-1]) == 0  # noqa: B015

    with pytest.raises(TypeError) as e:
        jf.elements("head/kernel", forgot)(make_params())
    assert "at path 'head/kernel'" in str(e.value) and "got None" in str(e.value)
    with pytest.raises(TypeError, match=r"at path 'backbone/layers/0/bias'.*got None"):
        jf.where(lambda path, leaf: None)(make_params())
    with pytest.raises(TypeError, match=r"'head/kernel'.*got None"):
        jf.freeze(optax.adam(1e-3), frozen=jf.elements("head/kernel", forgot)).init(make_params())


def test_mask_function_that_raises_names_the_path():
    with pytest.raises(TypeError, match=r"at path 'head/kernel'.*mask function.*ZeroDivision"):
        jf.elements("head/kernel", lambda leaf: 1 // 0)(make_params())


class _Weird:
    pass


# Returns that are neither a bool / bool array nor a NumPy index expression.
not_a_mask = st.one_of(
    st.none(),
    st.text(max_size=3),
    st.floats(allow_nan=False),
    st.complex_numbers(max_magnitude=3),
    st.dictionaries(st.text(max_size=2), st.booleans(), max_size=2),
    st.frozensets(st.integers(0, 1), max_size=2),
    st.builds(_Weird),
    st.lists(st.floats(allow_nan=False), min_size=1, max_size=3),
    st.lists(st.text(max_size=2), min_size=1, max_size=3),
    st.sampled_from([np.float32, np.complex64, np.uint8 if False else np.float16]).map(
        lambda t: np.ones(2, t)),
    st.sampled_from([jnp.float32, jnp.bfloat16]).map(lambda t: jnp.ones(2, t)),
    st.tuples(st.integers(0, 1), st.text(min_size=1, max_size=2)),
    st.tuples(st.floats(allow_nan=False)),
)


@property_settings(150)
@given(not_a_mask)
def test_a_mask_function_returning_a_non_mask_raises_naming_the_path(value):
    params = {"enc": {"w": jnp.ones((2, 2))}}
    with pytest.raises(TypeError, match="at path 'enc/w'"):
        jf.elements("enc/w", lambda leaf: value)(params)


@property_settings(150)
@given(st.one_of(not_a_mask, st.integers(), st.lists(st.integers(0, 1), min_size=1, max_size=2),
                 st.just(np.s_[:, 0])))
def test_a_where_predicate_returning_a_non_bool_raises_naming_the_path(value):
    params = {"enc": {"w": jnp.ones((2, 2))}}
    with pytest.raises(TypeError, match="at path 'enc/w'"):
        jf.where(lambda path, leaf: value)(params)


# --------------------------------------------------------------------------
# A dtype-testing selector, f32 params and bf16 gradients.


@pytest.mark.parametrize("inner", [optax.adam(1e-3), optax.sgd(1.0)], ids=["adam", "sgd"])
def test_dtype_selector_on_bf16_gradients_is_a_clear_error(inner):
    # On params the predicate freezes 'w'; on bf16 gradients it would not. A
    # stateless sgd would then silently move 'w'; adam crashed inside optax.
    params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    sel = jf.where(lambda path, leaf: leaf.dtype == jnp.float32 and path == "w")
    tx = jf.freeze(inner, frozen=sel)
    state = tx.init(params)
    grads = jax.tree.map(lambda x: jnp.ones_like(x, jnp.bfloat16), params)
    with pytest.raises(ValueError, match="'w'"):
        tx.update(grads, state, params)
