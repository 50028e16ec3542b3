"""Situation 2: a frozen feature extractor X, a trained Y — and what freezing costs.

One 6-layer MLP (linen), trained on a regression task four ways:

  full            every layer trains;
  frozen prefix   layers 0-2 (X) frozen, 3-5 (Y) trained. Nothing before X
                  trains, so nothing needs gradients through X: jf.split makes
                  X's parameters data, and the step is X's forward plus Y's
                  forward and backward;
  frozen 1 and 3  non-consecutive frozen layers. Layer 0 trains, so gradients
                  must pass *through* the frozen layers to it: jf.stop_gradient
                  on their weights only. The step computes their input
                  gradients, never their weight gradients;
  frozen 1 and 3, flax   the same with jf.flax.frozen on those two layers.

For each, it prints the compiled FLOPs of the jitted step (XLA's cost_analysis)
next to the matmul count of the ideal step, trains, and checks its claims: the
frozen layers are bit-for-bit unchanged (jf.assert_frozen), the loss falls, and
the frozen steps cost what the ideal says. Exits non-zero if a claim fails.

    python examples/frozen_feature_extractor.py            # ~20-40 s on a laptop CPU
    python examples/frozen_feature_extractor.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jfreeze as jf
import claims

DEPTH = 6


class MLP(nn.Module):
    """Dense layers named layers_0 ... layers_5; `frozen_layers` wrapped in jf.flax.frozen."""

    width: int
    out: int
    frozen_layers: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, x):
        for i in range(DEPTH):
            dense = jf.flax.frozen(nn.Dense) if i in self.frozen_layers else nn.Dense
            x = dense(self.out if i == DEPTH - 1 else self.width, name=f"layers_{i}")(x)
            if i < DEPTH - 1:
                x = jnp.tanh(x)
        return x


def layer_flops(batch: int, width: int, din: int, out: int) -> list[int]:
    """2*B*din*dout per matmul, for each layer (forward, input gradient or weight gradient)."""
    dims = [din] + [width] * (DEPTH - 1) + [out]
    return [2 * batch * a * b for a, b in zip(dims[:-1], dims[1:])]


def ideal_flops(per_layer: list[int], frozen: set[int]) -> int:
    """Matmul FLOPs of the cheapest correct step: forward everywhere; a weight
    gradient for trainable layers; an input gradient wherever a trainable layer
    lies upstream."""
    total = 0
    first_trainable = min(set(range(DEPTH)) - frozen)
    for i, f in enumerate(per_layer):
        total += f  # forward
        if i not in frozen:
            total += f  # weight gradient
        if i > first_trainable:
            total += f  # input gradient, needed by a trainable layer before it
    return total


def compile_with_flops(step, *args):
    """The jitted step compiled for these shapes, and its FLOPs (XLA's cost analysis)."""
    compiled = jax.jit(step).lower(*args).compile()
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return compiled, float(ca["flops"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few steps (for the tests)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    args = parser.parse_args(argv)
    width = args.width or (64 if args.quick else 256)
    steps = args.steps or (30 if args.quick else 400)
    batch, din, dout = 128, 32, 8

    # A task Y can learn on top of X's features: a random teacher network.
    kx, kt, kp = jax.random.split(jax.random.PRNGKey(0), 3)
    inputs = jax.random.normal(kx, (batch * 8, din))
    teacher = MLP(width, dout)
    targets = teacher.apply(teacher.init(kt, inputs[:1]), inputs)

    params = MLP(width, dout).init(kp, inputs[:1])["params"]
    per_layer = layer_flops(batch, width, din, dout)
    mse = lambda pred, y: jnp.mean((pred - y) ** 2)  # noqa: E731
    tx = optax.adam(1e-3)

    def batch_at(i):
        j = (i * batch) % inputs.shape[0]
        return inputs[j:j + batch], targets[j:j + batch]

    rows, failures = [], []

    def check(ok, what):
        if not ok:
            failures.append(what)

    # --- full training -------------------------------------------------------
    model = MLP(width, dout)

    def full_step(p, s, x, y):
        loss, g = jax.value_and_grad(lambda p: mse(model.apply({"params": p}, x), y))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    # --- frozen prefix: X = layers 0-2 are data, not parameters ---------------
    prefix = jf.paths("layers_[012]/**")

    # X's parameters are an argument like the batch: not differentiated, not in the
    # optimizer (its state is built from `trainable` only), not returned.
    def prefix_step(trainable, s, frozen, x, y):
        loss_fn = lambda t: mse(model.apply({"params": jf.merge(t, frozen)}, x), y)  # noqa: E731
        loss, g = jax.value_and_grad(loss_fn)(trainable)  # gradients of Y only
        u, s = tx.update(g, s, trainable)
        return optax.apply_updates(trainable, u), s, loss

    # --- frozen layers 1 and 3: gradients pass through to layers 0 and 2 -------
    middle = jf.paths("layers_1/**", "layers_3/**")
    tx_middle = jf.freeze(tx, frozen=middle)

    def middle_step(p, s, x, y):
        def loss_fn(p):
            return mse(model.apply({"params": jf.stop_gradient(p, frozen=middle)}, x), y)
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx_middle.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    flax_model = MLP(width, dout, frozen_layers=(1, 3))

    def flax_step(p, s, x, y):
        loss, g = jax.value_and_grad(lambda p: mse(flax_model.apply({"params": p}, x), y))(p)
        u, s = tx_middle.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    trainable, frozen_x = jf.split(params, frozen=prefix)
    variants = [
        ("full", None, set(), full_step, (params, tx.init(params)), ()),
        ("frozen prefix (X=0-2), jf.split", prefix, {0, 1, 2}, prefix_step,
         (trainable, tx.init(trainable)), (frozen_x,)),
        ("frozen 1 and 3, jf.stop_gradient", middle, {1, 3}, middle_step, (params, tx_middle.init(params)), ()),
        ("frozen 1 and 3, jf.flax.frozen", middle, {1, 3}, flax_step, (params, tx_middle.init(params)), ()),
    ]

    print(jf.summary(params, frozen=middle))
    print()
    x0, y0 = batch_at(0)
    measured = {}
    for name, sel, frozen_layers, step, state, const in variants:
        jstep, f = compile_with_flops(step, *state, *const, x0, y0)
        ideal = ideal_flops(per_layer, frozen_layers)
        measured[name] = f
        t0 = time.perf_counter()
        losses = []
        for i in range(steps):
            *state, loss = jstep(*state, *const, *batch_at(i))
            losses.append(float(loss))
        dt = time.perf_counter() - t0
        final = jf.merge(state[0], const[0]) if const else state[0]
        if sel is not None:
            try:
                jf.assert_frozen(params, final, frozen=sel)
                kept = "bit-for-bit"
            except AssertionError as e:
                kept = "MOVED"
                failures.append(f"{name}: {e}")
        else:
            kept = "-"
        first, last = np.mean(losses[:3]), np.mean(losses[-3:])
        rows.append((name, f"{f / 1e6:,.1f}", f"{ideal / 1e6:,.1f}", f"{f / ideal:.3f}",
                     f"{f / measured['full']:.2f}", f"{first:.4f} -> {last:.4f}", kept, f"{dt:.1f}"))
        check(last < first, f"{name}: loss did not fall")
        if frozen_layers:
            check(f <= 1.10 * ideal, f"{name}: {f / ideal:.3f}x the ideal FLOPs")

    check(measured["frozen prefix (X=0-2), jf.split"] < measured["frozen 1 and 3, jf.stop_gradient"]
          < measured["full"], "FLOPs order prefix < pass-through < full")
    check(abs(measured["frozen 1 and 3, jf.flax.frozen"] / measured["frozen 1 and 3, jf.stop_gradient"] - 1) < 0.01,
          "flax and pure pass-through cost the same")

    head = ("step", "MFLOPs", "ideal", "/ideal", "/full", "loss (first -> last)", "frozen", "s")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    print("  ".join(h.ljust(n) for h, n in zip(head, w)))
    print("-" * (sum(w) + 2 * (len(w) - 1)))
    for r in rows:
        print("  ".join(c.ljust(n) for c, n in zip(r, w)))
    print(f"\n(batch {batch}, width {width}, {steps} adam steps; ideal = matmuls only: forward,"
          " weight gradients of trained layers, input gradients below a trained layer)")
    return claims.report(failures)


if __name__ == "__main__":
    sys.exit(main())
