"""Held-out models: the probe and the baselines, fold by fold, on models none of them saw."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import baselines
from .probe import ProbeConfig
from .report import flops_line
from .train import train_probe
from .zoo import ZooConfig


def split_models(n: int, test_frac: float, seed: int, labels) -> tuple[np.ndarray, np.ndarray]:
    """A stratified random split of model indices."""
    rng = np.random.default_rng(seed)
    test = []
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test += idx[: round(test_frac * len(idx))].tolist()
    test = np.sort(np.array(test, int))
    train = np.setdiff1d(np.arange(n), test)
    return train, test


def make_splits(labels, folds: int, test_frac: float, seed: int) -> list:
    """``[(train, test)]``: one stratified split, or ``folds``-fold stratified CV."""
    if folds <= 1:
        return [split_models(len(labels), test_frac, seed, labels)]
    from sklearn.model_selection import StratifiedKFold

    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(cv.split(np.zeros(len(labels)), labels))


def take(tree, idx):
    return jax.tree.map(lambda x: np.asarray(x)[idx], tree)


def on_device(tree, dtype=None):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def cross_validate(params, labels, splits: list, cfg: ZooConfig, pc: ProbeConfig, *,
                   devices: int = 1, bf16: bool = False) -> dict:
    """Per fold: trains the probe (FLOPs checked on the first) and scores all three."""
    folds, curves, seconds, moved, flops = [], [], 0.0, [], {}
    for k, (tr, te) in enumerate(splits):
        if len(splits) > 1:
            print(f"fold {k + 1}/{len(splits)}: {len(tr)} training models, {len(te)} held out")
        out = train_probe(
            take(params, tr), labels[tr], cfg, pc, devices=devices, bf16=bf16,
            eval_sets={"train": (take(params, tr), labels[tr]),
                       "test": (take(params, te), labels[te])},
            eval_every=max(10, pc.steps // 20), flops_check=k == 0,
        )
        seconds += out["train_seconds"]
        curves.append(out["curves"])
        moved += [out["frozen_moved"]] if out["frozen_moved"] else []
        if k == 0:
            flops = out["flops"]
            print(flops_line(flops, out["optimizer_numbers"]))
        logits = np.asarray(out["predict"](on_device(out["probe"]),
                                           on_device(take(params, te), out["dtype"]),
                                           jax.random.key(10_000)))
        y_te = labels[te]
        folds.append({
            "majority": baselines.majority(labels[tr], y_te),
            "weight stats": baselines.weight_stats(take(params, tr), labels[tr],
                                                   take(params, te), y_te),
            "probe": {"acc": float(((logits > 0) == y_te).mean()),
                      "auc": baselines.roc_auc(y_te, logits)},
        })
    return {
        "per_fold": folds,
        "scores": {name: {m: float(np.mean([fd[name][m] for fd in folds])) for m in ("acc", "auc")}
                   for name in folds[0]},
        "std_over_folds": {name: {m: float(np.std([fd[name][m] for fd in folds]))
                                  for m in ("acc", "auc")} for name in folds[0]},
        "curves": {key: np.mean([c[key] for c in curves], axis=0).tolist() for key in curves[0]},
        "flops": flops, "probe_seconds": seconds, "frozen_moved": moved,
    }
