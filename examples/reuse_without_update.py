"""Situation 5: one layer applied twice, updated only through its first use.

    h = tanh(x W + b)          first use: W and b learn from it
    y = tanh(h W + b)          second use: gradients flow through h, not into W and b

Written twice, as a pure function with ``jf.stop_gradient`` on the second use's parameters and
as a linen module calling its shared ``nn.Dense`` through ``jf.flax.frozen(self.layer)`` the
second time. Claims, against the gradient derived by hand (NumPy, float64): the parameter
gradient is the first use's alone (the plain double use's is first + second), and the input
gradient flows through both uses; trained side by side, the two versions follow one trajectory.

    python examples/reuse_without_update.py           # a few seconds
    python examples/reuse_without_update.py --quick
"""

import sys

import claims
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jfreeze as jf


def layer(p, x):
    return jnp.tanh(x @ p["kernel"] + p["bias"])


def net(p, x, reuse_frozen=True):
    return layer(jf.stop_gradient(p) if reuse_frozen else p, layer(p, x))  # same weights twice


class Net(nn.Module):
    features: int

    def setup(self):
        self.layer = nn.Dense(self.features)

    def __call__(self, x):
        return jnp.tanh(jf.flax.frozen(self.layer)(jnp.tanh(self.layer(x))))  # 2nd call frozen


def by_hand(p, x, t):
    """Gradients of mean((net(x) - t)^2) in float64: (first use's, second use's, dL/dx)."""
    w, b, x, t = (np.asarray(a, np.float64) for a in (p["kernel"], p["bias"], x, t))
    h = np.tanh(x @ w + b)
    y = np.tanh(h @ w + b)
    d2 = 2 * (y - t) / y.size * (1 - y**2)  # through the second tanh
    d1 = d2 @ w.T * (1 - h**2)              # through h (the second use's input) and the first tanh
    first, second = {"kernel": x.T @ d1, "bias": d1.sum(0)}, {"kernel": h.T @ d2, "bias": d2.sum(0)}
    return first, second, d1 @ w.T


def close(a, b) -> bool:  # float32 against float64, relative to the largest entry
    return all(float(np.abs(u - v).max()) < 1e-4 * float(np.abs(v).max())
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def main(argv=None) -> int:
    steps = 20 if claims.quick(__doc__, argv) else 200
    kx, kt, kp = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (32, 4))
    t = jnp.tanh(jax.random.normal(kt, (32, 4)))
    model = Net(4)
    p = model.init(kp, x)["params"]["layer"]  # {"kernel", "bias"}: one tree for both versions

    def loss_pure(p, x, reuse_frozen=True):
        return jnp.mean((net(p, x, reuse_frozen) - t) ** 2)

    def loss_linen(p, x):
        return jnp.mean((model.apply({"params": {"layer": p}}, x) - t) ** 2)

    first, second, dx = by_hand(p, x, t)
    grads = {name: jax.jit(jax.grad(f, argnums=(0, 1)))(p, x) for name, f in
             [("pure", loss_pure), ("linen", loss_linen),
              ("plain", lambda p, x: loss_pure(p, x, reuse_frozen=False))]}
    c = claims.Claims()  # against the gradients derived by hand
    c.check("jf.stop_gradient: dW, db are the first use's", close(grads["pure"][0], first))
    c.check("jf.flax.frozen: dW, db are the first use's", close(grads["linen"][0], first))
    c.check("plain double use: dW, db are first + second",
            close(grads["plain"][0], jax.tree.map(np.add, first, second)))
    c.check("the input gradient flows through the second use, in all three",
            all(close(g[1], dx) for g in grads.values()))

    tx = optax.sgd(0.5)

    def train(loss):
        @jax.jit
        def step(q, s):
            updates, s = tx.update(jax.grad(loss)(q, x), s, q)
            return optax.apply_updates(q, updates), s

        q, s = p, tx.init(p)
        for _ in range(steps):
            q, s = step(q, s)
        return q

    pure, linen = train(loss_pure), train(loss_linen)
    loss0, loss1 = float(loss_pure(p, x)), float(loss_pure(pure, x))
    print(f"\n{steps} sgd steps: loss {loss0:.4f} -> {loss1:.4f}")
    c.check("the loss falls", loss1 < loss0)
    c.check("pure and linen versions train alike (relative gap < 1e-5)",
            all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in
                zip(jax.tree.leaves(pure), jax.tree.leaves(linen), strict=True)))
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
