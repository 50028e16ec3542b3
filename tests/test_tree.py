"""One spelling of a key path: dict keys, indices, attribute names, joined with '/'."""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import glob
import re

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from hypothesis import example, given
from strategies import property_settings

import jfreeze as jf
from jfreeze._globs import compile_glob
from jfreeze._tree import broadcast_prefix, closest, leaves_with_paths

NT = collections.namedtuple("NT", ["kernel", "bias"])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Linear:
    w: jax.Array
    b: jax.Array
    name: str = dataclasses.field(default="lin", metadata=dict(static=True))


@struct.dataclass
class FlaxLinear:
    kernel: jax.Array
    act: str = struct.field(pytree_node=False, default="relu")


def paths_of(tree):
    return [p for p, _ in leaves_with_paths(tree)[0]]


@pytest.mark.parametrize(
    "tree, expected",
    [
        ({"backbone": {"kernel": 1.0}}, ["backbone/kernel"]),
        ({"layers": [1.0, 2.0]}, ["layers/0", "layers/1"]),
        ({"pair": (1.0, (2.0,))}, ["pair/0", "pair/1/0"]),
        ({"nt": NT(1.0, 2.0)}, ["nt/kernel", "nt/bias"]),
        ({"lin": Linear(jnp.ones(2), jnp.ones(1))}, ["lin/w", "lin/b"]),  # static field: no leaf
        ({"flax": FlaxLinear(jnp.ones(2))}, ["flax/kernel"]),
        ({3: 1.0, 10: 2.0}, ["3", "10"]),
        (jnp.ones(2), [""]),  # a single array: the empty path
        ([{"a": NT(1.0, [2.0])}], ["0/a/kernel", "0/a/bias/0"]),
    ],
    ids=["dict", "list", "tuple", "namedtuple", "register_dataclass", "flax_struct",
         "int_keys", "single_array", "nested"],
)
def test_path_spelling(tree, expected):
    assert paths_of(tree) == expected
    # jf.path_str spells raw jax key paths the same way
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert [jf.path_str(p) for p, _ in flat] == expected


def test_path_str_accepts_raw_keys_as_nnx_state_paths():
    assert jf.path_str(("encoder", "layers", 0, "kernel")) == "encoder/layers/0/kernel"


def test_same_spelling_in_selectors_errors_and_summary():
    params = {"enc": [NT(jnp.ones(2), jnp.ones(1))], "lin": Linear(jnp.ones(3), jnp.ones(1))}
    assert jf.paths("enc/0/kernel", "lin/w")(params) == {
        "enc": [NT(True, False)], "lin": Linear(True, False)
    }
    with pytest.raises(ValueError, match="'enc/0/kernel'"):
        jf.paths("enc/0/kernl")(params)
    s = jf.summary(params, frozen=jf.paths("lin/**"))
    assert {r.name for r in s.rows} == {"enc", "lin"}
    with pytest.raises(AssertionError, match="'lin/w'"):
        jf.assert_frozen(params, {**params, "lin": Linear(jnp.zeros(3), jnp.ones(1))},
                         frozen=jf.paths("lin/**"))


def test_closest_suggests_subtrees_and_leaves():
    paths = ["backbone/layers/0/kernel", "backbone/layers/0/bias", "head/kernel"]
    assert closest("backbon/**", paths)[0] == "backbone/**"
    assert closest("head/kernl", paths)[0] == "head/kernel"


def test_broadcast_prefix_scalars_and_subtrees():
    tree = {"a": [np.ones(2), np.ones(3)], "b": np.ones(1)}
    assert broadcast_prefix(True, tree, what="mask") == [True, True, True]
    assert broadcast_prefix({"a": False, "b": True}, tree, what="mask") == [False, False, True]
    with pytest.raises(ValueError, match="covers 2 leaves"):
        broadcast_prefix({"a": np.array([True, False]), "b": True}, tree, what="mask")


# --------------------------------------------------------------------------
# Globs: classes stay inside a segment, fnmatch's class rules, linear matching.


@pytest.mark.parametrize(
    "glob, path, expected",
    [
        ("a[!b]c", "a/c", False),  # a class never matches '/', like ? and *
        ("a[!b]c", "axc", True),
        ("a?c", "a/c", False),
        ("a*c", "a/c", False),
        ("a[^b]c", "a^c", True),  # '^' is literal, as in fnmatch: the class is {^, b}
        ("a[^b]c", "abc", True),
        ("a[^b]c", "axc", False),
        ("a[]]", "a]", True),  # a ']' first in a class is a member
        ("a[!]]", "ax", True),
        ("a[!]]", "a]", False),
        ("a[/]b", "a[/]b", True),  # a class cannot span '/': both '[' and ']' literal
        ("a[b", "a[b", True),  # no closing ']': a literal '['
        ("a**", "abc", True),  # '**' inside a segment is '*' ...
        ("a**", "a/b", False),  # ... and stays in it
        ("a/**", "a", True),  # 'a/**' is a and everything below
        ("a/**", "a/b/c", True),
        ("**/b", "b", True),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("", "", True),
    ],
)
def test_glob_rules(glob, path, expected):
    assert compile_glob(glob).fullmatch(path) is expected


def test_glob_escape_matches_a_key_with_special_characters():
    tree = {"w*": jnp.ones(1), "w[0]": jnp.ones(1), "w?": jnp.ones(1), "wx": jnp.ones(1)}
    for key in ["w*", "w[0]", "w?"]:
        out = jf.paths(glob.escape(key))(tree)
        assert [k for k, v in out.items() if v] == [key]


def test_colliding_paths_are_refused_naming_both_key_paths():
    tree = {"enc/w": jnp.ones(1), "enc": {"w": jnp.zeros(1)}}
    for use in (jf.paths("enc/w"), jf.paths("**"), jf.nothing):
        with pytest.raises(ValueError) as e:
            use(tree)
        msg = str(e.value)
        assert "'enc/w'" in msg and "['enc/w']" in msg and "['enc']['w']" in msg
    with pytest.raises(ValueError, match="share the path 'enc/w'"):
        jf.freeze(optax.sgd(1.0), frozen=jf.paths("enc/w")).init(tree)
    # A '/' in a key is fine as long as no other leaf spells the same path.
    tree = {"enc/w": jnp.ones(1), "b": jnp.ones(1)}
    assert jf.paths("enc/w")(tree) == {"enc/w": True, "b": False}


def _many_deep(k: int) -> str:
    return "/".join(["**", "a"] * k) + "/**/b"


def test_many_double_stars_match_in_steps_linear_in_the_path():
    # With '**' compiled to nested '.*', a regex takes minutes on such a path (12
    # '**' segments, 40+ chars, no match); the matcher counts its state
    # transitions instead, which must stay within (glob + 1) * (path + 1).
    g = compile_glob(_many_deep(12))
    for n in (20, 40, 80):
        path = "/".join(["a"] * n) + "/c"
        matched, steps = g.match_counting(path)
        assert not matched
        assert steps <= (len(g.glob) + 1) * (len(path) + 1)
    # ...and the selector uses it: this returns at once.
    key = "/".join(["a"] * 25) + "/c"
    assert jf.paths(_many_deep(12), strict=False)({key: 1.0}) == {key: False}


# --------------------------------------------------------------------------
# Properties: globs against a reference matcher, keys with special characters.

SEG_CHARS = "ab*?[]!^-"


def _reference(glob: str, path: str) -> bool:
    """Segment by segment: '**' any number of segments, else fnmatch on one segment."""

    def match(gs, ps):
        if not gs:
            return not ps
        if gs[0] == "**":
            return any(match(gs[1:], ps[k:]) for k in range(len(ps) + 1))
        return bool(ps) and fnmatch.fnmatchcase(ps[0], gs[0]) and match(gs[1:], ps[1:])

    return match(glob.split("/"), path.split("/"))


glob_segments = st.one_of(st.just("**"), st.text(SEG_CHARS, max_size=4))
path_segments = st.text("ab?*[]!^-", max_size=3)


@property_settings(300)
@given(st.lists(glob_segments, min_size=1, max_size=5), st.lists(path_segments, min_size=1,
                                                                  max_size=5))
def test_globs_agree_with_the_reference_matcher(gsegs, psegs):
    g, p = "/".join(gsegs), "/".join(psegs)
    matched, steps = compile_glob(g).match_counting(p)
    assert matched == _reference(g, p)
    assert compile_glob(g).fullmatch(p) == matched
    assert steps <= (len(g) + 1) * (len(p) + 1)


keys = st.text("ab/*?[]", min_size=1, max_size=4)


@property_settings(150)
@given(st.recursive(st.just(0), lambda c: st.dictionaries(keys, c, min_size=1, max_size=3),
                    max_leaves=6).filter(lambda t: isinstance(t, dict)))
@example({"a/b": 0, "a": {"b": 0}})
@example({"a*": 0, "a[": {"]": 0}})
def test_keys_with_special_characters_are_escaped_or_refused(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    spelled = [jf.path_str(kp) for kp, _ in flat]
    if len(set(spelled)) < len(spelled):  # two leaves spelled alike: refused, named
        dup = next(s for s in spelled if spelled.count(s) > 1)
        with pytest.raises(ValueError, match=f"share the path {re.escape(repr(dup))}"):
            jf.paths("**")(tree)
        return
    for target in spelled:  # glob.escape spells a glob that selects just that leaf
        out = jf.paths(glob.escape(target))(tree)
        assert [s for s, m in zip(spelled, jax.tree.leaves(out), strict=True) if m] == [target]
