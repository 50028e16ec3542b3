"""The networks the benchmarks run, in plain JAX, and their analytic matmul FLOPs.

The probe of situation 1 is a sandwich::

    noise z -> pre (trainable MLP) -> soft sequence (T, d)
            -> transformer (pre-LN blocks: attention + MLP; the first ``frozen_layers`` frozen)
            -> post (trainable: LayerNorm, mean over T, MLP) -> logit

Parameters are nested dicts, so their key paths read ``pre/dense_0/kernel``,
``transformer/block_0/attn/qkv/kernel``, ... for both jfreeze selectors and
``flax.traverse_util.path_aware_map``. ``ideal_matmul_flops`` counts, from the sizes
alone, the matrix-multiply FLOPs a step needs: the forward pass, the input gradients
of every matmul with something trainable upstream, and the weight gradients of the
trainable layers only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Sizes of one benchmark configuration (all benchmarks share these fields)."""

    batch: int = 32  # probe inputs per step (per frozen model in the population benchmark)
    seq: int = 16  # T
    d_model: int = 64  # d
    heads: int = 4
    layers: int = 2  # transformer blocks
    frozen_layers: int = 2  # the first `frozen_layers` blocks are frozen
    mlp_ratio: int = 4
    d_noise: int = 64
    d_hidden: int = 128  # hidden width of the trainable pre/post MLPs
    n_out: int = 1
    models: int = 1  # K frozen models per step (population benchmark)

    def __post_init__(self):
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by heads={self.heads}")
        if not 0 <= self.frozen_layers <= self.layers:
            raise ValueError(f"frozen_layers={self.frozen_layers} not in [0, {self.layers}]")

    def short(self) -> str:
        s = (f"B={self.batch} T={self.seq} d={self.d_model} L={self.layers} "
             f"frozen={self.frozen_layers}/{self.layers}")
        return s + (f" K={self.models}" if self.models > 1 else "")


# --------------------------------------------------------------------------
# Parameters.


def _dense(key, n_in: int, n_out: int, dtype) -> Params:
    w = jax.random.normal(key, (n_in, n_out), jnp.float32) / math.sqrt(n_in)
    return {"kernel": w.astype(dtype), "bias": jnp.zeros((n_out,), dtype)}


def _ln(d: int, dtype) -> Params:
    return {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)}


def init_block(key, s: Sizes, dtype=jnp.float32) -> Params:
    d, h = s.d_model, s.d_model * s.mlp_ratio
    k = jax.random.split(key, 4)
    return {
        "ln1": _ln(d, dtype),
        "attn": {"qkv": _dense(k[0], d, 3 * d, dtype), "out": _dense(k[1], d, d, dtype)},
        "ln2": _ln(d, dtype),
        "mlp": {"fc": _dense(k[2], d, h, dtype), "proj": _dense(k[3], h, d, dtype)},
    }


def init_transformer(key, s: Sizes, dtype=jnp.float32) -> Params:
    keys = jax.random.split(key, s.layers)
    return {f"block_{i}": init_block(keys[i], s, dtype) for i in range(s.layers)}


def init_probe(key, s: Sizes, dtype=jnp.float32) -> Params:
    k = jax.random.split(key, 4)
    return {
        "pre": {
            "dense_0": _dense(k[0], s.d_noise, s.d_hidden, dtype),
            "dense_1": _dense(k[1], s.d_hidden, s.seq * s.d_model, dtype),
        },
        "post": {
            "ln": _ln(s.d_model, dtype),
            "dense_0": _dense(k[2], s.d_model, s.d_hidden, dtype),
            "dense_1": _dense(k[3], s.d_hidden, s.n_out, dtype),
        },
    }


def init_sandwich(key, s: Sizes, dtype=jnp.float32) -> Params:
    """``{"pre", "transformer", "post"}``: one network, the transformer inside the probe."""
    kp, kt = jax.random.split(key)
    probe = init_probe(kp, s, dtype)
    return {"pre": probe["pre"], "transformer": init_transformer(kt, s, dtype),
            "post": probe["post"]}


def frozen_patterns(s: Sizes) -> tuple[str, ...]:
    """Glob patterns of the frozen blocks (``jf.paths(*frozen_patterns(s))``)."""
    return tuple(f"transformer/block_{i}/**" for i in range(s.frozen_layers))


def is_frozen_path(path: tuple[str, ...], s: Sizes) -> bool:
    """The same rule on a ``path_aware_map`` key tuple, as the Flax guide writes it."""
    return (len(path) > 1 and path[0] == "transformer"
            and int(path[1].split("_")[1]) < s.frozen_layers)


# --------------------------------------------------------------------------
# Forward pass. Every function works on any leading batch axes.


def dense(p: Params, x, dtype=None):
    """``x @ kernel + bias``; with a ``kernel_t`` beside it, see ``with_transposed_kernels``."""
    dtype = dtype or x.dtype
    w, b = p["kernel"].astype(dtype), p["bias"].astype(dtype)
    if "kernel_t" in p:
        return _matmul_pretransposed(x, w, p["kernel_t"].astype(dtype)) + b
    return x @ w + b


@jax.custom_vjp
def _matmul_pretransposed(x, w, wt):
    return x @ w


def _mp_fwd(x, w, wt):
    return x @ w, (x, wt)


def _mp_bwd(res, g):
    # The README's recipe: the input gradient reads the stored transpose (an NN GEMM). The
    # weight gradient is the true one, so the matmul is right for any use; with frozen
    # weights nothing reads it and XLA drops it (matmul FLOPs = ideal, tested).
    x, wt = res
    lead = tuple(range(g.ndim - 1))
    return _like(g @ wt, x.dtype), _like(jnp.tensordot(x, g, axes=(lead, lead)), wt.dtype), None


def _like(a, dtype):  # a gradient in its input's dtype (a real input: the real part)
    return (a if jnp.issubdtype(dtype, jnp.complexfloating) else a.real).astype(dtype)


_matmul_pretransposed.defvjp(_mp_fwd, _mp_bwd)


def with_transposed_kernels(frozen: Params) -> Params:
    """Adds ``kernel_t`` (the kernel transposed, materialized) next to every frozen kernel.

    Frozen weights never change, so their transpose can be made once, outside the step:
    the input-gradient matmul ``g @ kernel.T`` then reads a row-major operand (a plain
    NN GEMM) instead of contracting the kernel's minor axis, which XLA:CPU's Eigen path
    runs markedly slower. Costs a second copy of the frozen weights; the weights get no
    gradient through ``dense`` any more, so use it for frozen weights only.
    """
    if isinstance(frozen, dict):
        out = {k: with_transposed_kernels(v) for k, v in frozen.items()}
        if "kernel" in frozen:
            out["kernel_t"] = jnp.array(jnp.swapaxes(frozen["kernel"], -1, -2))
        return out
    return frozen


def layer_norm(p: Params, x, eps: float = 1e-5):
    """LayerNorm over the last axis, as users write it (autodiff makes its backward)."""
    mean = x.mean(-1, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(-1, keepdims=True)
    return xc * jax.lax.rsqrt(var + eps) * p["scale"].astype(x.dtype) + p["bias"].astype(x.dtype)


def _ln_forward(x, scale, bias, eps):
    xc = x - x.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt((xc * xc).mean(-1, keepdims=True) + eps)
    xhat = xc * rstd
    return xhat * scale + bias, (xhat, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ln_custom(x, scale, bias, eps):
    return _ln_forward(x, scale, bias, eps)[0]


def _ln_fwd(x, scale, bias, eps):
    y, (xhat, rstd) = _ln_forward(x, scale, bias, eps)
    return y, (xhat, rstd, scale)


def _ln_bwd(eps, res, g):
    xhat, rstd, scale = res
    gs = g * scale
    dx = rstd * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
    lead = tuple(range(g.ndim - 1))
    return dx, (g * xhat).sum(lead), g.sum(lead)


_ln_custom.defvjp(_ln_fwd, _ln_bwd)


def layer_norm_custom_vjp(p: Params, x, eps: float = 1e-5):
    """``layer_norm`` with its textbook backward as one ``jax.custom_vjp`` (same values).

    ``dx = rstd * (g*s - mean(g*s) - xhat * mean(g*s*xhat))``. Autodiff of ``layer_norm``
    instead emits the mean-subtraction term of every LayerNorm as a separate broadcast
    add; on XLA:CPU those terms of all the blocks were re-associated along the residual
    stream into one many-input fusion, recomputed by each of its consumers (see
    ``benchmarks/NOTES.md``). Written this way, each LayerNorm's input gradient is one
    fusion, computed once.
    """
    return _ln_custom(x, p["scale"].astype(x.dtype), p["bias"].astype(x.dtype), eps)


LAYER_NORM = {"plain": layer_norm, "custom_vjp": layer_norm_custom_vjp}


def attention(p: Params, x, heads: int):
    """Multi-head self-attention with a fused qkv kernel ``(d, 3d)`` (tokens-major)."""
    *lead, t, d = x.shape
    qkv = dense(p["qkv"], x).reshape(*lead, t, 3, heads, d // heads)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    s = jnp.einsum("...qhc,...khc->...hqk", q, k) / math.sqrt(d // heads)
    a = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("...hqk,...khc->...qhc", a, v).reshape(*lead, t, d)
    return dense(p["out"], o)


def attention_heads_major(p: Params, x, heads: int):
    """``attention`` with every einsum in a heads-major layout (same weights, same FLOPs).

    The qkv kernel is read as ``(d, 3, heads, d_head)`` and the output kernel as
    ``(heads, d_head, d)``, so q, k and v come out of one einsum as ``(3, ..., heads, T,
    d_head)`` and no split/transposes of the qkv activations appear in either pass.
    """
    *lead, _, d = x.shape
    c = d // heads
    w = p["qkv"]["kernel"].astype(x.dtype).reshape(d, 3, heads, c)
    b = p["qkv"]["bias"].astype(x.dtype).reshape(3, *([1] * len(lead)), heads, 1, c)
    qkv = jnp.einsum("...td,dshc->s...htc", x, w) + b
    q, k, v = qkv[0], qkv[1], qkv[2]
    s = jnp.einsum("...hqc,...hkc->...hqk", q, k) / math.sqrt(c)
    o = jnp.einsum("...hqk,...hkc->...hqc", jax.nn.softmax(s, axis=-1), v)
    wo = p["out"]["kernel"].astype(x.dtype).reshape(heads, c, d)
    return jnp.einsum("...htc,hcd->...td", o, wo) + p["out"]["bias"].astype(x.dtype)


ATTENTION = {"tokens": attention, "heads": attention_heads_major}


def block(p: Params, x, heads: int, layout: str = "tokens", ln: str = "plain"):
    norm = LAYER_NORM[ln]
    x = x + ATTENTION[layout](p["attn"], norm(p["ln1"], x), heads)
    h = jax.nn.gelu(dense(p["mlp"]["fc"], norm(p["ln2"], x)), approximate=True)
    return x + dense(p["mlp"]["proj"], h)


def transformer(p: Params, x, heads: int, layout: str = "tokens", ln: str = "plain"):
    """The pre-LN blocks ``block_0 ...`` of ``p`` in order; ``layout``/``ln`` pick formulations."""
    for i in range(len(p)):
        x = block(p[f"block_{i}"], x, heads, layout, ln)
    return x


def pre(p: Params, z, s: Sizes, dtype=None):
    z = z.astype(dtype or z.dtype)
    h = jax.nn.gelu(dense(p["dense_0"], z), approximate=True)
    return dense(p["dense_1"], h).reshape(*z.shape[:-1], s.seq, s.d_model)


def post(p: Params, x):
    h = layer_norm(p["ln"], x).mean(-2)
    h = jax.nn.gelu(dense(p["dense_0"], h), approximate=True)
    return dense(p["dense_1"], h)


def bce(logits, y):
    """Mean binary cross-entropy of ``logits[..., 0]`` against labels ``y`` (in f32)."""
    logits = logits[..., 0].astype(jnp.float32)
    return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits)


def sandwich_loss(params: Params, z, y, s: Sizes, dtype=None):
    x = pre(params["pre"], z, s, dtype)
    x = transformer(params["transformer"], x, s.heads)
    return bce(post(params["post"], x), y)


def batch(key, s: Sizes, lead: tuple[int, ...] = ()):
    """Noise inputs ``z`` (``lead + (batch, d_noise)``) and 0/1 labels ``y``."""
    kz, ky = jax.random.split(key)
    z = jax.random.normal(kz, (*lead, s.batch, s.d_noise), jnp.float32)
    y = jax.random.bernoulli(ky, 0.5, (*lead, s.batch)).astype(jnp.float32)
    return z, y


# --------------------------------------------------------------------------
# Analytic FLOPs.


@dataclasses.dataclass(frozen=True)
class Matmul:
    """``batch`` independent products (m, k) @ (k, n) in the forward pass."""

    name: str
    batch: int
    m: int
    k: int
    n: int
    lhs_grad: bool  # the gradient w.r.t. the left operand is needed
    rhs_grad: bool  # the gradient w.r.t. the right operand (a weight, or an activation)

    @property
    def forward(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n

    @property
    def total(self) -> int:
        return self.forward * (1 + self.lhs_grad + self.rhs_grad)


def matmuls(s: Sizes, *, all_trainable: bool = False, frozen_models: int = 1) -> list[Matmul]:
    """Every matmul of one sandwich step and which of its gradients a step needs.

    ``frozen_models`` = K runs the transformer part once per frozen model, each on
    ``s.batch`` probe inputs, while pre/post see all ``K * batch`` inputs. The
    activation input of every matmul after the first has the trainable ``pre``
    layers upstream, so its gradient is always needed; a weight gradient is needed
    only where the weight trains.
    """
    k_models = frozen_models
    rows = k_models * s.batch  # sequences per step
    tok = rows * s.seq
    d, hd, dh = s.d_model, s.d_model * s.mlp_ratio, s.d_model // s.heads
    out = [
        Matmul("pre/dense_0", 1, rows, s.d_noise, s.d_hidden, False, True),
        Matmul("pre/dense_1", 1, rows, s.d_hidden, s.seq * d, True, True),
    ]
    for i in range(s.layers):
        w = all_trainable or i >= s.frozen_layers
        b = f"transformer/block_{i}"
        out += [
            Matmul(f"{b}/attn/qkv", 1, tok, d, 3 * d, True, w),
            # Activation x activation products: both operands need gradients.
            Matmul(f"{b}/attn/scores", rows * s.heads, s.seq, dh, s.seq, True, True),
            Matmul(f"{b}/attn/values", rows * s.heads, s.seq, s.seq, dh, True, True),
            Matmul(f"{b}/attn/out", 1, tok, d, d, True, w),
            Matmul(f"{b}/mlp/fc", 1, tok, d, hd, True, w),
            Matmul(f"{b}/mlp/proj", 1, tok, hd, d, True, w),
        ]
    out += [
        Matmul("post/dense_0", 1, rows, d, s.d_hidden, True, True),
        Matmul("post/dense_1", 1, rows, s.d_hidden, s.n_out, True, True),
    ]
    return out


def ideal_matmul_flops(s: Sizes, *, all_trainable: bool = False, frozen_models: int = 1) -> int:
    """Matmul FLOPs of one training step: forward + needed input and weight gradients."""
    return sum(m.total
               for m in matmuls(s, all_trainable=all_trainable, frozen_models=frozen_models))


def param_count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
