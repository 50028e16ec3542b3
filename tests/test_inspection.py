"""summary (counts, bytes, rows) and assert_frozen (exact, NaN == NaN, names paths)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jfreeze as jf


def make_params():
    return {
        "backbone": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)},  # 40 params
        "head": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2, jnp.bfloat16)},  # 16 + 2
    }


SEL = jf.paths("backbone/**") | jf.elements("head/kernel", np.s_[:, 0])  # 40 + 8 frozen


@pytest.mark.parametrize("abstract", [False, True], ids=["arrays", "shape_dtype_structs"])
def test_summary_counts_and_bytes(abstract):
    params = make_params()
    if abstract:
        params = jax.eval_shape(lambda p: p, params)
    s = jf.summary(params, frozen=SEL)
    assert (s.total, s.frozen, s.trainable) == (58, 48, 10)
    assert s.total_bytes == 56 * 4 + 2 * 2
    assert s.frozen_bytes == 48 * 4
    assert s.trainable_bytes == 8 * 4 + 2 * 2
    rows = {(r.kind, r.name): r for r in s.rows}
    assert (rows["module", "backbone"].leaves, rows["module", "backbone"].params) == (2, 40)
    assert rows["module", "backbone"].frozen == 40
    assert (rows["module", "head"].params, rows["module", "head"].frozen) == (18, 8)
    assert rows["module", "head"].trainable == 10
    assert s.opt_state_bytes is None
    table = str(s)
    assert re.search(r"backbone\s+2\s+40\s+0\s+40\s+160 B\s+69\.0%", table), table
    assert re.search(r"head\s+2\s+18\s+10\s+8\s+68 B\s+31\.0%", table), table
    assert "trainable  10 params (17.2%)" in table
    assert "frozen     48 params (82.8%)" in table


def test_summary_without_frozen_counts_everything_trainable():
    s = jf.summary(make_params())
    assert (s.total, s.trainable, s.frozen) == (58, 58, 0)


@pytest.mark.parametrize("abstract", [False, True], ids=["arrays", "shape_dtype_structs"])
def test_summary_label_rows_and_opt_state_bytes(abstract):
    params = make_params()
    label_fn = jf.labels({"frozen": jf.paths("backbone/**"), "head": jf.paths("head/**")})
    tx = jf.partition({"frozen": None, "head": optax.adam(1e-3)}, label_fn)
    state = jax.eval_shape(tx.init, params) if abstract else tx.init(params)
    if abstract:
        params = jax.eval_shape(lambda p: p, params)
    s = jf.summary(params, frozen=jf.paths("backbone/**"), labels=label_fn, opt_state=state)
    rows = {(r.kind, r.name): r for r in s.rows}
    assert (rows["label", "frozen"].params, rows["label", "frozen"].frozen) == (40, 40)
    assert (rows["label", "head"].params, rows["label", "head"].trainable) == (18, 18)
    assert rows["label", "head"].bytes == 16 * 4 + 2 * 2
    # adam: mu and nu for the head (in the head's dtypes) and an int32 counter
    assert s.opt_state_bytes == 2 * (16 * 4 + 2 * 2) + 4
    table = str(s)
    assert "by label" in table and "opt state  140 B" in table
    # a label tree works as well as a label function
    s2 = jf.summary(params, labels={"backbone": "frozen", "head": "head"})
    assert {r.name for r in s2.rows if r.kind == "label"} == {"frozen", "head"}


# --------------------------------------------------------------------------
# assert_frozen


def test_assert_frozen_passes_on_signed_zero_and_nan():
    before = {"w": jnp.array([-0.0, jnp.nan, 1.0]), "b": jnp.array([0.0])}
    after = {"w": jnp.array([0.0, jnp.nan, 1.0]), "b": jnp.array([-0.0])}  # eager -0.0 -> +0.0
    jf.assert_frozen(before, after, frozen=jf.everything)


def test_assert_frozen_fails_naming_path_and_count():
    before = {"enc": {"w": jnp.zeros((2, 3))}, "head": jnp.zeros(4)}
    after = {"enc": {"w": jnp.zeros((2, 3)).at[0, :2].set(0.5)}, "head": jnp.ones(4)}
    with pytest.raises(AssertionError) as e:
        jf.assert_frozen(before, after, frozen=jf.paths("enc/**"))
    assert "'enc/w'" in str(e.value) and "2 of 6" in str(e.value) and "head" not in str(e.value)
    with pytest.raises(AssertionError) as e:
        jf.assert_frozen(before, after, frozen=jf.everything)
    assert "2 frozen leaves moved" in str(e.value)
    assert "'enc/w' (2 of 6" in str(e.value) and "'head' (4 of 4" in str(e.value)
    # a NaN that appears is a move
    with pytest.raises(AssertionError, match="'head' \\(1 of 4"):
        jf.assert_frozen(before, {**before, "head": before["head"].at[1].set(jnp.nan)},
                         frozen=jf.paths("head"))


def test_assert_frozen_element_wise_checks_only_frozen_elements():
    before = {"w": jnp.zeros((2, 3))}
    after = {"w": jnp.zeros((2, 3)).at[:, 1:].set(1.0)}
    jf.assert_frozen(before, after, frozen=jf.elements("w", np.s_[:, 0]))
    with pytest.raises(AssertionError, match=r"'w' \(2 of 4 frozen elements"):
        jf.assert_frozen(before, after, frozen=jf.elements("w", np.s_[:, :2]))


def test_assert_frozen_after_a_real_eager_step():
    params = {"backbone": jnp.array([-0.0, jnp.nan, 2.0]), "head": jnp.array([1.0, 2.0])}
    mask = {"backbone": True, "head": False}
    for tx in (jf.freeze(optax.adam(0.1), frozen=jf.paths("backbone")),
               optax.selective_transform(optax.adam(0.1), freeze_mask=mask)):
        updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
        new = optax.apply_updates(params, updates)
        jf.assert_frozen(params, new, frozen=jf.paths("backbone"))
        with pytest.raises(AssertionError, match="'head'"):
            jf.assert_frozen(params, new, frozen=jf.everything)


def test_assert_frozen_dtype_or_shape_change_is_a_move():
    with pytest.raises(AssertionError, match="'w'"):
        jf.assert_frozen({"w": jnp.zeros(2)}, {"w": jnp.zeros(3)}, frozen=jf.everything)
