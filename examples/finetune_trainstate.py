"""Transfer learning with flax.linen and TrainState: pretrain, freeze the backbone, train a new head.

Data: scikit-learn's 8x8 digits (ships with scikit-learn, no download).
Task A is digits 0-4, task B digits 5-9; each split into train and held-out
test sets.

1. Pretrain an MLP (Dense-BatchNorm-relu-Dense-relu backbone + head) on task A.
2. Build the task-B model: the same backbone as ``jf.flax.frozen(Backbone,
   collections=("params", "batch_stats"))`` — same parameter paths, so the
   pretrained backbone drops in — run in inference mode, and a new head.
   Train it with flax's own ``TrainState`` and ``tx=jf.freeze(optax.adamw(...),
   frozen=jf.paths("backbone/**"))``.
3. Check the claims: held-out accuracy on task B well above chance, and the
   backbone's parameters *and* BatchNorm statistics bit-for-bit unchanged
   (``jf.assert_frozen``). Exits non-zero if a claim fails.

    python examples/finetune_trainstate.py           # ~10-20 s on a laptop CPU
    python examples/finetune_trainstate.py --quick   # a few seconds
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import jfreeze as jf
import claims
from digits_tasks import tasks

FROZEN = jf.paths("backbone/**")


class Backbone(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(128)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        return nn.relu(nn.Dense(64)(x))


class Classifier(nn.Module):
    classes: int
    freeze_backbone: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        if self.freeze_backbone:
            # Same paths as the plain Backbone; params get no gradient, batch_stats are read-only
            # (running it in training mode would raise), and it runs in inference mode.
            backbone = jf.flax.frozen(Backbone, collections=("params", "batch_stats"))(name="backbone")
            h = backbone(x, train=False)
        else:
            h = Backbone(name="backbone")(x, train=train)
        return nn.Dense(self.classes, name="head")(h)


class TrainState(train_state.TrainState):
    batch_stats: Any = None


def make_step(mutable_stats: bool):
    @jax.jit
    def step(state, x, y):
        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            if mutable_stats:
                logits, upd = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
                stats = upd["batch_stats"]
            else:  # nothing of the model is in training mode but the head
                logits, stats = state.apply_fn(variables, x, train=True), state.batch_stats
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, batch_stats=stats), loss

    return step


def accuracy(state, x, y) -> float:
    return float(_accuracy(state.apply_fn, state.params, state.batch_stats, x, y))


@functools.partial(jax.jit, static_argnums=0)
def _accuracy(apply_fn, params, batch_stats, x, y):
    logits = apply_fn({"params": params, "batch_stats": batch_stats}, x, train=False)
    return (jnp.argmax(logits, -1) == y).mean()


def fit(state, step, data, steps, batch, seed):
    rng = np.random.default_rng(seed)
    n = len(data["x_train"])
    for _ in range(steps):
        i = rng.integers(0, n, batch)
        state, loss = step(state, data["x_train"][i], data["y_train"][i])
    return state, float(loss)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (for the tests)")
    args = parser.parse_args(argv)
    steps = 100 if args.quick else 600
    batch = 128
    data = tasks()
    failures = []

    # 1. pretrain on task A ----------------------------------------------------------
    model_a = Classifier(classes=5)
    va = model_a.init(jax.random.PRNGKey(0), data["A"]["x_train"][:2], train=False)
    state_a = TrainState.create(apply_fn=model_a.apply, params=va["params"], tx=optax.adam(3e-3),
                                batch_stats=va["batch_stats"])
    state_a, loss_a = fit(state_a, make_step(mutable_stats=True), data["A"], steps, batch, seed=1)
    acc_a = accuracy(state_a, data["A"]["x_test"], data["A"]["y_test"])
    print(f"pretrained on task A (digits 0-4): held-out accuracy {acc_a:.3f}")

    # 2. new head on task B, backbone frozen ------------------------------------------
    model_b = Classifier(classes=5, freeze_backbone=True)
    vb = model_b.init(jax.random.PRNGKey(1), data["B"]["x_train"][:2], train=False)
    # the frozen module keeps the plain paths: the pretrained backbone drops in as it is
    params = {**vb["params"], "backbone": state_a.params["backbone"]}
    batch_stats = {**vb["batch_stats"], "backbone": state_a.batch_stats["backbone"]}
    state_b = TrainState.create(apply_fn=model_b.apply, params=params, batch_stats=batch_stats,
                                tx=jf.freeze(optax.adamw(1e-2, weight_decay=1e-4), frozen=FROZEN))
    print()
    print(jf.summary(params, frozen=FROZEN, opt_state=state_b.opt_state))
    before = jax.tree.map(np.array, {"params": state_b.params, "batch_stats": state_b.batch_stats})
    acc_b0 = accuracy(state_b, data["B"]["x_test"], data["B"]["y_test"])
    state_b, loss_b = fit(state_b, make_step(mutable_stats=False), data["B"], steps, batch, seed=2)
    acc_b = accuracy(state_b, data["B"]["x_test"], data["B"]["y_test"])
    print(f"\nnew head on task B (digits 5-9), backbone frozen: held-out accuracy {acc_b0:.3f} -> {acc_b:.3f}"
          f" (chance 0.200), final train loss {loss_b:.3f}")

    # 3. claims --------------------------------------------------------------------
    after = {"params": state_b.params, "batch_stats": state_b.batch_stats}
    try:
        jf.assert_frozen(before, after, frozen=jf.paths("*/backbone/**"))
        print("backbone params and batch_stats: bit-for-bit unchanged")
    except AssertionError as e:
        failures.append(f"backbone moved: {e}")
    moved = [k for k in ("kernel", "bias")
             if not (np.asarray(after["params"]["head"][k]) != before["params"]["head"][k]).any()]
    if moved:
        failures.append(f"head did not train: {moved}")
    threshold = 0.6 if args.quick else 0.8
    if not acc_b > threshold:
        failures.append(f"task-B accuracy {acc_b:.3f} not above {threshold}")
    if not acc_a > threshold:
        failures.append(f"task-A accuracy {acc_a:.3f} not above {threshold}")

    return claims.report(failures)


if __name__ == "__main__":
    sys.exit(main())
