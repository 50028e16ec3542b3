"""jf.check_frozen_compute on scanned stacks frozen by whole layers (jf.layers): a scan
over the whole stack computes the frozen layers' weight gradients (reported, with the
fix), one scan per run of frozen / trainable layers does not (ok)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jfreeze as jf
from jfreeze import _autodiff_hook

L, D, B = 8, 32, 16


def _params():
    rng = np.random.default_rng(0)
    return {"emb": jnp.asarray(rng.standard_normal((D, D), np.float32) / 6),
            "layers": {"w": jnp.asarray(rng.standard_normal((L, D, D), np.float32) / 6),
                       "b": jnp.zeros((L, D))},
            "head": jnp.ones((D, 1))}


X = jnp.ones((B, D))


def _layer(h, p):
    return jnp.tanh(h @ p["w"] + p["b"]), h.sum()


def _hand_split(frozen_layers):
    """What jf.scan does, written out: one lax.scan per run, frozen runs stopped."""
    sel = np.isin(np.arange(L), frozen_layers)

    def scan(stack, h):
        ys = []
        for start, group in itertools.groupby(range(L), key=lambda i: sel[i]):
            idx = list(group)
            part = jax.tree.map(lambda a, i=idx: a[i[0]:i[-1] + 1], stack)
            part = jax.lax.stop_gradient(part) if start else part
            h, y = jax.lax.scan(_layer, h, part)
            ys.append(y)
        return h, jnp.concatenate(ys)

    return scan


def _step(scan, frozen, *, embed=False):
    tx = jf.freeze(optax.adam(1e-3), frozen=frozen)

    def loss(p):
        h = jnp.tanh(X @ p["emb"]) if embed else X
        h, ys = scan(p["layers"], h)
        return (h @ p["head"]).mean() + 1e-3 * ys.mean()

    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return step, tx


def _check(scan, frozen_layers, *, embed=False, fixed=()):
    frozen = jf.layers("layers/**", frozen_layers)
    if not embed:
        frozen = frozen | jf.paths("emb")
    step, tx = _step(scan, frozen, embed=embed)
    params = _params()
    return jf.check_frozen_compute(step, params, tx.init(params), frozen=frozen)


def _masked(stack, h):
    return jax.lax.scan(_layer, h, stack)


def _jf_scan(frozen_layers):
    if not hasattr(jf, "scan"):
        pytest.skip("jf.scan is not there yet")
    return lambda stack, h: jf.scan(_layer, h, stack, frozen=jf.layers(
        "layers/**", frozen_layers), path="layers")


CASES = {  # frozen layers, gradients needed below the stack
    "frozen_prefix": (list(range(6)), False),
    "middle": ([2, 3, 4, 5], True),
    "non_contiguous": ([0, 1, 4, 5], True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_scan_over_the_whole_stack_is_reported_with_layers_cost_and_fix(case):
    layers, embed = CASES[case]
    report = _check(_masked, layers, embed=embed)
    assert report.ok is False, report
    runs = {"frozen_prefix": "0-5", "middle": "2-5", "non_contiguous": "0-1, 4-5"}[case]
    assert report.frozen_layers == (("layers/b", tuple(layers)), ("layers/w", tuple(layers)))
    for text in ("'layers/w'", "'layers/b'", f"frozen layers {runs} of 8",
                 "jf.scan(f, init, xs, frozen=..., path=...)", "jf.flax.scan("):
        assert text in report.message, (text, report.message)
    # the frozen layers' weight gradients are (nearly) all of the excess
    assert 0 < report.frozen_layer_flops <= report.flops - report.ideal_flops
    assert report.frozen_layer_flops == pytest.approx(report.flops - report.ideal_flops, rel=0.05)
    assert report.leaking_outputs == ()  # not the optimizer or logging: the stack


@pytest.mark.parametrize("how", ["hand_split", "jf.scan"])
@pytest.mark.parametrize("case", list(CASES))
def test_one_scan_per_run_is_ok(case, how):
    layers, embed = CASES[case]
    scan = _hand_split(layers) if how == "hand_split" else _jf_scan(layers)
    report = _check(scan, layers, embed=embed)
    assert report.ok is True, report
    assert report.frozen_layers == () and report.frozen_layer_flops == 0.0
    assert report.ratio == pytest.approx(1.0, abs=0.01)
    masked = _check(_masked, layers, embed=embed)
    assert report.flops == pytest.approx(masked.ideal_flops, rel=0.01)  # the ideal, reached


def test_a_frozen_prefix_costs_less_than_a_middle_run():
    # frozen at the input, nothing below needs gradients: no backward pass at all there
    prefix = _check(_hand_split([0, 1, 2, 3]), [0, 1, 2, 3])
    middle = _check(_hand_split([2, 3, 4, 5]), [2, 3, 4, 5], embed=True)
    assert prefix.ok and middle.ok
    assert prefix.flops < middle.flops


@pytest.mark.parametrize("loop", ["fori_loop", "lax.map"])
def test_a_stack_reaching_a_loop_the_check_cannot_split_is_not_verified(loop):
    def scan(stack, h):
        if loop == "fori_loop":
            body = lambda i, h: _layer(h, jax.tree.map(lambda a: a[i], stack))[0]
            return jax.lax.fori_loop(0, L, body, h), jnp.zeros(L)
        return h + jax.lax.map(lambda p: _layer(h, p)[0], stack).mean(0), jnp.zeros(L)

    report = _check(scan, [0, 1])
    assert report.ok is None, report
    assert "'layers/w'" in report.message and "could not split" in report.message
    assert "jf.scan(" in report.message


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("layers", [[0, 1, 2], [1, 2, 5, 6], [7]])
def test_the_reference_split_computes_what_the_scan_computes(layers, reverse):
    # The reference must run the same computation: values, carry, ys in layer order.
    stack = _params()["layers"]
    sel = np.isin(np.arange(L), layers)
    f = lambda st, h: jax.lax.scan(_layer, h, st, reverse=reverse)
    want = f(stack, X)
    split: dict = {}
    stacks = {id(stack["w"]): ("layers/w", sel), id(stack["b"]): ("layers/b", sel)}
    original = jax.lax.scan
    with _autodiff_hook.scans_split(stacks, split):
        assert jax.lax.scan is not original
        got = f(stack, X)
    assert jax.lax.scan is original  # restored
    assert set(split) == {"layers/w", "layers/b"}
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_loops_count_by_trip_count_in_the_check():
    # A whole frozen stack whose gradient norm is logged: the leak sits in the scan's
    # backward loop; counted once per layer, the ratio is that of the unrolled step.
    frozen = jf.paths("layers/**", "emb")
    tx = jf.freeze(optax.adam(1e-3), frozen=frozen)
    ratios = []
    for unroll in (1, True):
        def loss(p, unroll=unroll):
            h, _ = jax.lax.scan(_layer, X, p["layers"], unroll=unroll)
            return (h @ p["head"]).mean()

        def step(p, s, loss=loss):
            g = jax.grad(loss)(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, optax.tree.norm(g)

        params = _params()
        r = jf.check_frozen_compute(step, params, tx.init(params), frozen=frozen)
        assert r.ok is False and r.leaking_outputs == ("2",), r
        ratios.append(r.ratio)
    assert ratios[0] == pytest.approx(ratios[1], rel=0.05)


def test_a_loop_with_an_unknown_trip_count_is_not_verified():
    frozen = jf.paths("emb")

    def step(p):
        g = jax.grad(lambda p: (X @ p["emb"] @ p["head"]).mean())(p)
        h = jax.lax.while_loop(lambda h: h.sum() < 1e3, lambda h: h @ p["emb"] + 1.0, X)
        return p["head"] - g["head"], h

    report = jf.check_frozen_compute(step, _params(), frozen=frozen)
    assert report.ok is None, report
    assert "trip count" in report.message and "while" in report.message


def test_linen_nn_scan_over_the_whole_stack_is_reported():
    nn = pytest.importorskip("flax.linen")

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return jnp.tanh(nn.Dense(16)(h)), None

    def model(scan):
        class Model(nn.Module):
            @nn.compact
            def __call__(self, x):
                h, _ = scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                            length=6)(name="layers")(x, None)
                return nn.Dense(1, name="head")(h)

        return Model()

    x, frozen = jnp.ones((8, 16)), jf.layers("layers/**", [0, 1, 2, 3])
    tx = jf.freeze(optax.adam(1e-3), frozen=frozen)

    def check(scan):
        m = model(scan)
        params = m.init(jax.random.key(0), x)["params"]

        def step(p, s):
            g = jax.grad(lambda p: m.apply({"params": p}, x).mean())(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        return jf.check_frozen_compute(step, params, tx.init(params), frozen=frozen)

    report = check(nn.scan)
    assert report.ok is False, report
    assert "'layers/Dense_0/kernel' (frozen layers 0-3 of 6)" in report.message
    assert "jf.flax.scan(target, frozen=..." in report.message
    if hasattr(jf.flax, "scan"):  # the fix, once it is there: same parameter tree
        fixed = check(lambda target, **kw: jf.flax.scan(target, frozen=frozen, **kw))
        assert fixed.ok is True, fixed


def test_a_stack_on_axis_1_moved_to_axis_0_and_scanned_is_not_verified():
    # MaxText keeps its stack on axis 1: scanning it means moving the axis first, which
    # the check cannot split (it would say ok=True blind otherwise).
    def scan(stack, h):
        moved = {"w": jnp.moveaxis(stack["w"], 1, 0), "b": stack["b"]}
        return jax.lax.scan(_layer, h, moved)

    frozen = jf.layers("layers/w", [0, 1], axis=1) | jf.layers("layers/b", [0, 1])
    tx = jf.freeze(optax.adam(1e-3), frozen=frozen)
    params = _params()
    params["layers"]["w"] = jnp.moveaxis(params["layers"]["w"], 0, 1)

    def step(p, s):
        g = jax.grad(lambda p: scan(p["layers"], X)[0].mean())(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    report = jf.check_frozen_compute(step, params, tx.init(params), frozen=frozen)
    assert report.ok is not True, report
    assert "'layers/w'" in report.message and "could not split" in report.message


def test_a_masked_stack_and_a_logged_norm_are_both_reported():
    frozen = jf.layers("layers/**", [0, 1, 2, 3]) | jf.paths("emb")
    tx = jf.freeze(optax.adam(1e-3), frozen=frozen)

    def step(p, s):
        # emb, frozen whole, needs its weight gradient only for the logged norm
        h = lambda p: _masked(p["layers"], jnp.tanh(X @ p["emb"]))[0]
        g = jax.grad(lambda p: (h(p) @ p["head"]).mean())(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, optax.tree.norm(g)

    params = _params()
    report = jf.check_frozen_compute(step, params, tx.init(params), frozen=frozen)
    assert report.ok is False, report
    assert report.frozen_layers and report.frozen_layer_flops > 0
    assert report.frozen_layer_flops < report.flops - report.ideal_flops
    assert report.leaking_outputs == ("2",)
    assert "jf.scan(" in report.message and "optax.tree.norm" in report.message
