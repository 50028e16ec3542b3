"""Collections in checkpoints: a linen model's batch_stats (and step) beside the params.

A linen model with BatchNorm in a frozen backbone and a trained head, trained a few steps
in ``flax.training.train_state.TrainState`` + ``batch_stats`` and in ``jf.flax.TrainState``,
saved trainable-only, restored into a fresh state (the backbone from its "pretrained"
source, the head freshly initialised) and continued: bit for bit the straight run.
"""

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from strategies import bits

import jfreeze as jf

pytest.importorskip("orbax.checkpoint")
nn = pytest.importorskip("flax.linen")
from flax.training import train_state  # noqa: E402

FROZEN = jf.paths("backbone/**")


class Block(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(self.features)(x)
        return nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5)(x))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        # The backbone's params and statistics are read-only: BatchNorm on its running averages.
        backbone = jf.flax.frozen(Block, collections=("params", "batch_stats"))
        x = backbone(8, name="backbone")(x, train=False)
        return Block(3, name="head")(x, train)


MODEL = Net()


def _variables(seed):
    return MODEL.init(jax.random.key(seed), jnp.ones((4, 5)), train=False)


def _pretrained():
    """The backbone's source: weights and statistics, as a pretrained checkpoint holds them."""
    v = _variables(0)
    stats = jax.tree.map(lambda s: s + 0.25, v["batch_stats"]["backbone"])  # not the init values
    return v["params"]["backbone"], stats


def _fresh_variables(seed):
    """Backbone from its source, head from ``seed``."""
    v = _variables(seed)
    params, stats = _pretrained()
    return ({**v["params"], "backbone": params},
            {**v["batch_stats"], "backbone": stats})


def _batch(i):
    rng = np.random.default_rng(100 + i)
    return (jnp.asarray(rng.standard_normal((16, 5), np.float32)),
            jnp.asarray(rng.standard_normal((16, 3), np.float32)))


def _loss_fn(apply_fn, stats, x, y):
    def loss(params):
        out, upd = apply_fn({"params": params, "batch_stats": stats}, x, train=True,
                            mutable=["batch_stats"])
        return jnp.mean((out - y) ** 2), upd["batch_stats"]

    return loss


# --------------------------------------------------------------------------
# flax.training.train_state.TrainState + batch_stats.


class FlaxState(train_state.TrainState):
    batch_stats: Any = None


@jax.jit
def _flax_step(state, x, y):
    grads, stats = jax.grad(_loss_fn(state.apply_fn, state.batch_stats, x, y),
                            has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=stats)


def _flax_state(seed):
    params, stats = _fresh_variables(seed)
    return FlaxState.create(apply_fn=MODEL.apply, params=params, batch_stats=stats,
                            tx=jf.freeze(optax.adam(0.05), frozen=FROZEN))


# --------------------------------------------------------------------------
# jf.flax.TrainState (frozen params held apart) + batch_stats.


class JfState(jf.flax.TrainState):
    batch_stats: Any = None


@jax.jit
def _jf_step(state, x, y):
    loss = _loss_fn(state.apply_fn, state.batch_stats, x, y)
    grads, stats = jax.grad(lambda t: loss(state.merged(t)), has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=stats)


def _jf_state(seed):
    params, stats = _fresh_variables(seed)
    return JfState.create(apply_fn=MODEL.apply, params=params, batch_stats=stats,
                          tx=optax.adam(0.05), frozen=FROZEN)


def _train(step, state, steps):
    for i in steps:
        state = step(state, *_batch(i))
    return state


def assert_same_bits(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(bits(x), bits(np.asarray(y, np.asarray(x).dtype)))


def _fields(state):
    return (state.step, state.params, state.opt_state, state.batch_stats,
            getattr(state, "frozen_params", None))


@pytest.fixture(scope="module", params=["flax", "jf"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def runs(kind):
    step, make = (_flax_step, _flax_state) if kind == "flax" else (_jf_step, _jf_state)
    s3 = _train(step, make(0), range(3))
    s6 = _train(step, s3, range(3, 6))
    return step, make, s3, s6


def test_training_moves_head_statistics_and_keeps_the_backbone(runs):
    _, make, s3, _ = runs
    s0 = make(0)
    assert_same_bits(s3.batch_stats["backbone"], s0.batch_stats["backbone"])
    assert not np.array_equal(s3.batch_stats["head"]["BatchNorm_0"]["mean"],
                              s0.batch_stats["head"]["BatchNorm_0"]["mean"])


def test_train_state_helper_resumes_bit_identically(runs, tmp_path):
    step, make, s3, s6 = runs
    manifest = jf.flax.save_train_state(tmp_path / "c", s3, frozen=FROZEN,
                                        frozen_source="pretrained")
    assert sorted(manifest["collections"]) == ["batch_stats", "step"]
    status = {e["path"]: (e["status"], e["saved"]) for e in manifest["collections"]["batch_stats"]}
    assert status["backbone/BatchNorm_0/mean"] == ("frozen", False)  # by reference
    assert status["head/BatchNorm_0/mean"] == ("trainable", True)
    fresh = make(1)  # another process: backbone from its source, the head fresh
    assert not np.array_equal(fresh.batch_stats["head"]["BatchNorm_0"]["var"],
                              s3.batch_stats["head"]["BatchNorm_0"]["var"])
    back = jf.flax.restore_train_state(tmp_path / "c", fresh, frozen=FROZEN)
    assert type(back) is type(s3) and int(back.step) == 3
    assert_same_bits(_fields(back), _fields(s3))
    assert_same_bits(_fields(_train(step, back, range(3, 6))), _fields(s6))


def test_collections_argument_with_a_plain_train_state(tmp_path):
    """The explicit form, no helper: params, opt_state and named collections."""
    s3 = _train(_flax_step, _flax_state(0), range(3))
    s6 = _train(_flax_step, s3, range(3, 6))
    jf.save_trainable(tmp_path / "c", s3.params, s3.opt_state, frozen=FROZEN,
                      collections={"batch_stats": s3.batch_stats, "step": s3.step})
    fresh = _flax_state(1)
    params, opt_state, colls = jf.restore_trainable(
        tmp_path / "c", fresh.params, fresh.opt_state, frozen=FROZEN,
        collections={"batch_stats": fresh.batch_stats, "step": fresh.step})
    back = fresh.replace(params=params, opt_state=opt_state, **colls)
    assert_same_bits(_fields(back), _fields(s3))
    assert_same_bits(_fields(_train(_flax_step, back, range(3, 6))), _fields(s6))
    # Only the head's statistics are on disk; the backbone's are by reference.
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(tmp_path / "c" / "collections").item_metadata
    assert sorted(tuple(m.shape) for m in jax.tree.leaves(meta)) == [(), (3,), (3,)]


# --------------------------------------------------------------------------
# Errors name the collection and the path.


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    s3 = _train(_flax_step, _flax_state(0), range(3))
    directory = tmp_path_factory.mktemp("coll") / "c"
    jf.flax.save_train_state(directory, s3, frozen=FROZEN, frozen_source="pretrained.msgpack")
    return directory, s3


def test_a_collection_missing_is_named(saved):
    directory, _ = saved
    fresh = _flax_state(1)
    with pytest.raises(ValueError, match=r"holds the collection 'batch_stats'.*collections="):
        jf.restore_trainable(directory, fresh.params, fresh.opt_state, frozen=FROZEN)
    with pytest.raises(ValueError, match=r"holds the collection 'batch_stats'"):
        jf.restore_trainable(directory, fresh.params, fresh.opt_state, frozen=FROZEN,
                             collections={"step": fresh.step})
    with pytest.raises(ValueError, match=r"holds no collection 'ema' \(it holds \['batch_stats'"):
        jf.restore_trainable(directory, fresh.params, fresh.opt_state, frozen=FROZEN,
                             collections={"batch_stats": fresh.batch_stats, "step": 0,
                                          "ema": fresh.params})


def test_changed_frozen_statistics_are_named_with_their_collection(saved):
    directory, _ = saved
    fresh = _flax_state(1)
    stats = jax.tree.map(lambda x: x, fresh.batch_stats)
    stats["backbone"]["BatchNorm_0"]["var"] = stats["backbone"]["BatchNorm_0"]["var"].at[0].set(
        -0.0 if stats["backbone"]["BatchNorm_0"]["var"][0] == 0 else 0.0)
    moved = fresh.replace(batch_stats=stats)
    with pytest.raises(ValueError, match=r"collection 'batch_stats' at "
                       r"'backbone/BatchNorm_0/var' differ.*'pretrained.msgpack'.*"
                       r"collection_frozen=\{'batch_stats': jf.nothing\}"):
        jf.flax.restore_train_state(directory, moved, frozen=FROZEN)
    back = jf.flax.restore_train_state(directory, moved, frozen=FROZEN, verify_frozen=False)
    assert_same_bits(back.batch_stats["backbone"], stats["backbone"])  # kept, as asked


def test_frozen_statistics_given_as_shapes_are_named(saved):
    directory, _ = saved
    fresh = _flax_state(1)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh.batch_stats)
    with pytest.raises(ValueError, match=r"frozen leaves of the collection 'batch_stats' at "
                       r"'backbone/BatchNorm_0/mean'.*not in the checkpoint"):
        jf.flax.restore_train_state(directory, fresh.replace(batch_stats=shapes), frozen=FROZEN)


def test_a_path_mismatch_in_a_collection_is_named(saved):
    directory, _ = saved
    fresh = _flax_state(1)
    stats = {**fresh.batch_stats, "head": {"BatchNorm_1": fresh.batch_stats["head"]["BatchNorm_0"]}}
    with pytest.raises(ValueError, match=r"collection 'batch_stats' does not match(.|\n)*"
                       r"'head/BatchNorm_0/mean': in the checkpoint, not in the collection"):
        jf.flax.restore_train_state(directory, fresh.replace(batch_stats=stats), frozen=FROZEN)
    wider = jax.tree.map(lambda x: x, fresh.batch_stats)
    wider["head"]["BatchNorm_0"]["mean"] = jnp.zeros(4)
    with pytest.raises(ValueError, match=r"'batch_stats'(.|\n)*'head/BatchNorm_0/mean': saved as "
                       r"float32\[3\], now float32\[4\]"):
        jf.flax.restore_train_state(directory, fresh.replace(batch_stats=wider), frozen=FROZEN)
    # Another freeze of the statistics: the backbone's saved by reference, now trainable.
    with pytest.raises(ValueError, match=r"'backbone/BatchNorm_0/mean': frozen when saved, "
                       r"trainable now"):
        jf.flax.restore_train_state(directory, fresh, frozen=FROZEN,
                                    collection_frozen={"batch_stats": jf.nothing})


# --------------------------------------------------------------------------
# Collections whose frozen part still moves; old checkpoints; argument errors.


def _tree(v):
    return {"backbone": jnp.full(2, v), "head": jnp.full(3, v)}


def test_statistics_updated_in_a_frozen_part_are_saved_with_collection_frozen(tmp_path):
    params, stats = _tree(1.0), _tree(0.5)
    trained_stats = jax.tree.map(lambda s: s + 1, stats)  # BatchNorm in train mode everywhere
    jf.save_trainable(tmp_path / "a", params, frozen=FROZEN,
                      collections={"batch_stats": trained_stats})
    with pytest.raises(ValueError, match=r"'batch_stats' at 'backbone' differ"):
        jf.restore_trainable(tmp_path / "a", params, frozen=FROZEN,
                             collections={"batch_stats": stats})
    m = jf.save_trainable(tmp_path / "b", params, frozen=FROZEN,
                          collections={"batch_stats": trained_stats},
                          collection_frozen={"batch_stats": jf.nothing})
    assert all(e["saved"] for e in m["collections"]["batch_stats"])
    fresh = {**_tree(0.0), "backbone": params["backbone"]}
    got, state, colls = jf.restore_trainable(tmp_path / "b", fresh, frozen=FROZEN,
                                             collections={"batch_stats": stats},
                                             collection_frozen={"batch_stats": jf.nothing})
    assert state is None
    assert_same_bits(got["head"], params["head"])
    assert_same_bits(colls["batch_stats"], trained_stats)


def test_old_checkpoints_without_collections_still_load(tmp_path):
    params = _tree(1.0)
    jf.save_trainable(tmp_path / "c", params, frozen=FROZEN)
    metadata = tmp_path / "c" / "manifest" / "metadata"
    old = json.loads(metadata.read_text())
    del old["collections"]
    metadata.write_text(json.dumps({**old, "version": 1}))  # as jfreeze wrote it before
    got, _ = jf.restore_trainable(tmp_path / "c", params, frozen=FROZEN)
    assert_same_bits(got, params)
    with pytest.raises(ValueError, match=r"holds no collection 'batch_stats' \(it holds none\)"):
        jf.restore_trainable(tmp_path / "c", params, frozen=FROZEN,
                             collections={"batch_stats": _tree(0.0)})
    metadata.write_text(json.dumps({**old, "version": 2}))  # version 2 must have them
    with pytest.raises(ValueError, match=r"no 'collections'"):
        jf.restore_trainable(tmp_path / "c", params, frozen=FROZEN)


def test_collection_argument_errors(tmp_path):
    params = _tree(1.0)
    with pytest.raises(TypeError, match=r"collection 'batch_stats'.*collection_frozen="):
        jf.freeze_manifest(params, frozen={"backbone": True, "head": False},
                           collections={"batch_stats": _tree(0.0)})
    with pytest.raises(ValueError, match=r"collection_frozen= names the collection 'stats'"):
        jf.freeze_manifest(params, frozen=FROZEN, collections={"batch_stats": _tree(0.0)},
                           collection_frozen={"stats": jf.nothing})
    # A selector given for a collection is strict there (a typo names the closest paths).
    with pytest.raises(ValueError, match=r"collection_frozen\['batch_stats'\]: "
                       r"jf.paths\('hed/\*\*'\) matches no leaf.*Closest paths: 'head'"):
        jf.freeze_manifest(params, frozen=FROZEN, collections={"batch_stats": _tree(0.0)},
                           collection_frozen={"batch_stats": jf.paths("hed/**")})
    with pytest.raises(TypeError, match=r"collections= takes a dict"):
        jf.freeze_manifest(params, frozen=FROZEN, collections=[_tree(0.0)])
    with pytest.raises(TypeError, match=r"jf.flax.TrainState or a subclass"):
        jf.flax.save_train_state(tmp_path / "c", params, frozen=FROZEN)


def test_a_complement_selector_does_not_freeze_the_step(tmp_path):
    """~jf.paths("head/**") matches the path '' too; the step (one leaf) is still saved."""
    s3 = _train(_flax_step, _flax_state(0), range(3))
    frozen = ~jf.paths("head/**")
    m = jf.flax.save_train_state(tmp_path / "c", s3, frozen=frozen)
    assert m["collections"]["step"] == [{"path": "", "shape": [], "dtype": "int32",
                                         "status": "trainable", "saved": True}]
    back = jf.flax.restore_train_state(tmp_path / "c", _flax_state(1), frozen=frozen)
    assert int(back.step) == 3
