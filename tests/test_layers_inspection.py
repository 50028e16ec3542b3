"""jf.summary and jf.assert_frozen on stacks frozen by whole layers (jf.layers, or any
element selection of whole slices along one axis)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import MODES, property_settings

import jfreeze as jf


def stack(n=12, d=4, axis=0, dtype=jnp.float32):
    """A scanned block's params: one array per parameter, layer axis ``axis``."""
    def at(shape):
        shape = list(shape)
        shape.insert(axis, n)
        return jnp.ones(shape, dtype)

    return {"embed": jnp.ones((10, d)),
            "layers": {"mlp": {"kernel": at((d, 2 * d)), "bias": at((2 * d,))},
                       "norm": {"scale": at((d,))}},
            "head": jnp.ones((d, 2))}


BOTTOM_8 = jf.layers("layers/**", range(8))
LAYER = 4 * 8 + 8 + 4  # params of one layer: kernel, bias, scale


def test_summary_of_a_12_layer_stack_with_layers_0_to_7_frozen():
    s = jf.summary(stack(), frozen=BOTTOM_8)
    assert (s.total, s.frozen, s.trainable) == (40 + 12 * LAYER + 8, 8 * LAYER, 40 + 4 * LAYER + 8)
    assert str(s) == """\
                 leaves  params  trainable  frozen    bytes  % params
---------------------------------------------------------------------
by module
  embed               1      40         40       0    160 B      6.9%
  head                1       8          8       0     32 B      1.4%
  layers              3     528        176     352  2.1 KiB     91.7%  8 of 12 layers frozen
    layers 0-7              352          0     352  1.4 KiB     61.1%  frozen
    layers 8-11             176        176       0    704 B     30.6%  trainable
---------------------------------------------------------------------
total      576 params, 2.2 KiB
trainable  224 params (38.9%), 896 B
frozen     352 params (61.1%), 1.4 KiB"""
    runs = [r for r in s.rows if r.kind == "layers"]
    assert [(r.name, r.layers, r.level, r.status, r.leaves) for r in runs] == [
        ("layers", range(0, 8), 2, "frozen", 0), ("layers", range(8, 12), 2, "trainable", 0)]
    assert [r.bytes for r in runs] == [4 * 8 * LAYER, 4 * 4 * LAYER]
    assert sum(r.bytes for r in runs) == next(r for r in s.rows if r.name == "layers").bytes
    assert s.frozen_bytes == 4 * 8 * LAYER and s.trainable_bytes == s.total_bytes - s.frozen_bytes
    # jf.freeze keeps Adam state for the trainable layers only: 2 x trainable bytes + a counter
    state = jf.freeze(optax.adam(1e-3), frozen=BOTTOM_8).init(stack())
    s = jf.summary(stack(), frozen=BOTTOM_8, opt_state=state)
    assert s.opt_state_bytes == 2 * s.trainable_bytes + 4
    assert str(s).endswith("opt state  1.8 KiB")


def test_summary_of_abstract_stacks_and_bf16_bytes():
    params = jax.eval_shape(lambda: stack(dtype=jnp.bfloat16))
    s = jf.summary(params, frozen=BOTTOM_8)
    runs = [r for r in s.rows if r.kind == "layers"]
    assert [(r.params, r.bytes) for r in runs] == [(8 * LAYER, 2 * 8 * LAYER),
                                                   (4 * LAYER, 2 * 4 * LAYER)]


@pytest.mark.parametrize("depth", [None, 1, 2, 3])
def test_summary_runs_partition_every_row_at_any_depth(depth):
    s = jf.summary(stack(), frozen=BOTTOM_8 | jf.paths("embed"), depth=depth)
    modules = [r for r in s.rows if r.kind == "module"]
    for i, r in enumerate(s.rows):
        inside = []
        for nxt in s.rows[i + 1:]:
            if nxt.kind != "layers" or nxt.level != r.level + 1:
                break
            inside.append(nxt)
        if inside:
            assert r.kind == "module" and r.note == "8 of 12 layers frozen"
            assert [x.layers for x in inside] == [range(0, 8), range(8, 12)]
            assert sum(x.params for x in inside) == r.params
            assert sum(x.frozen for x in inside) == r.frozen
    with_runs = sorted({r.name for r in s.rows if r.kind == "layers"})
    expected = {None: ["layers"], 1: ["layers"], 2: ["layers/mlp", "layers/norm"],
                3: ["layers/mlp/bias", "layers/mlp/kernel", "layers/norm/scale"]}[depth]
    assert with_runs == expected
    assert [r.name for r in modules if r.level == 1] == ["embed", "head", "layers"]


def test_summary_a_group_frozen_unalike_opens_into_its_stacks():
    frozen = jf.layers("layers/mlp/**", range(8)) | jf.layers("layers/norm/**", [0, 5])
    s = jf.summary(stack(), frozen=frozen)
    names = [(r.kind, r.name, r.layers) for r in s.rows if r.name.startswith("layers")]
    assert names == [
        ("module", "layers", None),
        ("module", "layers/mlp", None),
        ("layers", "layers/mlp", range(0, 8)), ("layers", "layers/mlp", range(8, 12)),
        ("module", "layers/norm/scale", None),
        ("layers", "layers/norm/scale", range(0, 1)), ("layers", "layers/norm/scale", range(1, 5)),
        ("layers", "layers/norm/scale", range(5, 6)), ("layers", "layers/norm/scale", range(6, 12)),
    ]
    table = str(s)
    assert re.search(r"\n      layer 0\s+4\s+0\s+4\s+16 B\s+[\d.]+%  frozen\n"
                     r"      layers 1-4\s+16\s+16\s+0\s+64 B", table), table


def test_summary_maxtext_stack_on_axis_1():
    s = jf.summary(stack(axis=1), frozen=jf.layers("layers/**", [4, 5, 6, 7], axis=1))
    row = next(r for r in s.rows if r.name == "layers")
    assert row.note == "4 of 12 layers on axis 1 frozen"
    assert [r.layers for r in s.rows if r.kind == "layers"] == [range(0, 4), range(4, 8),
                                                                 range(8, 12)]


def test_summary_element_masks_that_are_no_slabs_keep_the_element_count():
    diag = jf.elements("layers/mlp/kernel", lambda leaf: np.eye(4, 8, dtype=bool)[None])
    s = jf.summary(stack(), frozen=diag)
    assert not [r for r in s.rows if r.kind == "layers"]
    kernel = next(r for r in s.rows if r.name == "layers/mlp/kernel")
    assert kernel.note == "48 of 384 elements frozen"
    # a 1-D leaf's elements are no layers
    s = jf.summary({"b": jnp.ones(4)}, frozen=jf.elements("b", np.s_[:2]))
    assert [r.note for r in s.rows] == ["2 of 4 elements frozen"]


def test_summary_max_rows_keeps_the_runs_of_a_group_closed():
    s = jf.summary(stack(), frozen=jf.layers("layers/**", [0, 2, 4, 6]), max_rows=4)
    row = next(r for r in s.rows if r.name == "layers")
    assert not [r for r in s.rows if r.kind == "layers"]
    assert row.note == "partly frozen: 8 rows inside (max_rows=, depth=)"
    s = jf.summary(stack(), frozen=jf.layers("layers/**", [0, 2, 4, 6]), max_rows=11)
    assert len([r for r in s.rows if r.kind == "layers"]) == 8


def test_summary_html_shows_the_same_layer_rows():
    s = jf.summary(stack(), frozen=BOTTOM_8)
    page = s._repr_html_()
    assert page.count('<tr class="jf-') == len(s.rows) == 5
    assert ('<tr class="jf-frozen" style="color:#777"><td style="text-align:left;'
            'padding-left:2em" title="layers layers 0-7">layers 0-7</td>'
            '<td style="text-align:right;font-family:monospace"></td>') in page
    assert 'title="layers layers 8-11">layers 8-11</td>' in page
    assert "<td style=\"text-align:left\">8 of 12 layers frozen</td>" in page
    for r in s.rows:
        assert f"{r.params:,}</td>" in page and f"{r.frozen:,}</td>" in page


# --------------------------------------------------------------------------
# assert_frozen


def test_assert_frozen_names_the_moved_layer_and_its_bits():
    before = stack()
    after = jax.tree.map(lambda x: x, before)
    after["layers"]["mlp"]["kernel"] = before["layers"]["mlp"]["kernel"].at[3, 1, 2].set(-1.0)
    after["layers"]["mlp"]["bias"] = before["layers"]["mlp"]["bias"].at[9].set(5.0)  # trains
    with pytest.raises(AssertionError) as e:
        jf.assert_frozen(before, after, frozen=BOTTOM_8)
    assert str(e.value) == (
        "1 frozen leaf moved: 'layers/mlp/kernel' (1 of 256 frozen elements, in layer 3 of 12 "
        "on axis 0; first at [3, 1, 2]: 1.0 (0x3f800000) -> -1.0 (0xbf800000))")
    after["layers"]["mlp"]["kernel"] = after["layers"]["mlp"]["kernel"].at[5:7].set(0.0)
    with pytest.raises(AssertionError, match=r"in layers 3, 5-6 of 12 on axis 0; first at "):
        jf.assert_frozen(before, after, frozen=BOTTOM_8)
    with pytest.raises(AssertionError, match=r"in layer 1 of 12 on axis 1; first at \[0, 1\]"):
        moved = stack(axis=1)
        moved["layers"]["norm"]["scale"] = moved["layers"]["norm"]["scale"].at[0, 1].set(2.0)
        jf.assert_frozen(stack(axis=1), moved, frozen=jf.layers("layers/**", [1], axis=1))


@pytest.mark.parametrize("mode", MODES)
def test_assert_frozen_after_jf_freeze_steps_on_a_stack(mode):
    params = jax.tree.map(lambda x: x * jnp.arange(1, x.size + 1).reshape(x.shape) / x.size,
                          stack())
    params["layers"]["mlp"]["kernel"] = params["layers"]["mlp"]["kernel"].at[0, 0, 0].set(-0.0)
    tx = jf.freeze(optax.adam(0.1), frozen=BOTTOM_8)

    @mode
    def step(p, s):
        grads = jax.tree.map(jnp.ones_like, p)
        updates, s = tx.update(grads, s, p)
        return jf.apply_updates(p, updates, frozen=BOTTOM_8), s

    new, state = params, tx.init(params)
    for _ in range(3):
        new, state = step(new, state)
    jf.assert_frozen(params, new, frozen=BOTTOM_8)  # trainable layers moved: not reported
    kernel = params["layers"]["mlp"]["kernel"]
    assert not np.array_equal(new["layers"]["mlp"]["kernel"][8:], kernel[8:])
    with pytest.raises(AssertionError, match=r"'layers/mlp/kernel' \(.* in layers 8-11 of 12"):
        jf.assert_frozen(params, new, frozen=jf.layers("layers/**", range(8, 12)))


@property_settings(40)
@given(st.data())
def test_assert_frozen_property_a_flip_in_a_frozen_layer_names_it(data):
    ndim = data.draw(st.integers(2, 3))
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axis = data.draw(st.integers(0, ndim - 1))
    n = shape[axis]
    frozen_layers = data.draw(st.sets(st.integers(0, n - 1)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    dtype = data.draw(st.sampled_from([np.float32, jnp.bfloat16, np.int8]))
    width = 8 * np.dtype(dtype).itemsize
    raw = rng.integers(0, 2**width, shape, dtype=np.uint64).astype(f"uint{width}")
    before = {"s": raw.view(dtype)}
    sel = jf.layers("s", sorted(frozen_layers), axis=axis)
    trainable = np.array([i not in frozen_layers for i in range(n)])
    after_raw = raw.copy()
    idx = [slice(None)] * ndim
    idx[axis] = trainable
    after_raw[tuple(idx)] = rng.integers(0, 2**width, after_raw[tuple(idx)].shape,
                                         dtype=np.uint64).astype(f"uint{width}")
    jf.assert_frozen(before, {"s": after_raw.view(dtype)}, frozen=sel)  # trainable: never
    if not frozen_layers:
        return
    layer = data.draw(st.sampled_from(sorted(frozen_layers)))
    at = [int(rng.integers(0, d)) for d in shape]
    at[axis] = layer
    after_raw[tuple(at)] ^= np.array(1 << data.draw(st.integers(0, width - 1))).astype(
        f"uint{width}")
    with pytest.raises(AssertionError) as e:
        jf.assert_frozen(before, {"s": after_raw.view(dtype)}, frozen=sel)
    msg = str(e.value)
    assert f"first at {at}: " in msg and "0x" in msg, msg
    if len(frozen_layers) < n:  # partly frozen: a stack (all frozen: a whole leaf)
        assert f", in layer {layer} of {n} on axis {axis}; " in msg, msg
