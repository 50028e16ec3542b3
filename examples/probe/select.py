"""Choosing the probe's variant on validation splits of each fold's training models only.

``nested_cross_validate`` runs the held-out cross-validation, but in every fold it first
hands :func:`choose` the fold's *training* models (a copy: the held-out models are never
passed on), which scores each variant by the ROC-AUC of probes trained on part of them
and validated on the rest (stratified inner splits), then trains that fold's probe with
the variant chosen. So the held-out scores measure the whole procedure, selection
included, and the selection never sees a model it is scored on.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from . import crossval
from .baselines import roc_auc
from .crossval import make_splits, probe_logits, take
from .probe import ProbeConfig
from .train import train_probe

# Stage 1: the baseline and each change alone; stage 2 adds every change that beat the
# baseline, together (when two or more did).
CHANGES = {"generator": "deep_linear", "hard_queries": True, "head": "pool"}


def name(pc: ProbeConfig) -> str:
    """generator/queries/head, e.g. ``mlp/soft/mlp`` (the first probe, the baseline)."""
    return f"{pc.generator}/{'hard' if pc.hard_queries else 'soft'}/{pc.head}"


def validation_aucs(params, labels, model, pc: ProbeConfig, inner: int, seed: int,
                    **kw) -> list[float]:
    """ROC-AUC on each inner split's validation part, of a probe trained on the rest."""
    aucs = []
    for a, b in make_splits(labels, inner, 0.5, seed):
        out = train_probe(take(params, a), labels[a], model, pc, verbose=False,
                          flops_check=False, **kw)
        aucs.append(roc_auc(labels[b], probe_logits(out, take(params, b))))
    return aucs


def choose(params, labels, model, pc: ProbeConfig, *, inner: int = 2, seed: int = 0,
           log=print, **kw) -> tuple[ProbeConfig, dict[str, list[float]]]:
    """The variant with the best mean validation AUC over ``inner`` splits of ``params``.

    ``params`` and ``labels`` are training models only. Ties keep the earlier variant,
    so a change must beat the baseline to be chosen. Returns it and every variant's AUCs.
    """
    base = dataclasses.replace(pc, generator="mlp", hard_queries=False, head="mlp")
    tried = {name(base): base}
    tried.update({name(c): c for c in (dataclasses.replace(base, **{k: v})
                                       for k, v in CHANGES.items())})
    table = {}
    for key, cand in tried.items():
        table[key] = validation_aucs(params, labels, model, cand, inner, seed, **kw)
        log(f"  {key:24s} {np.mean(table[key]):.3f}  ({', '.join(f'{x:.3f}' for x in table[key])})")
    better = {k: v for k, v in CHANGES.items()
              if np.mean(table[name(dataclasses.replace(base, **{k: v}))])
              > np.mean(table[name(base)])}
    if len(better) >= 2:
        both = dataclasses.replace(base, **better)
        tried[name(both)] = both
        table[name(both)] = validation_aucs(params, labels, model, both, inner, seed, **kw)
        log(f"  {name(both):24s} {np.mean(table[name(both)]):.3f}  "
            f"({', '.join(f'{x:.3f}' for x in table[name(both)])})")
    best = max(table, key=lambda k: (np.mean(table[k]), -list(table).index(k)))
    log(f"  chosen: {best}")
    return tried[best], table


def merge(results: list[dict]) -> dict:
    """One-fold ``cross_validate`` results -> the dict ``cross_validate`` returns for all."""
    folds = [r["per_fold"][0] for r in results]
    held_out = results[0]["held_out"]
    for r in results[1:]:
        for method, h in r["held_out"].items():
            for k, v in h.items():
                held_out[method][k] = np.where(np.isnan(v), held_out[method][k], v)
    stat = {"scores": np.mean, "std_over_folds": np.std}
    return {
        "per_fold": folds, "held_out": held_out,
        **{key: {m: {s: float(f([fd[m][s] for fd in folds])) for s in ("acc", "auc")}
                 for m in folds[0]} for key, f in stat.items()},
        "curves": {k: np.mean([r["curves"][k] for r in results], axis=0).tolist()
                   for k in results[0]["curves"]},
        "flops": results[0]["flops"],
        "frozen_moved": [m for r in results for m in r["frozen_moved"]],
        **{k: sum(r[k] for r in results) for k in ("probe_seconds", "stack_seconds")},
    }


def nested_cross_validate(params, labels, splits: list, model, pc: ProbeConfig, *,
                          inner: int = 2, seed: int = 0, out: Path | None = None,
                          **kw) -> dict:
    """``crossval.cross_validate``, each fold's variant chosen on its training models.

    ``kw`` goes to ``cross_validate`` (``devices``, ``bf16``, ``stack_folds``).
    """
    results, selection = [], []
    train_kw = {k: kw[k] for k in ("devices", "bf16") if k in kw}
    for k, (tr, te) in enumerate(splits):
        print(f"selection, fold {k + 1}/{len(splits)}: mean validation AUC over {inner} "
              f"inner splits of its {len(tr)} training models")
        chosen, table = choose(take(params, tr), labels[tr], model, pc, inner=inner,
                               seed=seed + 100 + k, **train_kw)
        selection.append({"chosen": name(chosen), "validation_auc": table})
        results.append(crossval.cross_validate(params, labels, [(tr, te)], model, chosen,
                                               seed=seed + k, **kw))
    res = merge(results)
    res["selection"] = selection
    print("selection over folds: " + ", ".join(s["chosen"] for s in selection))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "selection.json").write_text(json.dumps(selection, indent=1))
    return res
