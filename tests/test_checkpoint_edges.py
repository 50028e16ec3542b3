"""Checkpoints at their edges: what a user hands them by mistake gets a jfreeze error.

Non-array leaves (an unfiltered Equinox model, a string in a collection), a directory that
exists or holds no checkpoint, a ``TrainState`` frozen by a mask tree whose other fields are
one leaf (the step) or none (``batch_stats=None``), and the params' element-wise selection
meeting a collection leaf of another shape: each is a ``ValueError``/``TypeError`` naming the
path (and the collection), raised before orbax writes anything.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import property_settings

import jfreeze as jf

pytest.importorskip("orbax.checkpoint")

FROZEN = jf.paths("backbone")


def _params():
    return {"backbone": jnp.ones(3), "head": jnp.zeros(2)}


def test_non_array_leaves_are_refused_naming_the_path_before_anything_is_written(tmp_path):
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"'activation'.*eqx.filter\(model, eqx.is_array\)"):
        jf.save_trainable(tmp_path / "m", model, frozen=jf.paths("layers/0/*"))
    assert not (tmp_path / "m").exists()
    with pytest.raises(TypeError, match=r"collection 'meta'.*'name'.*str"):
        jf.save_trainable(tmp_path / "s", _params(), frozen=FROZEN,
                          collections={"meta": {"name": "run-1"}})
    assert not (tmp_path / "s").exists()
    # Python scalars are arrays to orbax: saved, and restored as the template's type.
    jf.save_trainable(tmp_path / "f", {**_params(), "scale": 1.5}, frozen=FROZEN)
    back, _ = jf.restore_trainable(tmp_path / "f", {**_params(), "scale": 0.0}, frozen=FROZEN)
    assert back["scale"] == 1.5 and type(back["scale"]) is float


def test_an_existing_directory_or_one_without_a_checkpoint_is_a_value_error(tmp_path):
    jf.save_trainable(tmp_path / "c", _params(), frozen=FROZEN)
    with pytest.raises(ValueError, match=r"jf.save_trainable\(.*already exists.*force=True"):
        jf.save_trainable(tmp_path / "c", _params(), frozen=FROZEN)
    jf.save_trainable(tmp_path / "c", _params(), frozen=FROZEN, force=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"jf.restore_trainable\(.*not a jfreeze trainable-only "
                       r"checkpoint"):
        jf.restore_trainable(tmp_path / "empty", _params(), frozen=FROZEN)


def test_a_mask_tree_freezes_a_train_state_whose_other_fields_are_the_step_or_none(tmp_path):
    """A mask tree cannot say what is frozen in a collection with paths of its own, but the
    step (one leaf, path '') and an unset ``batch_stats=None`` (no leaf) need no answer."""
    train_state = pytest.importorskip("flax.training.train_state")

    class State(train_state.TrainState):
        batch_stats: Any = None

    mask = {"backbone": True, "head": False}
    tx = jf.freeze(optax.adam(1e-2), frozen=mask)
    state = State.create(apply_fn=None, params=_params(), tx=tx)
    state = state.replace(step=7)
    m = jf.flax.save_train_state(tmp_path / "c", state, frozen=mask)
    assert m["collections"]["step"][0]["status"] == "trainable"
    assert m["collections"]["batch_stats"] == []
    fresh = State.create(apply_fn=None, params=_params(), tx=tx)
    assert jf.flax.restore_train_state(tmp_path / "c", fresh, frozen=mask).step == 7
    # A collection with paths of its own still needs collection_frozen (one closing brace).
    with pytest.raises(TypeError, match=r"collection_frozen=\{'batch_stats': \.\.\.\} \("):
        jf.flax.save_train_state(tmp_path / "d", state.replace(batch_stats=_params()),
                                 frozen=mask)


def test_an_element_selection_that_does_not_fit_a_collection_leaf_names_the_collection():
    frozen = jf.elements("head", np.s_[0])
    with pytest.raises(ValueError, match=r"collection 'ema'.*path 'head'"):
        jf.freeze_manifest(_params(), frozen=frozen, collections={"ema": {"head": jnp.ones(())}})


@property_settings(6)
@given(impl=st.sampled_from(["threefry2x32", "rbg", "unsafe_rbg"]),
       shape=st.sampled_from([(), (3,), (2, 2)]), seed=st.integers(0, 2**31 - 1),
       where=st.sampled_from(["params", "collection", "train state"]),
       template=st.sampled_from(["array", "eval_shape"]))
def test_typed_prng_keys_round_trip_bit_for_bit(tmp_path_factory, impl, shape, seed, where,
                                                template):
    """A typed key (a TrainState's ``rng``) was a bare NumPy TypeError ('key<fry>'); it is
    saved as its data and wrapped again, into an array or a ``jax.eval_shape`` template."""
    d = tmp_path_factory.mktemp("k") / "c"
    key = jax.random.split(jax.random.key(seed, impl=impl), int(np.prod(shape)) or 1)
    key = key.reshape(shape) if shape else key[0]
    fresh = jax.random.key(0, impl=impl)
    fresh = jnp.broadcast_to(fresh, shape) if shape else fresh
    like = jax.eval_shape(lambda: fresh) if template == "eval_shape" else fresh
    if where == "train state":
        train_state = pytest.importorskip("flax.training.train_state")

        class State(train_state.TrainState):
            rng: Any = None

        tx = jf.freeze(optax.adam(1e-2), frozen=FROZEN)
        state = State.create(apply_fn=None, params=_params(), tx=tx, rng=key)
        m = jf.flax.save_train_state(d, state, frozen=FROZEN)
        got = jf.flax.restore_train_state(d, state.replace(rng=like), frozen=FROZEN).rng
    elif where == "collection":
        m = jf.save_trainable(d, _params(), frozen=FROZEN, collections={"rng": key})
        got = jf.restore_trainable(d, _params(), frozen=FROZEN, collections={"rng": like})[2]
        got = got["rng"]
    else:
        m = jf.save_trainable(d, {**_params(), "rng": key}, frozen=FROZEN)
        got = jf.restore_trainable(d, {**_params(), "rng": like}, frozen=FROZEN)[0]["rng"]
    entries = m["params"] if where == "params" else m["collections"]["rng"]
    assert entries[-1]["dtype"] == str(key.dtype) and entries[-1]["shape"] == list(shape)
    assert got.dtype == key.dtype and got.shape == key.shape
    np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(key))


def test_a_frozen_typed_key_is_fingerprinted_by_its_data(tmp_path):
    params = {**_params(), "backbone": jax.random.key(1)}
    jf.save_trainable(tmp_path / "c", params, frozen=FROZEN)
    back, _ = jf.restore_trainable(tmp_path / "c", params, frozen=FROZEN)
    assert back["backbone"] is params["backbone"]
    with pytest.raises(ValueError, match=r"frozen leaves at 'backbone' differ"):
        jf.restore_trainable(tmp_path / "c", {**params, "backbone": jax.random.key(2)},
                             frozen=FROZEN)


def test_a_checkpoint_missing_an_item_is_a_value_error_naming_it(tmp_path):
    import shutil

    tx = jf.freeze(optax.adam(1e-2), frozen=FROZEN)
    jf.save_trainable(tmp_path / "c", _params(), tx.init(_params()), frozen=FROZEN)
    shutil.rmtree(tmp_path / "c" / "params")
    with pytest.raises(ValueError, match=r"jf.restore_trainable\(.*incomplete.*params"):
        jf.restore_trainable(tmp_path / "c", _params(), tx.init(_params()), frozen=FROZEN)


def test_train_state_helpers_take_no_collections_argument(tmp_path):
    train_state = pytest.importorskip("flax.training.train_state")
    state = train_state.TrainState.create(apply_fn=None, params=_params(),
                                          tx=jf.freeze(optax.adam(1e-2), frozen=FROZEN))
    for fn in (jf.flax.save_train_state, jf.flax.restore_train_state):
        with pytest.raises(TypeError, match=r"takes no collections=.*add a field"):
            fn(tmp_path / "c", state, frozen=FROZEN, collections={"x": jnp.ones(1)})
