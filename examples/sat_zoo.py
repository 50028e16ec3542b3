"""A zoo of tiny transformers that decide satisfiability of a conjunction of literals.

The task: a sequence of literals over ``n_vars`` variables (``A ¬B C A ...``) is
*unsatisfiable* iff it contains some variable and its negation. Every model is
trained on short sequences and labelled by its accuracy on longer ones
("generaliser" if above a threshold). What varies between models (and so what
makes length generalisation succeed or fail) is expressed as *data*, so that all
models share one parameter structure and train together under one ``jax.vmap``:

* the positional table ``pos``: learned (trained; rows past the training length
  keep their random init), sinusoidal (fixed) or none (all zeros, fixed);
* the training length, learning rate, weight decay and seed.

Everything here is plain JAX + optax; :mod:`probe_population` builds the probe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

POS_KINDS = ("none", "sinusoidal", "learned")
ZOO_VERSION = 2  # bump when a change would make cached zoos stale


@dataclasses.dataclass(frozen=True)
class ZooConfig:
    """Everything that determines a zoo (and so its cache key)."""

    models: int = 288
    n_vars: int = 5
    d_model: int = 16
    n_heads: int = 2
    n_layers: int = 2
    d_mlp: int = 32
    max_len: int = 32  # positional table size = longest sequence any model sees
    train_lens: tuple[int, ...] = (4, 6, 8)  # each model trains on lengths 2..T
    test_len: tuple[int, int] = (16, 32)  # labelled on lengths in [lo, hi]
    lrs: tuple[float, ...] = (2e-3, 5e-3)
    wds: tuple[float, ...] = (0.0, 0.1)
    steps: int = 400
    batch: int = 16
    eval_batch: int = 512
    seed: int = 0

    @property
    def vocab(self) -> int:
        return 2 * self.n_vars + 1  # literals x / ¬x, then PAD

    @property
    def pad(self) -> int:
        return 2 * self.n_vars

    def key(self) -> str:
        """Cache key: a hash of the config (and of the zoo format version)."""
        blob = json.dumps({**dataclasses.asdict(self), "_version": ZOO_VERSION},
                          sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# --------------------------------------------------------------------------
# The task.


def sample_batch(key, batch: int, max_len: int, lo, hi, n_vars: int):
    """Random literal sequences of lengths in ``[lo, hi]``, half of them unsatisfiable.

    Returns ``(tokens, mask, label)``: int tokens ``(batch, max_len)`` padded
    with ``2 * n_vars``, a bool mask of real positions and label 1 = satisfiable.
    Literal ``2 v + s`` is variable ``v`` with sign ``s``. A satisfiable
    sequence draws literals consistent with a random assignment; an
    unsatisfiable one then copies one literal's variable to another position
    with the opposite sign (so it has at least one clash).
    """
    k_len, k_sign, k_var, k_sat, k_ij = jax.random.split(key, 5)
    n = jax.random.randint(k_len, (batch,), lo, hi + 1)
    sign = jax.random.bernoulli(k_sign, 0.5, (batch, n_vars)).astype(jnp.int32)
    var = jax.random.randint(k_var, (batch, max_len), 0, n_vars)
    lit = 2 * var + jnp.take_along_axis(sign, var, axis=1)
    sat = jax.random.bernoulli(k_sat, 0.5, (batch,))
    # Two distinct real positions i != j: j gets i's variable with the other sign.
    u = jax.random.uniform(k_ij, (batch, 2))
    i = jnp.floor(u[:, 0] * n).astype(jnp.int32)
    j = (i + 1 + jnp.floor(u[:, 1] * (n - 1)).astype(jnp.int32)) % n
    clash = jnp.take_along_axis(lit, i[:, None], axis=1)[:, 0] ^ 1
    pos = jnp.arange(max_len)[None, :]
    lit = jnp.where(~sat[:, None] & (pos == j[:, None]), clash[:, None], lit)
    mask = pos < n[:, None]
    tokens = jnp.where(mask, lit, 2 * n_vars)
    return tokens, mask, sat.astype(jnp.int32)


def is_satisfiable(tokens, mask) -> np.ndarray:
    """Ground truth by brute force (NumPy), to check :func:`sample_batch`."""
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    out = []
    for t, m in zip(tokens, mask):
        lits = set(t[m].tolist())
        out.append(all((x ^ 1) not in lits for x in lits))
    return np.array(out, dtype=np.int32)


# --------------------------------------------------------------------------
# The model: a pre-LN transformer encoder with mean pooling, in plain JAX.


def sinusoid(max_len: int, d: int) -> np.ndarray:
    pos = np.arange(max_len)[:, None]
    i = np.arange(d // 2)[None, :]
    ang = pos / (10000 ** (2 * i / d))
    out = np.zeros((max_len, d), np.float32)
    out[:, 0::2], out[:, 1::2] = np.sin(ang), np.cos(ang)
    return out


def init_model(key, cfg: ZooConfig, pos_kind: int) -> dict:
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


def forward(params: dict, x, mask, n_heads: int, *, features: bool = False):
    """One sequence: ``x`` is ``(L, vocab)`` one-hot *or soft* tokens, ``mask`` ``(L,)``.

    Returns the satisfiability logit (and, with ``features=True``, the pooled
    final representation too). Soft inputs go through the same embedding matmul
    as one-hot ones, which is what lets a probe differentiate through the model.
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
    return (logit.astype(jnp.float32), pooled.astype(jnp.float32)) if features else logit.astype(
        jnp.float32)


def batched_logits(params, tokens, mask, cfg: ZooConfig):
    x = jax.nn.one_hot(tokens, cfg.vocab)
    return jax.vmap(lambda xi, mi: forward(params, xi, mi, cfg.n_heads))(x, mask)


# --------------------------------------------------------------------------
# The zoo: every model trained together, one vmapped + jitted step.


def zoo_settings(cfg: ZooConfig) -> dict[str, np.ndarray]:
    """Per-model settings (data, not architecture): a balanced grid, cycled."""
    grid = [  # positional kind varies fastest, so a small zoo still has every kind
        (p, t, lr, wd)
        for t in cfg.train_lens
        for lr in cfg.lrs
        for wd in cfg.wds
        for p in range(len(POS_KINDS))
    ]
    rows = [grid[i % len(grid)] for i in range(cfg.models)]
    return {
        "pos_kind": np.array([r[0] for r in rows], np.int32),
        "train_len": np.array([r[1] for r in rows], np.int32),
        "lr": np.array([r[2] for r in rows], np.float32),
        "wd": np.array([r[3] for r in rows], np.float32),
        "seed": np.arange(cfg.models, dtype=np.int32),
    }


def progress(prefix: str, i: int, n: int, t0: float, extra: str = "") -> None:
    """A carriage-return progress line on stderr (no dependency)."""
    if not sys.stderr.isatty() and i not in (n,) and i % max(1, n // 10):
        return
    frac = i / max(n, 1)
    bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
    el = time.time() - t0
    eta = el / frac - el if frac > 0 else 0.0
    end = "\n" if i >= n else ""
    sys.stderr.write(f"\r{prefix} [{bar}] {i}/{n} {el:5.1f}s eta {eta:5.1f}s {extra}{end}")
    sys.stderr.flush()


def make_zoo_step(cfg: ZooConfig):
    adam = optax.scale_by_adam()

    def loss_fn(params, tokens, mask, label):
        logits = batched_logits(params, tokens, mask, cfg)
        return optax.sigmoid_binary_cross_entropy(logits, label).mean()

    def one(params, opt_state, key, s):
        tokens, mask, label = sample_batch(key, cfg.batch, max(cfg.train_lens), 2,
                                           s["train_len"], cfg.n_vars)
        loss, g = jax.value_and_grad(loss_fn)(params, tokens, mask, label)
        # Only learned positional tables train; sinusoid / none stay as they are.
        learned = s["pos_kind"] == 2
        g = {**g, "pos": jnp.where(learned, g["pos"], 0.0)}
        u, opt_state = adam.update(g, opt_state)
        u = jax.tree.map(lambda u_, p: -s["lr"] * (u_ + s["wd"] * p), u, params)
        u = {**u, "pos": jnp.where(learned, u["pos"], 0.0)}
        return optax.apply_updates(params, u), opt_state, loss

    @jax.jit
    def step(params, opt_state, keys, settings):
        return jax.vmap(one)(params, opt_state, keys, settings)

    return step, adam


def make_eval(cfg: ZooConfig):
    @jax.jit
    def evaluate(params, key, lo, hi):
        tokens, mask, label = sample_batch(key, cfg.eval_batch, cfg.max_len, lo, hi, cfg.n_vars)

        def acc(p):
            pred = batched_logits(p, tokens, mask, cfg) > 0
            return (pred == label.astype(bool)).mean()

        return jax.lax.map(acc, params, batch_size=32)

    return evaluate


def train_zoo(cfg: ZooConfig, *, verbose: bool = True) -> dict[str, Any]:
    """Trains the whole zoo; returns stacked params, settings and accuracies."""
    settings = zoo_settings(cfg)
    keys = jax.random.split(jax.random.key(cfg.seed), cfg.models)
    params = jax.vmap(lambda k, p: init_model(k, cfg, p))(keys, jnp.asarray(settings["pos_kind"]))
    step, adam = make_zoo_step(cfg)
    opt_state = jax.vmap(adam.init)(params)
    s = {k: jnp.asarray(v) for k, v in settings.items()}
    key = jax.random.key(cfg.seed + 1)
    t0 = time.time()
    losses = []
    for i in range(cfg.steps):
        key, sub = jax.random.split(key)
        params, opt_state, loss = step(params, opt_state, jax.random.split(sub, cfg.models), s)
        if verbose and (i % 10 == 9 or i == cfg.steps - 1):
            losses.append(float(loss.mean()))
            progress(f"zoo   {cfg.models} models", i + 1, cfg.steps, t0,
                     f"loss {losses[-1]:.3f}")
    evaluate = make_eval(cfg)
    k1, k2 = jax.random.split(jax.random.key(cfg.seed + 2))
    train_acc = np.asarray(evaluate(params, k1, 2, int(max(cfg.train_lens))))
    test_acc = np.asarray(evaluate(params, k2, *cfg.test_len))
    return {
        "params": jax.tree.map(np.asarray, params),
        "settings": settings,
        "train_acc": train_acc,
        "test_acc": test_acc,
        "train_seconds": time.time() - t0,
    }


# --------------------------------------------------------------------------
# Caching: one .npz per config, keyed by its hash.


def _flatten(tree, prefix=""):
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[prefix + "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf
    return out


def save_zoo(path: Path, zoo: dict, cfg: ZooConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = _flatten(zoo["params"], "params/")
    arrays.update({f"settings/{k}": v for k, v in zoo["settings"].items()})
    arrays.update(train_acc=zoo["train_acc"], test_acc=zoo["test_acc"],
                  train_seconds=np.array(zoo["train_seconds"]),
                  config=np.array(json.dumps(dataclasses.asdict(cfg))))
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_zoo(path: Path, cfg: ZooConfig) -> dict:
    data = np.load(path)
    template = jax.eval_shape(lambda: init_model(jax.random.key(0), cfg, 0))
    names = list(_flatten(template, "params/"))
    leaves = [data[n] for n in names]
    params = jax.tree.unflatten(jax.tree.structure(template), leaves)
    settings = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("settings/")}
    return {"params": params, "settings": settings, "train_acc": data["train_acc"],
            "test_acc": data["test_acc"], "train_seconds": float(data["train_seconds"])}


def load_or_train(cfg: ZooConfig, cache_dir: Path, *, verbose: bool = True) -> tuple[dict, bool]:
    """The zoo for ``cfg`` from ``cache_dir`` if cached there, else trained and cached."""
    path = Path(cache_dir) / f"zoo-{cfg.key()}.npz"
    if path.exists():
        return load_zoo(path, cfg), True
    zoo = train_zoo(cfg, verbose=verbose)
    save_zoo(path, zoo, cfg)
    return zoo, False
