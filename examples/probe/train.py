"""Training the probe over a population of frozen models, on one device or a mesh of them."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jfreeze as jf

from .baselines import roc_auc
from .probe import ModelSpec, ProbeConfig, as_spec, init_probe, make_probe_fns
from .zoo import ZooConfig

# Models per call of ``predict`` (a fixed shape, so it compiles once for every fold; a
# small batch keeps the activations in cache: half the CPU time of one call for all).
PREDICT_CHUNK = 4
CURVE_MODELS = 64  # learning curves score at most this many models of each split (plot only)
_FNS: dict = {}  # (model, config but its seed) -> the jitted probe functions and the optimizer
_COMPILED: dict = {}  # (that key, argument shapes) -> the step compiled ahead of time


def probe_fns(model: ModelSpec | ZooConfig, pc: ProbeConfig):
    """``make_probe_fns`` and the optimizer, built once per config: every fold and every
    cross-fitted probe then reuses one jitted step (a compile per argument shape only)."""
    key = (model, dataclasses.replace(pc, seed=0))
    if key not in _FNS:
        tx = optax.adamw(pc.lr, weight_decay=pc.weight_decay)
        _FNS[key] = (make_probe_fns(model, pc, tx), tx)
    return (key, *_FNS[key])


def compiled_step(key, step, args):
    shapes = tuple((x.shape, x.dtype, getattr(x, "sharding", None))
                   for x in jax.tree.leaves(args))
    if (key, shapes) not in _COMPILED:
        _COMPILED[key, shapes] = step.lower(*args).compile()
    return _COMPILED[key, shapes]


def predict_logits(predict, probe, params, key) -> np.ndarray:
    """``predict`` over stacked ``params`` in chunks of :data:`PREDICT_CHUNK` models."""
    n = len(jax.tree.leaves(params)[0])
    idx = np.arange(-(-n // PREDICT_CHUNK) * PREDICT_CHUNK) % n  # the last chunk wraps around
    params = jax.tree.map(np.asarray, params)
    out = [predict(probe, jax.tree.map(lambda x, c=c: x[c], params), jax.random.fold_in(key, i))
           for i, c in enumerate(idx.reshape(-1, PREDICT_CHUNK))]
    return np.concatenate([np.asarray(o) for o in out])[:n]


def curve_subset(params, labels, seed: int):
    """At most :data:`CURVE_MODELS` of ``(params, labels)``, a fixed random choice."""
    n = len(labels)
    idx = np.sort(np.random.default_rng(seed).permutation(n)[:CURVE_MODELS])
    return jax.tree.map(lambda x: np.asarray(x)[idx], params), np.asarray(labels)[idx]


def use_devices(n: int) -> None:
    """Asks JAX for ``n`` CPU devices when it runs on CPU (before its backends start)."""
    if n > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # Read only by the CPU backend; a RuntimeError if JAX's backends already started.
        with contextlib.suppress(RuntimeError):
            jax.config.update("jax_num_cpu_devices", n)
    if jax.device_count() < n:
        raise SystemExit(f"--devices {n} but JAX sees {jax.device_count()} device(s); "
                         "on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N")


def as_rows(tree, labels, S: int):
    """Stacked models ``(n, ...)`` -> rows ``(S, ceil(n / S), ...)`` (wrapping around)."""
    n = len(labels)
    per_row = -(-n // S)
    order = np.arange(S * per_row) % n
    order = order.reshape(per_row, S).T  # row s holds models s, s + S, ...
    rows = jax.tree.map(lambda x: np.asarray(x)[order], tree)
    return rows, np.asarray(labels, np.float32)[order]


def cast_floats(tree, dtype):
    """Floating leaves to ``dtype`` (a user's checkpoint may hold integer leaves too)."""
    def cast(x):
        x = np.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


def train_probe(zoo_params, labels, model: ModelSpec | ZooConfig, pc: ProbeConfig, *,
                devices: int = 1, bf16: bool = False, eval_sets: dict | None = None,
                eval_every: int = 50, verbose: bool = True,
                flops_check: bool = True) -> dict[str, Any]:
    """Trains the probe on stacked frozen ``zoo_params`` with 0/1 ``labels``.

    ``model`` is a :class:`~probe.probe.ModelSpec` (a user's apply function), or the
    example's :class:`ZooConfig`.

    ``eval_sets`` maps a name to ``(stacked params, labels)`` scored every
    ``eval_every`` steps (learning curves only; nothing is selected on them).
    The result's ``"frozen_moved"`` is ``jf.assert_frozen``'s message if any frozen
    model changed during training (else empty).
    """
    S = pc.batch_models
    if S % devices:
        raise ValueError(f"--batch-models {S} must be a multiple of --devices {devices}")
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    spec = as_spec(model)
    zoo_params = cast_floats(zoo_params, dtype)
    rows, row_labels = as_rows(zoo_params, labels, S)
    probe = init_probe(jax.random.key(pc.seed), pc, spec.query_tokens)
    fns_key, fns, tx = probe_fns(model, pc)
    opt_state = tx.init(probe)  # the probe's state only: the frozen models are data

    mesh = None
    if devices > 1:
        # A "models" mesh over the first `devices` devices, with Auto axes: jit
        # propagates the shardings (S is a multiple of devices, so all of them).
        mesh = jf.models_mesh(S, devices=jax.local_devices()[:devices])
        rows = jf.shard_stacked(rows, mesh)  # each device holds S / devices rows
        row_labels = jf.shard_stacked(row_labels, mesh)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        probe, opt_state = jax.device_put((probe, opt_state), replicated)
    else:
        rows, row_labels = jax.device_put((rows, row_labels))
    rows_before = jax.tree.map(np.array, rows)

    key = jax.random.key(pc.seed + 1)
    report: dict[str, Any] = {}
    args = (probe, opt_state, rows, row_labels, key)
    step = compiled_step(fns_key, fns["step"], args)  # compiled ahead of time, once per shape
    if flops_check:
        report["flops"] = {"probe_step": jf.compiled_flops(fns["step"], *args),
                           "with_frozen_grads": jf.compiled_flops(fns["step_with_frozen_grads"],
                                                                  *args)}
    if mesh is not None:  # to check what the devices exchange: only the probe's gradients
        report["hlo"] = step.as_text()

    curves: dict[str, list] = {"step": [], "loss": [], "eval_step": []}
    for name in (eval_sets or {}):
        curves[f"{name}_auc"], curves[f"{name}_acc"] = [], []

    def evaluate(step_i):
        curves["eval_step"].append(step_i)
        for name, (params, y) in (eval_sets or {}).items():
            logits = predict_logits(fns["predict"], probe, params, jax.random.key(10_000))
            curves[f"{name}_auc"].append(roc_auc(y, logits))
            curves[f"{name}_acc"].append(float(((logits > 0) == y).mean()))

    if eval_sets:
        eval_sets = {k: (cast_floats(p, dtype), y) for k, (p, y) in
                     ((k, curve_subset(p, y, pc.seed)) for k, (p, y) in eval_sets.items())}
        evaluate(0)
    t0 = time.time()
    running = None
    bar = tqdm(range(pc.steps), desc="probe", disable=not verbose)
    for i in bar:
        key, sub = jax.random.split(key)
        probe, opt_state, loss = step(probe, opt_state, rows, row_labels, sub)
        if i % 10 == 9 or i == pc.steps - 1:
            loss = float(loss)
            running = loss if running is None else 0.8 * running + 0.2 * loss
            curves["step"].append(i + 1)
            curves["loss"].append(loss)
            if verbose:
                shown = {"loss": f"{running:.3f}"}
                if curves.get("test_auc"):
                    shown["held-out AUC"] = f"{curves['test_auc'][-1]:.2f}"
                bar.set_postfix(shown, refresh=False)
        if eval_sets and ((i + 1) % eval_every == 0 or i == pc.steps - 1):
            evaluate(i + 1)
    report["train_seconds"] = time.time() - t0
    try:  # bit for bit: the zoo never moved
        jf.assert_frozen(rows_before, jax.tree.map(np.array, rows), frozen=jf.everything)
        report["frozen_moved"] = ""
    except AssertionError as e:
        report["frozen_moved"] = str(e)
    report.update(probe=jax.tree.map(np.asarray, probe), curves=curves, predict=fns["predict"],
                  dtype=dtype, optimizer_numbers=sum(x.size for x in jax.tree.leaves(opt_state)))
    return report
