"""Situation 4: train single elements, x[0,0] and x[1,1], and keep the rest of x fixed.

A 2x2 matrix x is fitted to a target T with only its diagonal trainable, under adam, adamw and
sgd with momentum. Claims: the off-diagonal keeps every bit (neither momentum nor weight decay
reaches it), and the diagonal evolves as the same optimizer run on the diagonal alone. For
contrast, the common recipe (multiply the gradient by a mask, then adamw) is run too: weight
decay moves its "frozen" entries.

    python examples/freeze_elements.py           # a few seconds
    python examples/freeze_elements.py --quick
"""

import functools
import sys

import claims
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jfreeze as jf

# Everything in x but its diagonal is frozen.
FROZEN = jf.paths("x") - jf.elements("x", np.eye(2, dtype=bool))
TARGET = jnp.array([[2.0, 5.0], [7.0, -3.0]])


def fit(tx, params, target, steps, apply_updates=optax.apply_updates):
    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jnp.sum((p["x"] - target) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params


def main(argv=None) -> int:
    steps = 150 if claims.quick(__doc__, argv) else 600
    params = {"x": jnp.array([[0.0, 1.0], [-1.0, 0.0]])}
    print(f"frozen = {FROZEN!r}; its mask of x:\n{FROZEN(params)['x']}\n")
    c, rows = claims.Claims(), []

    optimizers = {"adam": optax.adam(5e-2), "adamw": optax.adamw(5e-2, weight_decay=0.1),
                  "sgd + momentum": optax.sgd(5e-2, momentum=0.9)}
    for name, inner in optimizers.items():
        tx = jf.freeze(inner, frozen=FROZEN)
        # jf.apply_updates selects the frozen entries instead of adding -0.0 to them
        new = fit(tx, params, TARGET, steps, functools.partial(jf.apply_updates, frozen=FROZEN))
        c.check(f"{name}: the off-diagonal keeps every bit",
                jf.assert_frozen, params, new, frozen=FROZEN)
        alone = fit(inner, {"x": jnp.diag(params["x"])}, jnp.diag(TARGET), steps)["x"]
        c.check(f"{name}: the diagonal evolves as {name} on the diagonal alone",
                np.allclose(jnp.diag(new["x"]), alone, rtol=1e-6, atol=1e-7))
        if name != "adamw":  # (adamw's weight decay holds the diagonal short of T)
            c.check(f"{name}: the diagonal reaches T's", np.allclose(
                jnp.diag(new["x"]), jnp.diag(TARGET), atol=1e-2))
        rows.append((f"jf.freeze({name})", np.array2string(np.asarray(new["x"]), precision=3)))

    # The common recipe: zero the gradient with a multiplicative mask, then adamw.
    zero_off_diagonal = optax.stateless(lambda g, p=None: {"x": g["x"] * jnp.eye(2)})
    naive = fit(optax.chain(zero_off_diagonal, optax.adamw(5e-2, weight_decay=0.1)),
                params, TARGET, steps)
    moved = float(jnp.abs(naive["x"] - params["x"]).max(where=~np.eye(2, dtype=bool),
                                                        initial=0.0))
    c.check(f"grad * mask, then adamw: weight decay moves the 'frozen' entries (by {moved:.3f})",
            moved > 0)
    rows.append(("grad * mask, then adamw", np.array2string(np.asarray(naive["x"]), precision=3)))

    print("\n" + claims.table(("optimizer", f"x after {steps} steps"),
                              ((n, x.replace("\n", "")) for n, x in rows)))
    print(f"target T = {np.array2string(np.asarray(TARGET)).replace(chr(10), '')}")
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
