"""Selectors: globs, regexes, predicates, elements, algebra; static and hashable."""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from strategies import MODES, property_settings

import jfreeze as jf

PARAMS = {
    "a": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
    "ab": {"kernel": jnp.ones((3, 2))},
    "enc": {
        "layers_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)},
        "layers_1": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)},
        "layers_12": {"kernel": jnp.ones((2, 2))},
    },
    "bias": jnp.zeros(1),
}


def selected(sel, tree=PARAMS):
    """Paths a whole-leaf selector selects, sorted."""
    flat = jax.tree_util.tree_flatten_with_path(sel(tree))[0]
    return sorted(jf.path_str(p) for p, m in flat if m is True)


@pytest.mark.parametrize(
    "glob, expected",
    [
        ("a/*", ["a/bias", "a/kernel"]),  # * is one segment
        ("a*/kernel", ["a/kernel", "ab/kernel"]),  # ... and may be empty
        ("*", ["bias"]),  # full match: not 'a/kernel'
        ("a/**", ["a/bias", "a/kernel"]),  # a and below
        ("a", []),  # a node is not a leaf (strict=False below)
        ("**/bias", ["a/bias", "bias", "enc/layers_0/bias", "enc/layers_1/bias"]),  # zero or more
        ("enc/**/kernel", ["enc/layers_0/kernel", "enc/layers_1/kernel", "enc/layers_12/kernel"]),
        ("enc/layers_?/kernel", ["enc/layers_0/kernel", "enc/layers_1/kernel"]),  # one char
        ("enc/layers_[1-3]/*", ["enc/layers_1/bias", "enc/layers_1/kernel"]),
        ("enc/layers_[!0]*/kernel", ["enc/layers_1/kernel", "enc/layers_12/kernel"]),
        ("**", sorted([
            "a/bias", "a/kernel", "ab/kernel", "bias", "enc/layers_0/bias", "enc/layers_0/kernel",
            "enc/layers_1/bias", "enc/layers_1/kernel", "enc/layers_12/kernel",
        ])),
    ],
)
def test_glob_semantics(glob, expected):
    assert selected(jf.paths(glob, strict=False)) == expected


def test_a_slash_double_star_matches_a_leaf_named_a():
    assert selected(jf.paths("bias/**"), PARAMS) == ["bias"]


def test_regex_is_a_full_match():
    assert selected(jf.regex(r"enc/layers_\d/.*")) == [
        "enc/layers_0/bias", "enc/layers_0/kernel", "enc/layers_1/bias", "enc/layers_1/kernel"
    ]
    assert selected(jf.regex("kernel", strict=False)) == []  # no search semantics


def test_where_sees_path_shape_and_dtype():
    seen = []

    def pred(path, leaf):
        seen.append((path, type(leaf)))
        return leaf.ndim == 1 and path.startswith("enc")

    assert selected(jf.where(pred)) == ["enc/layers_0/bias", "enc/layers_1/bias"]
    assert {t for _, t in seen} == {jax.ShapeDtypeStruct}


@pytest.mark.parametrize(
    "mask",
    [
        np.s_[:, 0],
        np.array([True, False]),  # broadcasts along the last axis
        np.array([[True, False], [True, False], [True, False]]),
        lambda leaf: np.arange(leaf.shape[-1]) == 0,  # a function of the leaf
    ],
    ids=["index", "bool_broadcast", "bool_full", "function"],
)
def test_elements_mask_forms(mask):
    out = jf.elements("ab/kernel", mask)(PARAMS)
    np.testing.assert_array_equal(out["ab"]["kernel"], [[True, False]] * 3)
    assert out["a"]["kernel"] is False


def test_elements_all_or_nothing_is_a_whole_leaf_mask():
    assert jf.elements("a/bias", np.s_[:])(PARAMS)["a"]["bias"] is True
    assert jf.elements("a/bias", np.zeros(3, bool))(PARAMS)["a"]["bias"] is False


def test_where_may_return_an_element_mask():
    eye = np.eye(2, dtype=bool)
    sel = jf.where(lambda path, leaf: eye if path == "enc/layers_0/kernel" else False)
    np.testing.assert_array_equal(sel(PARAMS)["enc"]["layers_0"]["kernel"], np.eye(2, dtype=bool))


def test_everything_and_nothing():
    assert all(jax.tree.leaves(jf.everything(PARAMS)))
    assert not any(jax.tree.leaves(jf.nothing(PARAMS)))


def test_algebra_whole_leaves():
    a, k = jf.paths("a/**"), jf.paths("**/kernel")
    assert selected(a | k) == sorted(set(selected(a)) | set(selected(k)))
    assert selected(a & k) == ["a/kernel"]
    assert selected(a - k) == ["a/bias"]
    assert selected(~a) == sorted(set(selected(jf.everything)) - set(selected(a)))
    assert selected(~~a) == selected(a)


def test_algebra_element_wise():
    col0 = jf.elements("a/kernel", np.s_[:, 0])
    row0 = jf.elements("a/kernel", np.s_[0, :])
    rows, cols = np.indices((2, 3))

    def mask(sel):
        m = sel(PARAMS)["a"]["kernel"]
        return np.broadcast_to(m, (2, 3))

    np.testing.assert_array_equal(mask(col0 | row0), (cols == 0) | (rows == 0))
    np.testing.assert_array_equal(mask(col0 & row0), (cols == 0) & (rows == 0))
    np.testing.assert_array_equal(mask(col0 - row0), (cols == 0) & (rows != 0))
    np.testing.assert_array_equal(mask(~col0), cols != 0)
    # mixing with whole-leaf selectors
    assert (col0 | jf.paths("a/**"))(PARAMS)["a"]["kernel"] is True
    np.testing.assert_array_equal(mask(jf.paths("a/**") - col0), cols != 0)
    assert (col0 & jf.paths("ab/**", "bias"))(PARAMS)["a"]["kernel"] is False
    # ~ turns the rest of the tree on
    assert (~col0)(PARAMS)["ab"]["kernel"] is True


@pytest.mark.parametrize("mode", MODES)
def test_same_answer_on_arrays_tracers_and_shape_dtype_structs(mode):
    sel = (
        jf.paths("enc/**")
        - jf.regex(r".*layers_1.*")
        | jf.elements("a/kernel", lambda leaf: np.tri(*leaf.shape, dtype=bool))
        | jf.where(lambda path, leaf: leaf.shape == (3, 2))
    )
    expected = sel(PARAMS)
    structs = jax.eval_shape(lambda p: p, PARAMS)
    assert jax.tree.leaves(structs)[0].__class__ is jax.ShapeDtypeStruct
    seen = {}

    def f(p):
        seen["mask"] = sel(p)  # evaluated on tracers under jit
        return p

    mode(f)(PARAMS)
    for got in (seen["mask"], sel(structs)):
        assert jax.tree.structure(got) == jax.tree.structure(expected)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            assert type(x) is type(y)
            np.testing.assert_array_equal(x, y)


def test_selectors_are_hashable_with_value_equality_and_readable_repr():
    a = jf.paths("a/**", "enc/*/kernel")
    e = jf.elements("a/kernel", np.s_[:, 0])
    combos = [a | e, a & e, a - e, ~a, jf.regex("x.*", strict=False)]
    for sel in [a, e, *combos]:
        hash(sel)
    assert jf.paths("a/**", "enc/*/kernel") == a
    assert hash(jf.paths("a/**", "enc/*/kernel")) == hash(a)
    assert jf.elements("a/kernel", np.s_[:, 0]) == e
    assert jf.elements("a/kernel", np.s_[:, 1]) != e
    assert jf.elements("a/kernel", np.array([True, False])) == jf.elements(
        "a/kernel", np.array([True, False]))
    assert (a | e) == (jf.paths("a/**", "enc/*/kernel") | jf.elements("a/kernel", np.s_[:, 0]))
    assert len({a, jf.paths("a/**", "enc/*/kernel"), e}) == 2
    assert repr(a) == "paths('a/**', 'enc/*/kernel')"
    assert repr(e) == "elements('a/kernel', np.s_[:, 0])"
    assert repr(a - e) == "(paths('a/**', 'enc/*/kernel') - elements('a/kernel', np.s_[:, 0]))"
    assert repr(~jf.regex("x", strict=False)) == "~regex('x', strict=False)"
    assert repr(jf.everything | jf.nothing) == "(everything | nothing)"


def test_selector_is_an_optax_masked_mask_fn():
    # optax.masked(inner, mask_fn): the inner transform runs on selected leaves.
    # (To *freeze*, use jf.freeze: masked passes unselected updates through raw.)
    tx = optax.masked(optax.set_to_zero(), jf.paths("a/**"))
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    assert float(jnp.abs(updates["a"]["kernel"]).sum()) == 0
    assert float(updates["ab"]["kernel"].sum()) == 6


@pytest.mark.parametrize(
    "spec",
    [
        True,
        {"a": True, "ab": False, "enc": False, "bias": False},  # a prefix of params
        lambda params: jax.tree.map(lambda _: False, params) | {"a": True},
    ],
    ids=["scalar_bool", "prefix_tree", "function"],
)
def test_as_selector_accepts_what_optax_takes(spec):
    sel = jf.as_selector(spec)
    expected = selected(jf.everything) if spec is True else ["a/bias", "a/kernel"]
    assert selected(sel) == expected
    assert jf.as_selector(sel) is sel


def test_strict_false_allows_a_pattern_that_matches_nothing():
    assert selected(jf.paths("nope/**", strict=False) | jf.paths("a/**")) == ["a/bias", "a/kernel"]
    assert selected(jf.regex("nope", strict=False)) == []
    assert jf.elements("nope", np.s_[0], strict=False)(PARAMS)["a"]["bias"] is False


def test_patterns_may_match_split_placeholders():
    # jf.split leaves None where the other part holds a leaf; a pattern naming
    # such a hole is not a typo.
    trainable, _ = jf.split(PARAMS, frozen=jf.paths("a/**"))
    assert jf.paths("a/**")(trainable)["a"] == {"kernel": None, "bias": None}


# --------------------------------------------------------------------------
# Hashable, value-compared selectors; jnp in mask functions under jit.


def test_jax_array_masks_are_hashable_and_compare_by_value():
    e = jf.elements("a/kernel", jnp.array([True, False, True]))
    same = jf.elements("a/kernel", jnp.array([True, False, True]))
    assert e == same and hash(e) == hash(same)
    assert e == jf.elements("a/kernel", np.array([True, False, True]))  # stored as NumPy
    assert e != jf.elements("a/kernel", jnp.array([True, True, True]))
    assert jf.elements("a/kernel", np.s_[jnp.array([0, 1])]) == jf.elements(
        "a/kernel", np.s_[np.array([0, 1])])
    assert len({e, same, e | jf.nothing, same | jf.nothing}) == 2
    np.testing.assert_array_equal(e(PARAMS)["a"]["kernel"], [[True, False, True]] * 2)


def test_equal_mask_trees_compare_equal():
    def spec():
        return {"a": True, "ab": False, "enc": False, "bias": jnp.array([True])}

    a, b = jf.as_selector(spec()), jf.as_selector(spec())
    assert a == b and hash(a) == hash(b)
    assert a != jf.as_selector({**spec(), "a": False})
    assert a != jf.as_selector({**spec(), "bias": np.array([False])})
    assert jf.as_selector({"x": True}) != jf.as_selector({"x": 1})  # True is not 1
    fn = lambda p: True
    assert jf.as_selector(fn) == jf.as_selector(fn) != jf.as_selector(lambda p: True)


@pytest.mark.parametrize("mode", MODES)
def test_mask_functions_using_jnp_work_under_jit(mode):
    # Evaluated on a ShapeDtypeStruct outside any trace: jnp code on shapes is concrete.
    sels = [
        jf.elements("a/kernel", lambda leaf: jnp.arange(leaf.shape[-1]) == 0),
        jf.where(lambda path, leaf: jnp.zeros(leaf.shape).ndim == 1),
        jf.as_selector(lambda p: jax.tree.map(lambda x: jnp.asarray(x.ndim == 1), p)),
    ]
    for sel in sels:
        expected = sel(PARAMS)
        seen = {}

        def f(p, sel=sel, seen=seen):
            seen["mask"] = sel(p)
            return p

        mode(f)(PARAMS)
        for x, y in zip(jax.tree.leaves(seen["mask"]), jax.tree.leaves(expected), strict=True):
            assert type(x) is type(y)
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "index",
    [
        np.s_[np.array([0, 2])],
        [0, 2],
        jnp.array([0, 2]),
        np.s_[:, np.array([0, 3])],
        np.s_[:, [0, 3]],
        np.s_[[0, 1], [2, 0]],  # mixed tuple: pairs of coordinates
        np.s_[np.array([[0], [2]]), np.array([1, 3])],  # broadcast index arrays
        np.s_[..., 1],
        np.s_[np.int64(1)],
    ],
    ids=["int_array", "int_list", "jax_int_array", "tuple_array", "tuple_list", "coordinates",
         "broadcast_arrays", "ellipsis", "numpy_int"],
)
def test_integer_array_and_list_indices_work_as_in_numpy(index):
    params = {"w": jnp.ones((3, 4))}
    x = np.zeros((3, 4), bool)
    x[_np_index(index)] = True
    for mask in (index, lambda leaf: index):  # given, or returned by a mask function
        out = jf.elements("w", mask)(params)["w"]
        np.testing.assert_array_equal(np.broadcast_to(out, (3, 4)), x)


def _np_index(index):
    if isinstance(index, tuple):
        return tuple(map(_np_index, index))
    return np.asarray(index) if isinstance(index, (jax.Array, list)) else index


def test_masks_like_names_a_path_answered_differently():
    # A dtype-testing selector gives other answers on bf16 gradients than on f32
    # params: evaluated with like=params, that is a clear error naming the path.
    sel = jf.where(lambda path, leaf: leaf.dtype == jnp.float32)
    grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    with pytest.raises(ValueError) as e:
        sel.masks(grads, like=PARAMS)
    msg = str(e.value)
    assert "'a/bias'" in msg and "float32[3]" in msg and "bfloat16[3]" in msg
    _flat, masks = jf.paths("a/**").masks(grads, like=PARAMS)  # same answers: fine
    assert masks == [m for m in jf.paths("a/**").masks(PARAMS)[1]]


# --------------------------------------------------------------------------
# Properties: equal inputs give equal, equally hashed selectors; indices as NumPy.

_GLOBS = st.sampled_from(["a/**", "**/kernel", "enc/layers_?/*", "a[!b]/*", "bias"])
_ARRAYS = st.lists(st.booleans(), min_size=2, max_size=2).map(np.array)
_INDICES = st.one_of(
    st.just(np.s_[:, 0]), st.integers(0, 1), st.lists(st.integers(0, 1), min_size=1, max_size=2),
    st.tuples(st.integers(0, 1), st.integers(0, 1)),
)


def _recipes():
    """Selector recipes: build(recipe, as_jax) makes a selector; equal recipes,
    whether their arrays are NumPy or jax, must give equal selectors."""
    leaf = st.one_of(
        st.tuples(st.just("paths"), st.lists(_GLOBS, min_size=1, max_size=2).map(tuple)),
        st.tuples(st.just("regex"), st.sampled_from(["a/.*", "enc/.*"])),
        st.tuples(st.just("elements"), st.sampled_from(["a/kernel", "enc/*/kernel"]),
                  st.one_of(_ARRAYS, _INDICES)),
        st.tuples(st.just("tree"), st.booleans(), _ARRAYS),
        st.tuples(st.just("const"), st.booleans()),
    )
    return st.recursive(leaf, lambda c: st.one_of(
        st.tuples(st.sampled_from(["|", "&", "-"]), c, c), st.tuples(st.just("~"), c)),
        max_leaves=4)


def _build(r, as_jax):
    arr = (lambda x: jnp.asarray(x)) if as_jax else (lambda x: x)
    kind = r[0]
    if kind == "paths":
        return jf.paths(*r[1], strict=False)
    if kind == "regex":
        return jf.regex(r[1], strict=False)
    if kind == "elements":
        m = r[2]
        m = arr(m) if isinstance(m, np.ndarray) else list(m) if isinstance(m, list) else m
        return jf.elements(r[1], m, strict=False)
    if kind == "tree":
        return jf.as_selector({"a": r[1], "ab": False, "enc": False, "bias": arr(r[2][:1])})
    if kind == "const":
        return jf.everything if r[1] else jf.nothing
    if kind == "~":
        return ~_build(r[1], as_jax)
    a, b = _build(r[1], as_jax), _build(r[2], as_jax)
    return {"|": a | b, "&": a & b, "-": a - b}[kind]


@property_settings(100)
@given(_recipes(), st.booleans(), st.booleans())
def test_equal_selectors_hash_equal(recipe, jax_a, jax_b):
    a, b = _build(recipe, jax_a), _build(recipe, jax_b)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    try:
        ma = a(PARAMS)
    except (ValueError, TypeError):
        return  # e.g. an index that does not fit a leaf: both raise alike
    for x, y in zip(jax.tree.leaves(ma), jax.tree.leaves(b(PARAMS)), strict=True):
        np.testing.assert_array_equal(x, y)


_index_atoms = st.one_of(
    st.integers(-3, 2),
    st.slices(3),
    st.lists(st.integers(-3, 2), min_size=1, max_size=3),
    st.lists(st.integers(-3, 2), min_size=1, max_size=3).map(np.array),
    st.lists(st.integers(-3, 2), min_size=1, max_size=3).map(jnp.array),
    st.just(Ellipsis),
)


@property_settings(200)
@given(st.one_of(_index_atoms, st.tuples(_index_atoms, _index_atoms)))
def test_index_expressions_select_what_numpy_indexes(index):
    leaf = np.zeros((3, 3), bool)
    try:
        leaf[_np_index(index)] = True
    except IndexError:
        with pytest.raises(ValueError, match=r"at path 'w'.*does not fit"):
            jf.elements("w", index)({"w": jnp.ones((3, 3))})
        return
    got = jf.elements("w", index)({"w": jnp.ones((3, 3))})["w"]
    np.testing.assert_array_equal(np.broadcast_to(got, (3, 3)), leaf)
    assert jf.elements("w", index) == jf.elements("w", _np_index(index))
