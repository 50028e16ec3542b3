"""Checkpoints under a jax.sharding.Mesh of 4 host devices (a subprocess: the device count
is fixed when JAX starts): every leaf is read with the sharding of its template, trainable
params, optimizer state and collections alike, bit for bit; a template without a sharding
(``jax.eval_shape`` outside jit) is read onto the first device, as the docstring says."""

from __future__ import annotations

import textwrap

import pytest
from strategies import run_on_host_devices

pytest.importorskip("orbax.checkpoint")

SCRIPT = textwrap.dedent(
    r"""
    import sys, jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jfreeze as jf

    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))
    rows, cols = NamedSharding(mesh, P("x", None)), NamedSharding(mesh, P(None, "y"))
    rng = np.random.default_rng(0)
    params = {k: jax.device_put(jnp.asarray(rng.standard_normal((4, 4)), jnp.float32), rows)
              for k in ("backbone", "head")}
    frozen = jf.paths("backbone")
    tx = jf.freeze(optax.adam(0.1), frozen=frozen)
    state = tx.init(params)
    updates, state = tx.update(params, state, params)
    params = jf.apply_updates(params, updates, frozen=frozen)
    ema = {"head": jax.device_put(params["head"] * 2, rows)}
    d = sys.argv[1]
    jf.save_trainable(d, params, state, frozen=frozen, collections={"ema": ema})

    sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    tmpl = {"backbone": params["backbone"], "head": sds(params["head"], cols)}
    state_tmpl = jax.tree.map(lambda x: sds(x, cols if x.ndim == 2 else None), state)
    p, s, c = jf.restore_trainable(d, tmpl, state_tmpl, frozen=frozen,
                                   collections={"ema": {"head": sds(ema["head"], cols)}})
    for got, want in [(p["head"], params["head"]), (c["ema"]["head"], ema["head"])] + list(
            zip(jax.tree.leaves(s), jax.tree.leaves(state))):
        np.testing.assert_array_equal(np.atleast_1d(np.asarray(got)).view(np.uint8),
                                      np.atleast_1d(np.asarray(want)).view(np.uint8))
        if got.ndim == 2:
            assert got.sharding.is_equivalent_to(cols, 2), got.sharding
    assert p["backbone"] is params["backbone"]
    # jax.eval_shape outside jit gives no sharding: read onto the first device.
    _, s, _ = jf.restore_trainable(d, tmpl, jax.eval_shape(tx.init, params), frozen=frozen,
                                   collections={"ema": ema})
    mu = jf.inner_state(s)[0].mu["head"]
    assert mu.sharding.device_set == {jax.devices()[0]}, mu.sharding
    print("CHECKPOINT-SHARDING-OK")
    """
)


def test_checkpoints_read_every_leaf_with_its_templates_sharding(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(SCRIPT)
    run_on_host_devices(script, 4, "CHECKPOINT-SHARDING-OK", str(tmp_path / "ckpt"))
