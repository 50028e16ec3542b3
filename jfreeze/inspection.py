"""Seeing and checking a freeze: ``summary`` and ``assert_frozen``."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jfreeze._tree import Flat, Mask, broadcast_prefix, describe_paths, is_array, is_placeholder
from jfreeze.selectors import FrozenSpec, as_selector, nothing

__all__ = ["Row", "Summary", "assert_frozen", "summary"]


def _nbytes(x: Any) -> int:
    if is_array(x):
        return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return 0


def _is_param(x: Any) -> bool:
    # Arrays and plain numbers hold parameters; functions, strings, ... do not.
    is_number = isinstance(x, (int, float, complex)) and not isinstance(x, bool)
    return is_array(x) or is_number


def _size(x: Any) -> int:
    return int(np.prod(getattr(x, "shape", ()), dtype=np.int64))


@dataclasses.dataclass
class Row:
    """One line of a :class:`Summary`: a top-level module or a label."""

    kind: str  # "module" or "label"
    name: str
    leaves: int = 0
    params: int = 0
    frozen: int = 0
    bytes: int = 0

    @property
    def trainable(self) -> int:
        return self.params - self.frozen


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclasses.dataclass
class Summary:
    """What :func:`summary` returns: counts as attributes, a table as ``str``."""

    rows: list[Row]
    total: int
    trainable: int
    frozen: int
    total_bytes: int
    trainable_bytes: int
    frozen_bytes: int
    opt_state_bytes: int | None = None

    def __str__(self) -> str:
        def pct(n: int) -> str:
            return f"{100 * n / self.total:.1f}%" if self.total else "-"

        head = ("", "leaves", "params", "trainable", "frozen", "bytes", "% params")
        lines: list[tuple[str, ...]] = [head]
        for kind in ("module", "label"):
            rows = [r for r in self.rows if r.kind == kind]
            if rows:
                lines.append((f"by {kind}",))
            for r in rows:
                lines.append((
                    f"  {r.name}", f"{r.leaves:,}", f"{r.params:,}", f"{r.trainable:,}",
                    f"{r.frozen:,}", _fmt_bytes(r.bytes), pct(r.params),
                ))
        widths = [max(len(line[i]) for line in lines if len(line) > i) for i in range(len(head))]
        out = []
        for line in lines:
            if len(line) == 1:
                out.append(line[0])
                continue
            right = [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]
            cells = [line[0].ljust(widths[0]), *right]
            out.append("  ".join(cells))
        rule = "-" * len(out[0])
        out.insert(1, rule)
        out += [
            rule,
            f"total      {self.total:,} params, {_fmt_bytes(self.total_bytes)}",
            f"trainable  {self.trainable:,} params ({pct(self.trainable)}), "
            f"{_fmt_bytes(self.trainable_bytes)}",
            f"frozen     {self.frozen:,} params ({pct(self.frozen)}), "
            f"{_fmt_bytes(self.frozen_bytes)}",
        ]
        if self.opt_state_bytes is not None:
            out.append(f"opt state  {_fmt_bytes(self.opt_state_bytes)}")
        return "\n".join(out)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython shows the table
        p.text(str(self))


def summary(
    params: Any,
    *,
    frozen: FrozenSpec | None = None,
    labels: Any = None,
    opt_state: Any = None,
) -> Summary:
    """A Keras/PEFT-style table of what trains and what is frozen.

    Rows per top-level module and, given ``labels`` (a label function such as
    :func:`jfreeze.labels`, or a label tree), per label: leaves, parameters,
    trainable and frozen counts (element-wise selections counted by element),
    bytes and % of all parameters. Works on arrays and ``jax.ShapeDtypeStruct``.

    Args:
      params: the parameter tree.
      frozen: what is frozen (anything ``frozen=`` takes); None: nothing.
      labels: optional label function or label tree, for per-label rows.
      opt_state: optional optimizer state, to report its bytes.

    >>> import jax.numpy as jnp, optax
    >>> import jfreeze as jf
    >>> params = {"backbone": {"w": jnp.ones((4, 4))}, "head": {"w": jnp.ones(4)}}
    >>> tx = jf.freeze(optax.adam(1e-3), frozen=jf.paths("backbone/**"))
    >>> s = jf.summary(params, frozen=jf.paths("backbone/**"), opt_state=tx.init(params))
    >>> s.total, s.trainable, s.frozen, s.opt_state_bytes
    (20, 4, 16, 36)
    >>> print(s)
                leaves  params  trainable  frozen  bytes  % params
    --------------------------------------------------------------
    by module
      backbone       1      16          0      16   64 B     80.0%
      head           1       4          4       0   16 B     20.0%
    --------------------------------------------------------------
    total      20 params, 80 B
    trainable  4 params (20.0%), 16 B
    frozen     16 params (80.0%), 64 B
    opt state  36 B
    """
    sel = nothing if frozen is None else as_selector(frozen)
    flat, masks = sel.masks(params)
    if labels is not None:
        spec = labels(params) if callable(labels) else labels
        label_of = broadcast_prefix(spec, params, what="label tree", is_hole=is_placeholder)
    else:
        label_of = [None] * len(flat.entries)

    rows, tot = _count(flat.entries, masks, label_of)
    state_bytes = None
    if opt_state is not None:
        state_bytes = sum(_nbytes(x) for x in jax.tree.leaves(opt_state))
    return Summary(
        rows=list(rows.values()),
        total=tot["params"],
        trainable=tot["params"] - tot["frozen"],
        frozen=tot["frozen"],
        total_bytes=tot["bytes"],
        trainable_bytes=tot["bytes"] - tot["frozen_bytes"],
        frozen_bytes=tot["frozen_bytes"],
        opt_state_bytes=state_bytes,
    )


def _count(
    entries: list[tuple[str, Any]], masks: list[Mask], label_of: list[Any]
) -> tuple[dict[tuple[str, str], Row], dict[str, int]]:
    """Rows per top-level module (and label), and the totals, of the parameter leaves."""
    rows: dict[tuple[str, str], Row] = {}
    tot = dict(params=0, frozen=0, bytes=0, frozen_bytes=0)
    for (path, x), m, label in zip(entries, masks, label_of, strict=True):
        if not _is_param(x):
            continue  # e.g. an unfiltered Equinox module's activation functions
        n = _size(x)
        nf = n if m is True else 0 if m is False else int(np.sum(m))
        b = _nbytes(x)
        bf = b if m is True else 0 if m is False else nf * np.dtype(x.dtype).itemsize
        keys = [("module", path.split("/")[0] or "(root)")]
        if label is not None:
            keys.append(("label", str(label)))
        for key in keys:
            r = rows.setdefault(key, Row(*key))
            r.leaves += 1
            r.params += n
            r.frozen += nf
            r.bytes += b
        tot["params"] += n
        tot["frozen"] += nf
        tot["bytes"] += b
        tot["frozen_bytes"] += bf
    return rows, tot


def _bit_view(x: np.ndarray) -> np.ndarray:
    """The bit pattern of each element as unsigned ints, shape ``(*x.shape, parts)``.

    Complex elements are two parts (real, imaginary: there is no uint128 for
    complex128); every other dtype (floats of any width incl. bf16/fp8, ints, bool)
    is one part of its own width.
    """
    parts = 2 if x.dtype.kind == "c" else 1
    width = 8 * x.dtype.itemsize // parts
    if width not in (8, 16, 32, 64):
        raise TypeError(f"jf.assert_frozen: cannot compare the bits of dtype {x.dtype}")
    flat = np.ascontiguousarray(x).reshape(-1)  # a 0-d array cannot change itemsize
    return flat.view(f"uint{width}").reshape(*x.shape, parts)


def _hex(bits: np.ndarray) -> str:
    width = 2 * bits.dtype.itemsize
    return ", ".join(f"0x{int(b):0{width}x}" for b in bits)  # complex: real, imag


def _same_values(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Value equality with NaN equal to NaN (so ``-0.0 -> +0.0`` is no move)."""
    same = a == b
    if jnp.issubdtype(a.dtype, jnp.inexact):
        if a.dtype.itemsize < 4 and not jnp.issubdtype(a.dtype, jnp.complexfloating):
            a, b = a.astype(np.float32), b.astype(np.float32)  # bf16/f16/fp8: exact
        same = same | (np.isnan(a) & np.isnan(b))
    return same


def assert_frozen(
    before: Any, after: Any, *, frozen: FrozenSpec, compare: str = "bits"
) -> None:
    """Raises ``AssertionError`` if any ``frozen`` leaf or element differs.

    By default bit patterns are compared, for every dtype (float32/64, bf16,
    f16, fp8, both parts of complex values, ints, bool): ``-0.0 -> +0.0``, a
    subnormal flushed to zero or a signalling NaN made quiet is a move. The
    error names each path that moved, how many of its frozen elements did, and
    the first one: its index and both values with their bit patterns (hex;
    ``(real, imag)`` for complex). A change of shape or dtype is a move.

    Args:
      before: the params before.
      after: the params after (same tree structure).
      frozen: what is frozen (anything ``frozen=`` takes); only these leaves
        or elements are compared.
      compare: ``"bits"`` (default), or ``"values"``: numeric equality with
        NaN equal to any NaN and ``-0.0`` equal to ``+0.0``, for a check that
        tolerates what ``optax.apply_updates`` may do to such values.

    >>> import jax.numpy as jnp
    >>> import jfreeze as jf
    >>> before = {"backbone": jnp.zeros(3), "head": jnp.zeros(2)}
    >>> after = {"backbone": jnp.array([0.0, -0.0, 0.0]), "head": jnp.ones(2)}
    >>> jf.assert_frozen(before, after, frozen=jf.paths("head"))  # head may move
    Traceback (most recent call last):
    AssertionError: ...
    >>> jf.assert_frozen(before, after, frozen=jf.paths("backbone"))
    Traceback (most recent call last):
    AssertionError: 1 frozen leaf moved: 'backbone' (1 of 3 frozen elements; first at [1]:
    0.0 (0x00000000) -> -0.0 (0x80000000))
    >>> jf.assert_frozen(before, after, frozen=jf.paths("backbone"), compare="values")
    """
    if compare not in ("bits", "values"):
        raise ValueError(f"jf.assert_frozen: compare= is 'bits' or 'values', got {compare!r}")
    fb, masks = as_selector(frozen).masks(before)
    fa = Flat.of(after)
    if fb.treedef != fa.treedef:
        pa, pb = set(fa.paths), set(fb.paths)
        odd = sorted(pb ^ pa)
        raise ValueError(
            "jf.assert_frozen: before and after have different structures"
            + (f" (paths only in one: {describe_paths(odd)})" if odd else "")
        )
    moved = []
    for (path, a), (_, b), m in zip(fb.entries, fa.entries, masks, strict=True):
        if m is False:
            continue
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            moved.append(f"{path!r} (was {a.dtype}{list(a.shape)}, now {b.dtype}{list(b.shape)})")
            continue
        bits_a, bits_b = _bit_view(a), _bit_view(b)
        same = (bits_a == bits_b).all(-1) if compare == "bits" else _same_values(a, b)
        changed = ~same & (True if m is True else np.broadcast_to(m, a.shape))
        k = int(np.sum(changed))
        if k:
            n = a.size if m is True else int(np.sum(np.broadcast_to(m, a.shape)))
            i = tuple(int(j) for j in np.argwhere(changed)[0])
            where = f"first at {list(i)}: " if i else ""
            moved.append(
                f"{path!r} ({k} of {n} frozen elements; {where}{a[i]} ({_hex(bits_a[i])}) "
                f"-> {b[i]} ({_hex(bits_b[i])}))"
            )
    if moved:
        noun = "leaf" if len(moved) == 1 else "leaves"
        raise AssertionError(f"{len(moved)} frozen {noun} moved: " + "; ".join(moved))
