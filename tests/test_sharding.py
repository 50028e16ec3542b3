"""Under a jax.sharding.Mesh of 8 host devices: bits kept, shardings kept, state only
for trainable leaves.

The device count is fixed when JAX starts, so the check runs in a subprocess
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import textwrap

from strategies import run_on_host_devices

SCRIPT = textwrap.dedent(
    r"""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jfreeze as jf

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    specs = {
        "backbone": {"kernel": P("data", None), "bias": P()},        # one axis / replicated
        "head": {"kernel": P(None, "model"), "bias": P("model")},
    }
    rng = np.random.default_rng(0)
    host = {
        "backbone": {"kernel": rng.standard_normal((16, 8)), "bias": rng.standard_normal(8)},
        "head": {"kernel": rng.standard_normal((8, 4)), "bias": rng.standard_normal(4)},
    }
    host = jax.tree.map(lambda x: x.astype(np.float32), host)
    # -0.0: bits that an update of +0.0 would not keep (NaN would poison the loss)
    host["backbone"]["kernel"][0, :3] = -0.0
    host["backbone"]["bias"][0] = -0.0
    host["head"]["kernel"][::2, 0] = -0.0
    params = jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), host, specs
    )
    # Not whole slices (every other row of column 0): zeroed with jnp.where, full state.
    sel = jf.paths("backbone/**") | jf.elements("head/kernel", np.s_[::2, 0])
    tx = jf.freeze(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1)), frozen=sel)
    state = tx.init(params)
    # optax puts its step counter on one device; replicate it over the mesh
    state = jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding)
        else jax.device_put(x, NamedSharding(mesh, P())), state)

    def loss(params, x):
        h = jnp.tanh(x @ params["backbone"]["kernel"] + params["backbone"]["bias"])
        return jnp.sum((h @ params["head"]["kernel"] + params["head"]["bias"]) ** 2)

    x = jax.device_put(jnp.ones((32, 16)), NamedSharding(mesh, P("data", None)))

    @jax.jit
    def step(params, state, x):
        grads = jax.grad(loss)(params, x)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    new, new_state = params, state
    for _ in range(3):
        new, new_state = step(new, new_state, x)

    def bits(a):
        return np.asarray(a).view(np.uint32)

    # frozen bits kept (NaN and -0.0 included)
    for k in ("kernel", "bias"):
        assert (bits(new["backbone"][k]) == bits(host["backbone"][k])).all(), k
    assert (bits(new["head"]["kernel"])[::2, 0] == bits(host["head"]["kernel"])[::2, 0]).all()
    assert np.isfinite(np.asarray(new["head"]["kernel"])).all()
    assert not np.array_equal(np.asarray(new["head"]["bias"]), host["head"]["bias"])

    # output shardings equivalent to input shardings: params and optimizer state
    def same_shardings(a, b, what):
        flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
        for (path, x), y in zip(flat_a, jax.tree.leaves(b), strict=True):
            assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (
                what, jf.path_str(path), x.sharding, y.sharding)
    same_shardings(new, params, "params")
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    same_shardings(new_state, state, "opt state")
    # adam's moments live where their parameters live
    adam = new_state.inner_states["trainable"].inner_state[1][0]
    for k in ("kernel", "bias"):
        for moment in (adam.mu, adam.nu):
            ndim = params["head"][k].ndim
            assert moment["head"][k].sharding.is_equivalent_to(params["head"][k].sharding, ndim)

    # optimizer state only for trainable leaves: adam's mu and nu for the head, one counter
    state_paths = [jf.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(new_state)[0]]
    assert not [p for p in state_paths if "backbone" in p], state_paths
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(new_state))
    head_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params["head"]))
    assert nbytes == 2 * head_bytes + 4, (nbytes, head_bytes)
    print("SHARDING-OK")
    """
)


# A stack (layers, d, d) sharded on the model axis, some layers frozen with jf.layers:
# the inner optimizer holds the trainable layers only, sharded as the stack is.
SCRIPT_LAYERS = textwrap.dedent(
    r"""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jfreeze as jf

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    L, d = 6, 8
    rng = np.random.default_rng(0)
    host = {"stack": rng.standard_normal((L, d, d)).astype(np.float32),
            "head": rng.standard_normal((d, 4)).astype(np.float32)}
    host["stack"][0, 0, :2] = -0.0
    host["stack"][4, 1, 0] = np.float32(1e-45)  # a subnormal an add would flush
    specs = {"stack": P(None, "model", None), "head": P("model", None)}
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), host, specs)
    frozen_layers, trainable_layers = [0, 1, 4], [2, 3, 5]
    sel = jf.layers("stack", frozen_layers)
    tx = jf.freeze(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1)), frozen=sel)
    state = tx.init(params)
    # optax puts its step counter on one device; replicate it over the mesh
    state = jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding)
        else jax.device_put(x, NamedSharding(mesh, P())), state)

    def loss(p, x):
        h = x
        for i in range(L):
            h = jnp.tanh(h @ p["stack"][i])
        return jnp.sum((h @ p["head"]) ** 2)

    x = jax.device_put(jnp.ones((16, d)), NamedSharding(mesh, P("data", None)))

    @jax.jit
    def step(params, state, x):
        updates, state = tx.update(jax.grad(loss)(params, x), state, params)
        return jf.apply_updates(params, updates, frozen=sel), state

    new, new_state = params, state
    for _ in range(3):
        new, new_state = step(new, new_state, x)

    def bits(a):
        return np.asarray(a).view(np.uint32)

    stack = np.asarray(new["stack"])
    assert (bits(stack[frozen_layers]) == bits(host["stack"][frozen_layers])).all()
    assert (stack[trainable_layers] != host["stack"][trainable_layers]).all()

    def same_shardings(a, b, what):
        flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
        for (path, x), y in zip(flat_a, jax.tree.leaves(b), strict=True):
            assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (
                what, jf.path_str(path), x.sharding, y.sharding)
    same_shardings(new, params, "params")
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    same_shardings(new_state, state, "opt state")
    adam = jf.inner_state(new_state)[1][0]
    want = NamedSharding(mesh, P(None, "model", None))
    for moment in (adam.mu, adam.nu):
        assert moment["stack"].shape == (len(trainable_layers), d, d)
        assert moment["stack"].sharding.is_equivalent_to(want, 3), moment["stack"].sharding
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(new_state))
    trainable = host["head"].nbytes + host["stack"][trainable_layers].nbytes
    assert nbytes == 2 * trainable + 4, (nbytes, trainable)
    print("SHARDING-OK")
    """
)


def _run_on_8_host_devices(tmp_path, script_text):
    script = tmp_path / "sharding_check.py"
    script.write_text(script_text)
    run_on_host_devices(script, 8, "SHARDING-OK")


def test_freeze_under_mesh_of_8_host_devices(tmp_path):
    _run_on_8_host_devices(tmp_path, SCRIPT)


def test_frozen_layers_of_a_stack_sharded_on_the_model_axis(tmp_path):
    _run_on_8_host_devices(tmp_path, SCRIPT_LAYERS)
