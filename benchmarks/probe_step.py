"""Situation 1: a trainable probe around a frozen transformer, one training step, five ways.

    python -m benchmarks.probe_step                 # CPU defaults (a few minutes on 2 cores)
    python -m benchmarks.probe_step --quick         # seconds
    python -m benchmarks.probe_step --gpu           # bf16 compute, larger sizes
    python -m benchmarks.probe_step --json out/probe_step.json

The network is noise -> trainable MLP -> transformer (pre-LN blocks, the first
``frozen_layers`` of them frozen) -> trainable LayerNorm/mean/MLP -> logit; the optimizer
is Adam. The variants run the same network on the same batch:

* ``full``: full fine-tuning, ``optax.adam`` on everything (the reference time).
* ``optax_multi_transform``: the Flax guide's way, ``optax.multi_transform`` with
  ``{"trainable": adam, "frozen": set_to_zero()}`` and labels from
  ``flax.traverse_util.path_aware_map``; ``jax.grad`` over all parameters.
* ``optax_multi_transform_gradnorm``: the same, also returning ``optax.global_norm`` of
  the gradients for logging, as training loops do: the frozen weight gradients come back.
* ``jf_freeze``: ``jf.freeze(optax.adam(...), frozen=jf.paths(...))``, ``jax.grad`` over all
  parameters; XLA drops the frozen weight gradients that nothing uses.
* ``jf_split``: ``jf.split`` the parameters, differentiate the trainable part only
  (donated with the optimizer state) and log its gradient norm: cheap by construction.

Every step is one ``jax.jit`` with the parameters and optimizer state donated. The
ideal counts matmul FLOPs from the sizes (forward, input gradients through every layer
after the first, weight gradients of trainable layers only; see ``benchmarks.models``).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jfreeze as jf
from benchmarks import measure
from benchmarks.models import (
    Sizes,
    batch,
    frozen_patterns,
    ideal_matmul_flops,
    init_sandwich,
    is_frozen_path,
    param_count,
    sandwich_loss,
)

VARIANTS = ("full", "optax_multi_transform", "optax_multi_transform_gradnorm", "jf_freeze",
            "jf_split")
LR = 1e-3

# name -> Sizes. The frozen fraction varies through frozen_layers.
PRESETS: dict[str, list[Sizes]] = {
    "quick": [
        Sizes(batch=8, seq=8, d_model=32, heads=2, layers=2, frozen_layers=1,
              d_noise=16, d_hidden=32),
    ],
    "cpu": [
        Sizes(batch=32, seq=32, d_model=128, heads=4, layers=4, frozen_layers=4,
              d_noise=64, d_hidden=128),
        Sizes(batch=32, seq=32, d_model=128, heads=4, layers=4, frozen_layers=2,
              d_noise=64, d_hidden=128),
        Sizes(batch=16, seq=64, d_model=256, heads=8, layers=4, frozen_layers=4,
              d_noise=64, d_hidden=256),
    ],
    "gpu": [
        Sizes(batch=64, seq=128, d_model=512, heads=8, layers=8, frozen_layers=8,
              d_noise=128, d_hidden=512),
        Sizes(batch=64, seq=128, d_model=512, heads=8, layers=8, frozen_layers=4,
              d_noise=128, d_hidden=512),
        Sizes(batch=32, seq=256, d_model=1024, heads=16, layers=8, frozen_layers=8, d_noise=256,
              d_hidden=1024),
    ],
}
TIMING = {"quick": (2, 2), "cpu": (5, 5), "gpu": (5, 10)}  # (rounds, steps per round)


def path_aware_map(fn, tree):
    """``flax.traverse_util.path_aware_map`` (the Flax guide's labels), or the same without flax."""
    try:
        from flax import traverse_util
    except ImportError:  # pragma: no cover - flax is in the test extra
        return jax.tree_util.tree_map_with_path(
            lambda p, v: fn(tuple(str(getattr(k, "key", k)) for k in p), v), tree)
    return traverse_util.path_aware_map(fn, tree)


@dataclasses.dataclass
class Variant:
    name: str
    step: Any  # jitted (state, extra, z, y) -> (state, metrics); state donated
    state: Any  # (trainable params, optimizer state)
    extra: Any  # what the step reads but never updates (jf.split's frozen half)
    logs_grad_norm: bool

    def __call__(self, z, y):
        self.state, metrics = self.step(self.state, self.extra, z, y)
        return measure.block(metrics)


def make_variant(name: str, params, s: Sizes, dtype) -> Variant:
    """One of ``VARIANTS``: its jitted step and initial state (params are copied)."""
    params = jax.tree.map(jnp.array, params)  # own copy: state is donated
    loss = functools.partial(sandwich_loss, s=s, dtype=dtype)
    frozen_sel = jf.paths(*frozen_patterns(s)) if s.frozen_layers else jf.nothing
    adam = optax.adam(LR)

    def jit(f):
        return jax.jit(f, donate_argnums=0)

    if name == "jf_split":
        trainable, frozen = jf.split(params, frozen=frozen_sel)

        @jit
        def step(state, frozen, z, y):
            t, opt = state
            value, g = jax.value_and_grad(lambda t: loss(jf.merge(t, frozen), z, y))(t)
            updates, opt = adam.update(g, opt, t)
            metrics = {"loss": value, "grad_norm": optax.global_norm(g)}
            return (optax.apply_updates(t, updates), opt), metrics

        return Variant(name, step, (trainable, adam.init(trainable)), frozen, True)

    if name == "full":
        tx = adam
    elif name in ("optax_multi_transform", "optax_multi_transform_gradnorm"):
        labels = path_aware_map(
            lambda path, _: "frozen" if is_frozen_path(path, s) else "trainable", params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            tx = optax.multi_transform({"trainable": adam, "frozen": optax.set_to_zero()}, labels)
    elif name == "jf_freeze":
        tx = jf.freeze(adam, frozen=frozen_sel)
    else:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    gradnorm = name == "optax_multi_transform_gradnorm"

    @jit
    def step(state, _, z, y):
        p, opt = state
        value, g = jax.value_and_grad(loss)(p, z, y)
        updates, opt = tx.update(g, opt, p)
        metrics = {"loss": value}
        if gradnorm:
            metrics["grad_norm"] = optax.global_norm(g)
        return (optax.apply_updates(p, updates), opt), metrics

    return Variant(name, step, (params, tx.init(params)), None, gradnorm)


def run_config(s: Sizes, *, dtype, variants=VARIANTS, rounds: int, per_round: int, time_it: bool,
               seed: int = 0) -> list[dict]:
    key = jax.random.PRNGKey(seed)
    params = init_sandwich(key, s)
    z, y = batch(jax.random.fold_in(key, 1), s)
    frozen = jf.paths(*frozen_patterns(s)) if s.frozen_layers else jf.nothing
    trainable, _ = jf.split(params, frozen=frozen)
    n_total, n_train = param_count(params), param_count(trainable)
    ideal = ideal_matmul_flops(s) / 1e9
    ideal_full = ideal_matmul_flops(s, all_trainable=True) / 1e9
    itemsize = jnp.dtype(jnp.float32).itemsize

    vs = {name: make_variant(name, params, s, dtype) for name in variants}
    rows = {}
    for name, v in vs.items():
        gflops = jf.compiled_flops(v.step, v.state, v.extra, z, y) / 1e9
        compiled = v.step.lower(v.state, v.extra, z, y).compile()
        v.step = compiled  # run exactly what was measured
        stats = {"gflops": gflops, **measure.compiled_stats(compiled)}
        rows[name] = {
            "variant": name,
            **dataclasses.asdict(s),
            "dtype": jnp.dtype(dtype).name,
            "params_total": n_total,
            "params_trainable": n_train,
            "frozen_fraction": 1 - n_train / n_total,
            "ideal_gflops": ideal,
            "ideal_full_finetune_gflops": ideal_full,
            **stats,
            "matmul_vs_ideal": stats["matmul_gflops"] / ideal,
            "opt_state_bytes": measure.tree_bytes(v.state[1]),
            # Adam: mu and nu for each trainable parameter, plus an int32 step counter.
            "opt_state_expected_bytes": 2 * itemsize * (n_total if name == "full" else n_train) + 4,
            "logs_grad_norm": v.logs_grad_norm,
        }
    if time_it:
        times = measure.time_interleaved({n: functools.partial(v, z, y) for n, v in vs.items()},
                                         rounds=rounds, per_round=per_round)
        for name, ms in times.items():
            rows[name].update(measure.summarize_times(ms))
            rows[name]["achieved_gflops_per_s"] = rows[name]["matmul_gflops"] / (
                rows[name]["step_ms_median"] / 1e3)
        if "full" in rows:
            for r in rows.values():
                r["time_vs_full"] = r["step_ms_median"] / rows["full"]["step_ms_median"]
    return list(rows.values())


COLUMNS = [
    ("variant", "variant", ""),
    ("gflops", "GFLOPs", ".3f"),
    ("matmul_gflops", "matmul GFLOPs", ".3f"),
    ("ideal_gflops", "ideal", ".3f"),
    ("matmul_vs_ideal", "matmul/ideal", ".3f"),
    ("temp_bytes", "temp bytes", ",d"),
    ("opt_state_bytes", "opt state bytes", ",d"),
    ("step_ms_median", "median ms", ".2f"),
    ("step_ms_min", "min ms", ".2f"),
    ("time_vs_full", "time/full", ".2f"),
]


def main(argv=None) -> list[dict]:
    p = measure.common_args(__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    args = p.parse_args(argv)
    preset, dtype, rounds, per_round = measure.run_settings(args, TIMING)
    peak = measure.peak_tflops(args.peak_tflops)
    info = measure.machine()
    print(f"probe_step [{preset}] on {info['device']} ({info['cpu']}, "
          f"{info['cores_available']} cores), "
          f"jax {info['jax']}, compute {jnp.dtype(dtype).name}; XLA_FLAGS={info['xla_flags']!r}")
    print(f"timing: {rounds} interleaved rounds x {per_round} steps per variant, "
          "after 2 warm-up steps\n")
    all_rows = []
    configs = PRESETS[preset]
    if args.config:
        configs = [configs[int(i)] for i in args.config.split(",")]
    for s in configs:
        rows = run_config(s, dtype=dtype, variants=tuple(args.variants.split(",")), rounds=rounds,
                          per_round=per_round, time_it=not args.no_time)
        measure.add_mfu(rows, peak)
        for r in rows:
            r.update({f"machine_{k}": v for k, v in info.items()})
        r0 = rows[0]
        print(f"{s.short()}  params {r0['params_total']:,} ({r0['frozen_fraction']:.0%} frozen); "
              f"ideal {r0['ideal_gflops']:.3f} GFLOPs, full fine-tuning ideal "
              f"{r0['ideal_full_finetune_gflops']:.3f}")
        print(measure.format_table(rows, COLUMNS + ([("mfu", "MFU", ".1%")] if peak else [])))
        print()
        all_rows += rows
    if args.json:
        measure.write_json(args.json, all_rows)
        print(f"wrote {len(all_rows)} rows to {args.json}")
    return all_rows


if __name__ == "__main__":
    main(sys.argv[1:])
