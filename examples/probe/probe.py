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
GENERATORS, HEADS = ("mlp", "deep_linear"), ("mlp", "pool")


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
    # Variants (examples/probe/select.py chooses among them on training models only):
    # "deep_linear": ProbeGen's linear stack (Kahana et al. 2024), what --select chose on
    # validation splits of training models in 3 of 4 folds; "mlp": the first probe's.
    generator: str = "deep_linear"
    linear_layers: int = 3  # depth of the "deep_linear" generator
    hard_queries: bool = False  # straight-through one-hot tokens, as a real input would be
    head: str = "mlp"  # "pool": one MLP per answer, mean over queries (permutation-invariant)

    def __post_init__(self):
        if self.generator not in GENERATORS or self.head not in HEADS:
            raise ValueError(f"generator {self.generator!r} not in {GENERATORS} or head "
                             f"{self.head!r} not in {HEADS}")


def _dense(key, n_in, n_out, scale=1.0):
    return jax.random.normal(key, (n_in, n_out)) * scale / math.sqrt(n_in)


def init_probe(key, pc: ProbeConfig, n_lits: int) -> dict:
    k = jax.random.split(key, 5)  # the keys of the defaults, as before the variants
    K, L, H = pc.queries, pc.query_len, pc.hidden
    if pc.generator == "mlp":  # noise z (K, d_noise) -> per-query soft sequence (K, L, n_lits)
        gen = {"w1": _dense(k[0], pc.d_noise, H), "b1": jnp.zeros(H),
               "w2": _dense(k[1], H, L * n_lits, 0.5),
               "query": jax.random.normal(k[2], (K, L * n_lits))}  # one learned code per query
    else:  # [learned code_k, z_k] -> linear layers, no activation: the queries share one
        # low-rank affine map, ProbeGen's regulariser (a free (K, L * n_lits) code has none)
        widths = [2 * pc.d_noise] + [H] * (pc.linear_layers - 1) + [L * n_lits]
        keys = jax.random.split(jax.random.fold_in(key, 1), pc.linear_layers)
        gen = {"code": jax.random.normal(k[2], (K, pc.d_noise)),
               "layers": [{"w": _dense(kl, a, b), "b": jnp.zeros(b)}
                          for kl, a, b in zip(keys, widths[:-1], widths[1:], strict=True)]}
    n_feats = 2 if pc.head == "pool" else 2 * K  # pool: one answer's features at a time
    head = {"w1": _dense(k[3], n_feats, H), "b1": jnp.zeros(H),
            "w2": _dense(k[4], H, 1, 0.1), "b2": jnp.zeros(1)}
    return {"gen": gen, "head": head}


def query_logits(gen: dict, z, L: int, n_lits: int):
    """Noise ``(K, d_noise)`` -> token logits ``(K, L, n_lits)``, by either generator."""
    if "query" in gen:  # "mlp"
        h = jax.nn.gelu(z @ gen["w1"] + gen["b1"])
        out = h @ gen["w2"] + gen["query"]
    else:  # "deep_linear"
        out = jnp.concatenate([gen["code"], z], axis=-1)
        for layer in gen["layers"]:
            out = out @ layer["w"] + layer["b"]
    return out.reshape(z.shape[0], L, n_lits)


def soft_queries(gen: dict, z, L: int, n_lits: int, vocab: int, hard: bool = False):
    """Noise ``(K, d_noise)`` -> one-hot-ish sequences ``(K, L, vocab)`` (no PAD mass).

    ``hard``: straight-through, the forward sees exact one-hot tokens (argmax), the
    backward the softmax's gradient.
    """
    probs = jax.nn.softmax(query_logits(gen, z, L, n_lits), axis=-1)
    if hard:  # onehot + (p - p): exactly one-hot forward (p + (onehot - p) can round off 1)
        onehot = jax.nn.one_hot(jnp.argmax(probs, axis=-1), n_lits, dtype=probs.dtype)
        probs = onehot + (probs - jax.lax.stop_gradient(probs))
    return jnp.pad(probs, ((0, 0), (0, 0), (0, vocab - n_lits)))


def head_logit(head: dict, answers, pool: bool):
    """The frozen model's ``(K,)`` answers -> one logit; ``pool``: invariant to their order."""
    feats = jnp.stack([jnp.tanh(answers / 4), jax.nn.sigmoid(answers)], axis=-1)  # (K, 2)
    if pool:  # the same MLP on every answer, mean over queries: no query combination to learn
        h = jax.nn.gelu(feats @ head["w1"] + head["b1"]).mean(0)
    else:
        h = jax.nn.gelu(feats.T.reshape(-1) @ head["w1"] + head["b1"])
    return (h @ head["w2"] + head["b2"])[0]


def sandwich(params: dict, z, spec: ModelSpec, pc: ProbeConfig):
    """One frozen model in, one "is a generaliser" logit out (vmap over models)."""
    probe, model = params["probe"], params["frozen_model"]
    x = soft_queries(probe["gen"], z, pc.query_len, spec.query_tokens, spec.vocab,
                     pc.hard_queries)
    lens = np.linspace(pc.min_query_len, pc.query_len, pc.queries).round()
    mask = np.arange(pc.query_len)[None, :] < lens[:, None]  # (K, L), static

    def answer(xi, mi):  # one number per query, whatever the user's apply returns it as
        return jnp.reshape(spec.apply(model, xi, mi), ()).astype(jnp.float32)

    return head_logit(probe["head"], jax.vmap(answer)(x, mask), pc.head == "pool")


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
