"""Situation 3: freeze part of a layer — the weights into output unit 0.

A linen ``Dense(2)`` layer reads fixed features. Its output unit 0 (kernel
column 0 and bias 0) is frozen with ``jf.elements``; unit 1 trains, with adamw
(so momentum and weight decay would move unit 0 if anything leaked). After
training, the program checks that unit 0's weights and its output on the data
are bit-for-bit what they were, that unit 1 learned its target, and it shows
why freezing a unit's weights is not the same as freezing its output when a
trainable layer feeds it. Exits non-zero if a claim fails.

    python examples/freeze_output_unit.py          # a few seconds
    python examples/freeze_output_unit.py --quick
"""

from __future__ import annotations

import argparse
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jfreeze as jf
import claims

#: The weights into output unit 0: kernel column 0 and bias 0.
UNIT0 = jf.elements("out/kernel", np.s_[:, 0]) | jf.elements("out/bias", np.s_[0])


class Readout(nn.Module):
    hidden: int = 0  # 0: the Dense reads the features directly

    @nn.compact
    def __call__(self, x):
        if self.hidden:
            x = jnp.tanh(nn.Dense(self.hidden, name="hidden")(x))
        return nn.Dense(2, name="out")(x)


def train(model, params, x, y, steps, frozen=UNIT0):
    tx = jf.freeze(optax.adamw(3e-2, weight_decay=0.1), frozen=frozen)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        loss = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)  # noqa: E731
        g = jax.grad(loss)(params)
        u, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, u), opt_state

    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    return params, opt_state


def bits(a):
    a = np.asarray(a)
    return a.view(np.uint32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (for the tests)")
    args = parser.parse_args(argv)
    steps = 100 if args.quick else 500

    kx, kw, kp = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (256, 8))
    w_true = jax.random.normal(kw, (8, 2))
    y = x @ w_true + jnp.array([0.5, -1.0])  # both units have a target; only unit 1 may learn it

    failures = []

    def check(ok, what):
        if not ok:
            failures.append(what)

    # --- one layer on fixed features ------------------------------------------
    model = Readout()
    params = model.init(kp, x)["params"]
    apply = jax.jit(lambda p: model.apply({"params": p}, x))
    out_before = np.asarray(apply(params))
    print(jf.summary(params, frozen=UNIT0))
    new, opt_state = train(model, params, x, y, steps)
    out_after = np.asarray(apply(new))

    jf.assert_frozen(params, new, frozen=UNIT0)  # exact; names the path if anything moved
    same_w = (bits(new["out"]["kernel"][:, 0]) == bits(params["out"]["kernel"][:, 0])).all() and \
        bits(new["out"]["bias"][0]) == bits(params["out"]["bias"][0])
    same_out = (bits(out_after[:, 0]) == bits(out_before[:, 0])).all()
    err = lambda o, j: float(np.mean((o[:, j] - np.asarray(y)[:, j]) ** 2))  # noqa: E731
    print(f"\nunit 0 (frozen):  weights bit-for-bit {'kept' if same_w else 'MOVED'}, output on the data "
          f"bit-for-bit {'kept' if same_out else 'MOVED'}; mse {err(out_before, 0):.3f} -> {err(out_after, 0):.3f}")
    print(f"unit 1 (trained): mse {err(out_before, 1):.3f} -> {err(out_after, 1):.4f}")
    check(same_w and same_out, "unit 0 kept")
    check(err(out_after, 1) < 0.05 * err(out_before, 1), "unit 1 learned")
    # adamw keeps state for the whole kernel; the frozen column is zeroed before it, so its
    # moments stay exactly zero (and after it, so weight decay cannot move it either)
    kernel_state = [a for a in jax.tree.leaves(opt_state) if a.shape == params["out"]["kernel"].shape]
    check(len(kernel_state) == 2 and all(bool((np.asarray(a)[:, 0] == 0).all()) for a in kernel_state),
          "no adam moments for unit 0")

    # --- with a trainable layer before it: weights fixed, output not -------------
    model2 = Readout(hidden=16)
    params2 = model2.init(kp, x)["params"]
    apply2 = jax.jit(lambda p: model2.apply({"params": p}, x))
    before2 = np.asarray(apply2(params2))
    new2, _ = train(model2, params2, x, y, steps)
    jf.assert_frozen(params2, new2, frozen=UNIT0)
    drift = float(np.abs(np.asarray(apply2(new2))[:, 0] - before2[:, 0]).max())
    print(f"\nwith a trained hidden layer before it, unit 0's weights are still kept bit-for-bit, but its "
          f"output moves (max |change| {drift:.3f})\nbecause its inputs train.")
    check(drift > 0, "hidden layer moves unit 0's output")
    both = UNIT0 | jf.paths("hidden/**")
    new3, _ = train(model2, params2, x, y, steps, frozen=both)
    jf.assert_frozen(params2, new3, frozen=both)
    kept = (bits(np.asarray(apply2(new3))[:, 0]) == bits(before2[:, 0])).all()
    print(f"with `hidden/**` frozen too: unit 0's output bit-for-bit {'kept' if kept else 'MOVED'}")
    check(kept, "unit 0 output kept with hidden frozen")

    return claims.report(failures)


if __name__ == "__main__":
    sys.exit(main())
