"""Situation 3: freeze part of a layer, the weights into output unit 0.

A linen ``Dense(2)`` reads fixed features. The weights into output unit 0 (kernel column 0 and
bias 0) are frozen with ``jf.elements``; unit 1 trains under adamw, whose momentum and weight
decay would move unit 0 if anything leaked. Claims: unit 0's weights and its output keep every
bit, Adam keeps moments for unit 1's weights only, unit 1 learns its target; and with a
trainable layer before it, unit 0's weights stay fixed but its output moves, until that layer
is frozen too.

    python examples/freeze_output_unit.py           # a few seconds
    python examples/freeze_output_unit.py --quick
"""

import sys

import claims
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jfreeze as jf

UNIT0 = jf.elements("out/kernel", np.s_[:, 0]) | jf.elements("out/bias", np.s_[0])


class Readout(nn.Module):
    hidden: int = 0  # 0: the Dense reads the features directly

    @nn.compact
    def __call__(self, x):
        if self.hidden:
            x = jnp.tanh(nn.Dense(self.hidden, name="hidden")(x))
        return nn.Dense(2, name="out")(x)


def train(model, params, x, y, steps, frozen):
    tx = jf.freeze(optax.adamw(3e-2, weight_decay=0.1), frozen=frozen)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return jf.apply_updates(params, updates, frozen=frozen), state  # frozen bits selected

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def same_bits(a, b) -> bool:
    return np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


def main(argv=None) -> int:
    steps = 100 if claims.quick(__doc__, argv) else 500
    kx, kw, kp = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (256, 8))
    y = x @ jax.random.normal(kw, (8, 2)) + jnp.array([0.5, -1.0])  # a target for both units
    c = claims.Claims()

    # One layer on fixed features.
    model = Readout()
    params = model.init(kp, x)["params"]
    print(jf.summary(params, frozen=UNIT0), "\n")
    new, state = train(model, params, x, y, steps, frozen=UNIT0)
    before, after = model.apply({"params": params}, x), model.apply({"params": new}, x)
    c.check("unit 0's weights keep every bit", jf.assert_frozen, params, new, frozen=UNIT0)
    c.check("unit 0's output on the data keeps every bit", same_bits(before[:, 0], after[:, 0]))
    mse = [float(jnp.mean((o[:, 1] - y[:, 1]) ** 2)) for o in (before, after)]
    c.check(f"unit 1 learns (mse {mse[0]:.3f} -> {mse[1]:.4f})", mse[1] < 0.05 * mse[0])
    # Whole columns: jf.freeze hands adamw only the trainable column, so unit 0 has no state.
    shapes = sorted(a.shape for a in jax.tree.leaves(state) if a.ndim)
    c.check(f"adam holds moments for unit 1 only {shapes}", shapes == [(1,)] * 2 + [(8, 1)] * 2)

    # A trainable layer before it: unit 0's weights are fixed, its output is not.
    model = Readout(hidden=16)
    params = model.init(kp, x)["params"]
    before = model.apply({"params": params}, x)
    new, _ = train(model, params, x, y, steps, frozen=UNIT0)
    drift = float(jnp.abs(model.apply({"params": new}, x)[:, 0] - before[:, 0]).max())
    c.check("with a trained hidden layer: unit 0's weights keep every bit",
            jf.assert_frozen, params, new, frozen=UNIT0)
    c.check(f"... but its output moves (max |change| {drift:.3f}): its inputs train", drift > 0)
    both = UNIT0 | jf.paths("hidden/**")
    new, _ = train(model, params, x, y, steps, frozen=both)
    c.check("with hidden/** frozen too: unit 0's output keeps every bit",
            same_bits(model.apply({"params": new}, x)[:, 0], before[:, 0]))
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
