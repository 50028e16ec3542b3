"""The task: is a conjunction of literals (``A ¬B C A ...``) satisfiable?

A sequence over ``n_vars`` variables is *unsatisfiable* iff it holds some variable
and its negation. Literal ``2 v + s`` is variable ``v`` with sign ``s``; ``2 n_vars``
is PAD.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sample_batch(key, batch: int, max_len: int, lo, hi, n_vars: int):
    """Random literal sequences of lengths in ``[lo, hi]``, half of them unsatisfiable.

    Returns ``(tokens, mask, label)``: int tokens ``(batch, max_len)`` padded
    with ``2 * n_vars``, a bool mask of real positions and label 1 = satisfiable.
    A satisfiable sequence draws literals consistent with a random assignment; an
    unsatisfiable one then copies one literal's variable to another position
    with the opposite sign (so it has at least one clash).
    """
    k_len, k_sign, k_var, k_sat, k_ij = jax.random.split(key, 5)
    n = jax.random.randint(k_len, (batch,), lo, hi + 1)
    sign = jax.random.bernoulli(k_sign, 0.5, (batch, n_vars)).astype(jnp.int32)
    var = jax.random.randint(k_var, (batch, max_len), 0, n_vars)
    lit = 2 * var + jnp.take_along_axis(sign, var, axis=1)
    sat = jax.random.bernoulli(k_sat, 0.5, (batch,))
    # Two distinct real positions i != j: j gets i's variable with the other sign.
    u = jax.random.uniform(k_ij, (batch, 2))
    i = jnp.floor(u[:, 0] * n).astype(jnp.int32)
    j = (i + 1 + jnp.floor(u[:, 1] * (n - 1)).astype(jnp.int32)) % n
    clash = jnp.take_along_axis(lit, i[:, None], axis=1)[:, 0] ^ 1
    pos = jnp.arange(max_len)[None, :]
    lit = jnp.where(~sat[:, None] & (pos == j[:, None]), clash[:, None], lit)
    mask = pos < n[:, None]
    tokens = jnp.where(mask, lit, 2 * n_vars)
    return tokens, mask, sat.astype(jnp.int32)


def is_satisfiable(tokens, mask) -> np.ndarray:
    """Ground truth by brute force (NumPy), to check :func:`sample_batch`."""
    out = []
    for t, m in zip(np.asarray(tokens), np.asarray(mask), strict=True):
        lits = set(t[m].tolist())
        out.append(all((x ^ 1) not in lits for x in lits))
    return np.array(out, dtype=np.int32)
