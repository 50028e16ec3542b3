"""Two transfer-learning tasks from scikit-learn's digits (shipped with it, no download), and
the small residual MLP that the examples pretrain on the first.

Task A is digits 0-4, task B digits 5-9 (labels shifted to 0-4); a quarter of each is held out.
The MLP's parameters are a plain dict: ``embed``, ``layers_0`` .. ``layers_2``, ``head``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits


def tasks(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """``{"A": {...}, "B": {...}}`` with ``x_train, y_train, x_test, y_test`` each."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    rng = np.random.default_rng(seed)
    out = {}
    for name, keep, offset in (("A", y < 5, 0), ("B", y >= 5, 5)):
        idx = rng.permutation(np.flatnonzero(keep))
        n_test = len(idx) // 4
        test, train = idx[:n_test], idx[n_test:]
        out[name] = dict(x_train=x[train], y_train=y[train] - offset,
                         x_test=x[test], y_test=y[test] - offset)
    return out


def init_mlp(seed: int, width: int = 64, depth: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    sizes = {"embed": (64, width), **{f"layers_{i}": (width, width) for i in range(depth)},
             "head": (width, 5)}
    return {name: {"w": jnp.asarray(rng.standard_normal((n, m), np.float32) * np.sqrt(2 / n)),
                   "b": jnp.zeros(m, jnp.float32)} for name, (n, m) in sizes.items()}


def apply_mlp(params, x):
    h = jax.nn.relu(x @ params["embed"]["w"] + params["embed"]["b"])
    for name in sorted(k for k in params if k.startswith("layers_")):
        h = h + jax.nn.relu(h @ params[name]["w"] + params[name]["b"])  # residual blocks
    return h @ params["head"]["w"] + params["head"]["b"]


def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply_mlp(params, x), y).mean()


def accuracy(params, data) -> float:
    """Held-out accuracy."""
    return float((jnp.argmax(apply_mlp(params, data["x_test"]), -1) == data["y_test"]).mean())


def batches(data, steps: int, seed: int, batch: int = 128):
    """``steps`` training batches, stacked: (xs, ys)."""
    idx = np.random.default_rng(seed).integers(0, len(data["x_train"]), (steps, batch))
    return data["x_train"][idx], data["y_train"][idx]


def pretrained_mlp(data, steps: int) -> dict:
    """The MLP trained with Adam on ``data`` (task A); prints its held-out accuracy."""
    adam = optax.adam(3e-3)

    @jax.jit
    def step(params, state, x, y):
        updates, state = adam.update(jax.grad(loss_fn)(params, x, y), state)
        return optax.apply_updates(params, updates), state

    params = init_mlp(seed=0)
    state = adam.init(params)
    for x, y in zip(*batches(data, steps, seed=1), strict=True):
        params, state = step(params, state, x, y)
    print(f"pretrained on task A (digits 0-4): held-out accuracy {accuracy(params, data):.3f}")
    return params
