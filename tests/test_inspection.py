"""summary (counts, bytes, rows) and assert_frozen (bitwise by default, names paths)."""

from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import leaf_paths, property_settings, trees_and_selections

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


def test_assert_frozen_values_mode_passes_on_signed_zero_and_nan_bits_mode_does_not():
    before = {"w": jnp.array([-0.0, jnp.nan, 1.0]), "b": jnp.array([0.0])}
    after = {"w": jnp.array([0.0, jnp.nan, 1.0]), "b": jnp.array([-0.0])}  # eager -0.0 -> +0.0
    jf.assert_frozen(before, after, frozen=jf.everything, compare="values")
    with pytest.raises(AssertionError) as e:
        jf.assert_frozen(before, after, frozen=jf.everything)
    assert "2 frozen leaves moved" in str(e.value)
    assert "'w' (1 of 3 frozen elements; first at [0]: -0.0 (0x80000000) -> 0.0 (0x00000000))" \
        in str(e.value)
    with pytest.raises(ValueError, match="compare= is 'bits' or 'values'"):
        jf.assert_frozen(before, after, frozen=jf.everything, compare="exact")


F8 = jnp.float8_e4m3fn


@pytest.mark.parametrize("dtype, was, now, values_equal", [
    (np.float32, 0x80000000, 0x00000000, True),   # -0.0 -> +0.0
    (np.float32, 0x00000001, 0x00000000, False),  # smallest subnormal flushed
    (np.float32, 0x007FFFFF, 0x00000000, False),  # largest subnormal flushed
    (np.float32, 0x7F800001, 0x7FC00001, True),   # signalling NaN quieted
    (np.float32, 0x7FC00000, 0xFFC00000, True),   # NaN sign
    (np.float64, 0x0000000000000001, 0x0, False),
    (np.float64, 0x7FF0000000000001, 0x7FF8000000000001, True),
    (jnp.bfloat16, 0x0001, 0x0000, False),
    (jnp.bfloat16, 0x7FC1, 0x7FC0, True),         # NaN payload
    (np.float16, 0x7C01, 0x7E01, True),
    (F8, 0x80, 0x00, True),
    (np.int32, 0x00000000, 0x80000000, False),
    (np.uint8, 0x01, 0x03, False),
], ids=lambda v: getattr(v, "__name__", None) if isinstance(v, type) else None)
def test_assert_frozen_compares_bits_of_every_dtype(dtype, was, now, values_equal):
    width = 8 * np.dtype(dtype).itemsize
    bits = np.array([0, was, 0], dtype=f"uint{width}")
    before = {"keep": np.zeros(2, np.float32), "x": bits.view(dtype)}
    after = {"keep": np.zeros(2, np.float32), "x": bits.copy()}
    after["x"][1] = now
    after["x"] = after["x"].view(dtype)
    jf.assert_frozen(before, before, frozen=jf.everything)
    with pytest.raises(AssertionError) as e:
        jf.assert_frozen(before, after, frozen=jf.paths("x"))
    digits = width // 4
    assert ("'x' (1 of 3 frozen elements; first at [1]: " in str(e.value)
            and f"(0x{was:0{digits}x}) -> " in str(e.value)
            and str(e.value).endswith(f"(0x{now:0{digits}x}))")), str(e.value)
    if values_equal:
        jf.assert_frozen(before, after, frozen=jf.paths("x"), compare="values")
    else:
        with pytest.raises(AssertionError, match="'x'"):
            jf.assert_frozen(before, after, frozen=jf.paths("x"), compare="values")


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_assert_frozen_compares_both_parts_of_complex_values(dtype):
    before = {"z": np.array(complex(1.0, -0.0), dtype)}  # a 0-d leaf
    after = {"z": np.array(complex(1.0, 0.0), dtype)}
    jf.assert_frozen(before, after, frozen=jf.everything, compare="values")
    with pytest.raises(AssertionError) as e:
        jf.assert_frozen(before, after, frozen=jf.everything)
    one, sign = ("0x3f800000", "0x80000000") if dtype == np.complex64 else (
        "0x3ff0000000000000", "0x8000000000000000")
    assert f"(1 of 1 frozen elements; (1-0j) ({one}, {sign}) -> (1+0j) ({one}, 0x" in str(e.value)


def test_assert_frozen_catches_an_eager_optax_step_that_turns_minus_zero_positive():
    # optax.selective_transform's frozen update is +0.0: eagerly, -0.0 + 0.0 = +0.0.
    params = {"backbone": jnp.array([1.5, -0.0]), "head": jnp.array([1.0, 2.0])}
    tx = optax.selective_transform(optax.sgd(0.1), freeze_mask={"backbone": True, "head": False})
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    jf.assert_frozen(params, new, frozen=jf.paths("backbone"), compare="values")
    with pytest.raises(AssertionError, match=r"'backbone' \(1 of 2 frozen elements; first at "
                       r"\[1\]: -0.0 \(0x80000000\) -> 0.0 \(0x00000000\)\)"):
        jf.assert_frozen(params, new, frozen=jf.paths("backbone"))


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
    with pytest.raises(AssertionError, match="'head' \\(1 of 4 frozen elements; first at \\[1\\]"):
        jf.assert_frozen(before, {**before, "head": before["head"].at[1].set(jnp.nan)},
                         frozen=jf.paths("head"))


def test_assert_frozen_element_wise_checks_only_frozen_elements():
    before = {"w": jnp.zeros((2, 3))}
    after = {"w": jnp.zeros((2, 3)).at[:, 1:].set(1.0)}
    jf.assert_frozen(before, after, frozen=jf.elements("w", np.s_[:, 0]))
    # whole columns: a slab along axis 1, so the moved column is named as a layer
    with pytest.raises(AssertionError, match=r"'w' \(2 of 4 frozen elements, in layer 1 of 3 "
                       r"on axis 1; first at \[0, 1\]"):
        jf.assert_frozen(before, after, frozen=jf.elements("w", np.s_[:, :2]))


def test_assert_frozen_after_a_real_eager_step():
    params = {"backbone": jnp.array([-0.0, jnp.nan, 2.0]), "head": jnp.array([1.0, 2.0])}
    mask = {"backbone": True, "head": False}
    for tx in (jf.freeze(optax.adam(0.1), frozen=jf.paths("backbone")),
               optax.selective_transform(optax.adam(0.1), freeze_mask=mask)):
        updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
        new = optax.apply_updates(params, updates)
        jf.assert_frozen(params, new, frozen=jf.paths("backbone"), compare="values")
        with pytest.raises(AssertionError, match="'head'"):
            jf.assert_frozen(params, new, frozen=jf.everything)


def test_assert_frozen_dtype_or_shape_change_is_a_move():
    with pytest.raises(AssertionError, match="'w'"):
        jf.assert_frozen({"w": jnp.zeros(2)}, {"w": jnp.zeros(3)}, frozen=jf.everything)


# Property: a single-bit flip in any frozen element is caught and named; any change in
# trainable elements is never reported. Every dtype, random bit patterns with the special
# ones over-represented (+-0, smallest subnormal, NaN with every payload bit, sign bit).

DTYPES = [np.float32, np.float64, jnp.bfloat16, np.float16, jnp.float8_e4m3fn,
          jnp.float8_e5m2, np.complex64, np.complex128, np.int32, np.int8, np.uint16, np.bool_]


def _random_bits(rng, shape, dtype):
    """An array of ``dtype`` with random bit patterns (bool: 0 or 1)."""
    parts = 2 if np.dtype(dtype).kind == "c" else 1
    width = 8 * np.dtype(dtype).itemsize // parts
    n = int(np.prod(shape, dtype=int)) * parts
    if dtype is np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    top = (1 << width) - 1
    specials = np.array([0, 1, 1 << (width - 1), (1 << (width - 1)) | 1, top, top >> 1],
                        dtype=np.uint64)
    raw = rng.integers(0, top, n, dtype=np.uint64, endpoint=True)
    raw = np.where(rng.random(n) < 0.5, specials[rng.integers(0, len(specials), n)], raw)
    return raw.astype(f"uint{width}").view(dtype).reshape(shape)


@property_settings(60)
@given(trees_and_selections(), st.data())
def test_assert_frozen_property_single_bit_flips(case, data):
    skeleton_params, selection, rng = case
    leaves, treedef = jax.tree.flatten(skeleton_params)
    paths = leaf_paths(skeleton_params)
    dtypes = [data.draw(st.sampled_from(DTYPES)) for _ in leaves]
    before = [_random_bits(rng, x.shape, d) for x, d in zip(leaves, dtypes, strict=True)]
    after = [x.copy() for x in before]
    for i, x in enumerate(after):  # any change to every trainable element
        free = ~selection.frozen_elements(i, x.shape)
        x[free] = _random_bits(rng, x.shape, dtypes[i])[free]
    frozen = [(i, idx) for i, x in enumerate(before)
              for idx in np.argwhere(selection.frozen_elements(i, x.shape))]
    flip = frozen and data.draw(st.booleans())
    tree = lambda xs: jax.tree.unflatten(treedef, xs)
    if not flip:
        jf.assert_frozen(tree(before), tree(after), frozen=selection.selector)
        return
    i, idx = data.draw(st.sampled_from(frozen))
    idx = tuple(int(j) for j in idx)
    parts = _bit_parts(after[i])
    part = data.draw(st.integers(0, parts.shape[-1] - 1))
    width = 1 if dtypes[i] is np.bool_ else 8 * parts.dtype.itemsize
    bit = data.draw(st.integers(0, width - 1))
    parts[(*idx, part)] ^= parts.dtype.type(1 << bit)
    with pytest.raises(AssertionError) as e:
        jf.assert_frozen(tree(before), tree(after), frozen=selection.selector)
    where = f"first at {list(idx)}: " if idx else ""
    msg = str(e.value)
    assert msg.startswith("1 frozen leaf moved: ") and f"{paths[i]!r} (1 of " in msg, msg
    # A mask of whole slices (a column) also names the layer: "elements, in layer 1 of 3 ...; ".
    assert f"; {where}" in msg and "frozen elements" in msg and "0x" in msg, msg


def _bit_parts(x):
    """A writable uint view of ``x``'s bits, shape ``(*x.shape, parts)``."""
    parts = 2 if x.dtype.kind == "c" else 1
    return x.reshape(-1).view(f"uint{8 * x.dtype.itemsize // parts}").reshape(*x.shape, parts)


# --------------------------------------------------------------------------
# summary on a BERT-base-shaped tree: depth=None opens where trainable and frozen separate


def _dense(n_in, n_out):
    f32 = jnp.float32
    return {"kernel": jax.ShapeDtypeStruct((n_in, n_out), f32),
            "bias": jax.ShapeDtypeStruct((n_out,), f32)}


def _layer_norm(n):
    return {"scale": jax.ShapeDtypeStruct((n,), jnp.float32),
            "bias": jax.ShapeDtypeStruct((n,), jnp.float32)}


def bert_base(layers=12, hidden=768, mlp=3072, vocab=30522, positions=512, labels=2):
    """The parameter tree of Hugging Face's FlaxBertForSequenceClassification (bert-base)."""
    emb = lambda n: {"embedding": jax.ShapeDtypeStruct((n, hidden), jnp.float32)}
    layer = {
        "attention": {
            "self": {k: _dense(hidden, hidden) for k in ("query", "key", "value")},
            "output": {"dense": _dense(hidden, hidden), "LayerNorm": _layer_norm(hidden)},
        },
        "intermediate": {"dense": _dense(hidden, mlp)},
        "output": {"dense": _dense(mlp, hidden), "LayerNorm": _layer_norm(hidden)},
    }
    return {
        "bert": {
            "embeddings": {"word_embeddings": emb(vocab), "position_embeddings": emb(positions),
                           "token_type_embeddings": emb(2), "LayerNorm": _layer_norm(hidden)},
            "encoder": {"layer": {str(i): layer for i in range(layers)}},
            "pooler": {"dense": _dense(hidden, hidden)},
        },
        "classifier": _dense(hidden, labels),
    }


BERT_FROZEN = jf.paths("bert/embeddings/**") | jf.regex(r"bert/encoder/layer/[0-7]/.*")
LAYER = 4 * (768 * 768 + 768) + 2 * 2 * 768 + 768 * 3072 + 3072 + 3072 * 768 + 768  # 7,087,872
EMBEDDINGS = (30522 + 512 + 2) * 768 + 2 * 768                                       # 23,837,184


def _innermost(rows):
    """The module rows with no row inside them, and the layer rows inside a stack's row
    (they partition the parameters)."""
    rows = [r for r in rows if r.kind in ("module", "layers")]
    return [r for r, nxt in zip(rows, [*rows[1:], None], strict=True)
            if nxt is None or nxt.level <= r.level]


def test_summary_bert_default_depth_opens_where_frozen_and_trainable_separate():
    s = jf.summary(bert_base(), frozen=BERT_FROZEN)
    assert LAYER == 7_087_872 and EMBEDDINGS == 23_837_184
    pooler, classifier = 768 * 768 + 768, 768 * 2 + 2
    assert s.total == EMBEDDINGS + 12 * LAYER + pooler + classifier == 109_483_778
    assert s.frozen == EMBEDDINGS + 8 * LAYER
    assert s.trainable == 4 * LAYER + pooler + classifier
    assert s.frozen_bytes == 4 * s.frozen and s.total_bytes == 4 * s.total
    layers = [f"bert/encoder/layer/{i}" for i in range(12)]  # numeric order: 2 before 10
    assert [(r.name, r.level) for r in s.rows] == [
        ("bert", 1), ("bert/embeddings", 2), ("bert/encoder/layer", 2),
        *[(name, 3) for name in layers], ("bert/pooler", 2), ("classifier", 1)]
    rows = {r.name: r for r in s.rows}
    for i in range(12):
        r = rows[f"bert/encoder/layer/{i}"]
        assert (r.leaves, r.params, r.frozen) == (16, LAYER, LAYER if i < 8 else 0)
        assert r.status == ("frozen" if i < 8 else "trainable")
    assert rows["bert/encoder/layer"].status == "mixed"
    assert (rows["bert/embeddings"].status, rows["bert/pooler"].status) == ("frozen", "trainable")
    assert (rows["bert"].leaves, rows["classifier"].leaves) == (199, 2)
    inner = _innermost(s.rows)
    assert sum(r.params for r in inner) == s.total and sum(r.frozen for r in inner) == s.frozen
    assert all(r.status != "mixed" for r in inner)
    table = str(s)
    assert re.search(r"\n    encoder/layer\s+192\s+85,054,464\s+28,351,488\s+56,702,976\s+"
                     r"324\.5 MiB\s+77\.7%\n      0\s+16\s+7,087,872\s+0\s+7,087,872", table)
    assert re.search(r"\n      11\s+16\s+7,087,872\s+7,087,872\s+0\s+27\.0 MiB\s+6\.5%\n"
                     r"    pooler\s", table), table
    assert "frozen     80,540,160 params (73.6%), 307.2 MiB" in table


@pytest.mark.parametrize("depth, names", [
    (1, ["bert", "classifier"]),
    (2, ["bert", "bert/embeddings", "bert/encoder", "bert/pooler",
         "classifier", "classifier/bias", "classifier/kernel"]),
    (3, ["bert", "bert/embeddings", "bert/embeddings/LayerNorm",
         "bert/embeddings/position_embeddings", "bert/embeddings/token_type_embeddings",
         "bert/embeddings/word_embeddings", "bert/encoder", "bert/encoder/layer",
         "bert/pooler", "bert/pooler/dense", "classifier", "classifier/bias",
         "classifier/kernel"]),
])
def test_summary_bert_fixed_depth_groups_by_the_first_k_segments(depth, names):
    s = jf.summary(bert_base(), frozen=BERT_FROZEN, depth=depth)
    assert [r.name for r in s.rows] == names
    assert all(r.level == r.name.count("/") + 1 <= depth for r in s.rows)
    for level in range(1, depth + 1):  # each level's rows plus shallower innermost ones
        part = [r for r in s.rows if r.level == level]
        part += [r for r in _innermost(s.rows) if r.level < level]
        assert sum(r.params for r in part) == s.total
        assert sum(r.frozen for r in part) == s.frozen
    assert s.rows[0].name == "bert" and s.rows[0].status == "mixed"


def test_summary_bert_max_rows_keeps_a_mixed_row_closed_and_says_so():
    s = jf.summary(bert_base(), frozen=BERT_FROZEN, max_rows=10)
    assert [r.name for r in s.rows] == ["bert", "bert/embeddings", "bert/encoder/layer",
                                        "bert/pooler", "classifier"]
    layer = s.rows[2]
    assert layer.status == "mixed" and "12 rows inside" in layer.note
    assert "partly frozen: 12 rows inside (max_rows=, depth=)" in str(s)
    assert len(jf.summary(bert_base(), frozen=jf.nothing).rows) == 2  # nothing separates


def test_summary_bert_element_wise_leaf_row_and_labels():
    # Half a column: not whole slices along one axis (those are shown by layers, see
    # tests/test_layers_inspection.py), so the row counts the elements.
    frozen = BERT_FROZEN | jf.paths("bert/pooler/**") | jf.elements("classifier/kernel",
                                                                      np.s_[:384, 0])
    label_fn = jf.labels({"frozen": BERT_FROZEN, "pooler": jf.paths("bert/pooler/**")},
                         default="head")
    s = jf.summary(bert_base(), frozen=frozen, labels=label_fn)
    rows = {(r.kind, r.name): r for r in s.rows}
    kernel = rows["module", "classifier/kernel"]
    assert (kernel.level, kernel.params, kernel.frozen) == (2, 1536, 384)
    assert kernel.note == "384 of 1,536 elements frozen" and kernel.status == "mixed"
    assert rows["module", "classifier/bias"].note == ""
    assert not [r for r in s.rows if r.kind == "layers"]
    assert re.search(r"\n    kernel\s+1\s+1,536\s+1,152\s+384\s+6\.0 KiB\s+0\.0%  "
                     r"384 of 1,536 elements frozen\n", str(s)), str(s)
    assert rows["label", "frozen"].params == EMBEDDINGS + 8 * LAYER
    assert rows["label", "head"].params == 4 * LAYER + 768 * 2 + 2
    assert rows["label", "head"].level == 1 and "by label" in str(s)


def test_summary_html_has_the_same_rows_and_numbers():
    s = jf.summary(bert_base(), frozen=BERT_FROZEN)
    page = s._repr_html_()
    assert page.startswith('<table class="jfreeze-summary">') and page.endswith("</table>")
    assert page.count('<tr class="jf-') == len(s.rows) == 17
    for r in s.rows:
        assert f"{r.params:,}</td>" in page and f"{r.frozen:,}</td>" in page
    assert page.count('<tr class="jf-frozen"') == 9 and page.count('class="jf-mixed"') == 2
    assert 'padding-left:3em" title="bert/encoder/layer/11">11</td>' in page
    assert "80,540,160 params (73.6%), 307.2 MiB" in page
    weird = jf.summary({"<b>&": jnp.ones(2)})._repr_html_()  # keys are escaped
    assert "&lt;b&gt;&amp;" in weird and "<b>&" not in weird


@pytest.mark.parametrize("depth", [0, -1, 1.5, True, "2"])
def test_summary_rejects_a_bad_depth(depth):
    with pytest.raises(ValueError, match=r"depth= is None .* or an int >= 1"):
        jf.summary(make_params(), depth=depth)
    with pytest.raises(ValueError, match="max_rows= is an int >= 1"):
        jf.summary(make_params(), max_rows=0)


def _ground_truth(paths, sizes, frozen_counts, name):
    inside = [i for i, p in enumerate(paths) if (p or "(root)") == name
              or (p or "(root)").startswith(name + "/")]
    return (len(inside), sum(sizes[i] for i in inside), sum(frozen_counts[i] for i in inside))


@property_settings(80)
@given(trees_and_selections(rich=True), st.sampled_from([None, 1, 2, 3, 5]),
       st.integers(1, 12))
def test_summary_property_rows_partition_the_totals(case, depth, max_rows):
    params, selection, _ = case
    paths = leaf_paths(params)
    leaves = jax.tree.leaves(params)
    sizes = [x.size for x in leaves]
    frozen_counts = [int(selection.frozen_elements(i, x.shape).sum())
                     for i, x in enumerate(leaves)]
    s = jf.summary(params, frozen=selection.selector, depth=depth, max_rows=max_rows)
    assert (s.total, s.frozen) == (sum(sizes), sum(frozen_counts))
    modules = [r for r in s.rows if r.kind == "module"]
    names = [r.name for r in modules]
    assert len(set(names)) == len(names)
    for r in modules:  # every row counts exactly the leaves at or under its path
        assert (r.leaves, r.params, r.frozen) == _ground_truth(paths, sizes, frozen_counts, r.name)
    _check_layer_rows(s.rows)
    inner = _innermost(s.rows)  # the innermost rows partition the totals
    assert sum(r.params for r in inner) == s.total
    assert sum(r.frozen for r in inner) == s.frozen
    assert sum(r.leaves for r in _innermost(modules)) == len(leaves)
    tops = [r for r in s.rows if r.level == 1]
    assert sum(r.params for r in tops) == s.total
    if depth is not None:
        assert all(r.level == r.name.count("/") + 1 <= depth for r in modules)
    else:  # a mixed row stays closed only when it is one leaf or max_rows is reached
        shown = {r.name for r in s.rows if r.kind == "layers"}  # opened into its layers
        closed = [r for r in inner if r.status == "mixed" and r.leaves > 1 and r.name not in shown]
        assert all(r.note.startswith("partly frozen") for r in closed)
        if max_rows >= 2 * len(leaves) + 8:  # never reached: every innermost row is one status
            assert closed == []
    for level in range(1, max(r.level for r in s.rows) + 1):  # and so do the rows of each level
        part = [r for r in s.rows if r.level == level] + [r for r in inner if r.level < level]
        part = [r for r in part if r.kind == "module" or r.level == level]
        assert (sum(r.params for r in part), sum(r.frozen for r in part)) == (s.total, s.frozen)
    page = s._repr_html_()
    assert page.count('<tr class="jf-') == len(s.rows)


def _check_layer_rows(rows):
    """The layer rows right after a row partition it: consecutive runs, one status each."""
    for i, r in enumerate(rows):
        inside = []
        for nxt in rows[i + 1:]:
            if nxt.kind != "layers" or nxt.level != r.level + 1:
                break
            inside.append(nxt)
        if r.kind != "module" or not inside:
            continue
        assert r.status == "mixed" and "layers" in r.note
        assert all(x.name == r.name and x.status != "mixed" for x in inside)
        assert inside[0].layers.start == 0
        assert all(a.layers.stop == b.layers.start and a.status != b.status
                   for a, b in itertools.pairwise(inside))
        assert (sum(x.params for x in inside), sum(x.frozen for x in inside),
                sum(x.bytes for x in inside)) == (r.params, r.frozen, r.bytes)
