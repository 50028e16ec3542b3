"""The zoo's model: a tiny pre-LN transformer encoder with mean pooling, in plain JAX.

Every model has the same parameter structure, so a zoo is one stacked tree and a
population of models is a leading axis to ``jax.vmap`` over. What differs between
models (the positional table among them) is data.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from .zoo import ZooConfig

POS_KINDS = ("none", "sinusoidal", "learned")


def sinusoid(max_len: int, d: int) -> np.ndarray:
    pos = np.arange(max_len)[:, None]
    i = np.arange(d // 2)[None, :]
    ang = pos / (10000 ** (2 * i / d))
    out = np.zeros((max_len, d), np.float32)
    out[:, 0::2], out[:, 1::2] = np.sin(ang), np.cos(ang)
    return out


def init_model(key, cfg: ZooConfig, pos_kind) -> dict:
    """One model's parameters; ``pos_kind`` indexes :data:`POS_KINDS` (may be traced)."""
    d, h, L = cfg.d_model, cfg.d_mlp, cfg.max_len
    keys = iter(jax.random.split(key, 4 + 4 * cfg.n_layers))

    def dense(k, n_in, n_out):
        return jax.random.normal(k, (n_in, n_out)) / math.sqrt(n_in)

    learned = jax.random.normal(next(keys), (L, d)) * 0.5
    pos = jnp.select(
        [pos_kind == 0, pos_kind == 1],
        [jnp.zeros((L, d)), jnp.asarray(sinusoid(L, d))],
        learned,
    )
    layers = []
    for _ in range(cfg.n_layers):
        layers.append({
            "ln1": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
            "qkv": dense(next(keys), d, 3 * d),
            "out": dense(next(keys), d, d) / math.sqrt(2 * cfg.n_layers),
            "ln2": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
            "mlp_in": {"kernel": dense(next(keys), d, h), "bias": jnp.zeros(h)},
            "mlp_out": {"kernel": dense(next(keys), h, d) / math.sqrt(2 * cfg.n_layers),
                        "bias": jnp.zeros(d)},
        })
    return {
        "embed": jax.random.normal(next(keys), (cfg.vocab, d)),
        "pos": pos,
        "layers": layers,
        "ln_f": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
        "head": {"kernel": dense(next(keys), d, 1)[:, 0] * 0.1, "bias": jnp.zeros(())},
    }


def _ln(p, x):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def forward(params: dict, x, mask, n_heads: int):
    """One sequence: ``x`` is ``(L, vocab)`` one-hot *or soft* tokens, ``mask`` ``(L,)``.

    Returns the satisfiability logit. Soft inputs go through the same embedding
    matmul as one-hot ones, which is what lets a probe differentiate through the model.
    """
    L = x.shape[0]
    dtype = params["embed"].dtype
    h = x.astype(dtype) @ params["embed"] + params["pos"][:L]
    d = h.shape[-1]
    dh = d // n_heads
    bias = jnp.where(mask, 0.0, -1e9).astype(dtype)
    for lp in params["layers"]:
        y = _ln(lp["ln1"], h)
        q, k, v = jnp.split(y @ lp["qkv"], 3, axis=-1)
        q, k, v = (t.reshape(L, n_heads, dh) for t in (q, k, v))
        s = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(dh) + bias
        a = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(dtype)
        h = h + jnp.einsum("hqk,khd->qhd", a, v).reshape(L, d) @ lp["out"]
        y = _ln(lp["ln2"], h)
        y = jax.nn.gelu(y @ lp["mlp_in"]["kernel"] + lp["mlp_in"]["bias"])
        h = h + y @ lp["mlp_out"]["kernel"] + lp["mlp_out"]["bias"]
    h = _ln(params["ln_f"], h)
    m = mask.astype(dtype)[:, None]
    pooled = (h * m).sum(0) / jnp.maximum(m.sum(), 1)
    logit = pooled @ params["head"]["kernel"] + params["head"]["bias"]
    return logit.astype(jnp.float32)


def apply(params: dict, x, mask):
    """:func:`forward` as ``--model probe.transformer:apply`` calls it (2 heads, the default)."""
    return forward(params, x, mask, n_heads=2)


def batched_logits(params, tokens, mask, cfg: ZooConfig):
    x = jax.nn.one_hot(tokens, cfg.vocab)
    return jax.vmap(lambda xi, mi: forward(params, xi, mi, cfg.n_heads))(x, mask)
