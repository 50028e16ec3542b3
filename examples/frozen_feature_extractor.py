"""Situation 2: a frozen feature extractor X, a trained Y, and what freezing saves in compute.

One 6-layer MLP (linen) learns a random teacher, trained four ways: in full; with a frozen
prefix X = layers 0-2 (nothing before X trains, so nothing needs gradients through X: ``jf.split``
makes X's parameters data); and with frozen layers 1 and 3, which gradients pass *through* to
layer 0 (their input gradients, never their weight gradients), once with ``jf.freeze`` alone and
once with ``jf.flax.frozen`` on those layers. Claims: frozen layers keep every bit, losses fall,
each step's compiled FLOPs (``jf.compiled_flops``) are within 10% of the matmuls it cannot avoid;
at the default size the frozen prefix costs 0.58x and the pass-through 0.83x of full training.

    python examples/frozen_feature_extractor.py           # ~30 s on a laptop CPU
    python examples/frozen_feature_extractor.py --quick   # a few seconds
"""

import sys

import claims
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jfreeze as jf

DEPTH, BATCH, DIN, DOUT = 6, 128, 32, 8
PREFIX = jf.paths("layers_[012]/**")
MIDDLE = jf.paths("layers_1/**", "layers_3/**")


class MLP(nn.Module):
    width: int
    frozen_layers: tuple[int, ...] = ()  # wrapped in jf.flax.frozen: no weight gradient

    @nn.compact
    def __call__(self, x):
        for i in range(DEPTH):
            dense = jf.flax.frozen(nn.Dense) if i in self.frozen_layers else nn.Dense
            x = dense(DOUT if i == DEPTH - 1 else self.width, name=f"layers_{i}")(x)
            x = jnp.tanh(x) if i < DEPTH - 1 else x
        return x


def ideal_flops(width: int, frozen: set[int]) -> int:
    """Matmul FLOPs no correct step avoids: every forward, the weight gradients of trained
    layers, the input gradients of layers with a trained layer before them."""
    dims = [DIN] + [width] * (DEPTH - 1) + [DOUT]
    first_trained = min(set(range(DEPTH)) - frozen)
    return sum(2 * BATCH * dims[i] * dims[i + 1] * (1 + (i not in frozen) + (i > first_trained))
               for i in range(DEPTH))


def make_step(model, tx, frozen=None):
    """A training step of ``params`` (and of nothing in ``data``, X's parameters included)."""
    def step(params, state, data, x, y):
        def loss_fn(p):
            return jnp.mean((model.apply({"params": jf.merge(p, data)}, x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        if frozen is None:
            return optax.apply_updates(params, updates), state, loss
        return jf.apply_updates(params, updates, frozen=frozen), state, loss  # frozen bits kept
    return step


def main(argv=None) -> int:
    quick = claims.quick(__doc__, argv)
    width, steps = (64, 30) if quick else (256, 400)
    kx, kt, kp = jax.random.split(jax.random.PRNGKey(0), 3)
    xs = jax.random.normal(kx, (steps, BATCH, DIN))
    teacher = MLP(width)
    ys = teacher.apply(teacher.init(kt, xs[0]), xs)
    params = MLP(width).init(kp, xs[0])["params"]
    print(jf.summary(params, frozen=MIDDLE), "\n")

    adam = optax.adam(1e-3)
    trainable, x_params = jf.split(params, frozen=PREFIX)  # X's parameters: data
    no_data = jax.tree.map(lambda _: None, params)         # nothing held out of the gradient
    # Frozen 1 and 3 with jf.freeze alone: nothing reads their gradients, so XLA drops the
    # weight-gradient matmuls (a jf.stop_gradient on them compiles to the same FLOPs).
    mid = jf.freeze(adam, frozen=MIDDLE)
    runs = {  # name: (step, optimizer, params, data, frozen selector, frozen layers)
        "full": (make_step(MLP(width), adam), adam, params, no_data, None, set()),
        "frozen prefix, jf.split": (make_step(MLP(width), adam), adam, trainable, x_params,
                                    PREFIX, {0, 1, 2}),
        "frozen 1 and 3, jf.freeze": (make_step(MLP(width), mid, MIDDLE), mid, params, no_data,
                                      MIDDLE, {1, 3}),
        "frozen 1 and 3, jf.flax.frozen": (make_step(MLP(width, (1, 3)), mid, MIDDLE), mid,
                                           params, no_data, MIDDLE, {1, 3}),
    }
    c, rows, flops = claims.Claims(), [], {}
    for name, (step, tx, p, data, sel, frozen_layers) in runs.items():
        state = tx.init(p)
        flops[name] = jf.compiled_flops(step, p, state, data, xs[0], ys[0])
        step, losses = jax.jit(step), []
        for i in range(steps):
            p, state, loss = step(p, state, data, xs[i], ys[i])
            losses.append(float(loss))
        ideal = ideal_flops(width, frozen_layers)
        c.check(f"{name}: loss falls ({losses[0]:.3f} -> {losses[-1]:.3f})", losses[-1] < losses[0])
        c.check(f"{name}: compiled FLOPs {flops[name] / ideal:.3f}x the ideal",
                flops[name] <= 1.10 * ideal)
        if sel is not None:
            c.check(f"{name}: frozen layers keep every bit",
                    jf.assert_frozen, params, jf.merge(p, data), frozen=sel)
        rows.append((name, f"{flops[name] / 1e6:,.1f}", f"{ideal / 1e6:,.1f}",
                     f"{flops[name] / flops['full']:.2f}"))

    prefix, middle, full = (flops[k] for k in ("frozen prefix, jf.split",
                                               "frozen 1 and 3, jf.freeze", "full"))
    c.check("FLOPs: frozen prefix < pass-through < full", prefix < middle < full)
    c.check("jf.flax.frozen costs what jf.freeze alone costs",
            abs(flops["frozen 1 and 3, jf.flax.frozen"] / middle - 1) < 0.01)
    print("\n" + claims.table(("step", "MFLOPs", "ideal (matmuls)", "/ full"), rows))
    print(f"(batch {BATCH}, width {width}, {steps} adam steps)")
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
