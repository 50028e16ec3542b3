"""Transfer learning with Equinox: pretrain an ``eqx.nn.MLP``, freeze its hidden layers by path.

The Equinox variant of ``finetune_nnx.py``, on the same digits tasks (A: 0-4, B: 5-9). jfreeze
spells an Equinox model's paths by attribute name and list index, so the MLP's first weight is
``layers/0/weight`` and its output layer ``layers/2``. After pretraining on A, the output layer
is replaced (``eqx.tree_at``) and trained on B with ``jf.freeze(optax.adamw(...),
frozen=jf.paths("layers/0/*", "layers/1/*"))`` in an ``eqx.filter_jit`` step;
``jf.apply_updates`` writes the updates into the model's arrays (``eqx.partition`` /
``eqx.combine`` keep the rest, such as the activation function).
Claims: held-out accuracy on B well above chance, the frozen layers keep every bit, the
optimizer state is Adam's for the new output layer alone.

    python examples/finetune_equinox.py           # ~20 s on a laptop CPU
    python examples/finetune_equinox.py --quick   # ~10 s
"""

import sys

import claims
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from digits_tasks import batches, tasks
from tqdm.auto import tqdm

import jfreeze as jf

FROZEN = jf.paths("layers/0/*", "layers/1/*")  # the hidden layers: layers/0/weight, ...


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(model)(x), y).mean()


def fit(model, tx, data, steps, seed, desc, frozen=jf.nothing):
    """``steps`` steps of ``tx`` on ``data``, ``frozen`` kept bit for bit; returns the model,
    its optimizer state and its held-out accuracy."""
    params, static = eqx.partition(model, eqx.is_array)
    opt_state = tx.init(params)

    @eqx.filter_jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(eqx.combine(p, static), x, y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return jf.apply_updates(params, updates, frozen=frozen), opt_state, loss

    bar = tqdm(zip(*batches(data, steps, seed), strict=True), total=steps, desc=desc)
    for x, y in bar:
        params, opt_state, loss = step(params, opt_state, x, y)
        bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
    model = eqx.combine(params, static)
    acc = float((jnp.argmax(jax.vmap(model)(data["x_test"]), -1) == data["y_test"]).mean())
    return model, opt_state, acc


def main(argv=None) -> int:
    quick = claims.quick(__doc__, argv)
    steps, threshold = (150, 0.6) if quick else (600, 0.8)
    data, c = tasks(), claims.Claims()

    mlp = eqx.nn.MLP(64, 5, width_size=256, depth=2, key=jax.random.key(0))
    mlp, _, acc_a = fit(mlp, optax.adam(3e-3), data["A"], steps, 1, "pretrain A (0-4)")
    c.check(f"task A held-out accuracy {acc_a:.3f} > {threshold}", acc_a > threshold)

    model = eqx.tree_at(lambda m: m.layers[-1], mlp, eqx.nn.Linear(256, 5, key=jax.random.key(1)))
    params = eqx.filter(model, eqx.is_array)
    tx = jf.freeze(optax.adamw(1e-2, weight_decay=1e-4), frozen=FROZEN)
    summary = jf.summary(params, frozen=FROZEN, opt_state=tx.init(params))
    print(summary)
    model, opt_state, acc_b = fit(model, tx, data["B"], steps, 2, "new head on B (5-9)",
                                   frozen=FROZEN)

    c.check(f"task B held-out accuracy {acc_b:.3f} > {threshold} (chance 0.200)",
            acc_b > threshold)
    c.check("the hidden layers keep every bit (jf.assert_frozen)", jf.assert_frozen,
            params, eqx.filter(model, eqx.is_array), frozen=FROZEN)
    state = {jf.path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]}
    moments = {p.split("/", 4)[4] for p, leaf in state.items() if np.ndim(leaf)}
    n_state = sum(np.size(leaf) for leaf in state.values() if np.ndim(leaf))
    c.check(f"optimizer state for {sorted(moments)} only: {n_state} numbers = Adam's mu and nu "
            f"of the {summary.trainable} trainable parameters",
            moments == {f"{m}/layers/2/{w}" for m in ("mu", "nu") for w in ("weight", "bias")}
            and n_state == 2 * summary.trainable)
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
