"""Gradual unfreezing (ULMFiT-style) in one compiled step, with layer-wise lr decay.

A residual MLP (``embed``, ``layers_0..2``, ``head``) pretrained on digits 0-4 moves to digits
5-9 with a new head: ``embed`` stays frozen, the head trains from step 0, ``layers_2`` thaws at
1/3 of the run, ``layers_0-1`` at 2/3 (``jf.gradual_unfreeze``, a fresh Adam per stage; the
count is in its state, so the schedule is traced), with layer-wise lr decay
(``jf.layerwise_decay``, ``jf.scale_by_label``); ``jf.thawed_value_and_grad`` differentiates
only what has thawed. Claims: one compilation; each layer keeps every bit until its thaw step
and trains after it; ``embed`` never moves; held-out accuracy well above chance; first-stage
gradients cost what the head's alone cost (plain ``jax.value_and_grad`` pays for every layer
that will thaw); ``jf.check_frozen_compute`` passes the step and flags one that logs the norm
of all gradients.

    python examples/gradual_unfreezing.py           # ~15 s on a laptop CPU
    python examples/gradual_unfreezing.py --quick   # a few seconds
"""

import sys

import claims
import jax
import numpy as np
import optax
from digits_tasks import accuracy, batches, init_mlp, loss_fn, pretrained_mlp, tasks
from tqdm.auto import tqdm

import jfreeze as jf

EMBED = jf.paths("embed/**")  # frozen for good: routed away, no optimizer state


def make_step(tx, thaw=None, traces=None, log_all_grads=False):
    """With ``thaw=`` (the optimizer's), only what has thawed is differentiated."""
    grad_fn = jf.thawed_value_and_grad(loss_fn, thaw) if thaw else None

    def step(params, state, x, y):
        if traces is not None:
            traces.append(1)  # a Python side effect: runs once per trace, i.e. per compilation
        if grad_fn is None:
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        else:
            loss, grads = grad_fn(state.count, params, x, y)
        updates, state = tx.update(grads, state, params)
        logged = grads if log_all_grads else jf.split(grads, frozen=EMBED)[0]
        return optax.apply_updates(params, updates), state, {"loss": loss,
                                                             "grad_norm": optax.tree.norm(logged)}

    return step


def same_bits(a, b) -> bool:
    return all(np.array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def main(argv=None) -> int:
    quick = claims.quick(__doc__, argv)
    (pre_steps, steps), threshold = ((150, 90), 0.6) if quick else ((600, 600), 0.85)
    data, c = tasks(), claims.Claims()
    start = {**pretrained_mlp(data["A"], pre_steps), "head": init_mlp(seed=1)["head"]}

    t1, t2 = steps // 3, 2 * steps // 3
    thaw = {0: jf.paths("head/**"), t1: jf.paths("layers_2/**"), t2: jf.paths("layers_*/**")}
    mults, label_fn = jf.layerwise_decay(start, decay=0.6, bottom=EMBED)
    inner = optax.chain(optax.adamw(3e-3, weight_decay=1e-4), jf.scale_by_label(mults, label_fn))
    tx = jf.gradual_unfreeze(inner, thaw=thaw, per_stage=True)  # a fresh Adam per stage
    state = tx.init(start)
    print("lr multipliers:", ", ".join(f"{k} {v:.3g}" for k, v in mults.items()))
    print(f"thaw: head at 0, layers_2 at {t1}, layers_0-1 at {t2}; {steps} steps")
    print(jf.summary(start, frozen=EMBED, labels=label_fn, opt_state=state))

    traces = []
    step, params, snapshots = jax.jit(make_step(tx, thaw, traces=traces)), start, {}
    bar = tqdm(zip(*batches(data["B"], steps, seed=2), strict=True), total=steps, desc="train B")
    for t, (x, y) in enumerate(bar):
        snapshots[t] = params  # before step t's update
        params, state, metrics = step(params, state, x, y)
        if (t + 1) % (steps // 6) == 0:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
            tqdm.write(f"  step {t + 1}/{steps}: {shown}")

    c.check(f"one compilation for the whole run, thaws included ({len(traces)})", len(traces) == 1)
    thawed_at = {t1: ["layers_0", "layers_1", "layers_2"], t2: ["layers_0", "layers_1"]}
    for t, names in thawed_at.items():
        c.check(f"{', '.join(names)} keep every bit until step {t}",
                all(same_bits(snapshots[t][n], start[n]) for n in names))
    c.check("every layer trains after its thaw",
            all(not same_bits(params[f"layers_{i}"], start[f"layers_{i}"]) for i in range(3))
            and not same_bits(snapshots[t2]["layers_2"], start["layers_2"]))
    c.check("embed keeps every bit (frozen for good)", same_bits(params["embed"], start["embed"]))
    acc = accuracy(params, data["B"])
    c.check(f"task B (digits 5-9) held-out accuracy {acc:.3f} > {threshold} (chance 0.200)",
            acc > threshold)

    # What the gradients cost, per stage: a constant count keeps one branch of the switch.
    x, y = data["B"]["x_train"][:128], data["B"]["y_train"][:128]
    grad_fn = jf.thawed_value_and_grad(loss_fn, thaw)
    first_stage = jf.compiled_flops(lambda p, x, y: grad_fn(0, p, x, y), params, x, y)

    def grads_of(names):  # jax.value_and_grad with respect to these entries only
        return lambda p, x, y: jax.value_and_grad(
            lambda sub: loss_fn({**p, **sub}, x, y))({n: p[n] for n in names})

    head_only = jf.compiled_flops(grads_of(["head"]), params, x, y)
    plain = jf.compiled_flops(grads_of([n for n in params if n != "embed"]), params, x, y)
    c.check(f"first-stage gradients cost a head-only gradient ({first_stage / head_only:.3f}x), "
            f"not {plain / first_stage:.2f}x", first_stage <= 1.01 * head_only < plain)

    report = jf.check_frozen_compute(make_step(tx, thaw), params, state, x, y, frozen=EMBED)
    # The trap: plain jax.value_and_grad, and the norm of all gradients logged.
    trap = jf.check_frozen_compute(make_step(tx, log_all_grads=True), params, state, x, y,
                                   frozen=EMBED, compiled=False)  # lowered: no compilation
    print(f"\ncompute check, the step as written: {report}")
    print(f"compute check, jax.value_and_grad, the norm of all gradients logged: {trap}")
    c.check("no frozen weight gradient in the step", report.ok and report.differentiated == 0)
    c.check(f"logging the norm of all gradients is flagged ({trap.ratio:.2f}x the FLOPs)",
            trap.ok is False and trap.leaking_outputs == ("2/grad_norm",))
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
