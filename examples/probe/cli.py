"""The example's command line: every flag with its default and its ``--quick`` default."""

from __future__ import annotations

import argparse
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent.parent / "out"
FLAGS = [  # flag, type, default, default under --quick, help
    ("--models", int, 1152, 24, "zoo size (1152: 32 models of each of the 36 setups)"),
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
    ("--generator", str, "deep_linear", "deep_linear", "query generator: deep_linear "
     "(ProbeGen's linear layers, no activation) | mlp"),
    ("--hard-queries", int, 0, 0, "1: straight-through one-hot queries (forward argmax tokens)"),
    ("--head", str, "mlp", "mlp", "mlp | pool (one MLP per answer, mean over queries)"),
    ("--select-splits", int, 2, 2, "with --select: inner splits of each fold's training models"),
    ("--folds", int, 4, 1, "K-fold cross-validation over the zoo; 1: one split of --test-frac"),
    ("--test-frac", float, 0.3, 0.3, "held-out share of one split"),
    ("--stack-folds", int, 2, 2, "probes cross-fitted per fold for 'probe + w.stats'; 0: none"),
    ("--devices", int, 1, 1, "shard the frozen models over N devices (a 'models' mesh axis)"),
    ("--seed", int, 0, 0, "seed of the zoo, the probe and the splits"),
    ("--cache-dir", Path, OUT / "zoo", OUT / "zoo", "where zoos are cached"),
    ("--out", Path, OUT / "probe_population", OUT / "probe_population", "plot and summary JSON"),
    # A user's zoo (layout: probe/user_zoo.py, README "Bring your own zoo").
    ("--zoo", Path, None, None, "read this zoo (labels.csv + checkpoints) instead of training one"),
    ("--model", str, None, None, "with --zoo: the apply function, package.module:function"),
    ("--vocab", int, None, None, "with --zoo: width of the soft tokens apply takes"),
    ("--query-tokens", int, None, None, "with --zoo: queries use token ids below this "
     "(default --vocab)"),
    ("--save-zoo", Path, None, None, "also write the zoo used in that layout (labelled models)"),
]


def parse_args(argv=None, doc: str = "") -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    p.add_argument("--quick", action="store_true", help="tiny zoo, few steps (seconds)")
    p.add_argument("--bf16", action="store_true", help="frozen models in bfloat16")
    p.add_argument("--select", action="store_true", help="choose generator / queries / head in "
                   "each fold on its training models only (probe/select.py)")
    for flag, kind, full, quick, help_ in FLAGS:
        also = "" if quick == full else f"; --quick {quick}"
        p.add_argument(flag, type=kind, help=f"{help_} (default {full}{also})")
    a = p.parse_args(argv)
    for flag, _, full, quick, _ in FLAGS:
        if getattr(a, name := flag[2:].replace("-", "_")) is None:
            setattr(a, name, quick if a.quick else full)
    if a.zoo is not None and (a.model is None or a.vocab is None):
        p.error("--zoo needs --model package.module:function and --vocab V")
    if a.zoo is None and (a.model or a.vocab):
        p.error("--model and --vocab describe a --zoo DIR")
    a.query_tokens = a.query_tokens or a.vocab
    return a
