"""What the run shows: the printed results and the plot (progress bars are tqdm's)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

from .baselines import roc_auc
from .transformer import POS_KINDS


def header(cfg, pc, devices: int) -> str:
    """``cfg`` None: a user's zoo (``--zoo``)."""
    the_zoo = (f"zoo {cfg.models} models d={cfg.d_model} layers={cfg.n_layers}" if cfg
               else "a user's zoo")
    return (f"jax {jax.__version__} on {jax.devices()[0].platform} x{devices}; {the_zoo}, "
            f"probe {pc.queries} queries x {pc.query_len} tokens, {pc.steps} steps")


def zoo_lines(cfg, zoo: dict, labels, kept, *, path: Path, cached: bool, seconds: float,
              min_train_acc: float, threshold: float, cpu_seconds: float | None = None) -> str:
    """Where the zoo came from, how many models learned the task and how many generalise."""
    n_gen = int(labels.sum())
    kinds = zoo["settings"]["pos_kind"][kept]
    by_kind = {k: f"{labels[kinds == i].mean():.2f}" for i, k in enumerate(POS_KINDS)
               if (kinds == i).any()}
    return (f"zoo: {'loaded from cache' if cached else 'trained and cached'} ({path}) "
            f"in {seconds:.1f}s" + (f" ({cpu_seconds:.0f}s CPU)" if cpu_seconds else "") + "\n"
            f"zoo: {kept.sum()} of {cfg.models} models learned the task (train acc >= "
            f"{min_train_acc}); {n_gen} generalisers / {len(labels) - n_gen} not "
            f"(acc >= {threshold:.2f} on lengths {cfg.test_len[0]}-{cfg.test_len[1]}, "
            f"trained on <= {max(cfg.train_lens)})\n"
            f"zoo: generaliser fraction by positional table: {by_kind}")


def peak_rss_mb() -> float:
    """This process's peak resident memory (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform == "darwin" else kib / 2**10


def zoo_bytes_line(params, path: Path | None) -> str:
    """The stacked zoo's size in memory, and its cache file's on disk."""
    nbytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
    n = len(jax.tree.leaves(params)[0])
    disk = (f"; cache file {path.stat().st_size / 2**20:.1f} MB"
            if path is not None and path.exists() else "")
    return (f"zoo: {n} models stacked = {nbytes / 2**20:.1f} MB "
            f"({nbytes // n} bytes each){disk}; peak RSS so far {peak_rss_mb():.0f} MB")


def flops_line(f: dict, optimizer_numbers: int) -> str:
    return (f"compiled FLOPs per step: probe only {f['probe_step']:.3g}; the same step also "
            f"differentiating the frozen models {f['with_frozen_grads']:.3g} "
            f"({f['with_frozen_grads'] / f['probe_step']:.2f}x): no frozen weight gradients "
            "are computed, and the optimizer state holds the probe only "
            f"({optimizer_numbers} numbers).")


def scores_table(result: dict, labels, splits: list) -> str:
    """The held-out scores: mean ± std over folds (or one split's)."""
    scores, spread, n = result["scores"], result["std_over_folds"], len(splits)
    if n == 1:
        tr, te = splits[0]
        lines = [f"held-out models: {len(te)} ({int(labels[te].sum())} generalisers); "
                 f"probe trained on {len(tr)} ({int(labels[tr].sum())} generalisers)"]
    else:
        lines = [f"held-out models: {n}-fold cross-validation over {len(labels)} models "
                 f"(mean ± std over folds)"]
    lines.append(f"{'':16s} {'accuracy':>13s} {'ROC-AUC':>13s}")
    for name, sc in scores.items():
        cells = [f"{sc[m]:.3f}" + (f" ± {spread[name][m]:.3f}" if n > 1 else "")
                 for m in ("acc", "auc")]
        lines.append(f"{name:16s} {cells[0]:>13s} {cells[1]:>13s}")
    return "\n".join(lines)


def within_groups(held_out: dict, labels, groups: dict) -> dict:
    """Every method's held-out accuracy and ROC-AUC within each group of each setup variable.

    Pooled over folds (each model is held out once); ``majority rate`` is the group's
    larger class: what a classifier knowing only the group would score.
    """
    out: dict = {}
    scored = ~np.isnan(next(iter(held_out.values()))["score"])
    for var, values in groups.items():
        values = np.asarray(values).astype(str)
        rows = {}
        for g in sorted(set(values[scored].tolist()), key=_natural):
            idx = np.flatnonzero(scored & (values == g))
            y = np.asarray(labels)[idx]
            row = {"n": len(idx), "generalisers": float(y.mean()),
                   "majority_rate": float(max(y.mean(), 1 - y.mean()))}
            for name, h in held_out.items():
                ok = ~np.isnan(h["score"][idx])
                yy, sc, pr = y[ok], h["score"][idx][ok], h["pred"][idx][ok]
                acc = float((pr.astype(bool) == yy.astype(bool)).mean()) if ok.any() else np.nan
                row[name] = {"acc": acc, "auc": roc_auc(yy, sc) if ok.any() else np.nan}
            rows[g] = row
        out[var] = rows
    return out


def _natural(g: str):
    try:
        return (0, float(g), g)
    except ValueError:
        return (1, 0.0, g)


def groups_table(within: dict, readable: dict, n_folds: int) -> str:
    """:func:`within_groups` as text: one block per setup variable, accuracy / ROC-AUC."""
    first = next(iter(next(iter(within.values())).values()), {}) if within else {}
    names = [k for k, v in first.items() if isinstance(v, dict)]  # the methods
    pooled = f"pooled over {n_folds} folds" if n_folds > 1 else "of one split"
    lines = [f"within setup groups: held-out predictions {pooled}; gen. = generaliser share, "
             "maj. = the larger class's share (what knowing only the group scores); cells: "
             "accuracy / ROC-AUC"]
    head = f"{'group':22s} {'n':>4s} {'gen.':>5s} {'maj.':>5s}" + "".join(
        f"  {nm:>15s}" for nm in names)
    for var, rows in within.items():
        r = readable.get(var)
        told = (f"weight stats read {var} with {r['acc']:.2f} CV accuracy (majority "
                f"{r['majority']:.2f})" if r else "not read from weights (too few per group)")
        lines += ["", f"{var}: {told}", head]
        for g, row in rows.items():
            cells = "".join(f"  {_cell(row[nm]):>15s}" for nm in names)
            lines.append(f"{var + '=' + g:22s} {row['n']:4d} {row['generalisers']:5.2f} "
                         f"{row['majority_rate']:5.2f}{cells}")
    return "\n".join(lines)


def _cell(sc: dict) -> str:
    f = [("  -  " if np.isnan(sc[m]) else f"{sc[m]:.3f}") for m in ("acc", "auc")]
    return f"{f[0]} / {f[1]}"


def finish(out: Path, result: dict, labels, splits: list, t_start: float, *, groups: dict,
           readable: dict, zoo_seconds: float, zoo_cached: bool, devices: int, bf16: bool,
           test_acc=None, kept=None, threshold: float | None = None) -> dict:
    """Saves the plot and ``summary.json`` under ``out``, prints the held-out scores overall
    and within each setup group; returns the within-group scores.

    ``test_acc``, ``kept`` and ``threshold`` describe the example's own zoo (None for a
    user's zoo, whose labels come from ``labels.csv``).
    """
    n = len(splits)
    out.mkdir(parents=True, exist_ok=True)
    plot_path = out / "probe_population.png"
    plot(plot_path, result["curves"], result["scores"], test_acc, threshold, kept,
         result["std_over_folds"] if n > 1 else None, n)
    within = within_groups(result["held_out"], labels, groups)
    total, cpu, rss = time.time() - t_start, time.process_time(), peak_rss_mb()
    summary = {
        "models": len(labels), "generalisers": int(np.sum(labels)), "threshold": threshold,
        "folds": n, "test_models": [len(te) for _, te in splits],
        **({"zoo_models": len(kept), "kept": int(kept.sum())} if kept is not None else {}),
        **{k: result[k] for k in ("scores", "std_over_folds", "per_fold", "flops")},
        "within_groups": within, "setup_read_from_weights": readable,
        "zoo_seconds": zoo_seconds, "zoo_cached": zoo_cached,
        "probe_seconds": result["probe_seconds"], "stack_seconds": result["stack_seconds"],
        "total_seconds": total, "cpu_seconds": cpu, "peak_rss_mb": rss,
        "devices": devices, "bf16": bool(bf16),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print()
    print(scores_table(result, labels, splits))
    if groups:
        print()
        print(groups_table(within, readable, n))
    print(f"\nzoo: {zoo_seconds:.0f}s ({'cached' if zoo_cached else 'trained'}), "
          f"probe: {result['probe_seconds']:.0f}s (+{result['stack_seconds']:.0f}s cross-fitted "
          f"probes), total {total:.0f}s ({cpu:.0f}s CPU time); peak RSS {rss:.0f} MB; "
          f"plot: {plot_path}")
    return within


def plot(path: Path, curves: dict, scores: dict, test_acc, threshold: float, kept,
         spread: dict | None = None, n_folds: int = 1) -> None:
    """Learning curves, held-out scores, and the zoo's accuracies on long sequences."""
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
    folds = f" (mean of {n_folds} folds)" if n_folds > 1 else ""
    ax[0].set_title("probe learning curves" + folds)

    names = list(scores)
    x = np.arange(len(names))
    err = {m: [spread[n][m] for n in names] if spread else None for m in ("acc", "auc")}
    ax[1].bar(x - 0.2, [scores[n]["acc"] for n in names], 0.4, yerr=err["acc"], label="accuracy")
    ax[1].bar(x + 0.2, [scores[n]["auc"] for n in names], 0.4, yerr=err["auc"], label="ROC-AUC")
    for i, n in enumerate(names):
        for dx, k in ((-0.2, "acc"), (0.2, "auc")):
            ax[1].text(i + dx + 0.03, scores[n][k] + 0.01, f"{scores[n][k]:.2f}", ha="center",
                       fontsize=7)
    ax[1].set_xticks(x, names, fontsize=8)
    ax[1].set_ylim(0, 1.1)
    ax[1].axhline(0.5, color="k", lw=0.5)
    ax[1].legend(fontsize=7, loc="lower right")
    ax[1].set_title("held-out models" + (f" ({n_folds}-fold CV, ± std)" if n_folds > 1 else ""))

    if test_acc is not None:
        bins = np.linspace(0.4, 1.0, 25)
        ax[2].hist(np.asarray(test_acc)[kept], bins=bins, color="tab:green", alpha=0.8)
        ax[2].axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.2f}")
        ax[2].set_xlabel("zoo model accuracy on long sequences")
        ax[2].set_ylabel("models")
        ax[2].legend(fontsize=7)
    else:  # a user's zoo: labels.csv holds labels, not the accuracies behind them
        ax[2].axis("off")
        ax[2].text(0.5, 0.5, "labels from labels.csv", ha="center", va="center")
    ax[2].set_title("the zoo's labels")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
