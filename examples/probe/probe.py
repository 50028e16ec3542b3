"""The probe: noise -> trainable generator -> **the frozen model** -> trainable head.

A batch is a population: ``S`` frozen models as one stacked tree (data, never
optimizer parameters), each wrapped in the same sandwich under ``jax.vmap``, the
whole step one ``jax.jit``. jfreeze says which part of the sandwich is frozen
(:data:`FROZEN`), and ``jf.split`` makes the step differentiate only the rest:
gradients flow *through* the frozen model into the generator, but no weight
gradient of a frozen model is ever built (``jf.compiled_flops`` checks it against
the same step differentiating everything).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jfreeze as jf

from .transformer import forward
from .zoo import ZooConfig

FROZEN = jf.paths("frozen_model/**")  # a sandwich is {"probe": ..., "frozen_model": ...}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the probe needs to know of the frozen models (see ``user_zoo`` for ``apply``)."""

    apply: Callable  # apply(params, x (L, vocab) soft tokens, mask (L,)) -> logit
    vocab: int  # width of x
    query_tokens: int  # the queries put mass on token ids below this (not on padding)


def as_spec(model: ModelSpec | ZooConfig) -> ModelSpec:
    """The example's own transformer, for a :class:`ZooConfig`."""
    if isinstance(model, ModelSpec):
        return model
    return ModelSpec(functools.partial(forward, n_heads=model.n_heads), model.vocab,
                     2 * model.n_vars)


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    queries: int = 16  # soft input sequences per model
    query_len: int = 32  # the longest query (longer than any training length)
    min_query_len: int = 16  # query k has a length spread evenly in [min_query_len, query_len]
    d_noise: int = 16
    hidden: int = 32
    steps: int = 300
    batch_models: int = 32  # frozen models per step (a multiple of --devices)
    lr: float = 3e-3
    weight_decay: float = 1e-2
    eval_draws: int = 8  # noise draws averaged at evaluation
    seed: int = 0


def init_probe(key, pc: ProbeConfig, n_lits: int) -> dict:
    k = jax.random.split(key, 5)
    K, L, H = pc.queries, pc.query_len, pc.hidden

    def dense(key, n_in, n_out, scale=1.0):
        return jax.random.normal(key, (n_in, n_out)) * scale / math.sqrt(n_in)

    return {
        # noise z (K, d_noise) -> per-query soft sequence (K, L, n_lits)
        "gen": {
            "w1": dense(k[0], pc.d_noise, H), "b1": jnp.zeros(H),
            "w2": dense(k[1], H, L * n_lits, 0.5),
            "query": jax.random.normal(k[2], (K, L * n_lits)),  # one learned code per query
        },
        # the frozen model's K answers -> generaliser logit
        "head": {
            "w1": dense(k[3], 2 * K, H), "b1": jnp.zeros(H),
            "w2": dense(k[4], H, 1, 0.1), "b2": jnp.zeros(1),
        },
    }


def soft_queries(gen: dict, z, L: int, n_lits: int, vocab: int):
    """Noise ``(K, d_noise)`` -> soft one-hot sequences ``(K, L, vocab)`` (no PAD mass)."""
    h = jax.nn.gelu(z @ gen["w1"] + gen["b1"])
    logits = (h @ gen["w2"] + gen["query"]).reshape(z.shape[0], L, n_lits)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.pad(probs, ((0, 0), (0, 0), (0, vocab - n_lits)))


def sandwich(params: dict, z, spec: ModelSpec, pc: ProbeConfig):
    """One frozen model in, one "is a generaliser" logit out (vmap over models)."""
    probe, model = params["probe"], params["frozen_model"]
    x = soft_queries(probe["gen"], z, pc.query_len, spec.query_tokens, spec.vocab)
    lens = np.linspace(pc.min_query_len, pc.query_len, pc.queries).round()
    mask = np.arange(pc.query_len)[None, :] < lens[:, None]  # (K, L), static

    def answer(xi, mi):  # one number per query, whatever the user's apply returns it as
        return jnp.reshape(spec.apply(model, xi, mi), ()).astype(jnp.float32)

    answers = jax.vmap(answer)(x, mask)  # (K,)
    feats = jnp.concatenate([jnp.tanh(answers / 4), jax.nn.sigmoid(answers)])
    h = jax.nn.gelu(feats @ probe["head"]["w1"] + probe["head"]["b1"])
    return (h @ probe["head"]["w2"] + probe["head"]["b2"])[0]


def make_probe_fns(model: ModelSpec | ZooConfig, pc: ProbeConfig, tx) -> dict:
    """The training step, the same step also differentiating the frozen models, and predict.

    A step takes the population as ``rows``: stacked frozen params of shape
    ``(S, per_row, ...)``; it picks one model from every row (a local gather when
    rows are sharded over devices, and the same models whatever the number of
    devices), so a step sees ``S`` models.
    """
    spec = as_spec(model)
    population = jax.vmap(lambda p, z: sandwich(p, z, spec, pc),
                          in_axes=({"probe": None, "frozen_model": 0}, 0))

    def loss_fn(params, labels, z):
        return optax.sigmoid_binary_cross_entropy(population(params, z), labels).mean()

    def pick(rows, row_labels, key):
        S, per_row = row_labels.shape
        k_idx, k_z = jax.random.split(key)
        idx = jax.random.randint(k_idx, (S,), 0, per_row)
        # Give idx the rows' sharding (a no-op on one device), so each device
        # gathers from its own rows: no frozen parameter crosses devices.
        idx = idx + jnp.zeros_like(row_labels[:, 0], jnp.int32)
        models = jax.vmap(lambda r, i: jax.tree.map(lambda x: x[i], r))(rows, idx)
        labels = jax.vmap(lambda r, i: r[i])(row_labels, idx)
        z = jax.random.normal(k_z, (S, pc.queries, pc.d_noise))
        return models, labels, z

    def step(probe, opt_state, rows, row_labels, key):
        models, labels, z = pick(rows, row_labels, key)
        params = {"probe": probe, "frozen_model": models}
        trainable, frozen = jf.split(params, frozen=FROZEN)  # differentiate the probe only
        loss, grads = jax.value_and_grad(
            lambda t: loss_fn(jf.merge(t, frozen), labels, z))(trainable)
        updates, opt_state = tx.update(grads["probe"], opt_state, probe)
        return optax.apply_updates(probe, updates), opt_state, loss

    def step_with_frozen_grads(probe, opt_state, rows, row_labels, key):
        # What full fine-tuning would cost: the same step differentiating the whole
        # sandwich, frozen models included (as if they were optimizer parameters).
        models, labels, z = pick(rows, row_labels, key)
        params = {"probe": probe, "frozen_model": models}
        loss, grads = jax.value_and_grad(loss_fn)(params, labels, z)
        updates, opt_state = tx.update(grads["probe"], opt_state, probe)
        return optax.apply_updates(probe, updates), opt_state, loss, grads["frozen_model"]

    def predict(probe, models, key):
        """Probe logits for stacked ``models``, averaged over noise draws."""
        n = jax.tree.leaves(models)[0].shape[0]
        z = jax.random.normal(key, (pc.eval_draws, n, pc.queries, pc.d_noise))
        params = {"probe": probe, "frozen_model": models}
        return jax.vmap(lambda zd: population(params, zd))(z).mean(0)

    return {"step": jax.jit(step, donate_argnums=(0, 1)), "predict": jax.jit(predict),
            "step_with_frozen_grads": step_with_frozen_grads}
