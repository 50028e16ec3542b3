"""What the compiled step costs: FLOPs (jf.compiled_flops), and optimizer-state bytes.

FLOPs are deterministic for a given program, so ratios are asserted (within
1 %), never wall-clock times (those live in benchmarks/).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jfreeze as jf

D, T, B = 32, 8, 4  # width, tokens, batch


def _dense(key, a, b):
    return {"kernel": jax.random.normal(key, (a, b)) / np.sqrt(a), "bias": jnp.zeros(b)}


def _block(key):
    k = jax.random.split(key, 4)
    return {
        "attn": {"qkv": _dense(k[0], D, 3 * D), "out": _dense(k[1], D, D)},
        "mlp": {"fc1": _dense(k[2], D, 2 * D), "fc2": _dense(k[3], 2 * D, D)},
    }


def _apply_dense(p, x):
    return x @ p["kernel"] + p["bias"]


def _apply_block(p, h):
    q, k, v = jnp.split(_apply_dense(p["attn"]["qkv"], h), 3, axis=-1)
    a = jax.nn.softmax(q @ k.swapaxes(-1, -2) / np.sqrt(D), axis=-1)
    h = h + _apply_dense(p["attn"]["out"], a @ v)
    return h + _apply_dense(p["mlp"]["fc2"], jax.nn.gelu(_apply_dense(p["mlp"]["fc1"], h)))


def make_params():
    ks = jax.random.split(jax.random.key(0), 3)
    return {
        "probe_in": _dense(ks[0], 4, D),
        "backbone": [_block(ks[1])],
        "head": _dense(ks[2], D, 1),
    }


def loss(params, x, y):
    h = _apply_dense(params["probe_in"], x)
    for blk in params["backbone"]:
        h = _apply_block(blk, h)
    return jnp.mean((_apply_dense(params["head"], h.mean(1))[:, 0] - y) ** 2)


def flops(fn, *args) -> float:
    # XLA's cost analysis, loop bodies by trip count (these steps have no loops: the
    # blocks are a Python loop, unrolled; the figures are XLA's own)
    return jf.compiled_flops(fn, *args)


def freeze_step(tx, sel, norm, params, state, x, y):
    """The everyday step: grad of everything, jf.freeze drops the frozen part."""
    value, grads = jax.value_and_grad(loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    out = (optax.apply_updates(params, updates), state, value)
    if norm == "trainable":  # the cheap way to log: norm of the trainable split
        out += (optax.tree.norm(jf.split(grads, frozen=sel)[0]),)
    elif norm == "all":  # the trap: needs every frozen weight gradient
        out += (optax.tree.norm(grads),)
    return out


def split_step(tx, trainable, frozen, state, x, y):
    """The ideal: differentiate only the trainable leaves."""
    value, grads = jax.value_and_grad(lambda t: loss(jf.merge(t, frozen), x, y))(trainable)
    updates, state = tx.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state, value


# situation 1: trainable probe -> frozen transformer block -> trainable head
# (gradients flow through the frozen block); situation 2: frozen prefix, only
# the head trains.
CASES = {
    "probe": jf.paths("backbone/**"),
    "frozen_prefix": jf.paths("probe_in/**", "backbone/**"),
}


@pytest.fixture(scope="module", params=list(CASES))
def costs(request):
    sel = CASES[request.param]
    params = make_params()
    x, y = jnp.ones((B, T, 4)), jnp.ones(B)
    tx = jf.freeze(optax.adamw(1e-3), frozen=sel)
    state = tx.init(params)
    trainable, frozen = jf.split(params, frozen=sel)
    ideal_tx = optax.adamw(1e-3)
    out = {"case": request.param}
    # (XLA compiles are slow on CPU: the cheap-norm variant only for the probe)
    norms = (None, "trainable", "all") if request.param == "probe" else (None, "all")
    for norm in norms:
        step = functools.partial(freeze_step, tx, sel, norm)
        out[("freeze", norm)] = flops(step, params, state, x, y)
    step = functools.partial(split_step, ideal_tx)
    out["split"] = flops(step, trainable, frozen, ideal_tx.init(trainable), x, y)
    return out


def test_freeze_step_flops_equal_differentiating_trainable_only(costs):
    ratio = costs[("freeze", None)] / costs["split"]
    assert abs(ratio - 1) <= 0.01, ratio


def test_cheap_trainable_grad_norm_keeps_flops(costs):
    if costs["case"] != "probe":
        pytest.skip("measured on the probe model only")
    # the norm of the trainable split adds a few hundred FLOPs: still within 1 %
    # of the step that differentiates only the trainable leaves
    ratio = costs[("freeze", "trainable")] / costs["split"]
    assert abs(ratio - 1) <= 0.01, ratio


def test_norm_of_all_grads_brings_frozen_compute_back(costs):
    # The trap jf.split avoids: the global norm of *all* gradients needs every
    # frozen weight gradient (measured: 1.5x with a probe, 3x for a frozen prefix).
    ratio = costs[("freeze", "all")] / costs[("freeze", None)]
    assert ratio > (1.3 if costs["case"] == "probe" else 2.0), ratio


# --------------------------------------------------------------------------
# Optimizer state bytes.


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("how", ["freeze", "partition"])
def test_adam_state_is_two_trainable_copies_plus_counter(how):
    params = make_params()
    sel = jf.paths("backbone/**")
    if how == "freeze":
        tx = jf.freeze(optax.adam(1e-3), frozen=sel)
    else:
        tx = jf.partition({"train": optax.adam(1e-3), "frozen": None},
                          jf.labels({"frozen": sel}, default="train"))
    trainable, _ = jf.split(params, frozen=sel)
    trainable_bytes = _nbytes(trainable)
    counter_bytes = np.dtype(np.int32).itemsize  # adam's step count
    expected = 2 * trainable_bytes + counter_bytes

    state = tx.init(params)
    assert _nbytes(state) == expected
    assert jf.summary(params, frozen=sel, opt_state=state).opt_state_bytes == expected
    # the same from shapes alone, without allocating anything
    abstract = jax.eval_shape(tx.init, params)
    assert jf.summary(params, frozen=sel, opt_state=abstract).opt_state_bytes == expected
    # nothing at all is kept for the frozen leaves
    state_paths = [jf.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert not [p for p in state_paths if "backbone" in p]
    assert _nbytes(optax.adam(1e-3).init(params)) > 4 * trainable_bytes  # without freezing
