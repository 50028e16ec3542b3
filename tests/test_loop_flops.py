"""jf.compiled_flops counts loop bodies by their trip counts (XLA's cost analysis counts
them once), and its parser (jfreeze/_hlo.py) counts as XLA does on loop-free programs."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jfreeze as jf
from jfreeze import _hlo

L, B, D = 8, 4, 16  # layers, batch, width


def _stack():
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.standard_normal((L, D, D), np.float32) / 4),
            "b": jnp.zeros((L, D))}


X = jnp.ones((B, D))


def _layer(h, p):
    return jax.nn.gelu(h @ p["w"] + p["b"]), None


def _step(unroll):
    def loss(stack, x):
        return jnp.tanh(jax.lax.scan(_layer, x, stack, unroll=unroll)[0]).mean()

    def step(stack, x):  # dx too: else the unrolled step drops layer 0's dx, a scan cannot
        g, dx = jax.grad(loss, argnums=(0, 1))(stack, x)
        return jax.tree.map(lambda p, g: p - 0.1 * g, stack, g), dx

    return step


def _xla(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_scanned_and_unrolled_steps_count_the_same():
    scanned, unrolled = _step(1), _step(True)
    mm = [jf.compiled_flops(f, _stack(), X, matmul_only=True) for f in (scanned, unrolled)]
    assert mm[0] == mm[1] == L * 3 * 2 * B * D * D  # forward, dx, dw per layer
    total = [jf.compiled_flops(f, _stack(), X) for f in (scanned, unrolled)]
    assert total[0] == pytest.approx(total[1], rel=0.02)
    # what XLA alone says: the scanned body once
    assert _xla(scanned, _stack(), X) < 0.3 * total[0]
    assert _xla(unrolled, _stack(), X) == total[1]  # no loop left: XLA's own figure


def _nested(unroll):
    def f(h, ws):  # ws: (3, 4, D, D): 3 outer steps of 4 inner layers
        def inner(h, w4):
            return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, w4, unroll=unroll)[0]

        return jax.lax.scan(lambda h, w4: (inner(h, w4), None), h, ws, unroll=unroll)[0]

    return f


def test_nested_scans_multiply_trip_counts():
    ws = jnp.ones((3, 4, D, D))
    for unroll in (1, True):
        assert jf.compiled_flops(_nested(unroll), X, ws, matmul_only=True) == 3 * 4 * 2 * B * D * D
    assert jf.compiled_flops(_nested(1), X, ws) == pytest.approx(
        jf.compiled_flops(_nested(True), X, ws), rel=0.02)


def test_fori_loop():
    w = jnp.ones((D, D))
    f = lambda h: jax.lax.fori_loop(0, 5, lambda i, h: jnp.tanh(h @ w), h)
    assert jf.compiled_flops(f, X, matmul_only=True) == 5 * 2 * B * D * D
    assert jf.compiled_flops(f, X) >= 5 * 2 * B * D * D


def test_grad_of_a_scan_counts_forward_and_transposed_loops():
    def grad(unroll):  # d/dws and d/dx: 6 forward, 6 dx and 6 dw matmuls either way
        def loss(ws, x):
            return jax.lax.scan(lambda h, w: (jnp.sin(h @ w), None), x, ws, unroll=unroll)[0].sum()

        return jax.grad(loss, argnums=(0, 1))

    ws = jnp.ones((6, D, D))
    for unroll in (1, True):
        assert jf.compiled_flops(grad(unroll), ws, X, matmul_only=True) == 3 * 6 * 2 * B * D * D
    assert jf.compiled_flops(grad(1), ws, X) == pytest.approx(
        jf.compiled_flops(grad(True), ws, X), rel=0.02)


def test_cond_inside_a_scan_counts_the_costlier_branch_per_iteration():
    def body(h, w):  # XLA's rule for a conditional: its most expensive branch
        return jax.lax.cond(h.sum() > 0, lambda h: h @ w @ w, lambda h: h @ w, h), None

    ws = jnp.ones((4, D, D))
    f = lambda h, ws: jax.lax.scan(body, h, ws)[0]
    assert jf.compiled_flops(f, X, ws, matmul_only=True) == 4 * 2 * 2 * B * D * D


def test_a_data_dependent_while_loop_warns_and_counts_once():
    w = jnp.ones((D, D)) / D
    f = lambda h: jax.lax.while_loop(lambda h: h.sum() < 1e3, lambda h: h @ w + 1, h)
    with pytest.warns(RuntimeWarning, match=r"trip count of the loop\(s\) .*while.*lower bound"):
        flops = jf.compiled_flops(f, X)
    assert flops == _xla(f, X)  # counted once: XLA's own figure


def test_a_loop_free_program_is_xlas_own_figure():
    f = lambda a, b: jnp.tanh(a @ b).sum()
    a, b = jnp.ones((4, 8)), jnp.ones((8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert jf.compiled_flops(f, a, b) == _xla(f, a, b)
    assert jf.compiled_flops(f, a, b, matmul_only=True) == 2 * 4 * 8 * 2


def _block(p, h):
    q = h @ p["q"]
    a = jax.nn.softmax(q @ h.swapaxes(-1, -2) / 4.0, axis=-1)
    h = h + a @ h
    mu = h.mean(-1, keepdims=True)
    h = (h - mu) * jax.lax.rsqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    return h + jax.nn.gelu(h @ p["w1"]) @ p["w2"]


def _adam_step(p, x):
    tx = optax.adam(1e-3)
    g = jax.grad(lambda p: jnp.tanh(_block(p, x)).mean())(p)
    return tx.update(g, tx.init(p), p)


P = {"q": jnp.ones((D, D)), "w1": jnp.ones((D, 2 * D)), "w2": jnp.ones((2 * D, D))}
LOOP_FREE = {
    "transformer block + adam": (_adam_step, (P, jnp.ones((2, 8, D)))),
    "where, max": (lambda a: jnp.where(a > 0, a, -a).max(), (jnp.ones((7, 9)),)),
    "integers": (lambda a: (a * 3 + 1) // 2, (jnp.ones((7, 9), jnp.int32),)),
    "cumsum": (lambda a: jnp.cumsum(a, 0).sum(), (jnp.ones((16, 9)),)),
    "sort": (lambda a: jnp.sort(a, 0), (jnp.ones((16, 9)),)),
    "scatter-add": (lambda a: a.at[jnp.array([1, 2, 2])].add(1.0), (jnp.ones((16, 9)),)),
    "cond": (lambda a: jax.lax.cond(a.sum() > 0, lambda a: a @ a, lambda a: a + 1, a),
             (jnp.ones((8, 8)),)),
    "bf16 matmul": (lambda a: (a.astype(jnp.bfloat16) @ a.astype(jnp.bfloat16)).sum(),
                    (jnp.ones((8, 8)),)),
}


@pytest.mark.parametrize("name", list(LOOP_FREE))
def test_the_parser_counts_loop_free_programs_as_xla_does(name):
    # What makes the loop bodies' element-wise work trustworthy: counted once, the
    # parser's figure is XLA's on these programs.
    fn, args = LOOP_FREE[name]
    text = jax.jit(fn).lower(*args).compile().as_text()
    assert _hlo.count(text).once_flops == _xla(fn, *args)


_TEXT = """HloModule m

%gemm (a: f32[4,8], b: f32[8,2]) -> f32[4,2] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %g = (f32[4,2]{1,0}, s8[0]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", \
backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":\
["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  ROOT %r = f32[4,2]{1,0} get-tuple-element(%g), index=0
}

%body (t: (f32[4,8], f32[8,2])) -> (f32[4,8], f32[8,2]) {
  %t = (f32[4,8]{1,0}, f32[8,2]{1,0}) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%t), index=0
  %y = f32[8,2]{1,0} get-tuple-element(%t), index=1
  %c = f32[4,2]{1,0} call(%x, %y), to_apply=%gemm
  %n = f32[4,8]{1,0} negate(%x)
  ROOT %o = (f32[4,8]{1,0}, f32[8,2]{1,0}) tuple(%n, %y)
}

%cond (t: (f32[4,8], f32[8,2])) -> pred[] {
  %t = (f32[4,8]{1,0}, f32[8,2]{1,0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

ENTRY %main (x: f32[4,8], y: f32[8,2]) -> (f32[4,8], f32[8,2]) {
  %x = f32[4,8]{1,0} parameter(0)
  %y = f32[8,2]{1,0} parameter(1)
  %t = (f32[4,8]{1,0}, f32[8,2]{1,0}) tuple(%x, %y)
  ROOT %w = (f32[4,8]{1,0}, f32[8,2]{1,0}) while(%t), condition=%cond, body=%body, \
backend_config={"known_trip_count":{"n":"3"}}
}
"""


def test_the_parser_reads_calls_gemm_custom_calls_and_trip_counts():
    # What GPU programs hold (cuBLAS GEMMs as custom calls) and a call by to_apply=.
    counted = _hlo.count(_TEXT)
    per_iteration = 2 * 4 * 8 * 2 + 4 * 8  # the GEMM, the negate
    assert counted.matmul_flops == 3 * 2 * 4 * 8 * 2
    assert counted.once_flops == per_iteration
    assert counted.extra_flops == 2 * per_iteration
    assert counted.unknown_trips == ()
    no_trip = _hlo.count(_TEXT.replace(', backend_config={"known_trip_count":{"n":"3"}}', ""))
    assert no_trip.extra_flops == 0 and no_trip.unknown_trips == ("w",)
