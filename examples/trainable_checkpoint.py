"""A trainable-only checkpoint with a freeze manifest, resumed bit for bit in a "new process".

The digits transfer (pretrain a residual MLP on 0-4, fine-tune on 5-9 with a new head) with
``embed`` and ``layers_0`` frozen under ``jf.freeze``. Halfway, ``jf.save_trainable`` writes
one orbax checkpoint: the manifest (each path frozen or trainable, a fingerprint of the frozen
values), the trainable parameters and the optimizer state; the frozen leaves by reference
(``frozen_source=``). A fresh parameter tree, with the frozen weights from their source, is
restored from it (``jf.restore_trainable``, leaves by path) and finishes the run. Claims: the
resumed run equals the straight one bit for bit; the frozen leaves are not in the checkpoint;
restoring under a different freeze is a ``ValueError`` naming the paths that differ.

    python examples/trainable_checkpoint.py           # ~10 s on a laptop CPU
    python examples/trainable_checkpoint.py --quick   # a few seconds
"""

import sys
import tempfile
from pathlib import Path

import claims
import jax
import numpy as np
import optax
from digits_tasks import accuracy, batches, init_mlp, loss_fn, pretrained_mlp, tasks
from tqdm.auto import tqdm

import jfreeze as jf

FROZEN = jf.paths("embed/**", "layers_0/**")


def same_bits(a, b) -> bool:
    return all(np.array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def main(argv=None) -> int:
    quick = claims.quick(__doc__, argv)
    pre_steps, steps = (150, 60) if quick else (600, 400)
    data, c = tasks(), claims.Claims()
    pretrained = pretrained_mlp(data["A"], pre_steps)
    tx = jf.freeze(optax.adamw(3e-3, weight_decay=1e-4), frozen=FROZEN)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return jf.apply_updates(params, updates, frozen=FROZEN), state, loss

    params = {**pretrained, "head": init_mlp(seed=1)["head"]}
    state, half = tx.init(params), steps // 2
    xs, ys = batches(data["B"], steps, seed=2)
    tmp = tempfile.TemporaryDirectory()  # removed at exit
    directory = Path(tmp.name) / f"step_{half}"
    bar = tqdm(range(steps), desc="train B (5-9)")
    for t in bar:
        if t == half:
            manifest = jf.save_trainable(directory, params, state, frozen=FROZEN,
                                         frozen_source="pretrained on digits 0-4")
            tqdm.write(f"  saved {directory}")
        params, state, loss = step(params, state, xs[t], ys[t])
        if (t + 1) % 10 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
    print(f"task B (digits 5-9): held-out accuracy {accuracy(params, data['B']):.3f}")

    # A new process: the frozen weights come from their source, the rest is freshly initialised;
    # the optimizer state's structure (jax.eval_shape) is all restoring needs of it.
    fresh = {**init_mlp(seed=7), "embed": pretrained["embed"], "layers_0": pretrained["layers_0"]}
    resumed, rstate = jf.restore_trainable(directory, fresh, jax.eval_shape(tx.init, fresh),
                                           frozen=FROZEN)
    for t in range(half, steps):
        resumed, rstate, _ = step(resumed, rstate, xs[t], ys[t])
    c.check(f"the run resumed at step {half} equals the straight run, bit for bit",
            same_bits((resumed, rstate), (params, state)))

    entries = {e["path"]: e for e in manifest["params"]}
    saved = sorted(p for p, e in entries.items() if e["saved"])
    print(f"manifest: frozen={manifest['selector']}; saved {saved}")
    c.check("the frozen leaves are in the manifest (with a fingerprint), not in the checkpoint",
            len(saved) == 6 and all("fingerprint" in entries[p] for p in entries
                                    if p.startswith(("embed/", "layers_0/"))))

    other = jf.paths("embed/**", "layers_0/**", "layers_1/**")
    try:
        jf.restore_trainable(directory, fresh, jax.eval_shape(tx.init, fresh), frozen=other)
        error = ""
    except ValueError as e:
        error = str(e)
    print(f"restored under frozen={other!r}:\n{error}")
    c.check("restoring under a different freeze names the paths that differ",
            "'layers_1/w': trainable when saved, frozen now" in error)
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
