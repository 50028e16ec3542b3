"""Situation 4: train single elements — x[0,0] and x[1,1] — and keep the rest fixed.

A 2x2 matrix x is fitted to a target T (||x - T||^2) with only its diagonal
trainable, under adam, adamw and sgd with momentum. Each run is checked: the
off-diagonal entries are bit-for-bit what they were (neither momentum nor
weight decay moved them), and the diagonal evolves exactly as the same
optimizer run on the diagonal alone (and reaches T's diagonal, but for
adamw, whose decay holds it short). For contrast, the common recipe —
multiply the gradient by a mask, then adamw — is run too: its "frozen" entries
are moved by weight decay. Exits non-zero if a claim fails.

    python examples/freeze_elements.py          # a few seconds
    python examples/freeze_elements.py --quick
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jfreeze as jf
import claims

#: Only x[0,0] and x[1,1] train: the frozen set is everything else in x.
TRAINABLE = jf.elements("x", np.eye(2, dtype=bool))
FROZEN = jf.paths("x") - TRAINABLE


def fit(tx, params, target, steps):
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        g = jax.grad(lambda p: jnp.sum((p["x"] - target) ** 2))(params)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    for _ in range(steps):
        params, state = step(params, state)
    return params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (for the tests)")
    args = parser.parse_args(argv)
    steps = 150 if args.quick else 600

    params = {"x": jnp.array([[0.0, 1.0], [-1.0, 0.0]])}
    target = jnp.array([[2.0, 5.0], [7.0, -3.0]])
    off = ~np.eye(2, dtype=bool)
    print(f"frozen = {FROZEN!r}; mask of x:\n{FROZEN(params)['x']}\n")

    failures, rows = [], []
    optimizers = {
        "adam": optax.adam(5e-2),
        "adamw (wd=0.1)": optax.adamw(5e-2, weight_decay=0.1),
        "sgd + momentum": optax.sgd(5e-2, momentum=0.9),
    }
    for name, inner in optimizers.items():
        new = fit(jf.freeze(inner, frozen=FROZEN), params, target, steps)
        x = np.asarray(new["x"])
        try:
            jf.assert_frozen(params, new, frozen=FROZEN)
            kept = "bit-for-bit"
        except AssertionError as e:
            kept = "MOVED"
            failures.append(f"{name}: {e}")
        # The diagonal evolves exactly as the same optimizer run on the diagonal alone.
        alone = fit(inner, {"x": jnp.diag(params["x"])}, jnp.diag(target), steps)["x"]
        same = np.allclose(np.diag(x), alone, rtol=1e-6, atol=1e-7)
        diag_err = float(np.abs(np.diag(x) - np.diag(np.asarray(target))).max())
        rows.append((f"jf.freeze({name})", np.array2string(x, precision=3).replace("\n", ""), kept,
                     "yes" if same else "NO", f"{diag_err:.1e}"))
        if not same:
            failures.append(f"{name}: diagonal differs from the optimizer run on it alone")
        # (adamw's weight decay pulls the diagonal towards 0, so it stops short of T)
        if "adamw" not in name and diag_err > 1e-2:
            failures.append(f"{name}: diagonal off target by {diag_err:.3g}")

    # The common recipe: zero the gradient with a multiplicative mask, then adamw.
    mask = {"x": jnp.eye(2)}
    naive = optax.chain(optax.stateless(lambda u, p=None: jax.tree.map(jnp.multiply, u, mask)),
                        optax.adamw(5e-2, weight_decay=0.1))
    new = fit(naive, params, target, steps)
    moved = float(np.abs(np.asarray(new["x"])[off] - np.asarray(params["x"])[off]).max())
    rows.append(("grad * mask, then adamw", np.array2string(np.asarray(new["x"]), precision=3).replace("\n", ""),
                 f"moved {moved:.3f}", "-", "-"))
    if moved == 0:
        failures.append("the naive recipe was expected to move the frozen entries (weight decay)")

    head = ("optimizer", "x after training", "off-diagonal", "diag = alone", "|diag - T|")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    print("  ".join(h.ljust(n) for h, n in zip(head, w)))
    print("-" * (sum(w) + 2 * (len(w) - 1)))
    for r in rows:
        print("  ".join(c.ljust(n) for c, n in zip(r, w)))
    print(f"\ntarget T = {np.array2string(np.asarray(target)).replace(chr(10), '')}, {steps} steps")
    return claims.report(failures)


if __name__ == "__main__":
    sys.exit(main())
