"""Transfer learning with Flax NNX: pretrain, freeze the backbone with an NNX filter, new head.

The NNX variant of ``finetune_trainstate.py``, on the same digits tasks (A: 0-4, B: 5-9). After
pretraining on A, a new head is trained on B with only what is not frozen:
``trainable = nnx.All(nnx.Param, nnx.Not(jf.flax.nnx_filter(FROZEN, model=model)))`` for both
``nnx.Optimizer(model, tx, wrt=trainable)`` (optimizer state for the head only) and
``nnx.DiffState(0, trainable)`` (gradients for the head only). The frozen backbone's BatchNorm
runs in inference mode (``model.backbone.eval()``), so its statistics stay put too. Claims:
held-out accuracy on B well above chance, the backbone's parameters and batch statistics keep
every bit, optimizer state and gradients exist for the head alone.

    python examples/finetune_nnx.py           # ~15 s on a laptop CPU
    python examples/finetune_nnx.py --quick   # a few seconds
"""

import sys

import claims
import jax
import jax.numpy as jnp
import numpy as np
import optax
from digits_tasks import tasks
from flax import nnx
from tqdm.auto import tqdm

import jfreeze as jf

FROZEN = jf.paths("backbone/**")


class Backbone(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(64, 128, rngs=rngs)
        self.bn = nnx.BatchNorm(128, momentum=0.9, rngs=rngs)
        self.fc2 = nnx.Linear(128, 64, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.fc2(nnx.relu(self.bn(self.fc1(x)))))


class Classifier(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.backbone = Backbone(rngs)
        self.head = nnx.Linear(64, 5, rngs=rngs)

    def __call__(self, x):
        return self.head(self.backbone(x))


@nnx.jit(static_argnums=4)
def step(model, optimizer, x, y, wrt):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)
    return loss, grads


def fit(model, optimizer, wrt, data, steps, seed, desc):
    rng = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc=desc)
    for t in bar:
        i = rng.integers(0, len(data["x_train"]), 128)
        loss, grads = step(model, optimizer, data["x_train"][i], data["y_train"][i], wrt)
        if (t + 1) % 10 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
    model.eval()
    return float((jnp.argmax(model(data["x_test"]), -1) == data["y_test"]).mean()), grads


def main(argv=None) -> int:
    quick = claims.quick(__doc__, argv)
    steps, threshold = (100, 0.6) if quick else (600, 0.8)
    data, c = tasks(), claims.Claims()

    print("pretraining on task A (digits 0-4)")
    model = Classifier(nnx.Rngs(0))
    model.train()
    acc_a, _ = fit(model, nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param), nnx.Param,
                   data["A"], steps, seed=1, desc="pretrain A (0-4)")
    c.check(f"task A held-out accuracy {acc_a:.3f} > {threshold}", acc_a > threshold)

    print("a new head on task B (digits 5-9), the backbone frozen")
    model.head = nnx.Linear(64, 5, rngs=nnx.Rngs(1))
    trainable = nnx.All(nnx.Param, nnx.Not(jf.flax.nnx_filter(FROZEN, model=model)))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=1e-4), wrt=trainable)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    print(jf.summary(params, frozen=FROZEN, opt_state=nnx.state(optimizer.opt_state)))
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))
    model.train()
    model.backbone.eval()  # the frozen BatchNorm normalises with its running statistics
    acc_b, grads = fit(model, optimizer, trainable, data["B"], steps, seed=2,
                        desc="new head on B (5-9)")

    c.check(f"task B held-out accuracy {acc_b:.3f} > {threshold} (chance 0.200)",
            acc_b > threshold)
    c.check("backbone params and batch statistics keep every bit", jf.assert_frozen,
            before, nnx.to_pure_dict(nnx.state(model)), frozen=FROZEN)
    # optimizer state paths look like (0, 'mu', 'head', 'bias'); (0, 'count') is Adam's counter
    state_paths = {jf.path_str(p[2:])
                   for p in nnx.to_flat_state(nnx.state(optimizer.opt_state)).paths if len(p) > 2}
    grad_paths = {jf.path_str(p) for p in nnx.to_flat_state(grads).paths}
    c.check(f"optimizer state for {sorted(state_paths)} only", state_paths == {
        "head/bias", "head/kernel"})
    c.check(f"gradients for {sorted(grad_paths)} only", grad_paths == {"head/bias", "head/kernel"})
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
