"""Headline example: a probe trained through a population of frozen transformers.

    python examples/probe_population.py            # minutes on a 2-core laptop CPU
    python examples/probe_population.py --quick    # seconds (what the tests run)

A zoo of tiny transformers learns a task on short sequences; a probe (noise -> trainable
generator -> *the frozen model* -> trainable head) learns which of them still solve it on
long ones, scored on held-out models against two baselines. The pieces live in ``probe/``;
``probe/probe.py`` is the jfreeze step that trains through the frozen population.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import claims
import jax
from probe import crossval, report, train, zoo
from probe.probe import FROZEN, ProbeConfig, init_probe

import jfreeze as jf

OUT = Path(__file__).resolve().parent.parent / "out"
FLAGS = [  # flag, type, default, default under --quick, help
    ("--models", int, 288, 24, "zoo size"),
    ("--zoo-steps", int, 400, 80, "training steps of every zoo model"),
    ("--d-model", int, 16, 16, "zoo model width"), ("--d-mlp", int, 32, 32, "MLP width"),
    ("--heads", int, 2, 2, "attention heads"), ("--layers", int, 2, 1, "transformer layers"),
    ("--min-train-acc", float, 0.9, 0.0, "leave out models less accurate at training lengths"),
    ("--threshold", float, 0.8, None, "generaliser: this accurate on long sequences; None: median"),
    ("--steps", int, 300, 20, "probe training steps"),
    ("--queries", int, 16, 8, "queries per model"),
    ("--query-len", int, 32, 32, "longest query"), ("--min-query-len", int, 16, 16, "shortest"),
    ("--batch-models", int, 32, 8, "frozen models per step, a multiple of --devices"),
    ("--lr", float, 3e-3, 3e-3, "probe learning rate"),
    ("--folds", int, 4, 1, "K-fold cross-validation over the zoo; 1: one split of --test-frac"),
    ("--test-frac", float, 0.3, 0.3, "held-out share of one split"),
    ("--devices", int, 1, 1, "shard the frozen models over N devices (a 'models' mesh axis)"),
    ("--seed", int, 0, 0, "seed of the zoo, the probe and the splits"),
    ("--cache-dir", Path, OUT / "zoo", OUT / "zoo", "where zoos are cached"),
    ("--out", Path, OUT / "probe_population", OUT / "probe_population", "plot and summary JSON"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny zoo, few steps (seconds)")
    p.add_argument("--bf16", action="store_true", help="frozen models in bfloat16")
    for flag, kind, full, quick, doc in FLAGS:
        also = "" if quick == full else f"; --quick {quick}"
        p.add_argument(flag, type=kind, help=f"{doc} (default {full}{also})")
    a = p.parse_args(argv)
    for flag, _, full, quick, _ in FLAGS:
        if getattr(a, name := flag[2:].replace("-", "_")) is None:
            setattr(a, name, quick if a.quick else full)
    return a


def main(argv=None) -> int:
    a, t_start = parse_args(argv), time.time()
    cfg = zoo.ZooConfig(models=a.models, steps=a.zoo_steps, d_model=a.d_model, n_heads=a.heads,
                        n_layers=a.layers, d_mlp=a.d_mlp, eval_batch=128 if a.quick else 512,
                        seed=a.seed)
    pc = ProbeConfig(queries=a.queries, query_len=a.query_len, min_query_len=a.min_query_len,
                     batch_models=a.batch_models, steps=a.steps, lr=a.lr, seed=a.seed,
                     eval_draws=2 if a.quick else 8)
    train.use_devices(a.devices)
    print(report.header(cfg, pc, a.devices))

    # 1. The zoo, trained in one vmapped step (or loaded from its cache), and labelled.
    t0 = time.time()
    the_zoo, cached = zoo.load_or_train(cfg, a.cache_dir)
    zoo_seconds = time.time() - t0
    params, labels, kept, a.threshold = zoo.labelled(the_zoo, a.min_train_acc, a.threshold)
    print(report.zoo_lines(cfg, the_zoo, labels, kept, path=zoo.cache_path(cfg, a.cache_dir),
                           cached=cached, seconds=zoo_seconds, min_train_acc=a.min_train_acc,
                           threshold=a.threshold))

    # 2. The probe, trained through the frozen models; 3. scored on held-out models.
    probe0 = init_probe(jax.random.key(0), pc, 2 * cfg.n_vars)
    print(jf.summary({"probe": probe0, "frozen_model": crossval.take(params, 0)}, frozen=FROZEN))
    splits = crossval.make_splits(labels, a.folds, a.test_frac, a.seed)
    res = crossval.cross_validate(params, labels, splits, cfg, pc, devices=a.devices, bf16=a.bf16)
    report.finish(a.out, res, the_zoo, labels, kept, splits, t_start, threshold=a.threshold,
                  zoo_seconds=zoo_seconds, zoo_cached=cached, devices=a.devices, bf16=a.bf16)

    c, flops, moved = claims.Claims(), res["flops"], res["frozen_moved"]
    c.check("; ".join(["every frozen model kept every bit (jf.assert_frozen)", *moved]), not moved)
    c.check(f"no frozen weight gradients: {flops['probe_step']:.3g} compiled FLOPs per step, "
            f"{flops['with_frozen_grads']:.3g} with them",
            flops["with_frozen_grads"] > 1.05 * flops["probe_step"])
    if not a.quick:  # --quick trains the probe for seconds: a smoke test, not a result
        probe, majority = res["scores"]["probe"], res["scores"]["majority"]
        c.check(f"the probe beats chance on held-out models (AUC {probe['auc']:.3f}, accuracy "
                f"{probe['acc']:.3f} vs the majority's {majority['acc']:.3f})",
                probe["auc"] > 0.5 and probe["acc"] > majority["acc"])
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
