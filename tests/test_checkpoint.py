"""jf.save_trainable / jf.restore_trainable: trainable-only orbax checkpoints with a manifest."""

import json
import subprocess
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from strategies import bits

import jfreeze as jf

pytest.importorskip("orbax.checkpoint")

# emb: frozen for good (the pretrained "source"); head column 0: frozen elements;
# body: thaws at step 4, i.e. after the resume.
FROZEN = jf.paths("emb") | jf.elements("head/w", np.s_[:, 0])
THAW = {0: jf.paths("head/**") - jf.elements("head/w", np.s_[:, 0]), 4: jf.paths("body/**")}


def _params(seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    return {"emb": normal(6, 5), "body": {"w": normal(5, 5)}, "head": {"w": normal(5, 3)}}


def _pretrained():
    return _params(0)["emb"]


def _loss(p, x, y):
    h = jnp.tanh(jnp.tanh(x @ p["emb"]) @ p["body"]["w"])
    return jnp.mean((h @ p["head"]["w"] - y) ** 2)


def _batch(i):
    rng = np.random.default_rng(100 + i)
    return (jnp.asarray(rng.standard_normal((8, 6), np.float32)),
            jnp.asarray(rng.standard_normal((8, 3), np.float32)))


TX = jf.freeze(jf.gradual_unfreeze(optax.adamw(0.05), thaw=THAW), frozen=FROZEN)


@jax.jit
def _step(params, state, x, y):
    grads = jax.grad(_loss)(params, x, y)
    updates, state = TX.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _train(params, state, steps):
    for i in steps:
        params, state = _step(params, state, *_batch(i))
    return params, state


def _bits(x):
    return np.asarray(x).view(np.uint32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """3 steps trained, saved trainable-only; and the 6-step straight run."""
    params = _params()
    p3, s3 = _train(params, TX.init(params), range(3))
    directory = tmp_path_factory.mktemp("ckpt") / "step3"
    manifest = jf.save_trainable(directory, p3, s3, frozen=FROZEN, frozen_source="pretrained.npz")
    p6, s6 = _train(p3, s3, range(3, 6))
    return directory, manifest, (p3, s3), (p6, s6)


def _fresh():
    """A fresh process: frozen weights from their source, the rest freshly initialised.

    Head column 0 is frozen by whole slices (a slab along axis 1), so like 'emb' it is
    saved by reference: its frozen column comes from its source too."""
    params = {**_params(seed=1), "emb": _pretrained()}
    column = _params(0)["head"]["w"][:, 0]
    params["head"] = {"w": params["head"]["w"].at[:, 0].set(column)}
    return params, TX.init(params)


def test_resumed_run_continues_bit_identically(saved):
    directory, _, (p3, s3), (p6, s6) = saved
    params, state = _fresh()
    params, state = jf.restore_trainable(directory, params, state, frozen=FROZEN)
    for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves((p3, s3)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state.inner_states["trainable"].inner_state.count) == 3  # the schedule resumes
    q6, t6 = _train(params, state, range(3, 6))
    for a, b in zip(jax.tree.leaves((q6, t6)), jax.tree.leaves((p6, s6)), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(_bits(a) if a.dtype == jnp.float32 else a, _bits(b)
                                      if b.dtype == jnp.float32 else b)
    assert not np.array_equal(q6["body"]["w"], p3["body"]["w"])  # body thawed after the resume


def test_frozen_leaves_are_not_saved_and_the_manifest_says_what_was_frozen(saved):
    directory, manifest, _, _ = saved
    entries = {e["path"]: e for e in manifest["params"]}
    assert entries["emb"]["status"] == "frozen" and not entries["emb"]["saved"]
    assert "fingerprint" in entries["emb"]
    assert entries["head/w"]["status"] == "partial" and entries["head/w"]["frozen_elements"] == 5
    assert entries["body/w"]["status"] == "trainable"
    assert manifest["selector"] == "(paths('emb') | elements('head/w', np.s_[:, 0]))"
    assert manifest["frozen_source"] == "pretrained.npz"
    on_disk = json.loads((directory / "manifest" / "metadata").read_text())
    assert on_disk == manifest
    # The params item holds the trainable leaves, and head/w without its frozen column 0
    # (whole slices along one axis are saved by reference, like 'emb').
    import orbax.checkpoint as ocp

    on_disk = ocp.StandardCheckpointer().metadata(directory / "params").item_metadata
    saved_shapes = sorted(tuple(m.shape) for m in jax.tree.leaves(on_disk))
    assert saved_shapes == [(5, 2), (5, 5)]  # head/w columns 1-2, body/w; no emb (6, 5)
    assert entries["head/w"]["layers"]["axis"] == 1 and entries["head/w"]["layers"]["frozen"] == [0]
    assert len(entries["head/w"]["layers"]["fingerprints"]) == 1 and manifest["version"] == 3


def test_restore_rejects_another_freeze_naming_paths(saved):
    directory = saved[0]
    params, state = _fresh()
    other = jf.paths("emb", "body/**") | jf.elements("head/w", np.s_[:, 0])
    with pytest.raises(ValueError, match=r"'body/w': trainable when saved, frozen now"):
        jf.restore_trainable(directory, params, state, frozen=other)
    other_mask = jf.paths("emb") | jf.elements("head/w", np.s_[:, 1])
    with pytest.raises(ValueError, match=r"'head/w': partially frozen with a different element"):
        jf.restore_trainable(directory, params, state, frozen=other_mask)


def test_restore_rejects_another_optimizer_or_other_frozen_weights(saved):
    directory = saved[0]
    params, _ = _fresh()
    sgd_state = jf.freeze(optax.sgd(0.1), frozen=FROZEN).init(params)
    with pytest.raises(ValueError, match="optimizer state does not match"):
        jf.restore_trainable(directory, params, sgd_state, frozen=FROZEN)
    other_emb = {**params, "emb": params["emb"].at[0, 0].add(1.0)}
    with pytest.raises(ValueError, match=r"'emb' differ.*'pretrained.npz'"):
        jf.restore_trainable(directory, other_emb, None, frozen=FROZEN)
    jf.restore_trainable(directory, other_emb, None, frozen=FROZEN, verify_frozen=False)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    with pytest.raises(ValueError, match=r"'emb' and the frozen layers at 'head/w' layer 0 of 3 "
                       r"on axis 1 are not in the checkpoint"):
        jf.restore_trainable(directory, shapes, None, frozen=FROZEN)
    renamed = {**params, "body": {"kernel": params["body"]["w"]}}
    with pytest.raises(ValueError, match=r"'body/w': in the checkpoint, not in the params"):
        jf.restore_trainable(directory, renamed, None, frozen=FROZEN)


def test_include_frozen_restores_from_shapes(tmp_path):
    params = _params()
    jf.save_trainable(tmp_path / "full", params, frozen=FROZEN, include_frozen=True)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    restored, state = jf.restore_trainable(tmp_path / "full", shapes, frozen=FROZEN)
    assert state is None
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(b))


def test_import_jfreeze_does_not_import_orbax():
    code = "import sys, jfreeze; sys.exit(any(m.startswith('orbax') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --------------------------------------------------------------------------
# Restored by path, never by position.


class Attn(NamedTuple):
    q: jax.Array
    k: jax.Array


class AttnRefactored(NamedTuple):  # the same fields, declared in another order
    k: jax.Array
    q: jax.Array


def test_restore_matches_leaves_by_path_when_fields_are_reordered(tmp_path):
    params = {"attn": Attn(q=jnp.full(2, 1.0), k=jnp.full(2, 2.0)), "emb": jnp.full(3, 3.0)}
    tx = optax.adam(0.1)
    state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)[1]
    jf.save_trainable(tmp_path / "c", params, state, frozen=jf.paths("emb"))
    # After the refactor: the same paths, flattened in another order.
    template = {"attn": AttnRefactored(q=jnp.zeros(2), k=jnp.zeros(2)), "emb": params["emb"]}
    got, _ = jf.restore_trainable(tmp_path / "c", template, frozen=jf.paths("emb"))
    np.testing.assert_array_equal(got["attn"].q, [1.0, 1.0])
    np.testing.assert_array_equal(got["attn"].k, [2.0, 2.0])
    got, got_state = jf.restore_trainable(
        tmp_path / "c", template, tx.init(template), frozen=jf.paths("emb"))
    assert isinstance(got["attn"], AttnRefactored)
    np.testing.assert_array_equal(got["attn"].q, [1.0, 1.0])
    np.testing.assert_array_equal(got["attn"].k, [2.0, 2.0])
    for name in ("q", "k"):  # the optimizer state too, leaf by leaf
        for part in ("mu", "nu"):
            np.testing.assert_array_equal(getattr(getattr(got_state[0], part)["attn"], name),
                                          getattr(getattr(state[0], part)["attn"], name))


def test_two_leaves_sharing_a_path_are_refused_naming_it(tmp_path):
    shared = {"a/b": jnp.ones(2), "a": {"b": jnp.zeros(2)}, "c": jnp.ones(1)}
    ok = {"a": {"b": jnp.zeros(2)}, "c": jnp.ones(1)}
    with pytest.raises(ValueError, match=r"share the path 'a/b'"):
        jf.freeze_manifest(shared, frozen=jf.paths("c"))
    with pytest.raises(ValueError, match=r"share the path 'a/b'"):
        jf.save_trainable(tmp_path / "c", shared, frozen=jf.paths("c"))
    with pytest.raises(ValueError, match=r"optimizer state share the path 'a/b'"):
        jf.save_trainable(tmp_path / "c", ok, shared, frozen=jf.paths("c"))
    jf.save_trainable(tmp_path / "ok", ok, ok, frozen=jf.paths("c"))
    with pytest.raises(ValueError, match=r"restore_trainable.*share the path 'a/b'"):
        jf.restore_trainable(tmp_path / "ok", shared, frozen=jf.paths("c"))
    with pytest.raises(ValueError, match=r"restore_trainable.*state share the path 'a/b'"):
        jf.restore_trainable(tmp_path / "ok", ok, shared, frozen=jf.paths("c"))


# --------------------------------------------------------------------------
# Fingerprints see every bit of every dtype.


def test_frozen_complex_leaf_is_fingerprinted_by_its_bits(tmp_path):
    z = jnp.asarray(np.array([1 + 2j, complex(3, -0.0)], np.complex64))
    params = {"z": z, "w": jnp.ones(2)}
    jf.save_trainable(tmp_path / "c", params, frozen=jf.paths("z"))
    jf.restore_trainable(tmp_path / "c", params, frozen=jf.paths("z"))
    flipped = {**params, "z": jnp.asarray(np.array([1 + 2j, complex(3, 0.0)], np.complex64))}
    with pytest.raises(ValueError, match=r"'z' differ"):  # only the sign of an imaginary zero
        jf.restore_trainable(tmp_path / "c", flipped, frozen=jf.paths("z"))


# --------------------------------------------------------------------------
# A damaged manifest is a clear error naming the checkpoint.


@pytest.fixture
def small_ckpt(tmp_path):
    params = {"a": jnp.ones(2), "b": jnp.zeros(3)}
    jf.save_trainable(tmp_path / "c", params, frozen=jf.paths("a"))
    return tmp_path / "c", params


@pytest.mark.parametrize("damage, what", [
    (lambda text: text[: len(text) // 2], "not valid JSON"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "params"}),
     "'params'"),
    (lambda text: json.dumps({**json.loads(text), "version": "2"}), "'version'"),
])
def test_damaged_manifest_is_a_clear_error_naming_the_checkpoint(small_ckpt, damage, what):
    directory, params = small_ckpt
    metadata = directory / "manifest" / "metadata"
    metadata.write_text(damage(metadata.read_text()))
    with pytest.raises(ValueError, match=str(directory)) as info:
        jf.restore_trainable(directory, params, frozen=jf.paths("a"))
    assert what in str(info.value)


# --------------------------------------------------------------------------
# Equinox modules as params (None holes where non-arrays were).


def test_equinox_mlp_round_trip_with_a_frozen_layer(tmp_path):
    eqx = pytest.importorskip("equinox")
    model = eqx.filter(eqx.nn.MLP(3, 2, 4, 2, key=jax.random.PRNGKey(0)), eqx.is_array)
    frozen = jf.paths("layers/0/**")
    tx = optax.adam(0.1)
    state = tx.update(jax.tree.map(jnp.ones_like, model), tx.init(model), model)[1]
    manifest = jf.save_trainable(tmp_path / "c", model, state, frozen=frozen)
    assert [e["path"] for e in manifest["params"] if e["status"] == "frozen"] == [
        "layers/0/weight", "layers/0/bias"]
    # A fresh process: the frozen layer from its source, the rest freshly initialised.
    fresh = eqx.filter(eqx.nn.MLP(3, 2, 4, 2, key=jax.random.PRNGKey(1)), eqx.is_array)
    fresh = eqx.tree_at(lambda m: m.layers[0], fresh, model.layers[0])
    got, got_state = jf.restore_trainable(tmp_path / "c", fresh, tx.init(fresh), frozen=frozen)
    assert jax.tree.structure(got) == jax.tree.structure(model)
    pairs = zip(jax.tree.leaves((got, got_state)), jax.tree.leaves((model, state)), strict=True)
    for a, b in pairs:
        np.testing.assert_array_equal(bits(a), bits(b))
    jf.check_manifest(manifest, got, frozen=frozen, opt_state=got_state)
    moved = eqx.tree_at(lambda m: m.layers[0].weight, fresh, fresh.layers[0].weight + 1)
    with pytest.raises(ValueError, match=r"'layers/0/weight' differ"):
        jf.restore_trainable(tmp_path / "c", moved, None, frozen=frozen)


def test_equinox_fields_reordered_restore_by_path(tmp_path):
    eqx = pytest.importorskip("equinox")

    class Block(eqx.Module):
        q: jax.Array
        k: jax.Array
        act: object = jax.nn.relu

    class BlockRefactored(eqx.Module):
        k: jax.Array
        q: jax.Array
        act: object = jax.nn.relu

    saved = eqx.filter(Block(jnp.full(2, 1.0), jnp.full(2, 2.0)), eqx.is_array)
    jf.save_trainable(tmp_path / "c", saved, frozen=jf.nothing)
    template = eqx.filter(BlockRefactored(jnp.zeros(2), jnp.zeros(2)), eqx.is_array)
    got, _ = jf.restore_trainable(tmp_path / "c", template, frozen=jf.nothing)
    assert got.act is None  # the hole stays a hole
    np.testing.assert_array_equal(got.q, [1.0, 1.0])
    np.testing.assert_array_equal(got.k, [2.0, 2.0])
