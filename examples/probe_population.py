"""Headline example: a probe trained through a population of frozen transformers.

    python examples/probe_population.py            # 1,152 models; ~11 min CPU (zoo ~4, cached)
    python examples/probe_population.py --quick    # seconds (what the tests run)
    python examples/probe_population.py --zoo DIR --model pkg.mod:apply --vocab V  # your zoo
    python examples/probe_population.py --select   # each fold's probe variant chosen on its
                                                   # training models only (probe/select.py)

A zoo of tiny transformers learns a task on short sequences; a probe (noise -> trainable
generator -> *the frozen model* -> trainable head) learns which of them still solve it on
long ones, scored on held-out models against baselines, overall and within each setup
group. The pieces live in ``probe/``; ``probe/probe.py`` is the jfreeze step that trains
through the frozen population; ``probe/user_zoo.py`` documents the ``--zoo`` layout.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import claims
import jax
from probe import baselines, crossval, report, select, train, user_zoo, zoo
from probe.cli import parse_args
from probe.probe import FROZEN, ModelSpec, ProbeConfig, as_spec, init_probe

import jfreeze as jf


def main(argv=None) -> int:
    a, t_start = parse_args(argv, __doc__), time.time()
    cfg = zoo.ZooConfig(models=a.models, steps=a.zoo_steps, d_model=a.d_model, n_heads=a.heads,
                        n_layers=a.layers, d_mlp=a.d_mlp, eval_batch=128 if a.quick else 512,
                        seed=a.seed)
    pc = ProbeConfig(queries=a.queries, query_len=a.query_len, min_query_len=a.min_query_len,
                     batch_models=a.batch_models, steps=a.steps, lr=a.lr, seed=a.seed,
                     eval_draws=2 if a.quick else 8, generator=a.generator,
                     hard_queries=bool(a.hard_queries), head=a.head)
    train.use_devices(a.devices)
    print(report.header(None if a.zoo else cfg, pc, a.devices))

    # 1. The zoo: a user's (labels.csv + checkpoints), or ours, trained in one vmapped step
    #    (or loaded from its cache) and labelled.
    t0, cpu0, own = time.time(), time.process_time(), {}
    if a.zoo is not None:
        params, labels, names, groups = user_zoo.load(a.zoo)
        model, cached = ModelSpec(user_zoo.load_apply(a.model), a.vocab, a.query_tokens), True
        print(user_zoo.describe(a.zoo, labels, names, groups))
    else:
        the_zoo, cached = zoo.load_or_train(cfg, a.cache_dir)
        params, labels, kept, a.threshold = zoo.labelled(the_zoo, a.min_train_acc, a.threshold)
        model, groups = cfg, zoo.setup_groups(the_zoo, kept)
        names = [f"model-{i:04d}" for i in kept.nonzero()[0]]
        own = {"test_acc": the_zoo["test_acc"], "kept": kept, "threshold": a.threshold}
        print(report.zoo_lines(cfg, the_zoo, labels, kept, path=zoo.cache_path(cfg, a.cache_dir),
                               cached=cached, seconds=time.time() - t0,
                               cpu_seconds=time.process_time() - cpu0,
                               min_train_acc=a.min_train_acc, threshold=a.threshold))
    zoo_seconds = time.time() - t0
    print(report.zoo_bytes_line(params, None if a.zoo else zoo.cache_path(cfg, a.cache_dir)))
    if a.save_zoo is not None:
        user_zoo.save(a.save_zoo, params, labels, names, groups)
        print(f"zoo: {len(names)} models written to {a.save_zoo} (read back: --zoo "
              f"{a.save_zoo} --model probe.transformer:apply --vocab {cfg.vocab} "
              f"--query-tokens {2 * cfg.n_vars})")

    # 2. The probe, trained through the frozen models; 3. scored on held-out models, overall
    #    and within each setup group (what the weights give away, the probe must work out).
    probe0 = init_probe(jax.random.key(0), pc, as_spec(model).query_tokens)
    print(jf.summary({"probe": probe0, "frozen_model": crossval.take(params, 0)}, frozen=FROZEN))
    splits = crossval.make_splits(labels, a.folds, a.test_frac, a.seed)
    cv_kw = {"devices": a.devices, "bf16": a.bf16, "stack_folds": a.stack_folds, "seed": a.seed}
    if a.select:  # each fold's variant chosen on its own training models only
        res = select.nested_cross_validate(params, labels, splits, model, pc,
                                           inner=a.select_splits, out=a.out, **cv_kw)
    else:
        res = crossval.cross_validate(params, labels, splits, model, pc, **cv_kw)
    readable = baselines.setup_readability(params, groups, a.seed)
    within = report.finish(a.out, res, labels, splits, t_start, groups=groups, readable=readable,
                           zoo_seconds=zoo_seconds, zoo_cached=cached, devices=a.devices,
                           bf16=a.bf16, **own)

    c, flops, moved = claims.Claims(), res["flops"], res["frozen_moved"]
    c.check("; ".join(["every frozen model kept every bit (jf.assert_frozen)", *moved]), not moved)
    c.check(f"no frozen weight gradients: {flops['probe_step']:.3g} compiled FLOPs per step, "
            f"{flops['with_frozen_grads']:.3g} with them",
            flops["with_frozen_grads"] > 1.05 * flops["probe_step"])
    held = sum(len(te) for _, te in splits)
    if groups:
        c.check(f"every method scored within the groups of {list(groups)}: {held} held-out "
                "models each", all(sum(r["n"] for r in g.values()) == held
                                   for g in within.values()))
    if not a.quick:  # --quick trains the probe for seconds: a smoke test, not a result
        probe, majority = res["scores"]["probe"], res["scores"]["majority"]
        c.check(f"the probe beats chance on held-out models (AUC {probe['auc']:.3f}, accuracy "
                f"{probe['acc']:.3f} vs the majority's {majority['acc']:.3f})",
                probe["auc"] > 0.5 and probe["acc"] > majority["acc"])
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
