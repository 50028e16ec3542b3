"""A scanned pre-LN transformer (one array per parameter, a leading layer axis) and its ideal.

::

    x (B, T, d) -> blocks 0 .. L-1 run by a scan over ``params["layers"]``
                -> LayerNorm, mean over T, dense -> class logits (softmax cross-entropy)

The blocks are ``benchmarks.models.block`` (attention + GELU MLP, residuals, LayerNorm),
so a layer's parameters read ``layers/attn/qkv/kernel`` ... with shape ``(L, d, 3d)``:
the layout of linen ``nn.scan(variable_axes={"params": 0})``. Which scan runs the stack
is a parameter of the loss (``jax.lax.scan`` or ``jf.scan``), so variants differ in nothing
else. ``ideal_matmul_flops`` counts, from the sizes and the frozen layers alone, the
matmul FLOPs a step cannot avoid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import optax

from benchmarks.models import Matmul, Params, Sizes, block, dense, init_block, layer_norm


@dataclasses.dataclass(frozen=True)
class ScanSizes:
    batch: int = 8
    seq: int = 64
    d_model: int = 256
    heads: int = 4
    layers: int = 12
    mlp_ratio: int = 4
    classes: int = 10

    def short(self) -> str:
        return f"B={self.batch} T={self.seq} d={self.d_model} heads={self.heads} L={self.layers}"


def init_params(key, s: ScanSizes) -> Params:
    """``{"layers": <block params stacked on axis 0>, "head": {"ln", "dense"}}`` (float32)."""
    kl, kh = jax.random.split(key)
    one = Sizes(d_model=s.d_model, heads=s.heads, mlp_ratio=s.mlp_ratio)
    layers = jax.vmap(lambda k: init_block(k, one))(jax.random.split(kl, s.layers))
    w = jax.random.normal(kh, (s.d_model, s.classes)) / s.d_model ** 0.5
    head = {"ln": {"scale": jnp.ones(s.d_model), "bias": jnp.zeros(s.d_model)},
            "dense": {"kernel": w, "bias": jnp.zeros(s.classes)}}
    return {"layers": layers, "head": head}


def batch(key, s: ScanSizes):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (s.batch, s.seq, s.d_model))
    return x, jax.random.randint(ky, (s.batch,), 0, s.classes)


Scan = Callable  # (f, init, xs) -> (carry, ys): jax.lax.scan or a jf.scan partial


def loss(params: Params, x, y, *, heads: int, scan: Scan = jax.lax.scan, dtype=None):
    """Mean softmax cross-entropy; the stack is run by ``scan(body, h, params["layers"])``."""
    h = x.astype(dtype or x.dtype)
    h, _ = scan(lambda h, p: (block(p, h, heads), None), h, params["layers"])
    logits = dense(params["head"]["dense"], layer_norm(params["head"]["ln"], h).mean(-2))
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


def matmuls(s: ScanSizes, frozen: Iterable[int] = ()) -> list[Matmul]:
    """Every matmul of one step and which of its gradients the step needs.

    Layer ``i``'s weight gradients are needed iff it trains; its activation gradients iff
    a trainable parameter sits at or below it (the lowest trainable layer's own LayerNorm
    needs the gradient through its qkv matmul). Below the lowest trainable layer nothing
    has a backward pass. The head always trains.
    """
    frozen = set(frozen)
    first = min((i for i in range(s.layers) if i not in frozen), default=s.layers)
    tok, d, hd, dh = s.batch * s.seq, s.d_model, s.d_model * s.mlp_ratio, s.d_model // s.heads
    out = []
    for i in range(s.layers):
        w, a = i not in frozen, i >= first
        out += [
            Matmul(f"layers/{i}/attn/qkv", 1, tok, d, 3 * d, a, w),
            Matmul(f"layers/{i}/attn/scores", s.batch * s.heads, s.seq, dh, s.seq, a, a),
            Matmul(f"layers/{i}/attn/values", s.batch * s.heads, s.seq, s.seq, dh, a, a),
            Matmul(f"layers/{i}/attn/out", 1, tok, d, d, a, w),
            Matmul(f"layers/{i}/mlp/fc", 1, tok, d, hd, a, w),
            Matmul(f"layers/{i}/mlp/proj", 1, tok, hd, d, a, w),
        ]
    return [*out, Matmul("head/dense", 1, s.batch, d, s.classes, True, True)]


def ideal_matmul_flops(s: ScanSizes, frozen: Iterable[int] = ()) -> int:
    """Forward of every layer + input gradients of frozen layers above the lowest trainable
    one + full backward of trainable layers and the head; no backward below them."""
    return sum(m.total for m in matmuls(s, frozen))
