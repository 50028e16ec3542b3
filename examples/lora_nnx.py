"""LoRA with Flax NNX: train only the adapters of ``nnx.LoRALinear`` layers, selected by path.

The PEFT habit in JAX: a small ``nnx.LoRALinear`` model learns digits 0-4 (``lora_b`` starts at
zero: adapters off), then its adapters alone learn 5-9, ``wrt=`` a jfreeze selector as an NNX
filter. Claims: base weights keep every bit, every adapter moves, the loss falls, held-out
accuracy on 5-9 well above chance, as many trainable parameters as ``nnx.LoRAParam`` holds.

    python examples/lora_nnx.py [--quick]   # ~15 s on a laptop CPU [a few seconds]
"""

import sys

import claims
import jax
import numpy as np
import optax
from digits_tasks import batches, tasks
from flax import nnx
from tqdm.auto import tqdm

import jfreeze as jf

ADAPTERS = jf.paths("**/lora_a", "**/lora_b")  # nnx.LoRALinear's: layers/0/lora/lora_a, ...


def lora_mlp(rngs, rank=4):
    return nnx.Sequential(nnx.LoRALinear(64, 128, lora_rank=rank, rngs=rngs), nnx.relu,
                          nnx.LoRALinear(128, 5, lora_rank=rank, rngs=rngs))


@nnx.jit(static_argnums=4)
def step(model, optimizer, x, y, wrt):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)
    return loss


def fit(model, wrt, data, steps, seed, desc):
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=wrt)
    losses = [float(step(model, optimizer, x, y, wrt)) for x, y in
              tqdm(zip(*batches(data, steps, seed), strict=True), total=steps, desc=desc)]
    return losses, float((model(data["x_test"]).argmax(-1) == data["y_test"]).mean())


def main(argv=None) -> int:
    quick = claims.quick(__doc__, argv)
    steps, threshold = (150, 0.6) if quick else (600, 0.8)
    data, c = tasks(), claims.Claims()
    model = lora_mlp(nnx.Rngs(0))
    adapters = jf.flax.nnx_filter(ADAPTERS, model=model)  # model=: a typo raises here
    base = nnx.All(nnx.Param, nnx.Not(adapters))
    _, acc_a = fit(model, base, data["A"], steps, 1, "base on 0-4")
    c.check(f"base model on digits 0-4: held-out accuracy {acc_a:.3f} > {threshold}",
            acc_a > threshold)

    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    print(summary := jf.summary(before, frozen=~ADAPTERS))
    losses, acc_b = fit(model, adapters, data["B"], steps, 2, "LoRA on 5-9")
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    c.check("the base weights (kernel, bias) keep every bit", jf.assert_frozen, before, after,
            frozen=~ADAPTERS)
    leaves = zip(*map(jax.tree.leaves, (ADAPTERS(before), before, after)), strict=True)
    moved = [bool((a != b).any()) for is_adapter, a, b in leaves if is_adapter]
    c.check(f"all {len(moved)} adapter matrices moved", len(moved) == 4 and all(moved))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    c.check(f"the loss falls: {first:.3f} -> {last:.3f}", last < 0.5 * first)
    c.check(f"adapted to digits 5-9: held-out accuracy {acc_b:.3f} > {threshold} (chance 0.200)",
            acc_b > threshold)
    lora = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    c.check(f"{summary.trainable} trainable parameters of {summary.total}: "
            f"exactly nnx.LoRAParam's {lora}", summary.trainable == lora)
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
