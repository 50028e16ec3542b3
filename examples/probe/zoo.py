"""The zoo: tiny transformers trained together in one vmapped, jitted step, and cached.

What varies between models (and so what makes length generalisation succeed or
fail) is *data*, so that all models share one parameter structure and train under
one ``jax.vmap``: the positional table (learned, sinusoidal or none), the training
length, learning rate, weight decay and seed. Each model is labelled by its
accuracy on sequences longer than any it trained on. Plain JAX + optax: this is the
population, not the library.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from .task import sample_batch
from .transformer import POS_KINDS, batched_logits, init_model

ZOO_VERSION = 3  # bump when a change would make cached zoos stale
# Models per chunk of the zoo's step (``lax.map`` over chunks, ``vmap`` within one): a
# chunk's activations stay in cache, which halves the step's CPU time at 1,152 models.
STEP_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class ZooConfig:
    """Everything that determines a zoo (and so its cache key)."""

    models: int = 1152  # 32 models of each of the 36 settings of the grid
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

    def key(self) -> str:
        """Cache key: a hash of the config (and of the zoo format version)."""
        blob = json.dumps({**dataclasses.asdict(self), "_version": ZOO_VERSION},
                          sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


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


def make_zoo_step(cfg: ZooConfig):
    """One step of every model at once: ``jax.vmap`` over models inside one ``jax.jit``."""
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
        return jax.lax.map(lambda a: one(*a), (params, opt_state, keys, settings),
                           batch_size=min(STEP_CHUNK, cfg.models))

    return step, adam


def make_eval(cfg: ZooConfig):
    @functools.partial(jax.jit, static_argnums=(2, 3))
    def evaluate(params, key, lo, hi):
        # Padded to the longest length asked for (not the table's), one model at a time:
        # 512 sequences of 32 tokens already make a working set beyond the cache.
        tokens, mask, label = sample_batch(key, cfg.eval_batch, hi, lo, hi, cfg.n_vars)

        def acc(p):
            pred = batched_logits(p, tokens, mask, cfg) > 0
            return (pred == label.astype(bool)).mean()

        return jax.lax.map(acc, params)

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
    bar = tqdm(range(cfg.steps), desc=f"zoo of {cfg.models} models", disable=not verbose)
    for i in bar:
        key, sub = jax.random.split(key)
        params, opt_state, loss = step(params, opt_state, jax.random.split(sub, cfg.models), s)
        if verbose and (i % 10 == 9 or i == cfg.steps - 1):
            bar.set_postfix(loss=f"{float(loss.mean()):.3f}", refresh=False)
    evaluate = make_eval(cfg)
    k1, k2 = jax.random.split(jax.random.key(cfg.seed + 2))
    return {
        "params": jax.tree.map(np.asarray, params),
        "settings": settings,
        "train_acc": np.asarray(evaluate(params, k1, 2, int(max(cfg.train_lens)))),
        "test_acc": np.asarray(evaluate(params, k2, *cfg.test_len)),
        "train_seconds": time.time() - t0,
    }


def labelled(zoo: dict, min_train_acc: float, threshold: float | None = None):
    """The models that learned the task, their labels (1 = generaliser) and the threshold.

    A generaliser scores at least ``threshold`` on long sequences (by default the
    median of the models kept, so that both classes exist). Returns ``(params,
    labels, kept, threshold)``, ``kept`` a bool per model of the zoo.
    """
    kept = zoo["train_acc"] >= min_train_acc
    if threshold is None:
        threshold = float(np.median(zoo["test_acc"][kept]))
    idx = np.flatnonzero(kept)
    labels = (zoo["test_acc"] >= threshold).astype(np.int32)[idx]
    return jax.tree.map(lambda x: np.asarray(x)[idx], zoo["params"]), labels, kept, threshold


def setup_groups(zoo: dict, kept) -> dict[str, np.ndarray]:
    """The setup variables of the kept models, as strings (seeds differ per model: left out)."""
    s = {k: np.asarray(v)[kept] for k, v in zoo["settings"].items()}
    return {"pos_kind": np.array([POS_KINDS[i] for i in s["pos_kind"]]),
            **{k: np.array([f"{x:g}" for x in s[k]]) for k in ("train_len", "lr", "wd")}}


# --------------------------------------------------------------------------
# The cache: one .npz per config, keyed by its hash.


def cache_path(cfg: ZooConfig, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"zoo-{cfg.key()}.npz"


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
    leaves = [data[n] for n in _flatten(template, "params/")]
    params = jax.tree.unflatten(jax.tree.structure(template), leaves)
    settings = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("settings/")}
    return {"params": params, "settings": settings, "train_acc": data["train_acc"],
            "test_acc": data["test_acc"], "train_seconds": float(data["train_seconds"])}


def load_or_train(cfg: ZooConfig, cache_dir: Path, *, verbose: bool = True) -> tuple[dict, bool]:
    """The zoo for ``cfg`` from ``cache_dir`` if cached there, else trained and cached."""
    path = cache_path(cfg, cache_dir)
    if path.exists():
        return load_zoo(path, cfg), True
    zoo = train_zoo(cfg, verbose=verbose)
    save_zoo(path, zoo, cfg)
    return zoo, False
