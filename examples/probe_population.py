"""Headline example: a probe trained through a population of frozen transformers.

    python examples/probe_population.py            # minutes on a 2-core laptop CPU
    python examples/probe_population.py --quick    # seconds (what the tests run)

1. A zoo of small transformers (:mod:`sat_zoo`) learns to tell satisfiable from
   unsatisfiable conjunctions of literals on short sequences; each model is
   labelled *generaliser* if it is still accurate on much longer ones. The zoo
   trains in one vmapped, jitted step and is cached under ``out/zoo/``.
2. A probe - Gaussian noise -> trainable layers -> soft literal sequences ->
   *the frozen model* -> trainable layers -> one logit - learns to tell, for a
   model it has never seen, whether it is a generaliser. Each step takes a batch
   of frozen models as stacked arrays (data, not optimizer parameters) and
   ``jax.vmap``-s the whole sandwich inside one ``jax.jit``; gradients flow
   through the frozen models into the probe's first layers, and no weight
   gradient of a frozen model is ever computed (checked with compiled FLOPs).
3. Held-out models: the probe against the majority class and a weight-statistics
   baseline (Unterthiner et al. 2020: per-layer means, variances and quantiles
   into logistic regression).

``--devices N`` shards the frozen population over a ``models`` mesh axis (the
probe is replicated; ``jax.jit`` all-reduces only the probe's gradients).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jfreeze as jf  # noqa: E402
import sat_zoo as sz  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------
# The probe.


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


def init_probe(key, pc: ProbeConfig, n_lits: int) -> dict:
    k = jax.random.split(key, 5)
    K, L, H = pc.queries, pc.query_len, pc.hidden

    def dense(key, n_in, n_out, scale=1.0):
        return jax.random.normal(key, (n_in, n_out)) * scale / math.sqrt(n_in)

    return {
        # noise z (K, d_noise) -> per-query soft sequence (K, L, n_lits)
        "gen": {
            "w1": dense(k[0], pc.d_noise, H), "b1": jnp.zeros(H),
            "w2": dense(k[1], H, L * n_lits, 0.5),
            "query": jax.random.normal(k[2], (K, L * n_lits)),  # one learned code per query
        },
        # the frozen model's K answers -> generaliser logit
        "head": {
            "w1": dense(k[3], 2 * K, H), "b1": jnp.zeros(H),
            "w2": dense(k[4], H, 1, 0.1), "b2": jnp.zeros(1),
        },
    }


def soft_queries(gen: dict, z, L: int, n_lits: int, vocab: int):
    """Noise ``(K, d_noise)`` -> soft one-hot sequences ``(K, L, vocab)`` (no PAD mass)."""
    h = jax.nn.gelu(z @ gen["w1"] + gen["b1"])
    logits = (h @ gen["w2"] + gen["query"]).reshape(z.shape[0], L, n_lits)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.pad(probs, ((0, 0), (0, 0), (0, vocab - n_lits)))


def probe_logit(probe: dict, model: dict, z, cfg: sz.ZooConfig, pc: ProbeConfig):
    """One frozen model in, one "is a generaliser" logit out (vmap over models)."""
    x = soft_queries(probe["gen"], z, pc.query_len, 2 * cfg.n_vars, cfg.vocab)
    lens = np.linspace(pc.min_query_len, pc.query_len, pc.queries).round()
    mask = np.arange(pc.query_len)[None, :] < lens[:, None]  # (K, L), static
    answers = jax.vmap(lambda xi, mi: sz.forward(model, xi, mi, cfg.n_heads))(x, mask)  # (K,)
    feats = jnp.concatenate([jnp.tanh(answers / 4), jax.nn.sigmoid(answers)])
    h = jax.nn.gelu(feats @ probe["head"]["w1"] + probe["head"]["b1"])
    return (h @ probe["head"]["w2"] + probe["head"]["b2"])[0]


def make_probe_fns(cfg: sz.ZooConfig, pc: ProbeConfig, tx, *, also_frozen_grads: bool = False):
    """The jitted training step and evaluation.

    The step takes the population as ``rows``: stacked frozen params of shape
    ``(S, per_row, ...)``; each step picks one model from every row (a local
    gather when rows are sharded over devices, and the same models whatever the
    number of devices), so a step sees ``S`` models.
    """

    def loss_fn(probe, frozen, labels, z):
        frozen = jf.stop_gradient(frozen)  # belt and braces: frozen params are data
        logits = jax.vmap(lambda m, zi: probe_logit(probe, m, zi, cfg, pc))(frozen, z)
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

    def pick(rows, row_labels, key):
        S, per_row = row_labels.shape
        k_idx, k_z = jax.random.split(key)
        idx = jax.random.randint(k_idx, (S,), 0, per_row)
        # Give idx the rows' sharding (a no-op on one device), so each device
        # gathers from its own rows: no frozen parameter crosses devices.
        idx = idx + jnp.zeros_like(row_labels[:, 0], jnp.int32)
        take = jax.vmap(lambda r, i: jax.tree.map(lambda x: x[i], r))
        batch = take(rows, idx)
        labels = jax.vmap(lambda r, i: r[i])(row_labels, idx)
        z = jax.random.normal(k_z, (S, pc.queries, pc.d_noise))
        return batch, labels, z

    def step(probe, opt_state, rows, row_labels, key):
        batch, labels, z = pick(rows, row_labels, key)
        loss, grads = jax.value_and_grad(loss_fn)(probe, batch, labels, z)
        updates, opt_state = tx.update(grads, opt_state, probe)
        return optax.apply_updates(probe, updates), opt_state, loss

    def step_with_frozen_grads(probe, opt_state, rows, row_labels, key):
        # What full fine-tuning would cost: the same step, but also asking for the
        # frozen models' weight gradients (as if they were optimizer parameters).
        batch, labels, z = pick(rows, row_labels, key)

        def loss2(probe, frozen):
            logits = jax.vmap(lambda m, zi: probe_logit(probe, m, zi, cfg, pc))(frozen, z)
            return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

        loss, (grads, fgrads) = jax.value_and_grad(loss2, argnums=(0, 1))(probe, batch)
        updates, opt_state = tx.update(grads, opt_state, probe)
        return optax.apply_updates(probe, updates), opt_state, loss, fgrads

    def predict(probe, models, key):
        """Probe logits for stacked ``models``, averaged over noise draws."""
        n = jax.tree.leaves(models)[0].shape[0]
        z = jax.random.normal(key, (pc.eval_draws, n, pc.queries, pc.d_noise))
        one = jax.vmap(lambda m, zi: probe_logit(probe, m, zi, cfg, pc))
        return jax.vmap(lambda zd: one(models, zd))(z).mean(0)

    fns = {"step": jax.jit(step, donate_argnums=(0, 1)), "predict": jax.jit(predict)}
    if also_frozen_grads:
        fns["step_with_frozen_grads"] = step_with_frozen_grads
    return fns


def as_rows(tree, labels, S: int):
    """Stacked models ``(n, ...)`` -> rows ``(S, ceil(n / S), ...)`` (wrapping around)."""
    n = len(labels)
    per_row = -(-n // S)
    order = np.arange(S * per_row) % n
    order = order.reshape(per_row, S).T  # row s holds models s, s + S, ...
    rows = jax.tree.map(lambda x: np.asarray(x)[order], tree)
    return rows, np.asarray(labels, np.float32)[order]


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0]
    return float(cost["flops"])


def compiled_flops(fn, *args) -> float:
    """FLOPs of ``fn`` compiled for ``args`` (XLA's cost analysis)."""
    return _flops(jax.jit(fn).lower(*args).compile())


def train_probe(zoo_params, labels, cfg: sz.ZooConfig, pc: ProbeConfig, *, devices: int = 1,
                bf16: bool = False, eval_sets: dict | None = None, eval_every: int = 50,
                verbose: bool = True, flops_check: bool = True) -> dict[str, Any]:
    """Trains the probe on stacked frozen ``zoo_params`` with 0/1 ``labels``.

    ``eval_sets`` maps a name to ``(stacked params, labels)`` scored every
    ``eval_every`` steps (learning curves only; nothing is selected on them).
    """
    S = pc.batch_models
    if S % devices:
        raise ValueError(f"--batch-models {S} must be a multiple of --devices {devices}")
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    zoo_params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), zoo_params)
    rows, row_labels = as_rows(zoo_params, labels, S)
    probe = init_probe(jax.random.key(pc.seed), pc, 2 * cfg.n_vars)
    tx = optax.adamw(pc.lr, weight_decay=pc.weight_decay)
    opt_state = tx.init(probe)

    mesh = None
    if devices > 1:
        # Auto axes: jit propagates the shardings (the explicit-sharding mode of new
        # JAX versions would also need every per-model array annotated).
        auto = getattr(jax.sharding, "AxisType", None)
        kw = {"axis_types": (auto.Auto,)} if auto is not None else {}
        mesh = jax.make_mesh((devices,), ("models",), **kw)
        rows = jf.shard_stacked(rows, mesh)  # each device holds S / devices rows
        row_labels = jf.shard_stacked(row_labels, mesh)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        probe, opt_state = jax.device_put((probe, opt_state), replicated)
    else:
        rows, row_labels = jax.device_put((rows, row_labels))
    rows_before = jax.tree.map(np.array, rows)

    fns = make_probe_fns(cfg, pc, tx, also_frozen_grads=flops_check)
    key = jax.random.key(pc.seed + 1)
    report: dict[str, Any] = {}
    args = (probe, opt_state, rows, row_labels, key)
    step = fns["step"].lower(*args).compile()  # compiled once, ahead of time
    if flops_check:
        f_full = compiled_flops(fns["step_with_frozen_grads"], *args)
        report["flops"] = {"probe_step": _flops(step), "with_frozen_grads": f_full}
    if mesh is not None:  # to check what the devices exchange: only the probe's gradients
        report["hlo"] = step.as_text()

    curves: dict[str, list] = {"step": [], "loss": [], "eval_step": []}
    for name in (eval_sets or {}):
        curves[f"{name}_auc"], curves[f"{name}_acc"] = [], []

    def evaluate(step_i):
        curves["eval_step"].append(step_i)
        for name, (params, y) in (eval_sets or {}).items():
            logits = np.asarray(fns["predict"](probe, params, jax.random.key(10_000)))
            curves[f"{name}_auc"].append(roc_auc(y, logits))
            curves[f"{name}_acc"].append(float(((logits > 0) == y).mean()))

    if eval_sets:
        eval_sets = {k: (jax.tree.map(lambda x: jnp.asarray(x, dtype), p), np.asarray(y))
                     for k, (p, y) in eval_sets.items()}
        evaluate(0)
    t0 = time.time()
    running = None
    for i in range(pc.steps):
        key, sub = jax.random.split(key)
        probe, opt_state, loss = step(probe, opt_state, rows, row_labels, sub)
        if i % 10 == 9 or i == pc.steps - 1:
            loss = float(loss)
            running = loss if running is None else 0.8 * running + 0.2 * loss
            curves["step"].append(i + 1)
            curves["loss"].append(loss)
            if verbose:
                extra = f"loss {running:.3f}"
                if curves.get("test_auc"):
                    extra += f"  held-out AUC {curves['test_auc'][-1]:.2f}"
                sz.progress("probe", i + 1, pc.steps, t0, extra)
        if eval_sets and ((i + 1) % eval_every == 0 or i == pc.steps - 1):
            evaluate(i + 1)
    report["train_seconds"] = time.time() - t0
    rows_after = jax.tree.map(np.array, rows)
    jf.assert_frozen(rows_before, rows_after, frozen=jf.everything)  # the zoo never moved
    report.update(probe=jax.tree.map(np.asarray, probe), curves=curves, predict=fns["predict"],
                  dtype=dtype)
    return report


# --------------------------------------------------------------------------
# Metrics and the baselines.


def roc_auc(y, score) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def weight_statistics(params) -> np.ndarray:
    """Per leaf (per layer tensor): mean, variance and 0/25/50/75/100% quantiles."""
    feats = []
    for leaf in jax.tree.leaves(params):
        x = np.asarray(leaf, np.float32).reshape(leaf.shape[0], -1)
        q = np.quantile(x, [0.0, 0.25, 0.5, 0.75, 1.0], axis=1).T
        feats += [x.mean(1, keepdims=True), x.var(1, keepdims=True), q]
    return np.concatenate(feats, axis=1)


def weight_stats_baseline(train_params, y_train, test_params, y_test) -> dict:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr, xte = weight_statistics(train_params), weight_statistics(test_params)
    if len(set(y_train.tolist())) < 2:
        p = np.full(len(y_test), float(y_train.mean()))
    else:
        folds = int(max(2, min(5, np.bincount(y_train.astype(int)).min())))
        clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, cv=folds, max_iter=5000))
        with warnings.catch_warnings():  # sklearn's deprecation notices about defaults
            warnings.simplefilter("ignore", FutureWarning)
            clf.fit(xtr, y_train)
        p = clf.predict_proba(xte)[:, 1]
    return {"acc": float(((p > 0.5) == y_test).mean()), "auc": roc_auc(y_test, p),
            "features": xtr.shape[1]}


# --------------------------------------------------------------------------
# The run.


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny zoo, few steps (seconds)")
    z = p.add_argument_group("zoo")
    z.add_argument("--models", type=int, default=None, help="zoo size (default 288; quick 48)")
    z.add_argument("--zoo-steps", type=int, default=None, help="training steps of every model")
    z.add_argument("--d-model", type=int, default=16)
    z.add_argument("--heads", type=int, default=2)
    z.add_argument("--layers", type=int, default=None, help="transformer layers (default 2; quick 1)")
    z.add_argument("--d-mlp", type=int, default=32)
    z.add_argument("--threshold", type=float, default=None,
                   help="generaliser: accuracy on long sequences at least this "
                        "(default 0.8; quick: the zoo's median, so both classes exist)")
    z.add_argument("--min-train-acc", type=float, default=None,
                   help="models below this accuracy at training lengths are left out "
                        "(default 0.9; quick 0)")
    z.add_argument("--cache-dir", type=Path, default=ROOT / "out" / "zoo")
    q = p.add_argument_group("probe")
    q.add_argument("--steps", type=int, default=None, help="probe training steps")
    q.add_argument("--queries", type=int, default=None, help="queries per model (default 16; quick 8)")
    q.add_argument("--query-len", type=int, default=32, help="longest query")
    q.add_argument("--min-query-len", type=int, default=16, help="shortest query")
    q.add_argument("--batch-models", type=int, default=None,
                   help="frozen models per step, a multiple of --devices (default 32; quick 8)")
    q.add_argument("--lr", type=float, default=3e-3)
    q.add_argument("--test-frac", type=float, default=0.3, help="held-out share (one split)")
    q.add_argument("--folds", type=int, default=None,
                   help="K > 1: K-fold cross-validation over the zoo (default 4); "
                        "1: one split of --test-frac (quick)")
    q.add_argument("--bf16", action="store_true", help="frozen models in bfloat16")
    q.add_argument("--devices", type=int, default=1,
                   help="shard the frozen models over this many devices (a 'models' mesh axis)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "probe_population",
                   help="where the plot and summary JSON go")
    return p.parse_args(argv)


def configs(args) -> tuple[sz.ZooConfig, ProbeConfig]:
    quick = args.quick
    cfg = sz.ZooConfig(
        models=args.models or (24 if quick else 288),
        steps=args.zoo_steps or (80 if quick else 400),
        d_model=args.d_model, n_heads=args.heads, n_layers=args.layers or (1 if quick else 2),
        d_mlp=args.d_mlp, eval_batch=128 if quick else 512, seed=args.seed,
    )
    pc = ProbeConfig(
        queries=args.queries or (8 if quick else 16), query_len=args.query_len,
        min_query_len=args.min_query_len, batch_models=args.batch_models or (8 if quick else 32),
        steps=args.steps or (20 if quick else 300), lr=args.lr, seed=args.seed,
        eval_draws=2 if quick else 8,
    )
    return cfg, pc


def split_models(n: int, test_frac: float, seed: int, labels) -> tuple[np.ndarray, np.ndarray]:
    """A stratified random split of model indices."""
    rng = np.random.default_rng(seed)
    test = []
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test += idx[: int(round(test_frac * len(idx)))].tolist()
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


def plot(path: Path, curves: dict, scores: dict, test_acc, threshold: float, kept,
         spread: dict | None = None, n_folds: int = 1) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(curves["step"], curves["loss"], color="tab:gray", lw=1, label="train loss (batch)")
    ax[0].set_xlabel("probe step")
    ax[0].set_ylabel("BCE loss")
    ax2 = ax[0].twinx()
    for name, style in (("train", "--"), ("test", "-")):
        if f"{name}_auc" in curves:
            ax2.plot(curves["eval_step"], curves[f"{name}_auc"], style, color="tab:blue",
                     label=f"{'held-out' if name == 'test' else 'train'} AUC")
            ax2.plot(curves["eval_step"], curves[f"{name}_acc"], style, color="tab:orange",
                     label=f"{'held-out' if name == 'test' else 'train'} acc")
    ax2.set_ylim(0.3, 1.02)
    h1, l1 = ax[0].get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax[0].legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left")
    ax[0].set_title("probe learning curves" + (f" (mean of {n_folds} folds)" if n_folds > 1 else ""))

    names = list(scores)
    x = np.arange(len(names))
    err = {m: [spread[n][m] for n in names] if spread else None for m in ("acc", "auc")}
    ax[1].bar(x - 0.2, [scores[n]["acc"] for n in names], 0.4, yerr=err["acc"], label="accuracy")
    ax[1].bar(x + 0.2, [scores[n]["auc"] for n in names], 0.4, yerr=err["auc"], label="ROC-AUC")
    for i, n in enumerate(names):
        for dx, k in ((-0.2, "acc"), (0.2, "auc")):
            ax[1].text(i + dx + 0.03, scores[n][k] + 0.01, f"{scores[n][k]:.2f}", ha="center", fontsize=7)
    ax[1].set_xticks(x, names, fontsize=8)
    ax[1].set_ylim(0, 1.1)
    ax[1].axhline(0.5, color="k", lw=0.5)
    ax[1].legend(fontsize=7, loc="lower right")
    ax[1].set_title("held-out models" + (f" ({n_folds}-fold CV, ± std)" if n_folds > 1 else ""))

    bins = np.linspace(0.4, 1.0, 25)
    ax[2].hist(np.asarray(test_acc)[kept], bins=bins, color="tab:green", alpha=0.8)
    ax[2].axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.2f}")
    ax[2].set_xlabel("zoo model accuracy on long sequences")
    ax[2].set_ylabel("models")
    ax[2].legend(fontsize=7)
    ax[2].set_title("the zoo's labels")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    cfg, pc = configs(args)
    if args.folds is None:
        args.folds = 1 if args.quick else 4
    if args.min_train_acc is None:
        args.min_train_acc = 0.0 if args.quick else 0.9
    if args.devices > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        try:  # on CPU, one device per share of the models (read only by the CPU backend)
            jax.config.update("jax_num_cpu_devices", args.devices)
        except RuntimeError:  # JAX's backends already started (main() called in-process)
            pass
    if jax.device_count() < args.devices:
        raise SystemExit(f"--devices {args.devices} but JAX sees {jax.device_count()} device(s); "
                         "on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{args.devices}; "
          f"zoo {cfg.models} models d={cfg.d_model} layers={cfg.n_layers}, "
          f"probe {pc.queries} queries x {pc.query_len} tokens, {pc.steps} steps")

    # 1. The zoo.
    t0 = time.time()
    zoo, cached = sz.load_or_train(cfg, args.cache_dir)
    zoo_seconds = time.time() - t0
    print(f"zoo: {'loaded from cache' if cached else 'trained and cached'} "
          f"({args.cache_dir / ('zoo-' + cfg.key() + '.npz')}) in {zoo_seconds:.1f}s")
    kept = zoo["train_acc"] >= args.min_train_acc
    if args.threshold is None:
        args.threshold = float(np.median(zoo["test_acc"][kept])) if args.quick else 0.8
    labels_all = (zoo["test_acc"] >= args.threshold).astype(np.int32)
    idx = np.flatnonzero(kept)
    labels = labels_all[idx]
    params = take(zoo["params"], idx)
    n_gen = int(labels.sum())
    print(f"zoo: {kept.sum()} of {cfg.models} models learned the task (train acc >= "
          f"{args.min_train_acc}); {n_gen} generalisers / {len(labels) - n_gen} not "
          f"(acc >= {args.threshold:.2f} on lengths {cfg.test_len[0]}-{cfg.test_len[1]}, "
          f"trained on <= {max(cfg.train_lens)})")
    kinds = zoo["settings"]["pos_kind"][idx]
    by_kind = {k: f"{labels[kinds == i].mean():.2f}" for i, k in enumerate(sz.POS_KINDS)
               if (kinds == i).any()}
    print(f"zoo: generaliser fraction by positional table: {by_kind}")

    splits = make_splits(labels, args.folds, args.test_frac, args.seed)
    one_model = take(params, 0)

    # 2. The probe, and 3. held-out models (once per fold with --folds K).
    probe0 = init_probe(jax.random.key(0), pc, 2 * cfg.n_vars)
    print(jf.summary({"probe": probe0, "frozen_model": one_model},
                     frozen=jf.paths("frozen_model/**")))
    folds, curves, probe_seconds = [], [], 0.0
    for k, (tr, te) in enumerate(splits):
        if len(splits) > 1:
            print(f"fold {k + 1}/{len(splits)}: {len(tr)} training models, {len(te)} held out")
        out = train_probe(
            take(params, tr), labels[tr], cfg, pc, devices=args.devices, bf16=args.bf16,
            eval_sets={"train": (take(params, tr), labels[tr]),
                       "test": (take(params, te), labels[te])},
            eval_every=max(10, pc.steps // 20), flops_check=k == 0,
        )
        probe_seconds += out["train_seconds"]
        curves.append(out["curves"])
        if k == 0:
            f = out["flops"]
            print(f"compiled FLOPs per step: probe only {f['probe_step']:.3g}; the same step also "
                  f"differentiating the frozen models {f['with_frozen_grads']:.3g} "
                  f"({f['with_frozen_grads'] / f['probe_step']:.2f}x): no frozen weight gradients "
                  "are computed, and the optimizer state holds the probe only "
                  f"({sum(x.size for x in jax.tree.leaves(optax.adam(1.0).init(probe0)))} "
                  "numbers).")
        dtype = out["dtype"]
        logits = np.asarray(out["predict"](
            jax.tree.map(jnp.asarray, out["probe"]),
            jax.tree.map(lambda x: jnp.asarray(x, dtype), take(params, te)),
            jax.random.key(10_000)))
        y_te = labels[te]
        majority = int(labels[tr].mean() >= 0.5)
        folds.append({
            "majority": {"acc": float((y_te == majority).mean()), "auc": 0.5},
            "weight stats": weight_stats_baseline(take(params, tr), labels[tr],
                                                  take(params, te), y_te),
            "probe": {"acc": float(((logits > 0) == y_te).mean()), "auc": roc_auc(y_te, logits)},
        })
    scores = {name: {m: float(np.mean([fd[name][m] for fd in folds])) for m in ("acc", "auc")}
              for name in folds[0]}
    spread = {name: {m: float(np.std([fd[name][m] for fd in folds])) for m in ("acc", "auc")}
              for name in folds[0]}
    mean_curves = {key: np.mean([c[key] for c in curves], axis=0).tolist() for key in curves[0]}
    args.out.mkdir(parents=True, exist_ok=True)
    plot_path = args.out / "probe_population.png"
    plot(plot_path, mean_curves, scores, zoo["test_acc"], args.threshold, kept,
         spread if len(folds) > 1 else None, len(folds))
    total = time.time() - t_start
    n_te = [len(te) for _, te in splits]
    summary = {
        "zoo_models": int(cfg.models), "kept": int(kept.sum()), "generalisers": n_gen,
        "threshold": args.threshold, "folds": len(folds), "test_models": n_te,
        "scores": scores, "std_over_folds": spread, "per_fold": folds,
        "flops": f, "zoo_seconds": zoo_seconds, "zoo_cached": cached,
        "probe_seconds": probe_seconds, "total_seconds": total,
        "devices": args.devices, "bf16": bool(args.bf16),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))

    print()
    if len(folds) == 1:
        tr, te = splits[0]
        print(f"held-out models: {len(te)} ({int(labels[te].sum())} generalisers); "
              f"probe trained on {len(tr)} ({int(labels[tr].sum())} generalisers)")
    else:
        print(f"held-out models: {len(folds)}-fold cross-validation over {len(labels)} models "
              f"(mean ± std over folds)")
    print(f"{'':14s} {'accuracy':>13s} {'ROC-AUC':>13s}")
    for name, sc in scores.items():
        cells = [f"{sc[m]:.3f}" + (f" ± {spread[name][m]:.3f}" if len(folds) > 1 else "")
                 for m in ("acc", "auc")]
        print(f"{name:14s} {cells[0]:>13s} {cells[1]:>13s}")
    print(f"zoo: {zoo_seconds:.0f}s ({'cached' if cached else 'trained'}), probe: "
          f"{probe_seconds:.0f}s, total {total:.0f}s; plot: {plot_path}")
    return summary


if __name__ == "__main__":
    main()
