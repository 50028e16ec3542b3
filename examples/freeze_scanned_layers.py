"""Freezing the bottom layers of a scanned layer stack: no optimizer state, no weight gradients.

A linen model whose blocks are an ``nn.scan`` stack, and the same blocks in plain JAX run by
``lax.scan``, learn a random teacher with layers 0-3 of 6 frozen by ``jf.layers``.
``jf.freeze(optax.adam(...))`` keeps Adam state for trainable layers only; ``jf.flax.scan`` (a
drop-in for ``nn.scan``, loading parameters initialised by plain ``nn.scan``) and ``jf.scan``
(for ``lax.scan``) run frozen layers as their own scan: no weight gradients, and no backward
below the lowest trainable layer. Claims: frozen layers keep every bit, Adam state = 2 x
trainable bytes + a counter, matmul FLOPs (loops by trip count) within 1% of ideal, losses fall.

    python examples/freeze_scanned_layers.py           # ~1 min on a laptop CPU
    python examples/freeze_scanned_layers.py --quick   # ~20 s
"""

import sys
from functools import partial

import claims
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

import jfreeze as jf

DEPTH, FROZEN, BATCH, DOUT = 6, 4, 256, 8
STACK = jf.layers("blocks/**", range(FROZEN))  # layers 0-3 of every leaf under blocks/
SCAN = {"variable_axes": {"params": 0}, "split_rngs": {"params": True}, "length": DEPTH}


class Block(nn.Module):  # pre-LN residual MLP; nn.scan's (carry, x) -> (carry, y)
    @nn.compact
    def __call__(self, h, _):
        hidden = nn.gelu(nn.Dense(h.shape[-1])(nn.LayerNorm()(h)))  # Dense_0, then Dense_1
        return h + nn.Dense(h.shape[-1])(hidden), None


class Net(nn.Module):
    frozen: jf.Selector | None = None  # None: plain nn.scan; else jf.flax.scan(frozen=...)

    @nn.compact
    def __call__(self, x):
        scan = nn.scan if self.frozen is None else partial(jf.flax.scan, frozen=self.frozen)
        h, _ = scan(Block, **SCAN)(name="blocks")(x, None)
        return nn.Dense(DOUT, name="head")(h)


def plain_block(h, p):  # the same block on one layer of the linen parameters, for lax.scan
    ln, d0, d1 = p["LayerNorm_0"], p["Dense_0"], p["Dense_1"]
    mean = h.mean(-1, keepdims=True)
    var = (h * h).mean(-1, keepdims=True) - mean ** 2  # linen's fast variance
    x = (h - mean) * jax.lax.rsqrt(var + 1e-6) * ln["scale"] + ln["bias"]
    return h + nn.gelu(x @ d0["kernel"] + d0["bias"]) @ d1["kernel"] + d1["bias"], None


def plain_net(params, x):
    h, _ = jf.scan(plain_block, x, params["blocks"], frozen=STACK, path="blocks")
    return h @ params["head"]["kernel"] + params["head"]["bias"]


def ideal_flops(width: int) -> int:
    """Every forward; weight and input gradients from the lowest trainable layer up (its
    LayerNorm trains, so its matmuls need input gradients); no backward below it."""
    fwd = 2 * 2 * BATCH * width * width  # one block's two width x width matmuls
    blocks = sum(fwd * (1 + 2 * (i >= FROZEN)) for i in range(DEPTH))
    return blocks + 3 * 2 * BATCH * width * DOUT  # the head: forward, both gradients


def make_step(apply, tx):
    def step(params, state, x, y):
        loss, g = jax.value_and_grad(lambda p: jnp.mean((apply(p, x) - y) ** 2))(params)
        updates, state = tx.update(g, state, params)
        return jf.apply_updates(params, updates, frozen=STACK), state, loss  # frozen bits kept
    return step


def main(argv=None) -> int:
    quick = claims.quick(__doc__, argv)
    width, steps = (32, 30) if quick else (128, 300)
    kx, kt, kp = jax.random.split(jax.random.PRNGKey(0), 3)
    xs = jax.random.normal(kx, (steps, BATCH, width))
    ys = Net().apply(Net().init(kt, xs[0]), xs)  # a random teacher
    params = Net().init(kp, xs[0])["params"]  # initialised by plain nn.scan: (6, ...) leaves
    print(jf.summary(params, frozen=STACK, depth=2), "\n")
    tx, c, rows = jf.freeze(optax.adam(1e-3), frozen=STACK), claims.Claims(), []
    c.check("jf.flax.scan keeps nn.scan's parameter tree", jax.tree.structure(params)
            == jax.tree.structure(Net(STACK).init(kp, xs[0])["params"]))
    runs = {"nn.scan (masked)": lambda p, x: Net().apply({"params": p}, x),
            "jf.flax.scan": lambda p, x: Net(STACK).apply({"params": p}, x),
            "jf.scan (lax.scan)": plain_net}
    ideal, trainable = ideal_flops(width), jf.summary(params, frozen=STACK).trainable * 4
    for name, apply in runs.items():
        step, state = make_step(apply, tx), tx.init(params)
        flops = jf.compiled_flops(step, params, state, xs[0], ys[0], matmul_only=True)
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
        rows.append((name, f"{flops / 1e6:,.1f}", f"{flops / ideal:.3f}", f"{state_bytes:,}"))
        if name.startswith("nn.scan"):  # one scan body for all layers: every weight gradient
            c.check(f"{name}: {flops / ideal:.2f}x the ideal FLOPs", flops > 1.2 * ideal)
            continue
        c.check(f"{name}: compiled matmul FLOPs {flops / ideal:.4f}x the ideal",
                flops <= 1.01 * ideal)
        c.check(f"{name}: Adam state {state_bytes:,} B = 2 x {trainable:,} trainable B + 4",
                state_bytes == 2 * trainable + 4)
        p, step, losses = params, jax.jit(step), []
        for i in tqdm(range(steps), desc=name):
            p, state, loss = step(p, state, xs[i], ys[i])
            losses.append(float(loss))
        c.check(f"{name}: loss falls ({losses[0]:.4f} -> {losses[-1]:.4f})", losses[-1] < losses[0])
        c.check(f"{name}: frozen layers 0-{FROZEN - 1} keep every bit",
                jf.assert_frozen, params, p, frozen=STACK)
    same = jnp.allclose(runs["jf.flax.scan"](params, xs[0]), plain_net(params, xs[0]), atol=1e-5)
    c.check("jf.flax.scan and jf.scan compute the same outputs from the same parameters", same)
    print("\n" + claims.table(("step", "matmul MFLOPs", "/ ideal", "Adam state B"), rows))
    print(f"(batch {BATCH}, width {width}, {steps} adam steps; ideal {ideal / 1e6:,.1f} MFLOPs)")
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
