"""jf.freeze and jf.partition: frozen is bit-identical, trainable is untouched by freezing."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from strategies import (
    FLOAT_DTYPES,
    MODES,
    bits,
    property_settings,
    random_array,
    special_values,
    trees_and_selections,
)

import jfreeze as jf

STEPS = 3


# name -> (factory, whether NaN/Inf may sit in frozen *elements* of params).
# Frozen elements of a partly frozen leaf, unless they are whole slices along one
# axis (cut away, see whole_slices), still reach the inner optimizer as params
# (only their gradients and updates are zeroed), exactly as in the reference run:
# lamb's trust ratio and adafactor's parameter scale take a whole leaf's norm,
# and novograd keeps weight decay in its momentum, so a NaN param *element*
# legitimately shows up in that leaf's trainable update or in the state. Those
# get NaN/Inf params only in whole frozen leaves (routed away).
OPTIMIZERS = {
    "sgd_momentum": (lambda: optax.sgd(0.1, momentum=0.9), True),
    "adam": (lambda: optax.adam(0.1), True),
    "adamw": (lambda: optax.adamw(0.1, weight_decay=0.1), True),
    "lion": (lambda: optax.lion(0.1, weight_decay=0.1), True),
    "lamb": (lambda: optax.lamb(0.1, weight_decay=0.1), False),
    "adafactor": (lambda: optax.adafactor(0.1), False),
    "clip_adamw": (
        lambda: optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(0.1, weight_decay=0.1)),
        True,
    ),
    # Not a GradientTransformation: passed as is, by duck typing.
    "multisteps_adam": (lambda: optax.MultiSteps(optax.adam(0.1), every_k_schedule=2), True),
    "inject_adamw": (
        lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=0.1, weight_decay=0.1),
        True,
    ),
    "rmsprop": (lambda: optax.rmsprop(0.1, momentum=0.5), True),
    "adagrad": (lambda: optax.adagrad(0.1), True),
    "novograd": (lambda: optax.novograd(0.1, weight_decay=0.1), False),
    "adabelief": (lambda: optax.adabelief(0.1), True),
}
# Examples per (optimizer, mode). Under jit every example is a fresh compile;
# eagerly MultiSteps' lax.cond is traced and compiled at every call.
EXAMPLES = {"jit": 5, "eager": 10}
EXAMPLES_MULTISTEPS_EAGER = 3


def _poison(x: np.ndarray, where: np.ndarray, rng, values) -> np.ndarray:
    """``x`` with entries at ``where`` replaced by random picks from ``values``."""
    x = x.copy()
    with np.errstate(over="ignore"):  # 1e30 is inf in float16
        picks = np.asarray(values, dtype=x.dtype)[rng.integers(0, len(values), x.shape)]
    x[where] = picks[where]
    return x


def _special(x: np.ndarray, where: np.ndarray, rng, *, finite: bool) -> np.ndarray:
    """``x`` with the entries at ``where`` set to bit patterns an add may change:
    subnormals and +-0.0, and (unless ``finite``) NaNs with payloads and +-inf."""
    x = x.copy()
    picks = special_values(rng, x.dtype.name, x.shape)
    if finite:
        parts = [picks.real, picks.imag] if np.iscomplexobj(picks) else [picks]
        for part in parts:
            part[~np.isfinite(part)] = np.asarray(-0.0, part.dtype)
    x[where] = picks[where]
    return x


def make_case(params, selection, rng, *, nan_in_frozen_elements: bool):
    """Params with special bit patterns in frozen places (subnormals, +-0.0, and
    NaN payloads / +-inf where the optimizer tolerates them), STEPS gradients
    with NaN/Inf there."""
    leaves, treedef = jax.tree.flatten(params)
    p_out, g_out = [], [[] for _ in range(STEPS)]
    for i, x in enumerate(leaves):
        fz = selection.frozen_elements(i, x.shape)
        # About half the frozen entries special, the rest ordinary values that
        # weight decay would move.
        finite = not (selection.masks[i] is True or nan_in_frozen_elements)
        p_out.append(_special(x, fz & (rng.random(x.shape) < 0.5), rng, finite=finite))
        for s in range(STEPS):
            g = random_array(rng, x.shape, x.dtype.name)
            g_out[s].append(_poison(g, fz, rng, [np.nan, np.inf, -np.inf, -0.0, 1e30]))
    return treedef.unflatten(p_out), [treedef.unflatten(g) for g in g_out]


def _identity(f):
    return f


def run(tx, params, grads_seq, mode=_identity, post=_identity, frozen=None):
    """init + one update per gradient; returns final params, all updates, final state.

    ``mode`` wraps init and the step (jax.jit: one compile, reused every step);
    ``post`` is applied to each update before it is applied; with ``frozen``,
    updates are applied by ``jf.apply_updates`` (else ``optax.apply_updates``).
    """

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        updates = post(updates)
        if frozen is None:
            return optax.apply_updates(params, updates), updates, state
        return jf.apply_updates(params, updates, frozen=frozen), updates, state

    state = mode(tx.init)(params)
    step = mode(step)
    all_updates = []
    for g in grads_seq:
        params, updates, state = step(params, state, g)
        all_updates.append(updates)
    return params, all_updates, state


def run_reference(inner, params, grads_seq, masks, mode=_identity):
    """Plain optax on the trainable subset alone: a list of the non-frozen leaves
    (flatten order), element-frozen entries zeroed with jnp.where in the gradient
    before ``inner`` and in the update after it."""

    def zero(tree):
        return [x if m is False else jnp.where(m, 0.0, x) for x, m in zip(tree, masks, strict=True)]

    # jnp.where, as jf.freeze does: np.where(m, 0.0, bf16) is float64, and optax fed NumPy
    # bf16 gradients computes its moments in float32, either way another precision than
    # jf.freeze's (1-ulp differences in bf16 that hypothesis finds now and then).
    grads_seq = [[x if m is False else jnp.where(m, jnp.zeros((), x.dtype), x)
                  for x, m in zip(g, masks, strict=True)] for g in grads_seq]
    return run(inner, params, grads_seq, mode, post=zero)[0]


def whole_slices(m) -> tuple[int, np.ndarray] | None:
    """``(axis, frozen per slice)`` if the partial mask ``m`` freezes whole slices
    along one axis (then jf.freeze cuts them away), else ``None``; by hand, not
    with jfreeze's own code."""
    if not isinstance(m, np.ndarray):
        return None
    for a in range(m.ndim):
        v = m.any(axis=tuple(i for i in range(m.ndim) if i != a))
        if np.array_equal(np.broadcast_to(np.expand_dims(v, [i for i in range(m.ndim) if i != a]),
                                          m.shape), m):
            return a, v
    return None


def reference_on_trainable(make_inner, p0, grads_seq, masks, mode):
    """``{leaf index: after -> (got, want)}``: the trainable entries of a leaf after
    jf.freeze, and those of plain optax run on the trainable subset alone. Whole
    frozen slices are cut away (NumPy) first, as jf.freeze does; other element
    masks are zeroed (run_reference)."""
    keep = [i for i, m in enumerate(masks) if m is not True]  # not wholly frozen
    cut = {i: whole_slices(masks[i]) for i in keep}
    # Cut slices as jax arrays, as jf.freeze's are: optax fed NumPy bf16 computes its moments
    # in float32, another precision (a 1-ulp difference hypothesis found).
    trim = lambda i, x: x if cut[i] is None else jnp.asarray(np.compress(~cut[i][1], x, cut[i][0]))
    ref_params = [trim(i, p0[i]) for i in keep]
    ref_grads = [[trim(i, jax.tree.leaves(g)[i]) for i in keep] for g in grads_seq]
    ref_masks = [False if cut[i] is not None else masks[i] for i in keep]
    ref = run_reference(make_inner(), ref_params, ref_grads, ref_masks, mode)

    def pair(i, want):
        def got_want(after):
            after, want_ = np.asarray(after), np.asarray(want)
            if cut[i] is not None:
                return trim(i, after), want_
            fz = np.broadcast_to(np.asarray(masks[i], dtype=bool), after.shape)
            return after[~fz], want_[~fz]
        return got_want

    return {i: pair(i, w) for i, w in zip(keep, ref, strict=True)}


def check_freeze_law(mode, make_inner, params, selection, grads_seq):
    """The three laws of jf.freeze on one tree, selection and gradient sequence."""
    masks = selection.masks
    tx = jf.freeze(make_inner(), frozen=selection.selector)
    new, all_updates, state = run(tx, params, grads_seq, mode, frozen=selection.selector)

    p0 = jax.tree.leaves(params)
    trainable = reference_on_trainable(make_inner, p0, grads_seq, masks, mode)

    new_leaves = jax.tree.leaves(new)
    assert jax.tree.structure(new) == jax.tree.structure(params)
    for i, (before, after) in enumerate(zip(p0, new_leaves, strict=True)):
        fz = selection.frozen_elements(i, before.shape)
        # (a) frozen leaves and elements: bit-identical.
        np.testing.assert_array_equal(bits(after)[fz], bits(before)[fz], err_msg=f"leaf {i} frozen")
        # (b) trainable: exactly the plain optimizer on the trainable subset.
        if i in trainable:
            got, want = trainable[i](after)
            if mode is jax.jit:
                # Two XLA programs computing the same math may round differently:
                # the algebraic simplifier folds constant factors (lr * b1, bias
                # corrections) depending on neighbouring ops such as a jnp.where,
                # and on which intermediates are outputs, so jit gets ~1 ulp per
                # step of slack; a leak of a frozen gradient (NaN, Inf, 1e30, or
                # an O(1) change of a global norm) is far outside it.
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"leaf {i}")
            else:
                # Eagerly the same primitives run one by one: bit for bit.
                np.testing.assert_array_equal(bits(got), bits(want), err_msg=f"leaf {i}")
    # (c) no NaN/Inf reaches trainable updates or the optimizer state.
    for updates in all_updates:
        for i, u in enumerate(jax.tree.leaves(updates)):
            u = np.asarray(u)
            fz = selection.frozen_elements(i, u.shape)
            assert np.isfinite(u[~fz]).all(), f"leaf {i}: non-finite trainable update"
            assert (u[fz] == 0).all(), f"leaf {i}: non-zero frozen update"
    for x in jax.tree.leaves(state):
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.inexact):
            assert np.isfinite(x).all(), "non-finite optimizer state"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_freeze_law_property(name, mode, request):
    make_inner, nan_in_frozen_elements = OPTIMIZERS[name]
    mode_id = request.node.callspec.id.split("-")[-1]
    examples = EXAMPLES[mode_id]
    if name == "multisteps_adam" and mode_id == "eager":
        examples = EXAMPLES_MULTISTEPS_EAGER

    @property_settings(examples, shrink=mode_id == "eager")
    @given(trees_and_selections(max_leaves=4, rich=True, frozen_dtypes=FLOAT_DTYPES))
    def prop(case):
        params, selection, rng = case
        params, grads_seq = make_case(
            params, selection, rng, nan_in_frozen_elements=nan_in_frozen_elements
        )
        check_freeze_law(mode, make_inner, params, selection, grads_seq)

    prop()


# --------------------------------------------------------------------------
# Clipping, extra args, what frozen= takes, migrating from optax.


def _bits_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(bits(x), bits(y))


@pytest.mark.parametrize("mode", MODES)
def test_clipping_inside_freeze_sees_trainable_gradients_only(mode):
    params = {"backbone": jnp.ones((4, 4)), "head": jnp.ones(3)}
    grads = {"backbone": jnp.full((4, 4), 50.0), "head": jnp.array([0.3, -0.2, 0.1])}
    clip_sgd = lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0))
    labels = {"backbone": "frozen", "head": "train"}

    def updates_of(tx, params, grads):
        return tx.update(grads, tx.init(params), params)[0]

    got = mode(lambda p, g: updates_of(jf.freeze(clip_sgd(), frozen=jf.paths("backbone")), p, g))(
        params, grads)
    alone = mode(lambda p, g: updates_of(clip_sgd(), p, g))(
        {"head": params["head"]}, {"head": grads["head"]})
    np.testing.assert_array_equal(bits(got["head"]), bits(alone["head"]))
    np.testing.assert_array_equal(got["head"], -grads["head"])  # norm < 1: not clipped
    # NaN/Inf frozen gradients change nothing
    poisoned = {**grads, "backbone": grads["backbone"].at[0].set(jnp.nan).at[1].set(jnp.inf)}
    got2 = mode(lambda p, g: updates_of(jf.freeze(clip_sgd(), frozen=jf.paths("backbone")), p, g))(
        params, poisoned)
    _bits_equal(got2, got)

    # The trap: clipping *before* routing (plain optax) lets the frozen gradients
    # shrink the trainable update (here ~70x).
    trap_tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.multi_transform({"train": optax.sgd(1.0), "frozen": optax.set_to_zero()}, labels),
    )
    trap = mode(lambda p, g: updates_of(trap_tx, p, g))(params, grads)
    shrink = np.linalg.norm(trap["head"]) / np.linalg.norm(got["head"])
    assert shrink < 0.02, shrink


def test_freeze_passes_extra_args_through():
    def scale_by_extra():
        def update(updates, state, params=None, *, scale, **extra):
            return jax.tree.map(lambda u: u * scale, updates), state

        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

    params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    tx = jf.freeze(optax.chain(optax.sgd(1.0), scale_by_extra()), frozen=jf.paths("a"))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params, scale=3.0)
    np.testing.assert_array_equal(updates["b"], [-3.0, -3.0])
    np.testing.assert_array_equal(bits(updates["a"]), bits(np.full(2, -0.0, np.float32)))
    assert isinstance(tx, optax.GradientTransformationExtraArgs)


def test_multisteps_accumulates_trainable_gradients_only():
    params = {"backbone": jnp.ones((64, 64)), "head": jnp.ones(3)}
    tx = jf.freeze(optax.MultiSteps(optax.adam(1e-3), every_k_schedule=4),
                   frozen=jf.paths("backbone"))
    state = tx.init(params)
    sizes = [x.size for x in jax.tree.leaves(state) if np.ndim(x)]
    assert sizes == [3, 3, 3]  # acc_grads, mu, nu for the head only


@pytest.mark.parametrize("mode", MODES)
def test_optax_masked_is_the_trap_freeze_avoids(mode):
    # optax.masked(inner, trainable) passes unselected ("frozen") updates through
    # raw: apply_updates adds the gradient to the frozen leaf.
    params = {"backbone": jnp.ones(2), "head": jnp.ones(2)}
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)

    def step(tx, params):
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates)

    trainable = {"backbone": False, "head": True}
    trap = mode(lambda p: step(optax.masked(optax.adam(0.1), trainable), p))(params)
    assert (np.asarray(trap["backbone"]) == 1.5).all()
    frozen = {"backbone": True, "head": False}
    ok = mode(lambda p: step(jf.freeze(optax.adam(0.1), frozen=frozen), p))(params)
    np.testing.assert_array_equal(ok["backbone"], params["backbone"])
    np.testing.assert_array_equal(ok["head"], trap["head"])


MASK_SPECS = {
    "selector": jf.paths("backbone/**"),
    "prefix_tree": {"backbone": True, "head": False},
    "full_tree": {"backbone": {"w": True, "b": True}, "head": {"w": False, "b": False}},
    "function": lambda params: {"backbone": True, "head": False},
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spec", list(MASK_SPECS))
def test_frozen_accepts_selector_mask_tree_and_mask_function(spec, mode):
    params = {"backbone": {"w": jnp.array([-0.0, jnp.nan]), "b": jnp.array([1.0])},
              "head": {"w": jnp.array([1.0, 2.0]), "b": jnp.array([-0.0])}}
    new, _, _ = mode(lambda p: run(jf.freeze(optax.adamw(0.1), frozen=MASK_SPECS[spec]), p,
                                   [jax.tree.map(jnp.ones_like, p)] * 2))(params)
    _bits_equal(new["backbone"], params["backbone"])
    assert (np.asarray(new["head"]["w"]) < params["head"]["w"]).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("everything_frozen", [True, False])
def test_scalar_bool_frozen(everything_frozen, mode):
    params = {"a": jnp.array([-0.0, 1.0]), "b": [jnp.array(2.0)]}
    tx = jf.freeze(optax.adam(0.1), frozen=everything_frozen)
    new, _, state = mode(lambda p: run(tx, p, [jax.tree.map(jnp.ones_like, p)] * 2))(params)
    moved = [not np.array_equal(bits(x), bits(y))
             for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(params), strict=True)]
    assert moved == [not everything_frozen] * 2
    assert (sum(np.size(x) for x in jax.tree.leaves(state)) == 1 + 2 * 3 * (not everything_frozen))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask", [True, False, {"backbone": True, "head": False},
                                  {"backbone": {"w": True, "b": False}, "head": False}],
                         ids=["all", "none", "prefix", "full"])
def test_selective_transform_migrates_to_freeze(mask, mode):
    assert hasattr(optax, "selective_transform")  # optax >= 0.2.7
    params = {"backbone": {"w": jnp.array([-0.0, 3.0]), "b": jnp.array([0.5])},
              "head": {"w": jnp.array([1.0, -0.0]), "b": jnp.array([2.0])}}
    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
             for _ in range(3)]
    inner = lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1))
    old, _, _ = mode(lambda p, g: run(optax.selective_transform(inner(), freeze_mask=mask), p, g))(
        params, grads)
    new, _, _ = mode(lambda p, g: run(jf.freeze(inner(), frozen=mask), p, g))(params, grads)
    # same values everywhere ...
    for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True):
        np.testing.assert_array_equal(x, y)
    # ... and frozen leaves keep their bits (selective_transform's +0.0 update
    # turns -0.0 into +0.0 eagerly; jfreeze's -0.0 update does not)
    jf.assert_frozen(params, new, frozen=mask)
    frozen_mask = jf.as_selector(mask)(params)
    leaves = jax.tree.leaves(new), jax.tree.leaves(params), jax.tree.leaves(frozen_mask)
    for x, y, m in zip(*leaves, strict=True):
        if m:
            np.testing.assert_array_equal(bits(x), bits(y))


# --------------------------------------------------------------------------
# Every bit pattern: jf.apply_updates selects; optax.apply_updates adds.

ALL_DTYPES = [pytest.param(d, id=d) for d in FLOAT_DTYPES]


def _every_pattern(dtype):
    """Each special bit pattern of ``dtype`` once (complex64: each in each part)."""
    rng = np.random.default_rng(0)
    x = special_values(rng, dtype, (64,))
    return np.concatenate([x, x[::-1]])  # both orders, so 0/1 element masks hit each


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_apply_updates_keeps_every_bit(dtype, mode):
    x = _every_pattern(dtype)
    params = {"whole": x, "elems": x}
    frozen = jf.paths("whole") | jf.elements("elems", np.arange(x.size) % 2 == 0)
    tx = jf.freeze(optax.sgd(0.5), frozen=frozen)
    grads = jax.tree.map(lambda p: jnp.ones(p.shape, p.dtype), params)

    def step(p, g):
        updates, _ = tx.update(g, tx.init(p), p)
        return jf.apply_updates(p, updates, frozen=frozen), updates

    new, updates = mode(step)(params, grads)
    np.testing.assert_array_equal(bits(new["whole"]), bits(x))
    np.testing.assert_array_equal(bits(new["elems"])[::2], bits(x)[::2])
    # Trainable entries: exactly what optax.apply_updates gives.
    ref = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(bits(new["elems"])[1::2], bits(ref["elems"])[1::2])
    if mode is not jax.jit:
        assert new["whole"] is x  # the very same object


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_optax_apply_updates_keeps_and_flushes_what_the_freeze_docstring_says(dtype):
    # Pins jf.freeze's docstring: eagerly, p + (-0.0) keeps +-0.0 (complex parts
    # too: the update is -0-0j), +-inf and f32/f16 quiet-NaN payloads; it
    # flushes f32/bf16 subnormals, quiets signalling NaNs and drops bf16 NaN
    # payloads; f16 subnormals are kept.
    x = _every_pattern(dtype)
    tx = jf.freeze(optax.sgd(0.5), frozen=jf.paths("a"))
    updates, _ = tx.update({"a": jnp.ones(x.shape, x.dtype)}, tx.init({"a": x}))
    got = np.asarray(optax.apply_updates({"a": x}, updates)["a"])
    parts = (lambda v: [v.real, v.imag]) if dtype == "complex64" else (lambda v: [v])
    for before, after in zip(parts(x), parts(got), strict=True):
        kind = "float32" if dtype == "complex64" else dtype
        b0, b1 = bits(before).astype(np.uint64), bits(after).astype(np.uint64)
        width = 8 * before.dtype.itemsize
        exp_bits = {"float32": 8, "bfloat16": 8, "float16": 5}[kind]
        mant = (1 << (width - 1 - exp_bits)) - 1
        exp = ((b0 >> (width - 1 - exp_bits)) & ((1 << exp_bits) - 1)).astype(np.int64)
        subnormal = (exp == 0) & ((b0 & mant) != 0)
        nan = (exp == (1 << exp_bits) - 1) & ((b0 & mant) != 0)
        quiet = (b0 >> (width - 2 - exp_bits)) & 1 == 1
        kept = ~subnormal & ~nan
        np.testing.assert_array_equal(b1[kept], b0[kept])  # +-0.0, +-inf, normals
        if kind == "float16":
            np.testing.assert_array_equal(b1[subnormal], b0[subnormal])
        else:
            np.testing.assert_array_equal(b1[subnormal], b0[subnormal] & (1 << (width - 1)))
        quiet_bit = np.uint64(1 << (width - 2 - exp_bits))
        assert (b1[nan] & quiet_bit).all()  # every NaN comes out quiet
        if kind == "bfloat16":
            np.testing.assert_array_equal(b1[nan], (b0[nan] & ~np.uint64(mant)) | quiet_bit)
        else:
            np.testing.assert_array_equal(b1[nan], b0[nan] | quiet_bit)  # payload kept
        assert (~quiet[nan]).any()  # the patterns include signalling NaNs ...
        assert subnormal.any() or kind == "float16"


def test_apply_updates_frozen_leaves_may_have_no_or_float0_updates():
    # A frozen int leaf's gradient is float0 (jax.grad(allow_int=True)): optax's
    # add fails on it; jf.apply_updates never touches a whole frozen leaf.
    params = {"step": jnp.arange(3), "w": jnp.ones(2), "hole": None}
    frozen = jf.paths("step")
    grads = jax.grad(lambda p: (p["w"] ** 2).sum(), allow_int=True)(params)
    tx = jf.freeze(optax.adam(0.1), frozen=frozen)
    updates, _ = tx.update(grads, tx.init(params), params)
    with pytest.raises(TypeError, match="float0"):
        optax.apply_updates(params, updates)
    new = jf.apply_updates(params, updates, frozen=frozen)
    assert new["step"] is params["step"] and new["hole"] is None
    np.testing.assert_array_equal(new["w"], optax.apply_updates(params["w"], updates["w"]))
    new = jf.apply_updates(params, {**updates, "step": None}, frozen=frozen)
    assert new["step"] is params["step"]


def test_apply_updates_errors_name_paths():
    params = {"a": jnp.ones(2), "b": {"c": jnp.ones(2)}}
    with pytest.raises(ValueError, match=r"only in the params: 'b/c'; only in the updates: 'b/d'"):
        jf.apply_updates(params, {"a": jnp.ones(2), "b": {"d": jnp.ones(2)}}, frozen=jf.paths("a"))
    with pytest.raises(ValueError, match=r"trainable leaf at path 'b/c' has no update \(None\)"):
        jf.apply_updates(params, {"a": jnp.ones(2), "b": {"c": None}}, frozen=jf.paths("a"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("frozen", [jf.nothing, jf.elements("a", np.s_[0])],
                         ids=["trainable", "partly-frozen"])
def test_apply_updates_refuses_a_masked_node_or_a_shape_changing_update(frozen, mode):
    """optax.apply_updates broadcasts p + u: a (2, 3) update turned a (3,) leaf into (2, 3)
    silently (and its mask with it); a MaskedNode update was a bare TypeError from '+'."""
    what = "trainable" if frozen is jf.nothing else "partly frozen"
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    apply = mode(lambda p, u: jf.apply_updates(p, u, frozen=frozen))
    with pytest.raises(ValueError, match=r"update at path 'a' has shape \(2, 3\).*\(3,\)"):
        apply(params, {"a": jnp.ones((2, 3)), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match=rf"the {what} leaf at path 'a' has no update "
                       r"\(MaskedNode\)"):
        jf.apply_updates(params, {"a": optax.MaskedNode(), "b": jnp.ones(2)}, frozen=frozen)
    # An update that broadcasts *into* the leaf's shape is optax's, as before.
    new = apply(params, {"a": jnp.ones(()), "b": jnp.ones(2)})
    assert new["a"].shape == (3,)
    # A MaskedNode at a whole frozen leaf (or one that is not an array) is no update at all.
    new = jf.apply_updates({**params, "f": jax.nn.relu},
                           {"a": optax.MaskedNode(), "b": jnp.ones(2), "f": optax.MaskedNode()},
                           frozen=jf.paths("a"))
    assert new["a"] is params["a"]


@pytest.mark.parametrize("mode", MODES)
def test_complex_frozen_update_keeps_a_negative_zero_imaginary_part(mode):
    # The frozen update is -0-0j: -0+0j added to (1 - 0j) gives (1 + 0j).
    x = np.array([1.0], np.complex64)
    x.imag = -0.0
    tx = jf.freeze(optax.adam(0.1), frozen=jf.paths("z") | jf.elements("e", [True, False]))
    params = {"z": x, "e": np.concatenate([x, x])}

    def step(p):
        updates, _ = tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
        return optax.apply_updates(p, updates)

    new = mode(step)(params)
    np.testing.assert_array_equal(bits(new["z"]), bits(x))
    np.testing.assert_array_equal(bits(new["e"])[:1], bits(x))


ELEMENT_DTYPE_OPTIMIZERS = {k: OPTIMIZERS[k][0] for k in ("sgd_momentum", "adam")}
# jit compiles the trainable entries' arithmetic with the jnp.where masks around
# it; allow a few ulps of the dtype (a leak of NaN/Inf/1e30 is far outside).
RTOL = {"float32": 1e-5, "complex64": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(ELEMENT_DTYPE_OPTIMIZERS))
def test_element_wise_frozen_bits_every_dtype_property(name, mode, request):
    """Element-wise frozen entries of f32/bf16/f16/complex64 leaves keep every bit."""
    make_inner = ELEMENT_DTYPE_OPTIMIZERS[name]
    import hypothesis.strategies as st
    from strategies import materialize, selections, skeletons

    @st.composite
    def cases(draw):
        skeleton = draw(skeletons(3, rich=True, dtypes=FLOAT_DTYPES))
        return skeleton, draw(selections(skeleton)), draw(st.integers(0, 2**32 - 1))

    @property_settings(4, shrink=False)
    @given(cases())
    def prop(case):
        skeleton, selection, seed = case
        rng = np.random.default_rng(seed)
        params, grads_seq = make_case(materialize(skeleton, rng), selection, rng,
                                      nan_in_frozen_elements=True)
        tx = jf.freeze(make_inner(), frozen=selection.selector)
        new, _, _ = run(tx, params, grads_seq, mode, frozen=selection.selector)
        p0 = jax.tree.leaves(params)
        ref = reference_on_trainable(make_inner, p0, grads_seq, selection.masks, mode)
        for i, (before, after) in enumerate(zip(p0, jax.tree.leaves(new), strict=True)):
            fz = selection.frozen_elements(i, before.shape)
            np.testing.assert_array_equal(bits(after)[fz], bits(before)[fz], err_msg=f"leaf {i}")
            if i in ref:
                got, want = ref[i](after)
                if mode is jax.jit:
                    np.testing.assert_allclose(
                        got.astype(np.complex128), want.astype(np.complex128),
                        rtol=RTOL[before.dtype.name], atol=1e-6)
                else:
                    np.testing.assert_array_equal(bits(got), bits(want), err_msg=f"leaf {i}")

    prop()


# --------------------------------------------------------------------------
# Optimizers that call a function of the params (sophia's obj_fn, lbfgs's value_fn).


def _loss(p):
    return jnp.sum(p["a"] ** 2 * p["b"] ** 2) + jnp.sum((p["b"] - 0.3) ** 2) + jnp.sum(p["a"])


PARAMS_FN = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([0.5, -1.0])}


def _alone(fn, frozen_a):
    """``fn`` of the trainable subset alone, the frozen leaf closed over."""
    return lambda sub: fn({"a": frozen_a, **sub})


@pytest.mark.parametrize("how", ["freeze", "partition"])
def test_sophia_sees_frozen_leaves_filled_back(how):
    if how == "freeze":
        tx = jf.freeze(optax.contrib.sophia(0.1), frozen=jf.paths("a"))
    else:
        tx = jf.partition({"t": optax.contrib.sophia(0.1), "f": None}, {"a": "f", "b": "t"})
    ref = optax.contrib.sophia(0.1)
    p, sub = PARAMS_FN, {"b": PARAMS_FN["b"]}
    state, rstate = tx.init(p), ref.init(sub)
    for _ in range(3):
        updates, state = tx.update(jax.grad(_loss)(p), state, p, obj_fn=_loss)
        rupdates, rstate = ref.update({"b": jax.grad(_loss)(p)["b"]}, rstate, sub,
                                      obj_fn=_alone(_loss, p["a"]))
        p = jf.apply_updates(p, updates, frozen=jf.paths("a"))
        sub = optax.apply_updates(sub, rupdates)
    assert p["a"] is PARAMS_FN["a"]
    np.testing.assert_array_equal(bits(p["b"]), bits(sub["b"]))
    assert not np.array_equal(p["b"], PARAMS_FN["b"])


def test_sophia_element_wise_frozen_entries_have_no_curvature():
    # Not whole slices (the diagonal of a 2-D leaf): zeroed with jnp.where, no curvature.
    p0 = {"a": PARAMS_FN["a"], "b": jnp.array([[0.5, -1.0], [2.0, 0.7]])}
    frozen = jf.elements("b", np.eye(2, dtype=bool))
    tx = jf.freeze(optax.contrib.sophia(0.1), frozen=frozen)
    p, state = p0, tx.init(p0)
    for _ in range(3):
        updates, state = tx.update(jax.grad(_loss)(p), state, p, obj_fn=_loss)
        p = jf.apply_updates(p, updates, frozen=frozen)
    diag = np.eye(2, dtype=bool)
    np.testing.assert_array_equal(bits(p["b"])[diag], bits(p0["b"])[diag])
    nu = np.asarray(optax.tree.get(state, "nu")["b"])  # EMA of the hessian diagonal
    assert (nu[diag] == 0.0).all() and (nu[~diag] != 0.0).all()


def test_sophia_whole_frozen_slices_have_no_state_and_see_the_full_params():
    # A 1-D partial mask is whole slices: sophia holds curvature for b[1] only, and
    # obj_fn gets the frozen b[0] back, as for sophia on b[1] alone.
    frozen = jf.elements("b", [True, False])
    tx, ref = jf.freeze(optax.contrib.sophia(0.1), frozen=frozen), optax.contrib.sophia(0.1)
    p, sub = PARAMS_FN, {"b1": PARAMS_FN["b"][1:]}
    state, rstate = tx.init(p), ref.init(sub)

    def alone(s):
        return _loss({"a": PARAMS_FN["a"], "b": jnp.concatenate([PARAMS_FN["b"][:1], s["b1"]])})

    for _ in range(3):
        updates, state = tx.update(jax.grad(_loss)(p), state, p, obj_fn=_loss)
        rupdates, rstate = ref.update(jax.grad(alone)(sub), rstate, sub, obj_fn=alone)
        p = jf.apply_updates(p, updates, frozen=jf.paths("a") | frozen)
        sub = optax.apply_updates(sub, rupdates)
    assert optax.tree.get(state, "nu")["b"].shape == (1,)
    np.testing.assert_array_equal(bits(p["b"][:1]), bits(PARAMS_FN["b"][:1]))
    np.testing.assert_array_equal(bits(p["b"][1:]), bits(sub["b1"]))


@pytest.mark.parametrize("mode", MODES)
def test_lbfgs_inside_freeze_equals_lbfgs_on_the_trainable_leaves(mode):
    tx = jf.freeze(optax.lbfgs(), frozen=jf.paths("a"))
    ref = optax.lbfgs()
    alone = _alone(_loss, PARAMS_FN["a"])

    def step(p, state, sub, rstate):
        value, grad = jax.value_and_grad(_loss)(p)
        updates, state = tx.update(grad, state, p, value=value, grad=grad, value_fn=_loss)
        rvalue, rgrad = jax.value_and_grad(alone)(sub)
        rupdates, rstate = ref.update(rgrad, rstate, sub, value=rvalue, grad=rgrad, value_fn=alone)
        return (jf.apply_updates(p, updates, frozen=jf.paths("a")), state,
                optax.apply_updates(sub, rupdates), rstate)

    p, sub = PARAMS_FN, {"b": PARAMS_FN["b"]}
    state, rstate = tx.init(p), ref.init(sub)
    for _ in range(3):
        p, state, sub, rstate = mode(step)(p, state, sub, rstate)
    np.testing.assert_array_equal(bits(p["a"]), bits(PARAMS_FN["a"]))
    np.testing.assert_array_equal(bits(p["b"]), bits(sub["b"]))
    assert _loss(p) < _loss(PARAMS_FN)


# --------------------------------------------------------------------------
# Errors: the inner optimizer's own, and a tree that changed since init.


def test_inner_optimizer_error_is_kept_with_a_none_hole():
    params = {"a": jnp.ones(2), "hole": None}
    tx = jf.freeze(optax.adamw(1e-3), frozen=jf.nothing)
    with pytest.raises(ValueError, match="not passing `params`") as e:
        tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params))
    assert "no leaf at" not in str(e.value)


class QK(NamedTuple):
    q: jax.Array
    k: jax.Array


class KQ(NamedTuple):  # the same fields, reordered in a refactor
    k: jax.Array
    q: jax.Array


@pytest.mark.parametrize("tx", [
    jf.freeze(optax.adam(1e-2), frozen=jf.paths("q")),
    jf.partition({"t": optax.adam(1e-2), "f": None}, jf.labels({"f": jf.paths("q")}, default="t")),
], ids=["freeze", "partition"])
def test_update_on_reordered_fields_names_the_node_types(tx):
    state = tx.init(QK(jnp.ones(2), jnp.ones(3)))
    new = KQ(jnp.ones(3), jnp.ones(2))
    with pytest.raises(ValueError, match="same paths but other node types"):
        tx.update(new, state, new)


P2 = {"a": jnp.ones(2), "b": {"c": jnp.ones(3), "d": jnp.ones(2)}}


@pytest.mark.parametrize("case, match", [
    ("renamed", r"only in the tree given to init: 'b/d'; paths only in the updates: 'b/e'"),
    ("extra", r"paths only in the updates: 'x'"),
    ("reshaped", r"shape changed: 'b/c' \(\(3,\) at init, \(4,\) now\)"),
    ("reselected", r"routed away \(frozen, or another label\) at init but not now: 'a'; "
                   r"paths routed away \(frozen, or another label\) now but not at init: 'b/d'"),
])
@pytest.mark.parametrize("who", ["jf.freeze", "jf.partition"])
def test_update_on_another_tree_names_the_paths(case, match, who):
    init_frozen = {"a": True, "b": {"c": False, "d": False}}

    def make(frozen):
        if who == "jf.freeze":
            return jf.freeze(optax.adam(0.1), frozen=frozen)
        labels = jax.tree.map(lambda m: "f" if m else "t", frozen)
        return jf.partition({"t": optax.adam(0.1), "f": None}, labels)

    state = make(init_frozen).init(P2)
    tree, frozen = P2, init_frozen
    if case == "renamed":
        tree = {"a": P2["a"], "b": {"c": P2["b"]["c"], "e": jnp.ones(2)}}
        frozen = {"a": True, "b": {"c": False, "e": False}}
    elif case == "extra":
        tree, frozen = {**P2, "x": jnp.ones(1)}, {**init_frozen, "x": False}
    elif case == "reshaped":
        tree = {"a": P2["a"], "b": {"c": jnp.ones(4), "d": P2["b"]["d"]}}
    else:
        frozen = {"a": False, "b": {"c": False, "d": True}}
    with pytest.raises(ValueError, match=f"{who}: the optimizer state does not match.*{match}"):
        make(frozen).update(jax.tree.map(jnp.ones_like, tree), state, tree)


def test_a_selector_that_selects_other_leaves_at_update_names_them():
    # jf.where on the dtype: f32 params at init, bf16 gradients at update.
    params = {"a": jnp.ones(2), "b": jnp.ones(2, jnp.bfloat16)}
    tx = jf.freeze(optax.sgd(0.1, momentum=0.9),
                   frozen=jf.where(lambda path, leaf: leaf.dtype == jnp.float32))
    state = tx.init(params)
    grads = {"a": jnp.ones(2, jnp.bfloat16), "b": jnp.ones(2, jnp.bfloat16)}
    with pytest.raises(ValueError, match="at init but not now: 'a'"):  # no params: the state tells
        tx.update(grads, state)
    with pytest.raises(ValueError, match=r"'a'.*float32.*bfloat16|'a'.*bfloat16.*float32"):
        tx.update(grads, state, params)  # with params: the selector's two answers are named


# --------------------------------------------------------------------------
# Limits (pinned so the docstring and README stay true).


def _limit_run(tx, mode, apply):
    params = {"f": jnp.array([-0.0, 1.0]), "t": jnp.array([1.0, 2.0])}
    grads = {"f": jnp.array([jnp.nan, 1.0]), "t": jnp.array([0.5, -0.5])}

    def step(p, s):
        u, s = tx.update(grads, s, p)
        return apply(p, u), s

    p, s = params, tx.init(params)
    for _ in range(3):
        p, s = mode(step)(p, s)
    return params, p, s


FROZEN_F = jf.paths("f")
WRAPPERS = {
    "chain": (lambda inner: optax.chain(inner, optax.scale(-0.1)), lambda: optax.scale_by_adam()),
    "multisteps": (lambda inner: optax.MultiSteps(inner, every_k_schedule=2),
                   lambda: optax.adam(0.1)),
    "apply_if_finite": (lambda inner: optax.apply_if_finite(inner, 5), lambda: optax.adam(0.1)),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_freeze_must_be_outermost(wrapper, mode):
    wrap, make_inner = WRAPPERS[wrapper]
    outside = wrap(jf.freeze(make_inner(), frozen=FROZEN_F))  # the wrong order
    inside = jf.freeze(wrap(make_inner()), frozen=FROZEN_F)   # the right one
    p0, good, good_state = _limit_run(inside, mode, optax.apply_updates)
    _, bad, bad_state = _limit_run(outside, mode, optax.apply_updates)
    # Right order: frozen bits kept, no state for the frozen leaf, and it trains.
    np.testing.assert_array_equal(bits(good["f"]), bits(p0["f"]))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(good_state)
               if jnp.issubdtype(jnp.result_type(x), jnp.inexact))
    assert not np.array_equal(good["t"], p0["t"])
    # Wrong order: what each wrapper does (see jf.freeze's docstring).
    lost_zero = bits(bad["f"])[0] == 0  # -0.0 -> +0.0
    if wrapper == "chain":
        assert lost_zero or mode is jax.jit  # eagerly the +0.0 update is added
    else:
        assert lost_zero  # skipped steps update by +0.0, eagerly and under jit
    if wrapper == "multisteps":  # an accumulator for the frozen leaf, NaN from its gradient
        assert sum(np.size(x) for x in jax.tree.leaves(bad_state)) > sum(
            np.size(x) for x in jax.tree.leaves(good_state))
        assert not np.isfinite(np.asarray(bad_state.acc_grads["f"])).all()
    if wrapper == "apply_if_finite":  # the NaN frozen gradient skips every step
        np.testing.assert_array_equal(bad["t"], p0["t"])
    # jf.apply_updates keeps the frozen bits whatever the order.
    _, kept, _ = _limit_run(outside, mode, lambda p, u: jf.apply_updates(p, u, frozen=FROZEN_F))
    np.testing.assert_array_equal(bits(kept["f"]), bits(p0["f"]))


@pytest.mark.parametrize("slices", [False, True], ids=["elements", "whole_slices"])
@pytest.mark.parametrize("name, depends", [
    ("sgd_momentum", False), ("adam", False), ("adamw", False), ("lion", False),
    ("rmsprop", False), ("adagrad", False), ("adabelief", False), ("clip_adamw", False),
    ("novograd", False), ("lamb", True), ("adafactor", True), ("lars", True),
])
def test_element_wise_freezing_with_parameter_norm_optimizers(name, depends, slices):
    # A partly frozen leaf whose mask is not whole slices reaches the inner optimizer
    # whole: lamb/lars (trust ratio) and adafactor (parameter scale) see the frozen
    # entries' values. Frozen whole slices (here column 0) are cut away before it.
    make = (lambda: optax.lars(0.1)) if name == "lars" else OPTIMIZERS[name][0]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32) + 2
    g = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
    where = np.zeros((4, 3), bool)
    where[:, 0] = True
    if not slices:
        where[1, 0] = False  # no longer a whole column
    frozen = jf.elements("w", where)

    def trainable_update(value):
        p = {"w": jnp.asarray(np.where(where, np.float32(value), w))}
        tx = jf.freeze(make(), frozen=frozen)
        s = tx.init(p)
        for _ in range(2):
            u, s = tx.update(g, s, p)
        return np.asarray(u["w"])[~where]

    one, hundred, nan = (trainable_update(c) for c in (1.0, 100.0, np.nan))
    leaks = depends and not slices
    assert (not np.array_equal(one, hundred)) == leaks
    assert np.isnan(nan).any() == leaks
