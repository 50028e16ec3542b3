"""jf.scan: a layer stack run so that frozen layers get no weight gradients.

Values and gradients are those of ``lax.scan`` on the masked stack (``jf.stop_gradient``);
compute is the analytic ideal, counted on the optimized HLO with loops by their trip count
(``benchmarks.measure.hlo_matmul_flops``) or on fully unrolled programs (``cost_analysis``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import jfreeze as jf

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.measure import hlo_matmul_flops  # noqa: E402

B, D = 8, 32
DENSE = 2 * B * D * D  # FLOPs of one layer's matmul (and of each of its two gradients)


def _layer(h, p):
    return jnp.tanh(h @ p["w"] + p["b"]), (h * p["b"]).sum(-1)


def _stack(n, seed=0, d=D):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"w": jax.random.normal(k1, (n, d, d)) / np.sqrt(d),
            "b": 0.1 * jax.random.normal(k2, (n, d))}


def _x(seed=1, d=D):
    return jax.random.normal(jax.random.key(seed), (B, d))


def _masked_scan(f, init, xs, *, frozen, path=None, **kw):
    """The reference: one lax.scan over the masked stack."""
    masked = jf.stop_gradient({path: xs}, frozen=frozen)[path] if path else (
        jf.stop_gradient(xs, frozen=frozen))
    return jax.lax.scan(f, init, masked, **kw)


def _loss(scan_fn, frozen, path="layers", f=_layer, **kw):
    def loss(params, x):
        h, ys = scan_fn(f, x, params, frozen=frozen, path=path, **kw)
        return (h ** 2).sum() + jnp.sin(ys).sum()
    return loss


def _head_loss(frozen, **kw):
    """A trainable head after the stack: with every layer frozen the step is not empty."""
    def loss(params, head, x):
        h, _ = jf.scan(_layer, x, params, frozen=frozen, path="layers", **kw)
        return ((h @ head) ** 2).sum()
    return loss


def _flops(fn, *args):
    return hlo_matmul_flops(jax.jit(fn).lower(*args).compile().as_text())


def _ideal(n, frozen_layers, *, input_needs_grad=False, dense=DENSE):
    """Forward of all layers + input and weight gradients of the trainable layers +
    input gradients of the frozen layers above the first trainable one (in a loop the
    first trainable layer's input gradient is computed too: one body serves the run)."""
    trainable = [i for i in range(n) if i not in set(frozen_layers)]
    if not trainable and not input_needs_grad:
        return n * dense
    first = 0 if input_needs_grad else min(trainable)
    above = [i for i in range(first, n) if i not in trainable]
    return dense * (n + 2 * len(trainable) + len(above))


# --------------------------------------------------------------------------
# Values and gradients equal the masked lax.scan.


@pytest.mark.parametrize("frozen_layers, jit", [
    ([0, 1, 4, 5], False), ([0, 1, 4, 5], True), ([2, 3], True), ([], False),
    ([0, 1, 2, 3, 4, 5], True)])
def test_values_and_gradients_equal_the_masked_scan(frozen_layers, jit):
    params, x = _stack(6), _x()
    sel = jf.layers("layers/**", frozen_layers, strict=True) if frozen_layers else jf.nothing
    vg = [jax.value_and_grad(_loss(fn, sel), argnums=(0, 1)) for fn in (jf.scan, _masked_scan)]
    if jit:
        vg = [jax.jit(f) for f in vg]
    (v1, (gp1, gx1)), (v2, (gp2, gx2)) = (f(params, x) for f in vg)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves((gp1, gx1)), jax.tree.leaves((gp2, gx2)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for i in frozen_layers:  # frozen layers: zero gradients
        assert not gp1["w"][i].any() and not gp1["b"][i].any()


def test_without_path_whole_leaves_and_element_masks():
    params, x = _stack(4), _x()
    for sel in [jf.paths("b"), jf.elements("w", np.s_[:, :, 0]),
                jf.layers("w", [1, 2]) | jf.elements("b", np.s_[3, :5]), jf.everything]:
        g1 = jax.jit(jax.grad(_loss(jf.scan, sel, path=None)))(params, x)
        g2 = jax.jit(jax.grad(_loss(_masked_scan, sel, path=None)))(params, x)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)


def _mask_arrays(sel, params):
    return jax.tree.map(lambda m, p: np.broadcast_to(m, p.shape), sel(params), params)


def test_frozen_elements_get_zero_gradient_and_trainable_ones_do_not():
    params, x = _stack(4), _x()
    sel = jf.layers("w", [0, 3]) | jf.elements("b", np.s_[1, :5])
    g = jax.grad(_loss(jf.scan, sel, path=None))(params, x)
    masks = _mask_arrays(sel, params)
    for name in ("w", "b"):
        assert not np.asarray(g[name])[masks[name]].any()
        assert np.asarray(g[name])[~masks[name]].all()


@pytest.mark.parametrize("reverse", [False, True])
def test_reverse_and_ys_in_layer_order(reverse):
    params, x = _stack(5), _x()
    sel = jf.layers("layers/**", [1, 2])
    h1, ys1 = jf.scan(_layer, x, params, frozen=sel, path="layers", reverse=reverse)
    h2, ys2 = jax.lax.scan(_layer, x, params, reverse=reverse)
    np.testing.assert_allclose(h1, h2, rtol=1e-5)
    np.testing.assert_allclose(ys1, ys2, rtol=1e-5)
    g1 = jax.jit(jax.grad(_loss(jf.scan, sel, reverse=reverse)))(params, x)
    g2 = jax.jit(jax.grad(_loss(_masked_scan, sel, reverse=reverse)))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)


def test_ys_none_extra_xs_and_length():
    params, x = _stack(3), _x()
    steps = jnp.arange(3.0)

    def f(h, inp):
        p, t = inp
        return jnp.tanh(h @ p["w"]) + t, None

    out = jf.scan(f, x, (params, steps), 3, frozen=jf.layers("0/**", [0]))
    ref = jax.lax.scan(f, x, (params, steps))
    assert out[1] is None
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-6)
    # xs=None with nothing frozen is plain lax.scan
    c, ys = jf.scan(lambda c, _: (c + 1, c), 0, None, 4, frozen=jf.nothing)
    assert int(c) == 4 and ys.tolist() == [0, 1, 2, 3]


def test_a_whole_model_selector_as_its_mask_of_the_stack():
    model = {"embed": jnp.ones((D, D)), "layers": _stack(4)}
    sel = jf.paths("embed") | jf.layers("layers/**", [0, 1])
    x = _x()
    g1 = jax.grad(_loss(jf.scan, sel(model)["layers"], path=None))(model["layers"], x)
    g2 = jax.grad(_loss(_masked_scan, jf.layers("**", [0, 1]), path=None))(model["layers"], x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)
    assert not g1["w"][:2].any() and g1["w"][2:].any()


def test_nothing_frozen_is_the_plain_scan_program():
    params, x = _stack(4), _x()
    a = jax.jit(_loss(jf.scan, jf.nothing)).lower(params, x).as_text()
    b = jax.jit(_loss(_masked_scan, jf.nothing)).lower(params, x).as_text()
    assert a == b


@st.composite
def _cases(draw):
    n = draw(st.integers(1, 6))
    frozen_layers = draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))
    extra = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    element = draw(st.booleans())
    reverse = draw(st.booleans())
    jit = draw(st.booleans())
    return n, sorted(frozen_layers), extra, element, reverse, jit


@settings(max_examples=12, deadline=None)
@given(_cases())
def test_property_matches_masked_scan(case):
    n, frozen_layers, extra, element, reverse, jit = case
    d = 4
    rng = np.random.default_rng(n + len(frozen_layers))
    params = {"w": jnp.asarray(rng.normal(size=(n, d, d)) / 2, jnp.float32),
              "e": jnp.asarray(rng.normal(size=(n, *extra, d)), jnp.float32)}
    sel = jf.layers("net/**", frozen_layers, strict=False)
    if element:
        sel = sel | jf.elements("net/e", (..., 0))

    def f(h, p):
        h = jnp.tanh(h @ p["w"] + p["e"].reshape(-1, d).sum(0))
        return h, h.sum() * p["w"][0, 0]

    def loss(scan_fn, params, x):
        h, ys = scan_fn(f, x, params, frozen=sel, path="net", reverse=reverse)
        return (h ** 2).sum() + (ys ** 2).sum(), (h, ys)

    x = jnp.asarray(rng.normal(size=(2, d)), jnp.float32)
    outs = []
    for scan_fn in (jf.scan, _masked_scan):
        vg = jax.value_and_grad(lambda p, x, s=scan_fn: loss(s, p, x), argnums=(0, 1),
                                has_aux=True)
        outs.append((jax.jit(vg) if jit else vg)(params, x))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), *outs)
    (_, _), (gp, _) = outs[0]
    for i in frozen_layers:
        assert not gp["w"][i].any() and not gp["e"][i].any()


# --------------------------------------------------------------------------
# Compute: the analytic ideal.


@pytest.mark.parametrize("n, frozen_layers", [
    (8, range(6)),            # bottom 6 of 8
    (12, [0, 1, 2, 3, 8, 9, 10, 11]),  # non-contiguous
    (8, [2, 3, 4]),           # a frozen run in the middle
])
def test_scanned_flops_are_the_ideal(n, frozen_layers):
    params, x = _stack(n), _x()
    sel = jf.layers("layers/**", list(frozen_layers))
    got = _flops(jax.grad(_loss(jf.scan, sel)), params, x)
    masked = _flops(jax.grad(_loss(_masked_scan, sel)), params, x)
    ideal = _ideal(n, list(frozen_layers))
    assert abs(got - ideal) <= 0.01 * ideal, (got, ideal, masked)
    if len(frozen_layers) < n:
        assert masked >= DENSE * 3 * n  # masking computes every weight gradient


def test_frozen_prefix_has_no_backward_pass():
    params, x = _stack(8), _x()
    sel = jf.layers("layers/**", range(5))
    head = jnp.ones((D, D))
    # every layer frozen: forward of the stack, and the head's forward and weight gradient
    frozen_all = _flops(jax.grad(_head_loss(jf.layers("layers/**", range(8))), argnums=1),
                        params, head, x)
    assert frozen_all == 8 * DENSE + 2 * DENSE
    # bottom 5 frozen: their 5 forward matmuls and nothing else
    assert _flops(jax.grad(_loss(jf.scan, sel)), params, x) == _ideal(8, range(5))
    # gradient wrt the input (something below needs it): input gradients come back
    both = _flops(jax.grad(_loss(jf.scan, sel), argnums=(0, 1)), params, x)
    assert both == _ideal(8, range(5), input_needs_grad=True)


def test_unrolled_flops_by_cost_analysis():
    # cost_analysis counts a loop body once; fully unrolled programs it counts right.
    d = 128  # wide enough that element-wise work is small next to the matmuls
    params, x = _stack(8, d=d), _x(d=d)
    sel = jf.layers("layers/**", range(6))

    def flops(scan_fn):
        fn = jax.grad(_loss(scan_fn, sel, unroll=True))
        return jax.jit(fn).lower(params, x).compile().cost_analysis()["flops"]

    got, masked = flops(jf.scan), flops(_masked_scan)
    # unrolled, the first trainable layer's input gradient is dropped too
    dense = 2 * B * d * d
    ideal = _ideal(8, range(6), dense=dense) - dense
    assert ideal <= got <= 1.02 * ideal  # matmuls plus element-wise work
    assert masked > 1.9 * ideal


# --------------------------------------------------------------------------
# Errors name the path.


def test_errors_name_the_path():
    params, x = _stack(4), _x()
    with pytest.raises(ValueError, match=r"layrs.*mask of the stack"):
        jf.scan(_layer, x, params, frozen=jf.layers("layrs/**", [0]), path="layers")
    with pytest.raises(ValueError, match=r"xs=None.*'dec/layers'"):
        jf.scan(lambda c, _: (c, None), x, None, 3, frozen=jf.layers("dec/layers/**", [0]),
                path="dec/layers")
    bad = {"w": params["w"], "b": params["b"][:3]}
    with pytest.raises(ValueError, match=r"'layers/w' has 4 layers.*'layers/b' has 3"):
        jf.scan(_layer, x, bad, frozen=jf.layers("layers/**", [0], strict=False),
                path="layers")
    with pytest.raises(ValueError, match=r"'layers/b'.*4 layers.*'length' has 5"):
        jf.scan(_layer, x, params, 5, frozen=jf.nothing, path="layers")
    with pytest.raises(ValueError, match=r"'layers/w'.*scalar"):
        jf.scan(_layer, x, {"w": jnp.ones(())}, frozen=jf.nothing, path="layers")
    with pytest.raises(ValueError, match=r"axis 1 of the leaf at path 'layers/w'"):
        jf.scan(_layer, x, params, frozen=jf.layers("layers/w", [0], axis=1), path="layers")
    with pytest.raises(ValueError, match=r"'layers/b'.*7"):  # layer index beyond the stack
        jf.scan(_layer, x, params, frozen=jf.layers("layers/**", [7]), path="layers")
