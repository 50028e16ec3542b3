"""Transfer learning with linen and TrainState: pretrain, freeze the backbone, train a new head.

scikit-learn's 8x8 digits: task A is digits 0-4, task B digits 5-9 (held-out test sets). An MLP
(Dense-BatchNorm-relu-Dense-relu backbone, Dense head) is pretrained on A. For B, the backbone
is ``jf.flax.frozen(Backbone, collections=("params", "batch_stats"))``: the same paths, so the
pretrained backbone drops in, run in inference mode; flax's own ``TrainState`` trains a new head
with ``tx=jf.freeze(optax.adamw(...), frozen=jf.paths("backbone/**"))``. Claims: held-out
accuracy on B well above chance (0.96 at the default size, chance 0.20), the head trains, and
the backbone's parameters and BatchNorm statistics keep every bit.

    python examples/finetune_trainstate.py           # ~15 s on a laptop CPU
    python examples/finetune_trainstate.py --quick   # a few seconds
"""

import sys
from typing import Any

import claims
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from digits_tasks import tasks
from flax.training import train_state
from tqdm.auto import tqdm

import jfreeze as jf

FROZEN = jf.paths("backbone/**")


class Backbone(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(128)(x))
        return nn.relu(nn.Dense(64)(nn.relu(x)))


class Classifier(nn.Module):
    freeze_backbone: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        if self.freeze_backbone:  # no gradient for its params, read-only batch_stats
            frozen = jf.flax.frozen(Backbone, collections=("params", "batch_stats"))
            h = frozen(name="backbone")(x, train=False)
        else:
            h = Backbone(name="backbone")(x, train=train)
        return nn.Dense(5, name="head")(h)


class TrainState(train_state.TrainState):
    batch_stats: Any = None


@jax.jit
def step(state, x, y):
    def loss_fn(params):
        logits, new = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                     train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=new["batch_stats"]), loss


def fit(state, data, steps, seed, desc):
    rng = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc=desc)
    for t in bar:
        i = rng.integers(0, len(data["x_train"]), 128)
        state, loss = step(state, data["x_train"][i], data["y_train"][i])
        if (t + 1) % 10 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
    x, y = data["x_test"], data["y_test"]
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x,
                            train=False)
    return state, float((jnp.argmax(logits, -1) == y).mean())


def new_state(model, params, batch_stats, tx):
    return TrainState.create(apply_fn=model.apply, params=params, batch_stats=batch_stats, tx=tx)


def main(argv=None) -> int:
    quick = claims.quick(__doc__, argv)
    steps, threshold = (100, 0.6) if quick else (600, 0.8)
    data, c = tasks(), claims.Claims()

    print("pretraining on task A (digits 0-4)")
    model = Classifier()
    v = model.init(jax.random.PRNGKey(0), data["A"]["x_train"][:2], train=False)
    pretrained, acc_a = fit(new_state(model, v["params"], v["batch_stats"], optax.adam(3e-3)),
                            data["A"], steps, seed=1, desc="pretrain A (0-4)")
    c.check(f"task A held-out accuracy {acc_a:.3f} > {threshold}", acc_a > threshold)

    print("a new head on task B (digits 5-9), the backbone frozen")
    model = Classifier(freeze_backbone=True)
    v = model.init(jax.random.PRNGKey(1), data["B"]["x_train"][:2], train=False)
    params = {**v["params"], "backbone": pretrained.params["backbone"]}  # the same paths
    stats = {**v["batch_stats"], "backbone": pretrained.batch_stats["backbone"]}
    tx = jf.freeze(optax.adamw(1e-2, weight_decay=1e-4), frozen=FROZEN)
    state = new_state(model, params, stats, tx)
    print(jf.summary(params, frozen=FROZEN, opt_state=state.opt_state))
    state, acc_b = fit(state, data["B"], steps, seed=2, desc="new head on B (5-9)")

    c.check(f"task B held-out accuracy {acc_b:.3f} > {threshold} (chance 0.200)",
            acc_b > threshold)
    c.check("backbone params and batch_stats keep every bit", jf.assert_frozen,
            {"params": params, "batch_stats": stats},
            {"params": state.params, "batch_stats": state.batch_stats},
            frozen=jf.paths("*/backbone/**"))
    c.check("the head trains", all(not np.array_equal(state.params["head"][k], params["head"][k])
                                   for k in ("kernel", "bias")))
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
