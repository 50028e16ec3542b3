"""The probe's variants (examples/probe/probe.py) and their selection (examples/probe/select.py)."""

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from probe import select
from probe.probe import ModelSpec, ProbeConfig, head_logit, init_probe, make_probe_fns, soft_queries

_init = jax.jit(lambda pc, n: init_probe(jax.random.key(0), pc, n), static_argnums=(0, 1))
TINY = ProbeConfig(queries=3, query_len=6, min_query_len=4, d_noise=4, hidden=8, batch_models=2)


def _linear_model(params, x, mask):  # a stand-in frozen model: cheap to compile
    return jnp.tanh((x * mask[:, None]) @ params["w"]).sum() + params["b"]


def test_the_variants_train():
    # All three at once (one compile, CI time is tight): every leaf of the deep linear
    # generator and the pooling head learns through hard queries and the frozen models.
    spec = ModelSpec(_linear_model, vocab=6, query_tokens=4)
    models = {"w": jax.random.normal(jax.random.key(0), (4, 6)), "b": jnp.arange(4.0)}
    rows = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[1:]), models)
    row_labels = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    pc = dataclasses.replace(TINY, generator="deep_linear", hard_queries=True, head="pool")
    tx = optax.adam(1e-2)
    probe = _init(pc, 4)
    assert len(probe["gen"]["layers"]) == pc.linear_layers and probe["head"]["w1"].shape[0] == 2
    before = jax.tree.map(np.array, probe)
    fns = make_probe_fns(spec, pc, tx)
    probe, _, loss = fns["step"](probe, tx.init(probe), rows, row_labels, jax.random.key(1))
    assert np.isfinite(float(loss))
    moved = jax.tree.map(lambda a, b: bool((a != b).any()), before, jax.tree.map(np.array, probe))
    assert all(jax.tree.leaves(moved))
    with pytest.raises(ValueError, match="generator 'linear'"):
        ProbeConfig(generator="linear")


@pytest.mark.parametrize("generator", ["mlp", "deep_linear"])
def test_hard_queries_are_one_hot_forward_with_generator_gradients(generator):
    pc = dataclasses.replace(TINY, generator=generator)
    gen = _init(pc, 4)["gen"]
    z = jax.random.normal(jax.random.key(1), (pc.queries, pc.d_noise))
    queries = jax.jit(lambda g: soft_queries(g, z, pc.query_len, 4, 6, hard=True))
    x = np.asarray(queries(gen))
    assert x.shape == (3, 6, 6) and set(np.unique(x)) == {0.0, 1.0}  # exactly, no rounding
    np.testing.assert_array_equal(x.sum(-1), 1.0)
    assert not x[..., 4:].any()  # no mass on padding ids
    w = jax.random.normal(jax.random.key(2), x.shape)
    grads = jax.jit(jax.grad(lambda g: (queries(g) * w).sum()))(gen)
    assert all(np.abs(g).sum() > 0 for g in jax.tree.leaves(grads))


def test_pool_head_is_invariant_to_the_order_of_queries():
    head = _init(dataclasses.replace(TINY, queries=5, head="pool"), 4)["head"]
    answers = jax.random.normal(jax.random.key(1), (5,)) * 3
    perm = np.array([3, 0, 4, 1, 2])
    logit = jax.jit(head_logit, static_argnums=2)
    np.testing.assert_allclose(logit(head, answers[perm], True), logit(head, answers, True),
                               rtol=1e-6)
    mlp = _init(dataclasses.replace(TINY, queries=5), 4)["head"]
    assert logit(mlp, answers[perm], False) != logit(mlp, answers, False)  # it sees the order


def test_selection_sees_the_training_models_of_its_fold_only(monkeypatch):
    n = 24
    labels = np.arange(n) % 2
    params = {"id": jnp.arange(n, dtype=jnp.float32)}  # each model's index, to trace it
    splits = select.make_splits(labels, 3, 0.3, 0)
    seen, fold = [], []

    def fake_train(p, y, model, pc, **kw):
        seen.append((len(fold), np.asarray(p["id"]).astype(int)))
        return {"variant": select.name(pc)}

    def fake_logits(out, p):
        seen.append((len(fold), np.asarray(p["id"]).astype(int)))
        good = out["variant"] == "mlp/soft/pool"  # the only variant that helps
        return np.asarray(p["id"]) % 2 + (0 if good else np.linspace(0, 3, len(p["id"])))

    def fake_cv(p, y, sp, model, pc, **kw):
        (tr, te), = sp
        fold.append((tr, te, select.name(pc)))
        held = {"probe": {"score": np.full(n, np.nan), "pred": np.full(n, np.nan)}}
        held["probe"]["score"][te] = held["probe"]["pred"][te] = 1.0
        return {"per_fold": [{"probe": {"acc": 1.0, "auc": 1.0}}], "held_out": held,
                "curves": {"step": [1]}, "flops": {}, "frozen_moved": [],
                "probe_seconds": 1.0, "stack_seconds": 0.0}

    monkeypatch.setattr(select, "train_probe", fake_train)
    monkeypatch.setattr(select, "probe_logits", fake_logits)
    monkeypatch.setattr(select.crossval, "cross_validate", fake_cv)
    res = select.nested_cross_validate(params, labels, splits, None, ProbeConfig())
    assert [f[2] for f in fold] == ["mlp/soft/pool"] * 3  # chosen on validation AUC
    assert {k for k, _ in seen} == {0, 1, 2}
    for k, ids in seen:  # everything selection trained or scored on: that fold's training models
        tr, te = splits[k]
        assert np.isin(ids, tr).all() and not np.isin(ids, te).any()
    assert not np.isnan(res["held_out"]["probe"]["score"]).any()  # every model held out once
