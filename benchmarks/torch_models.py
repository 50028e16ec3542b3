"""The population benchmark's network in PyTorch, loaded from the JAX parameters.

Only ``benchmarks.population`` imports this module, and only when torch is installed
(``pip install -e ".[bench]"``). Each module computes what its JAX twin in
``benchmarks.models`` computes, from the same weights, so the two frameworks do the same
FLOPs (checked with ``torch.utils.flop_counter.FlopCounterMode``) and start from the same
loss.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.models import Sizes


def _t(x, dtype=None) -> torch.Tensor:
    t = torch.from_numpy(np.array(x, dtype=np.float32))
    return t if dtype is None else t.to(dtype)


def _linear(p: dict, dtype=None) -> nn.Linear:
    n_in, n_out = np.shape(p["kernel"])
    lin = nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight.copy_(_t(p["kernel"]).T)
        lin.bias.copy_(_t(p["bias"]))
    return lin if dtype is None else lin.to(dtype)


def _layer_norm(p: dict, dtype=None) -> nn.LayerNorm:
    ln = nn.LayerNorm(np.shape(p["scale"])[0], eps=1e-5)
    with torch.no_grad():
        ln.weight.copy_(_t(p["scale"]))
        ln.bias.copy_(_t(p["bias"]))
    return ln if dtype is None else ln.to(dtype)


class Block(nn.Module):
    """Pre-LN block: x + attn(ln1(x)); x + mlp(ln2(x)) (as ``benchmarks.models.block``)."""

    def __init__(self, p: dict, heads: int, dtype=None):
        super().__init__()
        self.heads = heads
        self.ln1 = _layer_norm(p["ln1"], dtype)
        self.qkv = _linear(p["attn"]["qkv"], dtype)
        self.out = _linear(p["attn"]["out"], dtype)
        self.ln2 = _layer_norm(p["ln2"], dtype)
        self.fc = _linear(p["mlp"]["fc"], dtype)
        self.proj = _linear(p["mlp"]["proj"], dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, t, d = x.shape
        qkv = self.qkv(self.ln1(x)).reshape(*lead, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.unbind(-3)
        s = torch.einsum("...qhc,...khc->...hqk", q, k) / math.sqrt(d // self.heads)
        o = torch.einsum("...hqk,...khc->...qhc", torch.softmax(s, dim=-1), v)
        x = x + self.out(o.reshape(*lead, t, d))
        return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class Transformer(nn.Module):
    def __init__(self, p: dict, heads: int, dtype=None):
        super().__init__()
        self.blocks = nn.ModuleList(Block(p[f"block_{i}"], heads, dtype) for i in range(len(p)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


class Probe(nn.Module):
    """The trainable layers around the frozen transformer (``benchmarks.models.pre/post``)."""

    def __init__(self, p: dict, s: Sizes):
        super().__init__()
        self.s = s
        self.pre0, self.pre1 = _linear(p["pre"]["dense_0"]), _linear(p["pre"]["dense_1"])
        self.ln = _layer_norm(p["post"]["ln"])
        self.post0, self.post1 = _linear(p["post"]["dense_0"]), _linear(p["post"]["dense_1"])

    def pre(self, z: torch.Tensor) -> torch.Tensor:
        h = self.pre1(F.gelu(self.pre0(z), approximate="tanh"))
        return h.reshape(*z.shape[:-1], self.s.seq, self.s.d_model)

    def post(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x).mean(-2)
        return self.post1(F.gelu(self.post0(h), approximate="tanh"))


def unstack(zoo: Any, k: int) -> Any:
    """Model ``k`` of a stacked zoo (nested dicts of arrays with a leading model axis)."""
    if isinstance(zoo, dict):
        return {key: unstack(v, k) for key, v in zoo.items()}
    return np.asarray(zoo[k])


class Population:
    """The probe and K frozen transformers, and one training step two ways.

    ``step_loop``: each model is an ``nn.Module`` with ``requires_grad_(False)``, called in
    a Python loop. ``step_vmap``: ``torch.func.vmap`` over ``functional_call`` with the
    models' parameters stacked by ``torch.func.stack_module_state`` (no gradient).
    """

    def __init__(self, probe: dict, zoo: dict, s: Sizes, z, y, *, dtype=None, lr: float = 1e-3,
                 device: str = "cpu"):
        self.s, self.dtype = s, dtype
        self.probe = Probe(probe, s).to(device)
        self.opt = torch.optim.Adam(self.probe.parameters(), lr=lr)
        self.models = [Transformer(unstack(zoo, k), s.heads, dtype).to(device).requires_grad_(False)
                       for k in range(s.models)]
        params, buffers = torch.func.stack_module_state(self.models)
        self.stacked = {k: v.detach().requires_grad_(False) for k, v in params.items()}
        self.buffers = buffers
        self.base = copy.deepcopy(self.models[0]).to("meta")
        self.z, self.y = _t(z).to(device), _t(y).to(device)

    def _frozen_in(self, x):
        return x if self.dtype is None else x.to(self.dtype)

    def _frozen_out(self, h):
        return h if self.dtype is None else h.float()

    def loss_loop(self) -> torch.Tensor:
        x = self._frozen_in(self.probe.pre(self.z))
        h = torch.stack([m(x[k]) for k, m in enumerate(self.models)])
        return self._loss(self._frozen_out(h))

    def _one(self, params, buffers, x):
        return torch.func.functional_call(self.base, (params, buffers), (x,))

    def loss_vmap(self, fn=None) -> torch.Tensor:
        x = self._frozen_in(self.probe.pre(self.z))
        h = (fn or torch.func.vmap(self._one))(self.stacked, self.buffers, x)
        return self._loss(self._frozen_out(h))

    def _loss(self, h):
        logits = self.probe.post(h)[..., 0]
        return F.binary_cross_entropy_with_logits(logits, self.y)

    def train_step(self, loss_fn) -> torch.Tensor:
        loss = loss_fn()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def opt_state_bytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for st in self.opt.state.values()
                       for t in st.values() if torch.is_tensor(t)))

    def frozen_bytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self.stacked.values()))

    def matmul_flops(self, loss_fn) -> int:
        """Matmul FLOPs of one step (forward + backward), by ``FlopCounterMode``."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            loss = loss_fn()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        self.opt.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())
