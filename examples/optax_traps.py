"""The freezing traps of plain optax, measured next to jfreeze on the same tree.

Each row runs a few steps of a common hand-rolled recipe and the jfreeze
equivalent, and measures what happened to the "frozen" backbone and to the
trainable head. The program checks every claim it prints and exits non-zero if
one fails.

    python examples/optax_traps.py
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import jfreeze as jf
import claims


def make_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "backbone": {"w": jax.random.normal(k1, (64, 64)), "b": jnp.full(64, -0.0)},
        "head": {"w": jax.random.normal(k2, (64, 4)), "b": jnp.zeros(4)},
    }


def grads_like(params, frozen_scale=100.0, nan=False):
    """Gradients with large (or NaN) backbone entries, as a frozen backbone can have."""
    g = jax.tree.map(jnp.ones_like, params)
    fill = jnp.nan if nan else frozen_scale
    g["backbone"] = jax.tree.map(lambda x: jnp.full_like(x, fill), g["backbone"])
    return g


def run(tx, params, grads, steps=3):
    state = tx.init(params)
    p = params
    for _ in range(steps):
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
    return p, state


def moved(before, after):
    """How many backbone entries changed value or bits."""
    a = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(before["backbone"])])
    b = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(after["backbone"])])
    return int(np.sum(a.view(np.uint32) != b.view(np.uint32)))


def state_bytes(state):
    return sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))


def head_step(before, after):
    return float(jnp.abs(after["head"]["w"] - before["head"]["w"]).max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="same checks (already fast)")
    parser.parse_args(argv)

    params = make_params(jax.random.PRNGKey(0))
    n_backbone = sum(x.size for x in jax.tree.leaves(params["backbone"]))
    mask = {"backbone": True, "head": False}
    frozen = jf.paths("backbone/**")
    g = grads_like(params)
    rows, failures = [], []

    def check(ok, what):
        if not ok:
            failures.append(what)

    # 1. optax.masked passes unselected updates through unchanged: the raw gradient is added.
    p, _ = run(optax.masked(optax.adam(1e-2), {"backbone": False, "head": True}), params, g)
    pj, _ = run(jf.freeze(optax.adam(1e-2), frozen=frozen), params, g)
    rows.append(("optax.masked(adam, head_only)", f"{moved(params, p)}/{n_backbone} moved",
                 f"{moved(params, pj)}/{n_backbone} moved"))
    check(moved(params, p) == n_backbone and moved(params, pj) == 0, "masked")

    # 2. chain(optax.freeze, adamw): gradients zeroed, but decoupled weight decay still moves
    #    the "frozen" leaves, and adam keeps state for all of them.
    p, s = run(optax.chain(optax.freeze(mask), optax.adamw(1e-2, weight_decay=0.1)), params, g)
    pj, sj = run(jf.freeze(optax.adamw(1e-2, weight_decay=0.1), frozen=frozen), params, g)
    rows.append(("chain(optax.freeze, adamw)",
                 f"{moved(params, p)}/{n_backbone} moved, state {state_bytes(s):,} B",
                 f"{moved(params, pj)}/{n_backbone} moved, state {state_bytes(sj):,} B"))
    check(moved(params, p) > 0 and moved(params, pj) == 0, "freeze-then-adamw")
    check(state_bytes(sj) < state_bytes(s) / 5, "state bytes")

    # 3. chain(clip_by_global_norm, multi_transform): frozen gradients enter the global norm and
    #    shrink every trainable update.
    labels = traverse_util.path_aware_map(lambda path, _: "frozen" if path[0] == "backbone" else "train", params)
    plain = optax.chain(optax.clip_by_global_norm(1.0),
                        optax.multi_transform({"train": optax.sgd(1.0), "frozen": optax.set_to_zero()}, labels))
    ours = jf.freeze(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)), frozen=frozen)
    p, _ = run(plain, params, g, steps=1)
    pj, _ = run(ours, params, g, steps=1)
    alone, _ = run(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)), params["head"], g["head"], steps=1)
    shrink = head_step(params, pj) / head_step(params, p)
    rows.append(("chain(clip_by_global_norm, multi_transform)",
                 f"head step {head_step(params, p):.2e} ({shrink:,.0f}x too small)",
                 f"head step {head_step(params, pj):.2e} (= head alone)"))
    check(shrink > 10, "clip")
    check(all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(pj["head"]))), "clip ref")

    # 4. A typo in a hand-written label function trains everything, silently.
    typo = traverse_util.path_aware_map(lambda path, _: "frozen" if path[0] == "backbon" else "train", params)
    p, _ = run(optax.multi_transform({"train": optax.adam(1e-2), "frozen": optax.set_to_zero()}, typo), params, g)
    try:
        jf.freeze(optax.adam(1e-2), frozen=jf.paths("backbon/**")).init(params)
        err = "no error"
    except ValueError as e:
        err = "ValueError, suggests 'backbone/**'" if "'backbone/**'" in str(e) else f"ValueError: {e}"
    rows.append(("label-fn typo 'backbon'", f"{moved(params, p)}/{n_backbone} moved, no error", err))
    check(moved(params, p) == n_backbone and err.startswith("ValueError, suggests"), "typo")

    # 5. Multiplicative masks: NaN * 0 = NaN. A NaN gradient in a frozen leaf poisons it.
    gn = grads_like(params, nan=True)
    zero = jax.tree.map(lambda m: 0.0 if m else 1.0, {"backbone": {"w": True, "b": True},
                                                       "head": {"w": False, "b": False}})
    mult = optax.chain(optax.adam(1e-2), optax.stateless(lambda u, p=None: jax.tree.map(lambda x, m: x * m, u, zero)))
    p, _ = run(mult, params, gn)
    pj, sj = run(jf.freeze(optax.adam(1e-2), frozen=frozen), params, gn)
    nan_plain = int(sum(jnp.isnan(x).sum() for x in jax.tree.leaves(p["backbone"])))
    rows.append(("updates * mask, NaN frozen grads", f"{nan_plain}/{n_backbone} NaN",
                 f"{moved(params, pj)}/{n_backbone} moved, 0 NaN"))
    check(nan_plain > 0 and moved(params, pj) == 0, "nan")
    check(not any(bool(jnp.isnan(x).any()) for x in jax.tree.leaves(sj)), "nan state")

    # 6. set_to_zero adds +0.0: eagerly, a -0.0 frozen parameter becomes +0.0 (its bits move).
    p, _ = run(optax.selective_transform(optax.adam(1e-2), freeze_mask=mask), params, g)
    pj, _ = run(jf.freeze(optax.adam(1e-2), frozen=mask), params, g)
    rows.append(("selective_transform, eager, -0.0 params", f"{moved(params, p)}/{n_backbone} bits moved",
                 f"{moved(params, pj)}/{n_backbone} bits moved"))
    check(moved(params, p) == 64 and moved(params, pj) == 0, "signed zero")

    head = ("recipe (frozen = backbone)", "plain optax", "jfreeze")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
    line = lambda r: "  ".join(c.ljust(n) for c, n in zip(r, w)).rstrip()  # noqa: E731
    print(line(head))
    print("-" * (sum(w) + 4))
    for r in rows:
        print(line(r))
    return claims.report(failures)


if __name__ == "__main__":
    sys.exit(main())
