"""jf.vmap_models (with jf.models_mesh, jf.population_compiler_options): the population call.

Same values as a plain ``jax.vmap`` of the model, no frozen weight gradients in the compiled
step (matmul FLOPs counted loop by loop), less temporary memory when chunked, an all-reduce
and no all-gather over 8 host devices, and errors that name the path.
"""

from __future__ import annotations

import os
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    FLOAT_DTYPES,
    bits,
    property_settings,
    random_array,
    run_on_host_devices,
    skeletons,
    special_values,
)

import jfreeze as jf

K, B, D0, D, H, E = 8, 3, 5, 6, 7, 4


def apply(p, x, bias):
    """One frozen model (two layers, a nested params tree, two inputs, a tuple out)."""
    h = jnp.tanh(x @ p["layers"][0]["w"] + bias)
    return h @ p["layers"][1]["w"], h.mean(-1)


def _data(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    zoo = {"layers": [{"w": jax.random.normal(k[0], (K, D, H))},
                      {"w": jax.random.normal(k[1], (K, H, E))}]}
    probe = jax.random.normal(k[2], (D0, D)) / 3
    z = jax.random.normal(k[3], (K, B, D0))
    bias = jax.random.normal(k[4], (K, 1, H))
    return probe, zoo, z, bias


def _loss(run):
    def loss(probe, zoo, z, bias):
        out, mean = run(zoo, z @ probe, bias)
        return (out**2).mean() + mean.sum()
    return loss


@pytest.mark.parametrize("chunk,remat,jit", [
    (None, "dots_saveable", True), (None, None, False), (2, None, True),
    (4, "dots_saveable", False), (1, "nothing_saveable", True)])
def test_same_values_as_a_plain_vmap(chunk, remat, jit):
    probe, zoo, z, bias = _data(seed=0 if chunk is None else chunk)
    run = jf.vmap_models(apply, remat=remat, chunk=chunk)
    ref = jax.vmap(apply)
    maybe_jit = jax.jit if jit else (lambda f: f)
    got = maybe_jit(run)(zoo, z @ probe, bias)
    want = ref(zoo, z @ probe, bias)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    # Probe and input gradients match; the frozen models' gradients are zeros.
    grad = maybe_jit(jax.value_and_grad(_loss(run), argnums=(0, 1, 3)))
    (v, (gp, gzoo, gb)) = grad(probe, zoo, z, bias)
    (v0, (gp0, _, gb0)) = jax.jit(jax.value_and_grad(_loss(ref), argnums=(0, 1, 3)))(
        probe, zoo, z, bias)
    np.testing.assert_allclose(v, v0, rtol=1e-5)
    np.testing.assert_allclose(gp, gp0, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gb, gb0, rtol=1e-4, atol=1e-6)
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(gzoo))


def _matmul_flops(run, argnums, *args):
    step = jax.value_and_grad(_loss(run), argnums=argnums)
    return jf.compiled_flops(step, *args, matmul_only=True)


def test_no_frozen_weight_gradients_in_the_compiled_step():
    probe, zoo, z, bias = _data()
    probe_f = 2 * K * B * D0 * D  # the probe's matmul, forward (its weight gradient the same)
    model_f = 2 * K * B * (D * H + H * E)  # the frozen models' forward (input gradients: same)
    ideal = 2 * probe_f + 2 * model_f
    args = (probe, zoo, z, bias)
    # Differentiating the stacked models too: the call still computes no weight gradients.
    assert _matmul_flops(jf.vmap_models(apply), (0, 1), *args) == ideal
    assert _matmul_flops(jax.vmap(apply), (0,), *args) == ideal
    assert _matmul_flops(jax.vmap(apply), (0, 1), *args) == ideal + model_f  # weight grads
    # Chunked: a loop of K / 2 steps, each forward run again in the backward pass (but for
    # the last layer, whose output the loop keeps).
    chunked = _matmul_flops(jf.vmap_models(apply, chunk=2), (0, 1), *args)
    assert chunked == ideal + 2 * K * B * D * H

    def lax_map(p, x, b):  # the same loop, written with lax.map, differentiating the models
        return jax.lax.map(jax.checkpoint(lambda a: apply(*a)), (p, x, b), batch_size=2)
    assert _matmul_flops(lax_map, (0, 1), *args) == chunked + model_f  # + weight grads


def test_chunks_bound_temporary_memory():
    k = jax.random.PRNGKey(0)
    zoo = {"w": jax.random.normal(k, (16, 3, 16, 64)) / 8}
    x = jax.random.normal(k, (16, 8, 16))

    def deep(p, x):
        for w in p["w"]:
            x = x + jnp.tanh(x @ w) @ w.T
        return x

    def temp(chunk):
        run = jf.vmap_models(deep, chunk=chunk)
        step = jax.jit(jax.value_and_grad(lambda x: run(zoo, x).sum()))
        return step.lower(x).compile().memory_analysis().temp_size_in_bytes

    whole, quarter = temp(None), temp(4)
    assert quarter < whole / 2.5, (whole, quarter)


def test_compiler_options_and_mesh():
    no_ynn = {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert jf.population_compiler_options(backend="cpu") == no_ynn
    assert jf.population_compiler_options(backend="gpu") == {}
    assert jf.population_compiler_options(jf.models_mesh(K), backend="tpu") == {}
    # A device per core: each device runs its ops on one thread (here one device, so not).
    many = types.SimpleNamespace(size=len(os.sched_getaffinity(0)) + 1)
    assert jf.population_compiler_options(many, backend="cpu") == {
        **no_ynn, "xla_cpu_multi_thread_eigen": False}
    probe, zoo, z, bias = _data()
    step = jax.jit(_loss(jf.vmap_models(apply)),
                   compiler_options=jf.population_compiler_options(backend="cpu"))
    np.testing.assert_allclose(step(probe, zoo, z, bias), _loss(jax.vmap(apply))(
        probe, zoo, z, bias), rtol=1e-5)
    # jf.compiled_flops compiles a jitted step as it is, its compiler options included
    # (wrapping it in another jit would be refused: nested jits take no options).
    assert jf.compiled_flops(step, probe, zoo, z, bias) == jf.compiled_flops(
        _loss(jf.vmap_models(apply)), probe, zoo, z, bias) > 0
    mesh = jf.models_mesh(K)
    assert mesh.axis_names == ("models",) and K % mesh.size == 0
    run = jf.vmap_models(apply, mesh=mesh)
    out = jax.jit(run)(jf.shard_stacked(zoo, mesh), z @ probe, bias)
    np.testing.assert_allclose(out[0], jax.vmap(apply)(zoo, z @ probe, bias)[0], rtol=1e-5)
    eager = run(jf.shard_stacked(zoo, mesh), z @ probe, bias)  # a mesh works outside jit too
    np.testing.assert_allclose(eager[0], out[0], rtol=1e-6)


def test_errors_name_the_path():
    probe, zoo, z, bias = _data()
    run = jf.vmap_models(apply)
    with pytest.raises(ValueError, match=r"path 'params/layers/1/w' is a scalar"):
        run({"layers": [zoo["layers"][0], {"w": jnp.float32(1)}]}, z @ probe, bias)
    with pytest.raises(ValueError, match=r"path 'inputs/1' has 3 models.*'params/layers/0/w'"):
        run(zoo, z @ probe, bias[:3])
    with pytest.raises(ValueError, match=r"chunk=3 must divide the 8 models"):
        jf.vmap_models(apply, chunk=3)(zoo, z @ probe, bias)
    with pytest.raises(ValueError, match=r"chunk must be a positive int"):
        jf.vmap_models(apply, chunk=0)
    with pytest.raises(ValueError, match=r"remat='dot_saveable' is not.*dots_saveable"):
        jf.vmap_models(apply, remat="dot_saveable")
    with pytest.raises(ValueError, match=r"not 'models'"):
        jf.vmap_models(apply, mesh=jax.make_mesh((1,), ("data",)))
    with pytest.raises(ValueError, match=r"no leaves"):
        run({})
    with pytest.raises(ValueError, match=r"n_models >= 1"):
        jf.models_mesh(0)


SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, pytest
    import jfreeze as jf
    from test_population_call import _data, _loss, apply, K

    assert jax.device_count() == 8 and K == 8
    probe, zoo, z, bias = _data()
    want = jax.jit(jax.value_and_grad(_loss(jax.vmap(apply))))(probe, zoo, z, bias)
    mesh = jf.models_mesh(K)
    assert mesh.shape["models"] == 8
    placed = jf.shard_stacked((zoo, z, bias), mesh)
    for chunk in (None, 8):
        run = jf.vmap_models(apply, mesh=mesh, chunk=chunk)
        step = jax.jit(jax.value_and_grad(_loss(run)))
        compiled = step.lower(probe, *placed).compile()
        hlo = compiled.as_text()
        assert "all-reduce" in hlo and "all-gather" not in hlo, chunk
        got = compiled(probe, *placed)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     got, want)
    # The ambient mesh of jax.set_mesh is used when none is given.
    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(_loss(jf.vmap_models(apply))))
        hlo = step.lower(probe, *placed).compile().as_text()
        assert "all-reduce" in hlo and "all-gather" not in hlo
    # An Explicit-axis mesh: resharded under its jax.set_mesh (chunked too), refused without.
    explicit = jax.make_mesh((8,), ("models",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(explicit):
        on_explicit = jf.shard_stacked((zoo, z, bias), explicit)
        for chunk in (None, 8):
            step = jax.jit(jax.value_and_grad(_loss(jf.vmap_models(apply, chunk=chunk))))
            compiled = step.lower(probe, *on_explicit).compile()
            hlo = compiled.as_text()
            assert "all-reduce" in hlo and "all-gather" not in hlo, chunk
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         compiled(probe, *on_explicit), want)
    with pytest.raises(ValueError, match="axis 'models' is Explicit; call the step under"):
        jax.jit(jf.vmap_models(apply, mesh=explicit))(zoo, z @ probe, bias)
    run = jf.vmap_models(apply, mesh=mesh, chunk=4)
    with pytest.raises(ValueError, match="chunk=4 must .* multiple of the 8 devices"):
        run(zoo, z @ probe, bias)
    with pytest.raises(ValueError, match="6 models .*'params/layers/0/w'.* 8 devices"):
        jf.vmap_models(apply, mesh=mesh)(*jax.tree.map(lambda a: a[:6], (zoo, z, bias)))
    assert jf.models_mesh(12).shape["models"] == 6
    print("POPULATION-CALL-OK")
    """
)


def test_sharded_over_8_host_devices(tmp_path):
    script = tmp_path / "population_call.py"
    script.write_text("import sys; sys.path.insert(0, 'tests')\n" + SCRIPT)
    run_on_host_devices(script, 8, "POPULATION-CALL-OK")


@pytest.mark.parametrize("chunk", [None, 2])
def test_an_equinox_population_as_it_is(chunk):
    # A stacked Equinox module has non-array leaves (its activation functions): they are
    # shared by every model, so vmap_models takes the module whole, as eqx.filter_vmap does.
    eqx = pytest.importorskip("equinox")
    models = eqx.filter_vmap(lambda k: eqx.nn.MLP(3, 2, 8, 2, key=k))(
        jax.random.split(jax.random.key(0), 4))
    x = jax.random.normal(jax.random.key(1), (4, 5, 3))
    run = jf.vmap_models(lambda m, x: jax.vmap(m)(x), chunk=chunk)
    ref = eqx.filter_vmap(lambda m, x: jax.vmap(m)(x))
    for fn in (run, eqx.filter_jit(run)):
        np.testing.assert_allclose(fn(models, x), ref(models, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: run(models, x).sum())(x),
                               jax.grad(lambda x: ref(models, x).sum())(x), rtol=1e-5, atol=1e-6)


@property_settings(25, shrink=False)
@given(skeleton=skeletons(4, rich=True, dtypes=FLOAT_DTYPES), k=st.sampled_from([1, 2, 4]),
       chunk=st.sampled_from([None, 1, 2]), jit=st.booleans(), special=st.booleans(),
       seed=st.integers(0, 2**16))
def test_any_population_tree_and_bit_pattern(skeleton, k, chunk, jit, special, seed):
    """Any pytree kind (dicts, lists, tuples, NamedTuples, registered dataclasses, callable
    modules, None holes) of any float dtype, with odd bit patterns (NaN payloads, -0.0,
    subnormals, inf): a frozen weight passed through comes back bit for bit, the values and
    input gradients are plain vmap's, and the weight gradients are exact zeros."""
    rng = np.random.default_rng(seed)
    def make(leaf):
        shape = (k, *leaf.shape)
        return jnp.asarray(special_values(rng, leaf.dtype, shape) if special
                           else random_array(rng, shape, leaf.dtype))

    zoo = jax.tree.map(make, skeleton)
    x = jnp.asarray(rng.standard_normal((k, 3)), jnp.float32)

    def apply(p, x):
        leaves = jax.tree.leaves(p)
        total = sum(jnp.sum(jnp.real(leaf).astype(jnp.float32)) for leaf in leaves)
        return jnp.tanh(x * total), leaves[0]  # the first frozen weight, untouched

    chunk = chunk if chunk is not None and k % chunk == 0 else None
    run = jf.vmap_models(apply, chunk=chunk)
    run = jax.jit(run) if jit else run
    (out, passed), (want, _) = run(zoo, x), jax.vmap(apply)(zoo, x)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    first = jax.tree.leaves(zoo)[0]
    assert passed.dtype == first.dtype
    same = bits(passed) == bits(first)
    if chunk is not None and chunk < k and first.dtype.itemsize == 2:
        # The documented limit: XLA:CPU's loop moves 16-bit floats as f32, which keeps every
        # value (subnormals, -0.0, inf) but may quiet a NaN (its payload lost).
        nan = np.isnan(np.asarray(first, np.float32))
        same |= nan & np.isnan(np.asarray(passed, np.float32))
    assert same.all()

    def loss(zoo, x, fn):
        return fn(zoo, x)[0].sum()

    gz, gx = jax.grad(loss, argnums=(0, 1))(zoo, x, run)
    np.testing.assert_allclose(gx, jax.grad(loss, argnums=1)(zoo, x, jax.vmap(apply)),
                               rtol=1e-5, atol=1e-6, equal_nan=True)
    assert jax.tree.structure(gz) == jax.tree.structure(zoo)
    for g, z in zip(jax.tree.leaves(gz), jax.tree.leaves(zoo), strict=True):
        assert g.dtype == z.dtype and not np.any(np.asarray(g))


def test_eager_calls_reuse_the_trace_and_unhashable_shared_leaves_work():
    # One wrapped function per kind of shared leaves: repeated eager calls trace the model
    # once (a fresh closure per call retraced it every time). An unhashable shared leaf
    # (a SimpleNamespace) cannot key that cache and is wrapped for its call instead.
    import types

    traces = []

    def model(p, x):
        traces.append(1)
        return jnp.tanh(x @ p["w"]) * (p["cfg"].scale if "cfg" in p else 1.0)

    zoo, x = {"w": jnp.ones((4, 3, 2))}, jnp.ones((4, 5, 3))
    run = jf.vmap_models(model)
    outs = [run(zoo, x) for _ in range(3)]
    assert len(traces) == 1
    cfg = types.SimpleNamespace(scale=2.0)
    with pytest.raises(TypeError):
        hash(cfg)
    np.testing.assert_allclose(run({**zoo, "cfg": cfg}, x), 2 * outs[0], rtol=1e-6)
    # Equal but different shared leaves (1 == 1.0 == True) each reach the model as they are.
    kinds = jf.vmap_models(lambda p, x: x * {int: 1.0, float: 2.0, bool: 3.0}[type(p["s"])])
    for s, factor in ((1, 1.0), (1.0, 2.0), (True, 3.0)):
        np.testing.assert_allclose(kinds({**zoo, "s": s}, x), factor * x)
