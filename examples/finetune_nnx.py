"""Transfer learning with Flax NNX: pretrain, freeze the backbone with an NNX filter, train a new head.

The NNX variant of ``finetune_trainstate.py``, on the same data (scikit-learn's
digits: task A = digits 0-4, task B = digits 5-9, held-out test sets).

1. Pretrain backbone + head on task A with ``nnx.Optimizer(..., wrt=nnx.Param)``.
2. Swap in a new head, and train only what is not frozen:
   ``trainable = nnx.All(nnx.Param, nnx.Not(jf.flax.nnx_filter(FROZEN, model=model)))``
   for both ``nnx.Optimizer(model, tx, wrt=trainable)`` (optimizer state only
   for the head) and ``nnx.DiffState(0, trainable)`` (gradients only for the
   head). The frozen backbone's BatchNorm runs in inference mode
   (``model.backbone.eval()``), so its statistics stay put too.
3. Check: task-B held-out accuracy well above chance, the backbone's
   parameters and batch statistics bit-for-bit unchanged, optimizer state and
   gradients only for the head. Exits non-zero if a claim fails.

    python examples/finetune_nnx.py           # ~10-20 s on a laptop CPU
    python examples/finetune_nnx.py --quick   # a few seconds
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jfreeze as jf
import claims
from digits_tasks import tasks

FROZEN = jf.paths("backbone/**")


class Backbone(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(64, 128, rngs=rngs)
        self.bn = nnx.BatchNorm(128, momentum=0.9, rngs=rngs)
        self.fc2 = nnx.Linear(128, 64, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.fc2(nnx.relu(self.bn(self.fc1(x)))))


class Classifier(nnx.Module):
    def __init__(self, classes: int, rngs: nnx.Rngs):
        self.backbone = Backbone(rngs)
        self.head = nnx.Linear(64, classes, rngs=rngs)

    def __call__(self, x):
        return self.head(self.backbone(x))


def make_step(wrt):
    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss, grads

    return step


def fit(model, optimizer, step, data, steps, batch, seed):
    rng = np.random.default_rng(seed)
    n = len(data["x_train"])
    for _ in range(steps):
        i = rng.integers(0, n, batch)
        loss, grads = step(model, optimizer, data["x_train"][i], data["y_train"][i])
    return float(loss), grads


@nnx.jit
def _accuracy(model, x, y):
    return (jnp.argmax(model(x), -1) == y).mean()


def accuracy(model, x, y) -> float:
    model.eval()
    return float(_accuracy(model, x, y))


def snapshot(model):
    return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (for the tests)")
    args = parser.parse_args(argv)
    steps = 100 if args.quick else 600
    batch = 128
    data = tasks()
    failures = []

    # 1. pretrain on task A --------------------------------------------------------
    model = Classifier(5, nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    model.train()
    fit(model, opt, make_step(nnx.Param), data["A"], steps, batch, seed=1)
    acc_a = accuracy(model, data["A"]["x_test"], data["A"]["y_test"])
    print(f"pretrained on task A (digits 0-4): held-out accuracy {acc_a:.3f}")

    # 2. new head on task B, backbone frozen -----------------------------------------
    model.head = nnx.Linear(64, 5, rngs=nnx.Rngs(1))
    trainable = nnx.All(nnx.Param, nnx.Not(jf.flax.nnx_filter(FROZEN, model=model)))
    opt = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=1e-4), wrt=trainable)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    print()
    print(jf.summary(params, frozen=FROZEN, opt_state=nnx.state(opt.opt_state)))
    before = snapshot(model)
    acc_b0 = accuracy(model, data["B"]["x_test"], data["B"]["y_test"])
    model.train()
    model.backbone.eval()  # the frozen BatchNorm normalises with its running statistics
    loss_b, grads = fit(model, opt, make_step(trainable), data["B"], steps, batch, seed=2)
    acc_b = accuracy(model, data["B"]["x_test"], data["B"]["y_test"])
    print(f"\nnew head on task B (digits 5-9), backbone frozen: held-out accuracy {acc_b0:.3f} -> {acc_b:.3f}"
          f" (chance 0.200), final train loss {loss_b:.3f}")

    # 3. claims ----------------------------------------------------------------------
    after = snapshot(model)
    try:
        jf.assert_frozen(before, after, frozen=FROZEN)  # Param and BatchStat variables alike
        print("backbone params and batch statistics: bit-for-bit unchanged")
    except AssertionError as e:
        failures.append(f"backbone moved: {e}")
    # opt_state paths look like (0, 'mu', 'head', 'bias'); (0, 'count') is adam's step counter
    state_paths = sorted({jf.path_str(p[2:]) for p in nnx.to_flat_state(nnx.state(opt.opt_state)).paths
                          if len(p) > 2})
    grad_paths = sorted(jf.path_str(p) for p in nnx.to_flat_state(grads).paths)
    print(f"optimizer state for {state_paths}; gradients for {grad_paths}")
    if state_paths != ["head/bias", "head/kernel"] or grad_paths != ["head/bias", "head/kernel"]:
        failures.append("optimizer state or gradients outside the head")
    threshold = 0.6 if args.quick else 0.8
    if not acc_b > threshold:
        failures.append(f"task-B accuracy {acc_b:.3f} not above {threshold}")
    if not acc_a > threshold:
        failures.append(f"task-A accuracy {acc_a:.3f} not above {threshold}")

    return claims.report(failures)


if __name__ == "__main__":
    sys.exit(main())
