"""The freezing traps of plain optax, measured next to jfreeze on the same tree.

Each row runs 3 steps of a common hand-rolled recipe and of its jfreeze equivalent (``jf.freeze``,
applied with ``jf.apply_updates`` but in the last row), and counts what happened to the "frozen"
backbone (4,160 parameters) and to the trainable head. Every row is a checked claim.

    python examples/optax_traps.py      # a few seconds (--quick: the same)
"""

import sys

import claims
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.flatten_util import ravel_pytree

import jfreeze as jf

FROZEN = jf.paths("backbone/**")
MASK = {"backbone": True, "head": False}  # the same, as optax's boolean mask
k1, k2 = jax.random.split(jax.random.PRNGKey(0))
PARAMS = {"backbone": {"w": jax.random.normal(k1, (64, 64)), "b": jnp.full(64, -0.0)},
          "head": {"w": jax.random.normal(k2, (64, 4)), "b": jnp.zeros(4)}}
N = 64 * 64 + 64


def grads(fill=100.0):  # large (or NaN) backbone gradients, as a frozen backbone can have
    return {"backbone": jax.tree.map(lambda x: jnp.full_like(x, fill), PARAMS["backbone"]),
            "head": jax.tree.map(jnp.ones_like, PARAMS["head"])}


def run(tx, g, steps=3, params=PARAMS, frozen=None):
    """Steps of ``tx``; with ``frozen=``, the updates are applied by ``jf.apply_updates``."""
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(g, state, params)
        params = (optax.apply_updates(params, updates) if frozen is None
                  else jf.apply_updates(params, updates, frozen=frozen))
    return params, state


def moved(p) -> int:  # how many backbone entries changed bits
    a, b = (np.asarray(ravel_pytree(q["backbone"])[0]).view(np.uint32) for q in (PARAMS, p))
    return int((a != b).sum())


def nbytes(state) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state))


def labels(backbone="backbone"):  # the Flax guide's hand-written label tree
    return traverse_util.path_aware_map(
        lambda path, _: "frozen" if path[0] == backbone else "train", PARAMS)


def main(argv=None) -> int:
    claims.quick(__doc__, argv)
    c, rows = claims.Claims(), []
    def row(recipe, ok, plain, ours):  # each row is a claim: the trap springs, jfreeze avoids it
        c.check(recipe, ok)
        rows.append((recipe, plain, ours))

    p, _ = run(optax.masked(optax.adam(1e-2), {"backbone": False, "head": True}), grads())
    q, _ = run(jf.freeze(optax.adam(1e-2), frozen=FROZEN), grads(), frozen=FROZEN)
    row("optax.masked(adam, head_only)", moved(p) == N and moved(q) == 0,
        f"{moved(p)}/{N} moved", f"{moved(q)}/{N} moved")

    adamw = optax.adamw(1e-2, weight_decay=0.1)
    p, s = run(optax.chain(optax.freeze(MASK), adamw), grads())
    q, t = run(jf.freeze(adamw, frozen=FROZEN), grads(), frozen=FROZEN)
    row("chain(optax.freeze, adamw)", moved(p) > 0 and moved(q) == 0 and nbytes(t) < nbytes(s) / 5,
        f"{moved(p)}/{N} moved, state {nbytes(s):,} B",
        f"{moved(q)}/{N} moved, state {nbytes(t):,} B")

    clip_sgd = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0))
    plain = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
        {"train": optax.sgd(1.0), "frozen": optax.set_to_zero()}, labels()))
    p, _ = run(plain, grads(), steps=1)
    q, _ = run(jf.freeze(clip_sgd, frozen=FROZEN), grads(), steps=1, frozen=FROZEN)
    alone, _ = run(clip_sgd, grads()["head"], steps=1, params=PARAMS["head"])
    step_p, step_q = (float(jnp.abs(x["head"]["w"] - PARAMS["head"]["w"]).max()) for x in (p, q))
    row("chain(clip_by_global_norm, multi_transform)", step_q / step_p > 10 and moved(q) == 0
        and jax.tree.all(jax.tree.map(np.array_equal, alone, q["head"])),
        f"head step {step_p:.2e} ({step_q / step_p:,.0f}x too small)",
        f"head step {step_q:.2e} (= head alone)")

    p, _ = run(optax.multi_transform({"train": optax.adam(1e-2), "frozen": optax.set_to_zero()},
                                     labels("backbon")), grads())
    try:
        jf.freeze(optax.adam(1e-2), frozen=jf.paths("backbon/**")).init(PARAMS)
        err = "no error"
    except ValueError as e:
        err = "ValueError, suggests 'backbone/**'" if "'backbone/**'" in str(e) else str(e)
    row("label-fn typo 'backbon'", moved(p) == N and err.startswith("ValueError, suggests"),
        f"{moved(p)}/{N} moved, no error", err)

    zero_frozen = optax.stateless(lambda u, _=None: jax.tree.map(jnp.multiply, u, {
        "backbone": {"w": 0.0, "b": 0.0}, "head": {"w": 1.0, "b": 1.0}}))
    p, _ = run(optax.chain(optax.adam(1e-2), zero_frozen), grads(jnp.nan))
    q, t = run(jf.freeze(optax.adam(1e-2), frozen=FROZEN), grads(jnp.nan), frozen=FROZEN)
    nans = int(sum(jnp.isnan(x).sum() for x in jax.tree.leaves(p["backbone"])))
    no_nan = not any(jnp.isnan(x).any() for x in jax.tree.leaves(t))  # in jf.freeze's state
    row("updates * mask, NaN frozen grads", nans > 0 and moved(q) == 0 and no_nan,
        f"{nans}/{N} NaN", f"{moved(q)}/{N} moved, 0 NaN")

    p, _ = run(optax.selective_transform(optax.adam(1e-2), freeze_mask=MASK), grads())
    # here both through plain optax.apply_updates: jf.freeze's frozen updates are -0.0
    q, _ = run(jf.freeze(optax.adam(1e-2), frozen=MASK), grads())
    row("selective_transform, eager, -0.0 params", moved(p) == 64 and moved(q) == 0,
        f"{moved(p)}/{N} bits moved", f"{moved(q)}/{N} bits moved")

    print("\n" + claims.table(("recipe (frozen = backbone)", "plain optax", "jfreeze"), rows))
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
