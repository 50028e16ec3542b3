"""Held-out models: the probe and the baselines, fold by fold, on models none of them saw.

Every method's held-out score of every model is kept (each model is held out in exactly
one fold), so the report can also score each method *within* each setup group.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import baselines
from .probe import ModelSpec, ProbeConfig
from .report import flops_line
from .train import cast_floats, predict_logits, train_probe
from .zoo import ZooConfig

COMBINED = "probe + w.stats"


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


def probe_logits(out: dict, params) -> np.ndarray:
    """A trained probe's logits (averaged over noise draws) for stacked ``params``."""
    return predict_logits(out["predict"], on_device(out["probe"]),
                          cast_floats(params, out["dtype"]), jax.random.key(10_000))


def cross_fit(params, labels, tr, te, model, pc: ProbeConfig, k: int, seed: int, **kw):
    """Held-out probe logits for every training model, and the same probes' mean on ``te``.

    ``k`` probes, each trained on all but one stratified ``k``-th of the training models
    ``tr`` and scoring that ``k``-th, so no training model is scored by a probe that saw it;
    the test models ``te`` are never touched. What ``probe + w.stats`` is fitted on. Each
    makes as many passes over its (k-1)/k of ``tr`` as the fold's probe over all of it.
    """
    held, on_test = np.full(len(tr), np.nan), []
    pc = dataclasses.replace(pc, steps=max(1, round(pc.steps * (k - 1) / k)))
    for j, (a, b) in enumerate(make_splits(labels[tr], k, 0.5, seed + 1)):
        assert not np.intersect1d(tr[a], te).size and not np.intersect1d(tr[b], tr[a]).size
        out = train_probe(take(params, tr[a]), labels[tr[a]], model,
                          dataclasses.replace(pc, seed=pc.seed + 1 + j), verbose=False,
                          flops_check=False, **kw)
        held[b] = probe_logits(out, take(params, tr[b]))
        on_test.append(probe_logits(out, take(params, te)))
    assert not np.isnan(held).any()
    return held, np.mean(on_test, axis=0)


def cross_validate(params, labels, splits: list, model: ModelSpec | ZooConfig, pc: ProbeConfig,
                   *, devices: int = 1, bf16: bool = False, stack_folds: int = 2,
                   seed: int = 0) -> dict:
    """Per fold: trains the probe (FLOPs checked on the first) and scores every method.

    ``stack_folds`` > 1 adds ``probe + w.stats``, fitted on the training fold's models
    with cross-fitted probe logits (``stack_folds`` more probes per fold); 0 leaves it out.
    Returns per-fold and mean scores, and ``held_out``: each method's score and
    prediction for every model (NaN where a model was never held out, as in one split).
    """
    folds, curves, seconds, moved, flops, stack_seconds = [], [], 0.0, [], {}, 0.0
    n = len(labels)
    held_out: dict[str, dict[str, np.ndarray]] = {}
    for k, (tr, te) in enumerate(splits):
        t_fold = time.time(), time.process_time()
        if len(splits) > 1:
            print(f"fold {k + 1}/{len(splits)}: {len(tr)} training models, {len(te)} held out")
        out = train_probe(
            take(params, tr), labels[tr], model, pc, devices=devices, bf16=bf16,
            eval_sets={"train": (take(params, tr), labels[tr]),
                       "test": (take(params, te), labels[te])},
            eval_every=max(10, pc.steps // 6), flops_check=k == 0,
        )
        seconds += out["train_seconds"]
        curves.append(out["curves"])
        moved += [out["frozen_moved"]] if out["frozen_moved"] else []
        if k == 0:
            flops = out["flops"]
            print(flops_line(flops, out["optimizer_numbers"]))
        logits = probe_logits(out, take(params, te))
        y_tr, y_te = labels[tr], labels[te]
        fold = {
            "majority": baselines.majority(y_tr, y_te),
            "weight stats": baselines.weight_stats(take(params, tr), y_tr, take(params, te), y_te),
            "probe": baselines.scored(y_te, logits, logits > 0),
        }
        if stack_folds > 1 and np.bincount(y_tr, minlength=2).min() >= stack_folds:
            print(f"{COMBINED}: {stack_folds} cross-fitted probes on the training models")
            t0 = time.time()
            held, test_logits = cross_fit(params, labels, tr, te, model, pc, stack_folds,
                                          seed + k, devices=devices, bf16=bf16)
            stack_seconds += time.time() - t0
            fold[COMBINED] = baselines.probe_and_weight_stats(
                held, take(params, tr), y_tr, test_logits, take(params, te), y_te)
        elif stack_folds > 1:  # too few of a class to cross-fit: no score, not a made-up one
            nan = np.full(len(te), np.nan)
            fold[COMBINED] = {"acc": np.nan, "auc": np.nan, "score": nan, "pred": nan}
        for name, sc in fold.items():
            h = held_out.setdefault(name, {"score": np.full(n, np.nan),
                                           "pred": np.full(n, np.nan)})
            h["score"][te], h["pred"][te] = sc.pop("score"), sc.pop("pred")
        folds.append(fold)
        # One split (--folds 1, or one fold of --select, which labels its own folds): no count.
        where = f"fold {k + 1}/{len(splits)}" if len(splits) > 1 else "split"
        print(f"{where} done in {time.time() - t_fold[0]:.0f}s "
              f"({time.process_time() - t_fold[1]:.0f}s CPU; the probe's "
              f"{pc.steps} steps {out['train_seconds']:.0f}s)")
    return {
        "per_fold": folds, "held_out": held_out,
        "scores": {name: {m: float(np.mean([fd[name][m] for fd in folds])) for m in ("acc", "auc")}
                   for name in folds[0]},
        "std_over_folds": {name: {m: float(np.std([fd[name][m] for fd in folds]))
                                  for m in ("acc", "auc")} for name in folds[0]},
        "curves": {key: np.mean([c[key] for c in curves], axis=0).tolist() for key in curves[0]},
        "flops": flops, "probe_seconds": seconds, "stack_seconds": stack_seconds,
        "frozen_moved": moved,
    }
