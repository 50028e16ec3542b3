"""Gradual unfreezing (ULMFiT-style) in one compiled step, with layer-wise lr decay,
a trainable-only checkpoint and a check that frozen compute is gone.

Data: scikit-learn's 8x8 digits (ships with scikit-learn, no download). Task A is
digits 0-4, task B digits 5-9; each split into train and held-out test sets.

1. Pretrain a small MLP (``embed``, ``layers_0..layers_2``, ``head``) on task A.
2. Transfer to task B with a new head: ``embed`` stays frozen for good; the head
   trains from step 0, ``layers_2`` thaws at 1/3 of the run, ``layers_0`` and
   ``layers_1`` at 2/3 (``jf.gradual_unfreeze``, one inner Adam state per stage),
   with layer-wise learning-rate decay (``jf.layerwise_decay`` +
   ``jf.scale_by_label``).
3. Halfway, save a trainable-only checkpoint (``jf.save_trainable``; the frozen
   embedding by reference), restore it into freshly initialised parameters as a
   new process would, and finish the run from there.
4. Check the claims (exits non-zero if one fails): one compilation for the whole
   run; each layer bit-for-bit unchanged until its thaw step and moving after it;
   ``embed`` never moves; the resumed run equals the straight one bit for bit;
   held-out accuracy on task B well above chance; the step's compiled FLOPs show no
   frozen weight gradient (``jf.check_frozen_compute``), while a variant that logs
   the norm of *all* gradients is flagged; and ``jf.thawed_value_and_grad`` makes
   each stage differentiate only what has thawed (the first stage's gradients cost
   what the head's alone cost).

    python examples/gradual_unfreezing.py           # ~10-20 s on a laptop CPU
    python examples/gradual_unfreezing.py --quick   # a few seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jfreeze as jf
import claims
from digits_tasks import tasks

WIDTH, DEPTH, CLASSES = 64, 3, 5
EMBED = jf.paths("embed/**")  # frozen for good: routed away, no optimizer state


def dense(rng, n_in, n_out):
    w = rng.standard_normal((n_in, n_out), np.float32) * np.sqrt(2.0 / n_in)
    return {"w": jnp.asarray(w), "b": jnp.zeros(n_out, jnp.float32)}


def init(seed: int):
    rng = np.random.default_rng(seed)
    params = {"embed": dense(rng, 64, WIDTH)}
    for i in range(DEPTH):
        params[f"layers_{i}"] = dense(rng, WIDTH, WIDTH)
    params["head"] = dense(rng, WIDTH, CLASSES)
    return params


def apply(params, x):
    h = jax.nn.relu(x @ params["embed"]["w"] + params["embed"]["b"])
    for i in range(DEPTH):
        layer = params[f"layers_{i}"]
        h = h + jax.nn.relu(h @ layer["w"] + layer["b"])  # residual blocks
    return h @ params["head"]["w"] + params["head"]["b"]


def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()


@jax.jit
def _correct(params, x, y):
    return (jnp.argmax(apply(params, x), -1) == y).mean()


def accuracy(params, x, y) -> float:
    return float(_correct(params, x, y))


def batches(data, steps, batch, seed):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(data["x_train"]), (steps, batch))
    return data["x_train"][idx], data["y_train"][idx]


def make_step(tx, traces=None, log_all_grads=False, thaw=None):
    # With thaw=, only what has thawed by the optimizer's count is differentiated.
    grad_fn = jf.thawed_value_and_grad(loss_fn, thaw) if thaw else None

    def step(params, state, x, y):
        if traces is not None:
            traces[0] += 1  # a Python side effect: runs once per trace, i.e. per compilation
        if grad_fn is None:
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        else:
            loss, grads = grad_fn(state.count, params, x, y)
        updates, state = tx.update(grads, state, params)
        norm = optax.tree.norm(grads if log_all_grads else jf.split(grads, frozen=EMBED)[0])
        return optax.apply_updates(params, updates), state, {"loss": loss, "grad_norm": norm}

    return step


def same_bits(a, b) -> bool:
    return all(np.array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (for the tests)")
    args = parser.parse_args(argv)
    pre_steps, steps = (150, 90) if args.quick else (600, 600)
    thaw1, thaw2 = steps // 3, 2 * steps // 3
    resume_at = (thaw1 + thaw2) // 2  # between the two thaws: the second happens after the resume
    data = tasks()
    failures = []

    # 1. pretrain on task A -------------------------------------------------------------
    params = init(seed=0)
    adam = optax.adam(3e-3)
    pre_step = jax.jit(make_step(adam))
    state = jax.jit(adam.init)(params)
    xs, ys = batches(data["A"], pre_steps, 128, seed=1)
    for x, y in zip(xs, ys):
        params, state, _ = pre_step(params, state, x, y)
    acc_a = accuracy(params, data["A"]["x_test"], data["A"]["y_test"])
    print(f"pretrained on task A (digits 0-4): held-out accuracy {acc_a:.3f}")

    # 2. task B: new head, gradual unfreezing, layer-wise lr decay ------------------------
    pretrained = params
    params = {**pretrained, "head": init(seed=1)["head"]}
    mults, label_fn = jf.layerwise_decay(params, decay=0.6, bottom=EMBED)
    thaw = {0: jf.paths("head/**"), thaw1: jf.paths("layers_2/**"), thaw2: jf.paths("layers_*/**")}
    inner = optax.chain(optax.adamw(3e-3, weight_decay=1e-4), jf.scale_by_label(mults, label_fn))
    tx = jf.gradual_unfreeze(inner, thaw=thaw, per_stage=True)  # a fresh Adam per stage
    state = jax.jit(tx.init)(params)
    print("\nlr multipliers:", ", ".join(f"{k} {v:.3g}" for k, v in mults.items()),
          "(embed: frozen for good)")
    print(f"thaw: head at 0, layers_2 at {thaw1}, layers_0-1 at {thaw2}; {steps} steps\n")
    print(jf.summary(params, frozen=EMBED, labels=label_fn, opt_state=state))

    traces = [0]
    step = jax.jit(make_step(tx, traces, thaw=thaw))
    xs, ys = batches(data["B"], steps, 128, seed=2)
    tmp = tempfile.TemporaryDirectory()
    start, snapshots, checkpoint = params, {}, Path(tmp.name) / "resume"
    for t in range(steps):
        if t in (thaw1, thaw2):
            snapshots[t] = params  # just before the thaw step's update
        if t == resume_at:
            jf.save_trainable(checkpoint, params, state, frozen=EMBED,
                              frozen_source="pretrained on task A (embed)")
        params, state, metrics = step(params, state, xs[t], ys[t])
    acc_b = accuracy(params, data["B"]["x_test"], data["B"]["y_test"])
    print(f"\ntask B (digits 5-9): held-out accuracy {acc_b:.3f} (chance 0.200), "
          f"final loss {float(metrics['loss']):.3f}, compilations: {traces[0]}")

    # 3. resume from the trainable-only checkpoint, as a fresh process would -------------------
    fresh = {**init(seed=7), "embed": pretrained["embed"]}  # frozen weights from their source
    template = jax.eval_shape(tx.init, fresh)  # the state's structure is all restore needs
    resumed, rstate = jf.restore_trainable(checkpoint, fresh, template, frozen=EMBED)
    for t in range(resume_at, steps):
        resumed, rstate, _ = step(resumed, rstate, xs[t], ys[t])
    tmp.cleanup()
    saved = sum(e["saved"] for e in jf.freeze_manifest(params, frozen=EMBED)["params"])
    print(f"resumed at step {resume_at} from {checkpoint.name}/ ({saved} of "
          f"{len(jax.tree.leaves(params))} parameter leaves saved, embed by reference)")

    # 4. is frozen compute gone? -----------------------------------------------------------
    report = jf.check_frozen_compute(make_step(tx, thaw=thaw), params, state, xs[0], ys[0],
                                     frozen=EMBED)
    # Per stage (a constant count keeps one branch of the switch): the first stage pays for
    # the head's gradients only, where plain value_and_grad pays for every layer that will thaw.
    def grad_flops(fn):
        return jax.jit(fn).lower(params, xs[0], ys[0]).compile().cost_analysis()["flops"]

    def grad_of(names):  # value_and_grad with respect to these top-level entries only
        return lambda p, x, y: jax.value_and_grad(
            lambda sub: loss_fn({**p, **sub}, x, y))({n: p[n] for n in names})

    staged = jf.thawed_value_and_grad(loss_fn, thaw)
    stage0 = grad_flops(lambda p, x, y: staged(0, p, x, y))
    head_only = grad_flops(grad_of(["head"]))
    plain = grad_flops(grad_of([n for n in params if n != "embed"]))  # all that ever thaws
    # (compiled=False: the lowered programs' FLOPs, no compilation; for large models)
    trap = jf.check_frozen_compute(make_step(tx, log_all_grads=True), params, state, xs[0], ys[0],
                                   frozen=EMBED, compiled=False)
    print(f"\ncompute check, the step as written: {report}")
    print(f"compute check, logging the norm of all gradients: {trap}")
    print(f"gradients in the first stage: {stage0:,.0f} FLOPs (head only: {head_only:,.0f}); "
          f"of every layer that will thaw, as jax.value_and_grad in one compiled step computes "
          f"them: {plain:,.0f} ({plain / stage0:.2f}x)")

    # 5. claims ------------------------------------------------------------------------------
    def claim(ok: bool, text: str) -> None:
        print(("ok     " if ok else "FAILED ") + text)
        if not ok:
            failures.append(text)

    print()
    claim(traces[0] == 1,
          f"one compilation for the whole run, thaws and resume included ({traces[0]})")
    layers_at = {thaw1: ["layers_0", "layers_1", "layers_2"], thaw2: ["layers_0", "layers_1"]}
    for t, names in layers_at.items():
        claim(all(same_bits(snapshots[t][n], start[n]) for n in names),
              f"{', '.join(names)} bit-for-bit unchanged until step {t}")
    claim(not same_bits(snapshots[thaw2]["layers_2"], start["layers_2"]),
          "layers_2 trains after its thaw")
    claim(all(not same_bits(params[f"layers_{i}"], start[f"layers_{i}"]) for i in range(DEPTH)),
          "every layer trains after its thaw")
    claim(same_bits(params["embed"], start["embed"]),
          "embed bit-for-bit unchanged (frozen for good)")
    claim(same_bits((resumed, rstate), (params, state)),
          "the run resumed from the trainable-only checkpoint equals the straight run, bit for bit")
    threshold = 0.6 if args.quick else 0.85
    claim(acc_b > threshold, f"task-B held-out accuracy {acc_b:.3f} above {threshold}")
    claim(report.ok and report.differentiated == 0,
          "no frozen weight gradient in the compiled step: embed is never differentiated "
          f"(ratio {report.ratio:.3f})")
    claim(not trap.ok and trap.leaking_outputs == ("2/grad_norm",),
          f"logging the norm of all gradients is flagged ({trap.ratio:.2f}x the FLOPs)")
    claim(stage0 <= 1.01 * head_only < plain,
          f"first-stage gradients cost a head-only gradient ({stage0 / head_only:.3f}x), "
          f"not {plain / stage0:.2f}x")

    return claims.report(failures)


if __name__ == "__main__":
    sys.exit(main())
