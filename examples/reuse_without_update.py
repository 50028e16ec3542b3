"""Situation 5: one layer applied twice, updated only through its first use.

    h = tanh(x W + b)          first use: W and b learn from it
    y = tanh(h W + b)          second use: gradients flow through h, not into W, b

Written twice — as a pure function with ``jf.stop_gradient`` on the second
use's parameters, and as a linen module calling its shared ``nn.Dense`` the
second time through ``jf.flax.frozen(self.layer)`` — and checked against the
gradient worked out by hand (NumPy, float64): the parameter gradient is the
first use's alone, the plain double use's is first + second, and the input
gradient (what flows through the activations) is the same either way. Both
versions then train side by side and must follow the same trajectory. Exits
non-zero if a claim fails.

    python examples/reuse_without_update.py          # a few seconds
    python examples/reuse_without_update.py --quick
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


# --- pure function ---------------------------------------------------------------
def layer(p, x):
    return jnp.tanh(x @ p["w"] + p["b"])


def net(p, x, reuse_frozen=True):
    h = layer(p, x)
    return layer(jf.stop_gradient(p) if reuse_frozen else p, h)  # same weights, no update


# --- linen -----------------------------------------------------------------------
class Net(nn.Module):
    features: int
    reuse_frozen: bool = True

    def setup(self):
        self.layer = nn.Dense(self.features)

    def __call__(self, x):
        h = jnp.tanh(self.layer(x))
        second = jf.flax.frozen(self.layer) if self.reuse_frozen else self.layer  # this call only
        return jnp.tanh(second(h))


def mse(y, t):
    return jnp.mean((y - t) ** 2)


def by_hand(w, b, x, t):
    """The gradients of mse(net(x), t), derived by hand in float64.

    Returns (first-use dW, db), (second-use dW, db), and dL/dx."""
    w, b, x, t = (np.asarray(a, np.float64) for a in (w, b, x, t))
    h = np.tanh(x @ w + b)
    y = np.tanh(h @ w + b)
    g = 2 * (y - t) / y.size  # dL/dy
    d2 = g * (1 - y**2)       # through the second tanh
    dh = d2 @ w.T             # into h: flows through the second use's activations
    d1 = dh * (1 - h**2)      # through the first tanh
    return (x.T @ d1, d1.sum(0)), (h.T @ d2, d2.sum(0)), d1 @ w.T


def max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (for the tests)")
    args = parser.parse_args(argv)
    steps = 20 if args.quick else 200
    d = 4

    kx, kt, kp = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (32, d))
    t = jnp.tanh(jax.random.normal(kt, (32, d)))
    variables = Net(d).init(kp, x)
    p = {"w": variables["params"]["layer"]["kernel"], "b": variables["params"]["layer"]["bias"]}
    to_pure = lambda v: {"w": v["layer"]["kernel"], "b": v["layer"]["bias"]}  # noqa: E731

    (w1, b1), (w2, b2), dx = by_hand(p["w"], p["b"], x, t)
    grad_pure = jax.jit(jax.grad(lambda p, x: mse(net(p, x), t), argnums=(0, 1)))
    grad_full = jax.jit(jax.grad(lambda p, x: mse(net(p, x, reuse_frozen=False), t), argnums=(0, 1)))
    grad_linen = jax.jit(jax.grad(lambda v, x: mse(Net(d).apply({"params": v}, x), t), argnums=(0, 1)))
    gp, gpx = grad_pure(p, x)
    gf, gfx = grad_full(p, x)
    gl, glx = grad_linen(variables["params"], x)
    gl = to_pure(gl)

    tol = 1e-4  # float32 against float64
    checks = [
        ("jf.stop_gradient: dW, db = first use (by hand)", max(max_rel(gp["w"], w1), max_rel(gp["b"], b1))),
        ("jf.flax.frozen:   dW, db = first use (by hand)", max(max_rel(gl["w"], w1), max_rel(gl["b"], b1))),
        ("plain double use: dW, db = first + second     ", max(max_rel(gf["w"], w1 + w2), max_rel(gf["b"], b1 + b2))),
        ("input gradient flows through the second use   ", max(max_rel(gpx, dx), max_rel(glx, dx), max_rel(gfx, dx))),
    ]
    failures = []
    print("gradient check (max relative error vs the hand derivation)")
    for what, err in checks:
        print(f"  {what}  {err:.1e}  {'ok' if err < tol else 'FAIL'}")
        if not err < tol:
            failures.append(what.strip())
    ratio = float(np.abs(w2).sum() / np.abs(w1).sum())
    print(f"  (in the plain double use the second use's dW is {ratio:.1f}x the first's in size)")

    # --- train both versions side by side -----------------------------------------
    tx = optax.sgd(0.5)

    @jax.jit
    def step_pure(p, s):
        g = jax.grad(lambda p: mse(net(p, x), t))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    @jax.jit
    def step_linen(v, s):
        g = jax.grad(lambda v: mse(Net(d).apply({"params": v}, x), t))(v)
        u, s = tx.update(g, s, v)
        return optax.apply_updates(v, u), s

    pp, sp = p, tx.init(p)
    vl, sl = variables["params"], tx.init(variables["params"])
    loss0 = float(mse(net(p, x), t))
    for _ in range(steps):
        pp, sp = step_pure(pp, sp)
        vl, sl = step_linen(vl, sl)
    gap = max(max_rel(to_pure(vl)["w"], pp["w"]), max_rel(to_pure(vl)["b"], pp["b"]))
    loss1 = float(mse(net(pp, x), t))
    print(f"\ntraining {steps} sgd steps: loss {loss0:.4f} -> {loss1:.4f}; "
          f"pure and linen trajectories differ by {gap:.1e} (relative)")
    if not gap < 1e-5:
        failures.append("pure and linen trajectories differ")
    if not loss1 < loss0:
        failures.append("loss did not fall")

    return claims.report(failures)


if __name__ == "__main__":
    sys.exit(main())
