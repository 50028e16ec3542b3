"""Hugging Face Flax models (transformers 4.x), when installed: freeze the embeddings and the
lower encoder layers of a small FlaxBertForSequenceClassification, train the rest.

Skipped when ``transformers`` (or its Flax models, gone in 5.x) or ``flax`` is missing; never a
dependency of jfreeze. The model is built from a config: nothing is downloaded.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jfreeze as jf

pytest.importorskip("flax")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "FlaxBertForSequenceClassification"):
    pytest.skip("this transformers has no Flax models (4.x has them)", allow_module_level=True)

LAYERS = 4
FROZEN = jf.paths("bert/embeddings/**", "bert/encoder/layer/0/**", "bert/encoder/layer/1/**")


@pytest.fixture(scope="module")
def model():
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=2,
    )
    return transformers.FlaxBertForSequenceClassification(config, seed=0)


def _batch():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 64, (8, 16)), jnp.int32)
    return ids, jnp.arange(8) % 2


def test_freeze_embeddings_and_lower_layers_of_flax_bert(model):
    params = model.params
    paths = [jf.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert "bert/encoder/layer/0/attention/self/query/kernel" in paths  # HF's own spelling
    tx = jf.freeze(optax.adamw(1e-2), frozen=FROZEN)
    state = tx.init(params)
    ids, labels = _batch()

    def loss(p):
        logits = model(ids, params=p, train=False).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = tx.update(grads, s, p)
        return jf.apply_updates(p, updates, frozen=FROZEN), s, value

    new, losses = params, []
    for _ in range(5):
        new, state, value = step(new, state)
        losses.append(float(value))
    assert losses[-1] < losses[0], losses

    jf.assert_frozen(params, new, frozen=FROZEN)  # bit for bit
    with pytest.raises(AssertionError) as e:  # and everything else trained
        jf.assert_frozen(params, new, frozen=jf.everything)
    moved = set(re.findall(r"'([^']+)' \(", str(e.value)))
    trainable = {p for p in paths if not re.match(r"bert/(embeddings|encoder/layer/[01])/", p)}
    assert moved == trainable

    s = jf.summary(new, frozen=FROZEN, opt_state=state)
    n_trainable = sum(x.size for p, x in zip(paths, jax.tree.leaves(new), strict=True)
                      if p in trainable)
    assert (s.trainable, s.total) == (n_trainable, sum(x.size for x in jax.tree.leaves(new)))
    # adamw: mu and nu for the trainable leaves only, and a counter
    assert s.opt_state_bytes == 2 * 4 * n_trainable + 4


def test_summary_of_flax_bert_has_a_row_per_layer(model):
    s = jf.summary(model.params, frozen=FROZEN)
    layers = [f"bert/encoder/layer/{i}" for i in range(LAYERS)]
    assert [r.name for r in s.rows] == [
        "bert", "bert/embeddings", "bert/encoder/layer", *layers, "bert/pooler", "classifier"]
    rows = {r.name: r for r in s.rows}
    assert [rows[name].status for name in layers] == ["frozen", "frozen", "trainable", "trainable"]
    assert rows["bert/embeddings"].status == "frozen"
    assert rows["bert/encoder/layer"].status == "mixed"
    assert all(rows[name].leaves == 16 for name in layers)
    table = str(s)
    assert re.search(r"\n      3\s+16\s", table) and "\n  classifier " in table, table
    assert [r.name for r in jf.summary(model.params, frozen=FROZEN, depth=1).rows] == [
        "bert", "classifier"]
