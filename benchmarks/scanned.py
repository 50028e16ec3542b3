"""Frozen layers inside a scanned layer stack: one training step, four ways, two freezing setups.

    python -m benchmarks.scanned                  # CPU defaults: L=12, d=256 (a few minutes)
    python -m benchmarks.scanned --quick          # seconds
    python -m benchmarks.scanned --gpu            # bf16 compute, larger sizes
    python -m benchmarks.scanned --json out/scanned.json

The network is a pre-LN transformer whose parameters are stacked on a leading layer axis
(``benchmarks.scanned_model``), Adam on top. Setups: the bottom two thirds of the layers
frozen (``bottom``: 0-7 of 12), and the middle third (``middle``: 4-7 of 12), which
gradients pass through to the trainable layers below. Variants, side by side:

* ``full``: full fine-tuning, ``jax.lax.scan`` + ``optax.adam`` (the reference time).
* ``optax_mask``: what plain optax allows on a stack: the gradient zeroed with a
  ``jnp.where`` over the frozen layers, then Adam on everything.
* ``jf_layers``: ``jf.freeze(adam, frozen=jf.layers(...))`` and ``jf.apply_updates``,
  the stack still run by ``jax.lax.scan``.
* ``jf_scan``: the same, the stack run by ``jf.scan(..., frozen=...)``: frozen runs of
  layers are their own scans, with no weight gradients (and no backward at all below
  the lowest trainable layer).

Every step is one ``jax.jit`` with the parameters and optimizer state donated. Matmul
FLOPs are counted in the optimized HLO with loops multiplied by their trip counts
(``measure.hlo_matmul_flops``); the ideal comes from the sizes
(``scanned_model.ideal_matmul_flops``).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jfreeze as jf
from benchmarks import measure
from benchmarks import scanned_model as sm

VARIANTS = ("full", "optax_mask", "jf_layers", "jf_scan")
LR = 1e-3

PRESETS: dict[str, sm.ScanSizes] = {
    "quick": sm.ScanSizes(batch=4, seq=8, d_model=32, heads=2, layers=6),
    "cpu": sm.ScanSizes(batch=8, seq=64, d_model=256, heads=4, layers=12),
    "gpu": sm.ScanSizes(batch=32, seq=512, d_model=1024, heads=16, layers=12),
}
TIMING = {"quick": (2, 2), "cpu": (5, 4), "gpu": (5, 10)}  # (rounds, steps per round)


def setups(layers: int) -> dict[str, range]:
    """Frozen layers: the bottom two thirds, and the middle third."""
    return {"bottom": range(0, 2 * layers // 3), "middle": range(layers // 3, 2 * layers // 3)}


@dataclasses.dataclass
class Variant:
    name: str
    step: Any  # jitted (state, x, y) -> (state, loss); state donated
    state: Any  # (params, optimizer state)
    stats: dict | None = None  # compiled step's FLOPs and memory, measured once

    def __call__(self, x, y):
        self.state, loss = self.step(self.state, x, y)
        return measure.block(loss)


def make_variant(name: str, params, s: sm.ScanSizes, frozen: range, dtype) -> Variant:
    params = jax.tree.map(jnp.array, params)  # own copy: the state is donated
    sel = jf.layers("layers/**", list(frozen)) if name != "full" else jf.nothing
    scan = functools.partial(jf.scan, frozen=sel, path="layers") if name == "jf_scan" else (
        jax.lax.scan)
    loss = functools.partial(sm.loss, heads=s.heads, scan=scan, dtype=dtype)
    adam = optax.adam(LR)
    tx, apply = adam, optax.apply_updates
    if name in ("jf_layers", "jf_scan"):
        tx, apply = jf.freeze(adam, frozen=sel), functools.partial(jf.apply_updates, frozen=sel)
    elif name not in ("full", "optax_mask"):
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    is_frozen = np.isin(np.arange(s.layers), list(frozen))

    def mask_frozen_layers(g):  # plain optax: zero the frozen layers' gradients, keep the shape
        def where(x):
            return jnp.where(is_frozen.reshape(-1, *[1] * (x.ndim - 1)), 0, x)
        return {**g, "layers": jax.tree.map(where, g["layers"])}

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, x, y):
        p, opt = state
        value, g = jax.value_and_grad(loss)(p, x, y)
        if name == "optax_mask":
            g = mask_frozen_layers(g)
        updates, opt = tx.update(g, opt, p)
        return (apply(p, updates), opt), value

    return Variant(name, step, (params, tx.init(params)))


def run_setup(s: sm.ScanSizes, setup: str, *, dtype, variants, full: Variant | None,
              rounds: int, per_round: int, time_it: bool, seed: int = 0) -> list[dict]:
    frozen = setups(s.layers)[setup]
    key = jax.random.PRNGKey(seed)
    params = sm.init_params(key, s)
    x, y = sm.batch(jax.random.fold_in(key, 1), s)
    sel = jf.layers("layers/**", list(frozen))
    total_bytes = measure.tree_bytes(params)
    trainable_bytes = total_bytes - sum(  # a mask is a bool per leaf, or per element of a stack
        int(np.sum(np.broadcast_to(m, x.shape))) * x.dtype.itemsize
        for m, x in zip(jax.tree.leaves(sel(params)), jax.tree.leaves(params), strict=True))
    ideal = sm.ideal_matmul_flops(s, frozen) / 1e9
    ideal_full = sm.ideal_matmul_flops(s) / 1e9

    vs: dict[str, Variant] = {}
    rows: dict[str, dict] = {}
    for name in variants:
        row = {"variant": name, "setup": setup,
               "frozen_layers": "none" if name == "full" else f"{frozen[0]}-{frozen[-1]}",
               **dataclasses.asdict(s), "dtype": jnp.dtype(dtype).name,
               "ideal_gflops": ideal, "ideal_full_finetune_gflops": ideal_full,
               "trainable_bytes": total_bytes if name == "full" else trainable_bytes,
               "params_bytes": total_bytes}
        rows[name] = row
        v = full if name == "full" and full is not None else make_variant(
            name, params, s, frozen, dtype)
        if v.stats is None:
            compiled = v.step.lower(v.state, x, y).compile()
            v.stats = {"xla_gflops": jf.compiled_flops(v.step, v.state, x, y) / 1e9,
                       **measure.compiled_stats(compiled)}
            v.step = compiled  # run exactly what was measured
        row.update(v.stats)
        row["matmul_vs_ideal"] = row["matmul_gflops"] / ideal
        row["opt_state_bytes"] = measure.tree_bytes(v.state[1])
        # Adam: mu and nu of each trainable parameter, plus an int32 step counter.
        row["adam_expected_bytes"] = 2 * row["trainable_bytes"] + 4
        row["state_vs_trainable"] = (row["opt_state_bytes"] - 4) / (2 * row["trainable_bytes"])
        before = jax.tree.map(np.asarray, v.state[0])  # the state is donated: a host copy
        row["loss0"] = float(v(x, y))
        if name != "full":  # the frozen layers keep every bit
            try:
                jf.assert_frozen(before, v.state[0], frozen=sel)
                row["frozen_bits_kept"] = True
            except AssertionError:
                row["frozen_bits_kept"] = False
        vs[name] = v
    if time_it:
        times = measure.time_interleaved({n: functools.partial(v, x, y) for n, v in vs.items()},
                                         rounds=rounds, per_round=per_round)
        for name, ms in times.items():
            rows[name].update(measure.summarize_times(ms))
        if "full" in vs:
            for name in vs:
                rows[name]["time_vs_full"] = (rows[name]["step_ms_median"]
                                              / rows["full"]["step_ms_median"])
    return list(rows.values())


COLUMNS = [
    ("variant", "variant", ""),
    ("matmul_gflops", "matmul GFLOPs", ".3f"),
    ("ideal_gflops", "ideal", ".3f"),
    ("matmul_vs_ideal", "matmul/ideal", ".3f"),
    ("xla_gflops", "XLA GFLOPs", ".3f"),
    ("opt_state_bytes", "Adam state B", ",d"),
    ("adam_expected_bytes", "2x trainable B+4", ",d"),
    ("state_vs_trainable", "state/ideal", ".2f"),
    ("temp_bytes", "temp B", ",d"),
    ("step_ms_median", "median ms", ".1f"),
    ("time_vs_full", "time/full", ".2f"),
]


def main(argv=None) -> list[dict]:
    p = measure.common_args(__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--setups", default="bottom,middle", help="comma-separated: bottom, middle")
    args = p.parse_args(argv)
    preset, dtype, rounds, per_round = measure.run_settings(args, TIMING)
    s = PRESETS[preset]
    variants = tuple(args.variants.split(","))
    info = measure.machine()
    print(f"scanned [{preset}] on {info['device']} ({info['cpu']}, "
          f"{info['cores_available']} cores), jax {info['jax']}, compute "
          f"{jnp.dtype(dtype).name}; XLA_FLAGS={info['xla_flags']!r}")
    print(f"timing: {rounds} interleaved rounds x {per_round} steps per variant, "
          "after 2 warm-up steps\n")
    full = None
    if "full" in variants:  # one full fine-tuning step, the reference of every setup
        params = sm.init_params(jax.random.PRNGKey(0), s)
        full = make_variant("full", params, s, range(0), dtype)
    all_rows = []
    for setup in args.setups.split(","):
        rows = run_setup(s, setup, dtype=dtype, variants=variants, full=full, rounds=rounds,
                         per_round=per_round, time_it=not args.no_time)
        measure.add_mfu([r for r in rows if "step_ms_median" in r],
                        measure.peak_tflops(args.peak_tflops))
        for r in rows:
            r.update({f"machine_{k}": v for k, v in info.items()})
        r0 = rows[-1]  # a frozen variant's row: its trainable bytes
        print(f"{s.short()}, layers {r0['frozen_layers']} frozen ({setup}); trainable "
              f"{r0['trainable_bytes']:,} of {r0['params_bytes']:,} B; ideal "
              f"{r0['ideal_gflops']:.3f} GFLOPs, full fine-tuning "
              f"{r0['ideal_full_finetune_gflops']:.3f}")
        cols = COLUMNS + ([("mfu", "MFU", ".1%")] if measure.peak_tflops(args.peak_tflops)
                          else [])
        print(measure.format_table(rows, cols))
        print()
        all_rows += rows
    if args.json:
        measure.write_json(args.json, all_rows)
        print(f"wrote {len(all_rows)} rows to {args.json}")
    return all_rows


if __name__ == "__main__":
    main(sys.argv[1:])
