"""Checkpoints of stacks frozen by whole layers: the frozen layers are saved by reference
(a fingerprint per layer, values from the frozen source given at restore), only the
trainable layers are written; older checkpoints (manifest versions 1 and 2) still load."""

from __future__ import annotations

import json
import os
import pathlib
import textwrap

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hypothesis import given
from strategies import property_settings, run_on_host_devices

import jfreeze as jf

ocp = pytest.importorskip("orbax.checkpoint")


def _on_disk(directory, item="params"):
    """The shapes of the arrays written in one item, by on-disk key."""
    meta = ocp.StandardCheckpointer().metadata(pathlib.Path(directory) / item).item_metadata
    return {k: tuple(v.shape) for k, v in meta.items()}


def _bits(x):
    x = np.asarray(x)
    return x.reshape(-1).view(f"uint{8 * x.dtype.itemsize}")


def assert_same_bits(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype and np.shape(a) == np.shape(b)
        np.testing.assert_array_equal(_bits(a), _bits(b))


def _stack_params(n=12, d=8, seed=0, axis=0):
    rng = np.random.default_rng(seed)
    at = lambda *shape: jnp.asarray(
        rng.standard_normal((*shape[:axis], n, *shape[axis:])), jnp.float32)
    return {"embed": jnp.asarray(rng.standard_normal((10, d)), jnp.float32),
            "layers": {"w": at(d, d), "b": at(d)},
            "head": jnp.asarray(rng.standard_normal((d, 2)), jnp.float32)}


FROZEN = jf.paths("embed") | jf.layers("layers/**", range(8))


def _loss(p, x):
    h = jnp.tanh(x @ p["embed"])

    def layer(h, wb):
        w, b = wb
        return jnp.tanh(h @ w + b), None

    h, _ = jax.lax.scan(layer, h, (p["layers"]["w"], p["layers"]["b"]))
    return jnp.mean((h @ p["head"]) ** 2)


TX = jf.freeze(optax.adam(0.05), frozen=FROZEN)


@jax.jit
def _step(params, state, x):
    grads = jax.grad(_loss)(params, x)
    updates, state = TX.update(grads, state, params)
    return jf.apply_updates(params, updates, frozen=FROZEN), state


def _train(params, state, steps):
    for i in steps:
        x = jnp.asarray(np.random.default_rng(100 + i).standard_normal((4, 10)), jnp.float32)
        params, state = _step(params, state, x)
    return params, state


def test_a_resumed_run_of_a_frozen_stack_continues_bit_for_bit(tmp_path):
    params = _stack_params()
    p3, s3 = _train(params, TX.init(params), range(3))
    manifest = jf.save_trainable(tmp_path / "c", p3, s3, frozen=FROZEN, frozen_source="base")
    assert manifest["version"] == 3
    entries = {e["path"]: e for e in manifest["params"]}
    assert entries["layers/w"]["layers"]["frozen"] == list(range(8))
    assert len(entries["layers/w"]["layers"]["fingerprints"]) == 8
    assert entries["layers/w"]["saved"] and entries["layers/w"]["status"] == "partial"
    # Written: the trainable layers 8-11 of each stack and the head; no embed.
    assert sorted(_on_disk(tmp_path / "c").values()) == [(4, 8), (4, 8, 8), (8, 2)]
    # A fresh process: frozen parts from the source, the trainable layers anything.
    fresh = _stack_params(seed=1)
    fresh["embed"] = params["embed"]
    fresh["layers"] = {k: fresh["layers"][k].at[:8].set(params["layers"][k][:8])
                       for k in ("w", "b")}
    got, state = jf.restore_trainable(tmp_path / "c", fresh, jax.eval_shape(TX.init, fresh),
                                      frozen=FROZEN)
    assert_same_bits((got, state), (p3, s3))
    assert_same_bits(_train(got, state, range(3, 6)), _train(p3, s3, range(3, 6)))


def test_a_frozen_layer_that_differs_is_named_with_its_layer(tmp_path):
    params = _stack_params()
    jf.save_trainable(tmp_path / "c", params, frozen=FROZEN, frozen_source="base.ckpt")
    other = {**params, "layers": {**params["layers"],
                                  "w": params["layers"]["w"].at[3, 0, 1].add(1e-3)}}
    with pytest.raises(ValueError, match=r"the frozen layers at 'layers/w' layer 3 of 12 on "
                       r"axis 0 differ from those the checkpoint was trained with \(saved by "
                       r"reference to 'base.ckpt'\)"):
        jf.restore_trainable(tmp_path / "c", other, frozen=FROZEN)
    jf.restore_trainable(tmp_path / "c", other, frozen=FROZEN, verify_frozen=False)
    # the trainable layers of the source may hold anything
    trained = {**params, "layers": {**params["layers"],
                                    "w": params["layers"]["w"].at[9:].set(jnp.nan)}}
    got, _ = jf.restore_trainable(tmp_path / "c", trained, frozen=FROZEN)
    assert_same_bits(got, params)
    two = {**params, "layers": {"w": params["layers"]["w"].at[0].set(0.0).at[5:7].set(0.0),
                                "b": params["layers"]["b"].at[7].set(0.0)}}
    with pytest.raises(ValueError, match=r"at 'layers/b' layer 7 of 12 on axis 0, 'layers/w' "
                       r"layers 0, 5-6 of 12 on axis 0 differ"):
        jf.check_manifest(jf.freeze_manifest(params, frozen=FROZEN), two, frozen=FROZEN)


def test_a_stack_given_as_shapes_is_refused_naming_its_frozen_layers(tmp_path):
    params = _stack_params()
    jf.save_trainable(tmp_path / "c", params, frozen=FROZEN)
    shapes = jax.eval_shape(lambda: params)
    with pytest.raises(ValueError, match=r"the frozen leaves at 'embed' and the frozen layers "
                       r"at 'layers/b' layers 0-7 of 12 on axis 0, 'layers/w' layers 0-7 of 12 "
                       r"on axis 0 are not in the checkpoint; pass params that hold"):
        jf.restore_trainable(tmp_path / "c", shapes, frozen=FROZEN)
    # with include_frozen=True every layer is written: shapes are enough
    m = jf.save_trainable(tmp_path / "all", params, frozen=FROZEN, include_frozen=True)
    assert not [e for e in m["params"] if "layers" in e]
    assert sorted(_on_disk(tmp_path / "all").values()) == [(8, 2), (10, 8), (12, 8), (12, 8, 8)]
    got, _ = jf.restore_trainable(tmp_path / "all", shapes, frozen=FROZEN)
    assert_same_bits(got, params)


def test_maxtext_stacks_on_axis_1_and_collections(tmp_path):
    params = _stack_params(axis=1)
    frozen = jf.layers("layers/**", [0, 1, 2, 6], axis=1)
    ema = jax.tree.map(lambda x: x * 2, params)
    m = jf.save_trainable(tmp_path / "c", params, frozen=frozen, collections={"ema": ema})
    w = next(e for e in m["collections"]["ema"] if e["path"] == "layers/w")
    assert w["layers"]["axis"] == 1 and w["layers"]["frozen"] == [0, 1, 2, 6]
    assert (8, 8, 8) in _on_disk(tmp_path / "c").values()
    assert (8, 8, 8) in _on_disk(tmp_path / "c", "collections").values()
    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
    tmpl = {**zeros(params), "layers": {k: zeros(v).at[:, [0, 1, 2, 6]].set(v[:, [0, 1, 2, 6]])
                                        for k, v in params["layers"].items()}}
    ema_tmpl = {**zeros(ema), "layers": {k: zeros(v).at[:, [0, 1, 2, 6]].set(v[:, [0, 1, 2, 6]])
                                         for k, v in ema["layers"].items()}}
    got, _, colls = jf.restore_trainable(tmp_path / "c", tmpl, frozen=frozen,
                                         collections={"ema": ema_tmpl})
    assert_same_bits((got, colls["ema"]), (params, ema))
    bad = {"ema": {**ema_tmpl, "layers": {**ema_tmpl["layers"], "b": ema_tmpl["layers"]["b"] + 1}}}
    with pytest.raises(ValueError, match=r"frozen layers of the collection 'ema' at 'layers/b' "
                       r"layers 0-2, 6 of 12 on axis 1 differ"):
        jf.restore_trainable(tmp_path / "c", tmpl, frozen=frozen, collections=bad)


def _write_old(directory, params, frozen, version):
    """A checkpoint as jfreeze wrote it before version 3: partially frozen leaves whole."""
    m = jf.freeze_manifest(params, frozen=frozen)
    for e in m["params"]:
        e.pop("layers", None)
    m["version"] = version
    if version == 1:
        del m["collections"]
    leaves = jax.tree.leaves(params)
    assert [e["path"] for e in m["params"]] == [jax.tree_util.keystr(k, simple=True, separator="/")
                                                for k, _ in jax.tree_util.tree_leaves_with_path(
                                                    params)]
    saved = {f"p{i}": x for i, (x, e) in enumerate(zip(leaves, m["params"], strict=True))
             if e["saved"]}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(os.path.abspath(directory), ocp.args.Composite(
            manifest=ocp.args.JsonSave(m), params=ocp.args.StandardSave(saved)))


@pytest.mark.parametrize("version", [1, 2])
def test_checkpoints_of_versions_1_and_2_still_load(tmp_path, version):
    params = _stack_params()
    _write_old(tmp_path / "c", params, FROZEN, version)
    assert (12, 8, 8) in _on_disk(tmp_path / "c").values()  # the stack, whole
    shapes = {**jax.eval_shape(lambda: params), "embed": params["embed"]}
    got, _ = jf.restore_trainable(tmp_path / "c", shapes, frozen=FROZEN)
    assert_same_bits(got, params)
    metadata = tmp_path / "c" / "manifest" / "metadata"
    manifest = json.loads(metadata.read_text())
    manifest["version"] = 4
    metadata.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"'version' is 4; this jfreeze reads up to version 3"):
        jf.restore_trainable(tmp_path / "c", shapes, frozen=FROZEN)


@pytest.mark.parametrize("bad, problem", [
    ({"axis": 3, "frozen": [0]}, "not an axis of its shape"),
    ({"axis": 0, "frozen": [0, 0]}, "not some of its 12 layers"),
    ({"axis": 0, "frozen": list(range(12))}, "not some of its 12 layers"),
    ({"axis": 0, "frozen": [12]}, "not some of its 12 layers"),
    ({"axis": 0, "frozen": [1], "fingerprints": None}, "one string per frozen layer"),
    ("layers", "not a saved, partially frozen leaf"),
])
def test_a_damaged_layers_entry_is_a_value_error(bad, problem):
    params = _stack_params()
    m = jf.freeze_manifest(params, frozen=FROZEN)
    next(e for e in m["params"] if e["path"] == "layers/w")["layers"] = bad
    with pytest.raises(ValueError, match=r"not a valid jfreeze .* params\[\d\] has 'layers'.*"
                       + problem):
        jf.check_manifest(m, params, frozen=FROZEN)


# --------------------------------------------------------------------------
# Property: random stacks, axes, frozen layer sets and dtypes (bf16 -0.0 and NaN
# payloads included): save -> restore gives every bit back, and only the trainable
# layers are written.

SPECIAL = {16: [0x8000, 0x0001, 0x7FC1, 0xFF81, 0x7F81, 0x7C01], 32: [0x80000000, 0x00000001,
           0x7FC12345, 0xFF800001], 8: [0x80, 0x7F, 0xFF],
           64: [0x8000000000000000, 0x7F8000017FC12345, 0x0000000180000000]}
DTYPES = [np.float32, jnp.bfloat16, np.float16, np.int8, ml_dtypes.float8_e4m3fn, np.complex64,
          np.bool_]


def _random_bits(rng, shape, dtype):
    if dtype is np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    width = 8 * np.dtype(dtype).itemsize
    raw = rng.integers(0, 1 << width, shape, dtype=np.uint64)
    special = np.array(SPECIAL[width], np.uint64)[rng.integers(0, len(SPECIAL[width]), shape)]
    raw = np.where(rng.random(shape) < 0.5, special, raw)
    return raw.astype(f"uint{width}").view(dtype)


@property_settings(12)
@given(st.data())
def test_save_restore_property_every_bit_back_and_only_trainable_layers_written(data):
    import tempfile

    ndim = data.draw(st.integers(2, 3), label="ndim")
    axis = data.draw(st.integers(-ndim, ndim - 1), label="axis")
    n = data.draw(st.integers(2, 6), label="layers")
    frozen_layers = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n - 1),
                                     label="frozen layers"))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    stacks = {}
    for name in ("a", "b"):
        shape = [data.draw(st.integers(1, 3)) for _ in range(ndim)]
        shape[axis] = n
        stacks[name] = _random_bits(rng, tuple(shape), data.draw(st.sampled_from(DTYPES)))
    params = {"stack": stacks, "other": _random_bits(rng, (3,), jnp.bfloat16)}
    as_jax = data.draw(st.booleans(), label="jax arrays")
    if as_jax:
        params = jax.tree.map(jnp.asarray, params)
    frozen = jf.layers("stack/**", frozen_layers, axis=axis)
    trainable = [i for i in range(n) if i not in frozen_layers]
    with tempfile.TemporaryDirectory() as tmp:
        jf.save_trainable(os.path.join(tmp, "c"), params, frozen=frozen)
        written = sorted(_on_disk(os.path.join(tmp, "c")).values())
        want = [(3,)] + [tuple(len(trainable) if i == axis % ndim else d
                               for i, d in enumerate(np.shape(x))) for x in stacks.values()]
        assert written == sorted(want)
        # the template: frozen layers from the source, trainable ones garbage, 'other' a shape
        tmpl = {"other": jax.ShapeDtypeStruct((3,), jnp.bfloat16), "stack": {}}
        for name, x in stacks.items():
            garbage = np.array(x)
            at = [slice(None)] * ndim
            at[axis] = trainable
            garbage[tuple(at)] = _random_bits(rng, garbage[tuple(at)].shape, x.dtype)
            tmpl["stack"][name] = jnp.asarray(garbage) if as_jax else garbage
        got, _ = jf.restore_trainable(os.path.join(tmp, "c"), tmpl, frozen=frozen)
    assert_same_bits(got, params)
    assert all(isinstance(got["stack"][k], type(tmpl["stack"][k])) for k in stacks)


# --------------------------------------------------------------------------
# Sharding: a stack sharded on its layer axis keeps its sharding when restored.

SCRIPT = textwrap.dedent(
    r"""
    import sys, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jfreeze as jf

    mesh = Mesh(np.array(jax.devices()), ("layers",))
    on_layers = NamedSharding(mesh, P("layers"))
    rng = np.random.default_rng(0)
    params = {"w": jax.device_put(jnp.asarray(rng.standard_normal((8, 4, 4)), jnp.float32),
                                  on_layers)}
    for frozen_layers in ([0, 1, 2, 3], [0, 1, 2, 3, 4]):  # 4 trainable (divisible), 3 (not)
        frozen = jf.layers("w", frozen_layers)
        d = sys.argv[1] + str(len(frozen_layers))
        jf.save_trainable(d, params, frozen=frozen)
        tmpl = {"w": jax.device_put(params["w"].at[len(frozen_layers):].set(0.0), on_layers)}
        got, _ = jf.restore_trainable(d, tmpl, frozen=frozen)
        np.testing.assert_array_equal(np.asarray(got["w"]).view(np.uint32),
                                      np.asarray(params["w"]).view(np.uint32))
        assert got["w"].sharding.is_equivalent_to(on_layers, 3), got["w"].sharding
    print("LAYERS-SHARDING-OK")
    """
)


def test_a_stack_sharded_on_its_layer_axis_is_restored_with_its_sharding(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(SCRIPT)
    run_on_host_devices(script, 4, "LAYERS-SHARDING-OK", str(tmp_path / "ckpt"))
