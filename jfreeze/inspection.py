"""Seeing and checking a freeze: ``summary`` and ``assert_frozen``."""

from __future__ import annotations

import collections
import dataclasses
import html
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jfreeze._tree import (
    Flat,
    Mask,
    broadcast_prefix,
    call_or_tree,
    describe_paths,
    is_array,
    is_placeholder,
    mask_count,
    runs,
    slab,
)
from jfreeze.selectors import FrozenSpec, as_selector, nothing

__all__ = ["Row", "Summary", "assert_frozen", "summary"]

#: The most module rows the default ``depth=None`` layout expands to.
MAX_ROWS = 40


def _itemsize(x: Any) -> int:
    """Bytes per element: of the dtype (PRNG key dtypes included: ``key<fry>`` is
    8), or of the array JAX makes of a Python number (``1.0`` is float32)."""
    dtype = x.dtype if is_array(x) else jax.dtypes.result_type(x)
    return int(dtype.itemsize)


def _nbytes(x: Any) -> int:
    if _is_param(x):
        return _size(x) * _itemsize(x)
    return 0


def _is_param(x: Any) -> bool:
    # Arrays and plain numbers hold parameters; functions, strings, ... do not.
    is_number = isinstance(x, (int, float, complex)) and not isinstance(x, bool)
    return is_array(x) or is_number


def _size(x: Any) -> int:
    return int(np.prod(getattr(x, "shape", ()), dtype=np.int64))


@dataclasses.dataclass
class Row:
    """One line of a :class:`Summary`: a subtree (``kind="module"``) or a label.

    Attributes:
      kind: ``"module"`` (a subtree, named by its path), ``"layers"`` (a run of
        layers of the stacks in the module row it sits in) or ``"label"``.
      name: the subtree's full path (``"bert/encoder/layer/3"``), or the label.
      leaves: parameter leaves in it (0 in a layers row: its slices belong to the
        leaves counted in the row it sits in).
      params: parameters (elements) in it.
      frozen: frozen parameters (element-wise selections counted by element).
      bytes: bytes of its parameters.
      level: nesting in the table: 1 for a top-level row, 2 for a row inside it, ...
      note: what the counts do not say (``"8 of 16 elements frozen"`` for a
        partially frozen leaf, ``"8 of 12 layers frozen"`` for a stack), or ``""``.
      layers: for a ``kind="layers"`` row, the run of layers it counts (a
        ``range`` along the stack's layer axis) of the stacked leaves under
        ``name``; else None. Such rows sit inside the row of a stack frozen by
        whole layers (:func:`jfreeze.layers`, or any element selection of whole
        slices along one axis), one row per run of frozen or trainable layers.
    """

    kind: str
    name: str
    leaves: int = 0
    params: int = 0
    frozen: int = 0
    bytes: int = 0
    level: int = 1
    note: str = ""
    layers: range | None = None

    @property
    def trainable(self) -> int:
        return self.params - self.frozen

    @property
    def status(self) -> str:
        """``"trainable"``, ``"frozen"`` or ``"mixed"`` (some of each)."""
        if self.frozen == 0:
            return "trainable"
        return "frozen" if self.frozen == self.params else "mixed"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_HEAD = ("", "leaves", "params", "trainable", "frozen", "bytes", "% params")


@dataclasses.dataclass
class Summary:
    """What :func:`summary` returns: counts as attributes, a table as ``str``.

    ``str(s)`` is a plain-text table; in a notebook ``s`` displays as an HTML
    table (``_repr_html_``) with the same rows and numbers.
    """

    rows: list[Row]
    total: int
    trainable: int
    frozen: int
    total_bytes: int
    trainable_bytes: int
    frozen_bytes: int
    opt_state_bytes: int | None = None

    def _pct(self, n: int) -> str:
        return f"{100 * n / self.total:.1f}%" if self.total else "-"

    def _cells(self, r: Row) -> tuple[str, ...]:
        # A layers row slices the leaves of the row it sits in: their count is said there.
        leaves = "" if r.kind == "layers" else f"{r.leaves:,}"
        return (leaves, f"{r.params:,}", f"{r.trainable:,}", f"{r.frozen:,}",
                _fmt_bytes(r.bytes), self._pct(r.params))

    def _sections(self) -> list[tuple[str, list[Row]]]:
        modules = [r for r in self.rows if r.kind in ("module", "layers")]
        out = [("module", modules), ("label", [r for r in self.rows if r.kind == "label"])]
        return [(f"by {k}", rows) for k, rows in out if rows]

    def _footer(self) -> list[tuple[str, str]]:
        out = [
            ("total", f"{self.total:,} params, {_fmt_bytes(self.total_bytes)}"),
            ("trainable", f"{self.trainable:,} params ({self._pct(self.trainable)}), "
                          f"{_fmt_bytes(self.trainable_bytes)}"),
            ("frozen", f"{self.frozen:,} params ({self._pct(self.frozen)}), "
                       f"{_fmt_bytes(self.frozen_bytes)}"),
        ]
        if self.opt_state_bytes is not None:
            out.append(("opt state", _fmt_bytes(self.opt_state_bytes)))
        return out

    def __str__(self) -> str:
        lines: list[tuple[str, ...]] = [_HEAD]
        notes: dict[int, str] = {}
        for title, rows in self._sections():
            lines.append((title,))
            for r, label in zip(rows, _labels(rows), strict=True):
                notes[len(lines)] = r.note
                lines.append((label, *self._cells(r)))
        widths = [max(len(line[i]) for line in lines if len(line) > i) for i in range(len(_HEAD))]
        out = []
        for i, line in enumerate(lines):
            if len(line) == 1:
                out.append(line[0])
                continue
            right = [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]
            text = "  ".join([line[0].ljust(widths[0]), *right])
            out.append(f"{text}  {notes[i]}" if notes.get(i) else text)
        rule = "-" * len(out[0])
        out.insert(1, rule)
        out.append(rule)
        out += [f"{k:<10} {v}" for k, v in self._footer()]
        return "\n".join(out)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython shows the table
        p.text(str(self))

    def _repr_html_(self) -> str:
        """The table as HTML, for notebooks: same rows, numbers and notes as ``str``."""
        esc = html.escape
        cell = '<td style="text-align:right;font-family:monospace">{}</td>'
        head = "".join(f"<th>{esc(h)}</th>" for h in (*_HEAD, ""))
        body = []
        for title, rows in self._sections():
            body.append(f'<tr><th colspan="8" style="text-align:left">{esc(title)}</th></tr>')
            for r, label in zip(rows, _labels(rows), strict=True):
                style = {"frozen": "color:#777", "mixed": "font-weight:bold"}.get(r.status, "")
                title = f"{r.name} {label.strip()}" if r.kind == "layers" else r.name
                name = (f'<td style="text-align:left;padding-left:{r.level}em" '
                        f'title="{esc(title)}">{esc(label.strip())}</td>')
                nums = "".join(cell.format(esc(c)) for c in self._cells(r))
                note = f'<td style="text-align:left">{esc(r.note)}</td>'
                body.append(f'<tr class="jf-{r.status}" style="{style}">{name}{nums}{note}</tr>')
        foot = "".join(
            f'<tr><th style="text-align:left">{esc(k)}</th>'
            f'<td colspan="7" style="text-align:left">{esc(v)}</td></tr>'
            for k, v in self._footer()
        )
        return (f'<table class="jfreeze-summary"><thead><tr>{head}</tr></thead>'
                f"<tbody>{''.join(body)}</tbody><tfoot>{foot}</tfoot></table>")


def _labels(rows: list[Row]) -> list[str]:
    """Each row's name in the table: indented by level, relative to the row it sits in."""
    enclosing: list[str] = []  # names of the rows a module row sits in, by level
    out = []
    for r in rows:
        if r.kind == "label":
            out.append("  " + r.name)
            continue
        if r.kind == "layers" and r.layers is not None:
            out.append("  " * r.level + _span(r.layers))
            continue
        del enclosing[r.level - 1:]
        parent = enclosing[-1] if enclosing else ""
        rel = r.name[len(parent) + 1:] if parent and r.name.startswith(parent + "/") else r.name
        enclosing.append(r.name)
        out.append("  " * r.level + (rel or "''"))  # an empty key is shown as ''"
    return out


def _span(layers: range, word: str = "layer") -> str:
    """``layer 3`` or ``layers 0-7`` (both ends included)."""
    if len(layers) == 1:
        return f"{word} {layers.start}"
    return f"{word}s {layers.start}-{layers.stop - 1}"


def summary(
    params: Any,
    *,
    frozen: FrozenSpec | None = None,
    labels: Any = None,
    opt_state: Any = None,
    depth: int | None = None,
    max_rows: int = MAX_ROWS,
) -> Summary:
    """A Keras/PEFT-style table of what trains and what is frozen.

    Rows per subtree (leaves, parameters, trainable and frozen counts, bytes,
    % of all parameters), indented by nesting, and, given ``labels`` (a label
    function such as :func:`jfreeze.labels`, or a label tree), per label.
    Element-wise selections are counted by element, and a partially frozen
    leaf says how many of its elements are frozen. Works on arrays and
    ``jax.ShapeDtypeStruct``; in a notebook the result shows as an HTML table.

    Which subtrees get a row:

    - ``depth=None`` (default): where trainable and frozen parts separate. Each
      top-level subtree is a row; a row that is partly frozen opens into rows
      for its children, until every row is wholly trainable, wholly frozen, or
      a single leaf (whose frozen elements the row counts). A partly frozen
      subtree with one child is shown as one row (``encoder/layer``). Rows open
      breadth-first while the table stays within ``max_rows`` module rows; a
      partly frozen row left closed says so in its note. Top-level rows are
      always shown, so a tree with more top-level keys than ``max_rows`` has
      that many rows (``depth=`` does not bound them either).
    - ``depth=k``: every subtree of the first ``k`` path segments, nested
      (``depth=1``: the top-level keys), as torchinfo's ``depth`` does.

    Stacks: a leaf of 2 or more dimensions frozen by whole slices along one
    axis (:func:`jfreeze.layers`, or any such element selection: whole columns
    too) is a stack of layers. Its row opens into one ``kind="layers"`` row per
    run of frozen or trainable layers (``layers 0-7``), each with its
    parameters and bytes. A partly frozen subtree whose leaves are all stacks
    frozen alike (the same layers of the same number) shows the runs once,
    instead of a row per leaf (``depth=None``), or when it is the deepest row
    shown (``depth=k``).

    Either way the innermost rows partition the parameters: their counts add
    up to ``total``, ``trainable`` and ``frozen``.

    Args:
      params: the parameter tree.
      frozen: what is frozen (anything ``frozen=`` takes); None: nothing.
      labels: optional label function or label tree, for per-label rows.
      opt_state: optional optimizer state, to report its bytes.
      depth: None (where trainable and frozen separate), or how many path
        segments to group by (an int >= 1).
      max_rows: the most module rows ``depth=None`` opens up to.

    >>> import jax.numpy as jnp, numpy as np, optax
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

    Nested trees open where trainable and frozen parts separate:

    >>> params = {"embed": jnp.ones((8, 4)),
    ...           "encoder": {"layers": [{"w": jnp.ones((4, 4))} for _ in range(3)]},
    ...           "head": {"w": jnp.ones((4, 2))}}
    >>> frozen = jf.paths("embed", "encoder/layers/0/**") | jf.elements("head/w", np.s_[:, 0])
    >>> print(jf.summary(params, frozen=frozen))
                      leaves  params  trainable  frozen  bytes  % params
    --------------------------------------------------------------------
    by module
      embed                1      32          0      32  128 B     36.4%
      encoder/layers       3      48         32      16  192 B     54.5%
        0                  1      16          0      16   64 B     18.2%
        1                  1      16         16       0   64 B     18.2%
        2                  1      16         16       0   64 B     18.2%
      head/w               1       8          4       4   32 B      9.1%  1 of 2 layers on ...
        layer 0                    4          0       4   16 B      4.5%  frozen
        layer 1                    4          4       0   16 B      4.5%  trainable
    --------------------------------------------------------------------
    total      88 params, 352 B
    trainable  36 params (40.9%), 144 B
    frozen     52 params (59.1%), 208 B

    >>> [(r.kind, r.name, r.layers) for r in jf.summary(params, frozen=frozen, depth=1).rows]
    ... # doctest: +NORMALIZE_WHITESPACE
    [('module', 'embed', None), ('module', 'encoder', None), ('module', 'head', None),
     ('layers', 'head', range(0, 1)), ('layers', 'head', range(1, 2))]
    >>> [(r.name, r.level) for r in jf.summary(params, frozen=frozen, depth=2).rows
    ...  if r.kind == "module"]
    [('embed', 1), ('encoder', 1), ('encoder/layers', 2), ('head', 1), ('head/w', 2)]

    A stack (one array per parameter with a layer axis, as ``nn.scan`` builds
    it) frozen by whole layers shows its runs of layers, once for a group of
    stacks frozen alike:

    >>> stack = {"layers": {"w": jnp.ones((12, 4, 4)), "b": jnp.ones((12, 4))}}
    >>> print(jf.summary(stack, frozen=jf.layers("layers/**", range(8))))
                   leaves  params  trainable  frozen    bytes  % params
    -------------------------------------------------------------------
    by module
      layers            2     240         80     160    960 B    100.0%  8 of 12 layers frozen
        layers 0-7            160          0     160    640 B     66.7%  frozen
        layers 8-11            80         80       0    320 B     33.3%  trainable
    -------------------------------------------------------------------
    total      240 params, 960 B
    trainable  80 params (33.3%), 320 B
    frozen     160 params (66.7%), 640 B
    """
    _check_layout_args(depth, max_rows)
    sel = nothing if frozen is None else as_selector(frozen)
    flat, masks = sel.masks(params)
    if labels is not None:
        spec = call_or_tree(labels, params)  # an Equinox label tree is callable
        label_of = broadcast_prefix(spec, params, what="label tree", is_hole=is_placeholder)
    else:
        label_of = [None] * len(flat.entries)

    root, label_rows, frozen_bytes = _count(flat.entries, masks, label_of)
    state_bytes = None
    if opt_state is not None:
        state_bytes = sum(_nbytes(x) for x in jax.tree.leaves(opt_state))
    tot = root.row
    return Summary(
        rows=_layout(root, depth, max_rows) + label_rows,
        total=tot.params,
        trainable=tot.trainable,
        frozen=tot.frozen,
        total_bytes=tot.bytes,
        trainable_bytes=tot.bytes - frozen_bytes,
        frozen_bytes=frozen_bytes,
        opt_state_bytes=state_bytes,
    )


def _check_layout_args(depth: Any, max_rows: Any) -> None:
    def positive_int(x: Any) -> bool:
        return isinstance(x, int | np.integer) and not isinstance(x, bool) and bool(x >= 1)

    if depth is not None and not positive_int(depth):
        raise ValueError(
            "jf.summary: depth= is None (rows where trainable and frozen parts separate) "
            f"or an int >= 1 (group by that many path segments), got {depth!r}"
        )
    if not positive_int(max_rows):
        raise ValueError(f"jf.summary: max_rows= is an int >= 1, got {max_rows!r}")


#: How a leaf is frozen by whole layers: (axis, frozen per layer), or None if it is not.
_Stack = tuple[int, tuple[bool, ...]] | None


def _stack_of(x: Any, m: Mask) -> _Stack:
    """A stacked leaf (2-D or more) frozen by whole slices along one axis: its layers.

    A 1-D leaf's partial mask is a slab too, but its elements are no layers.
    """
    if isinstance(m, bool) or len(np.shape(x)) < 2:
        return None
    found = slab(np.broadcast_to(m, np.shape(x)))
    return None if found is None else (found[0], tuple(bool(v) for v in found[1]))


@dataclasses.dataclass
class _Node:
    """A subtree of the parameter paths (split at ``/``) and its counts."""

    row: Row
    children: dict[str, _Node] = dataclasses.field(default_factory=dict)
    is_leaf: bool = False  # a parameter leaf sits at exactly this path
    stacks: set[_Stack] = dataclasses.field(default_factory=set)  # of the leaves under it

    def kids(self) -> list[_Node]:
        """Children in tree order; numbered ones (``layer/10``) in numeric order."""
        keys = list(self.children)
        if all(k.isdigit() for k in keys):
            keys.sort(key=int)
        return [self.children[k] for k in keys]

    def opens(self) -> bool:
        return bool(self.children) and not self.is_leaf

    def stack(self) -> _Stack:
        """The layers of a partly frozen subtree whose leaves are all stacks frozen alike."""
        if self.row.status != "mixed" or len(self.stacks) != 1:
            return None
        return next(iter(self.stacks))

    def layer_rows(self, level: int) -> list[Row]:
        """One row per run of frozen or trainable layers (they partition this row)."""
        stack = self.stack()
        assert stack is not None
        frozen = stack[1]
        r, n = self.row, len(frozen)
        out = []
        for start, stop, value in runs(np.array(frozen)):
            # Every leaf under r has n layers of equal size: each run holds its share.
            params, nbytes = r.params * (stop - start) // n, r.bytes * (stop - start) // n
            out.append(Row("layers", r.name, 0, params, params if value else 0, nbytes,
                           level, "frozen" if value else "trainable", range(start, stop)))
        r.note = _layers_note(stack)
        return out


def _layers_note(stack: tuple[int, tuple[bool, ...]]) -> str:
    axis, frozen = stack
    on = f" on axis {axis}" if axis else ""
    return f"{sum(frozen)} of {len(frozen)} layers{on} frozen"


def _count(
    entries: list[tuple[str, Any]], masks: list[Mask], label_of: list[Any]
) -> tuple[_Node, list[Row], int]:
    """The path tree of the parameter leaves with counts, the label rows, frozen bytes."""
    root = _Node(Row("module", ""))
    labels: dict[Any, Row] = {}
    frozen_bytes = 0
    for (path, x), m, label in zip(entries, masks, label_of, strict=True):
        if not _is_param(x):
            continue  # e.g. an unfiltered Equinox module's activation functions
        n = _size(x)
        nf = mask_count(m, n)
        b = _nbytes(x)
        frozen_bytes += b if m is True else 0 if m is False else nf * _itemsize(x)
        stack = _stack_of(x, m)
        node, nodes = root, [root]
        segments = path.split("/") if path else ["(root)"]
        for i, seg in enumerate(segments):
            name = "/".join(segments[: i + 1])
            node = node.children.setdefault(seg, _Node(Row("module", name)))
            nodes.append(node)
        node.is_leaf = True
        if 0 < nf < n:
            node.row.note = _layers_note(stack) if stack else f"{nf:,} of {n:,} elements frozen"
        rows = [nd.row for nd in nodes]
        for nd in nodes:
            nd.stacks.add(stack)
        if label is not None:  # 1, True and "1" are three labels to optax
            try:
                row = labels.setdefault((type(label), label), Row("label", str(label)))
            except TypeError:
                raise TypeError(
                    f"jf.summary: the label at path {path!r} is not hashable: {label!r}"
                ) from None
            rows.append(row)
        for r in rows:
            r.leaves += 1
            r.params += n
            r.frozen += nf
            r.bytes += b
    spelled = collections.Counter(r.name for r in labels.values())
    for (_, label), r in labels.items():  # two labels spelled alike: show their reprs
        if spelled[r.name] > 1:
            r.name = repr(label)
    return root, list(labels.values()), frozen_bytes


def _chain(node: _Node) -> _Node:
    """A partly frozen subtree with a single child is shown as that child's row."""
    while node.row.status == "mixed" and node.opens() and len(node.children) == 1:
        node = next(iter(node.children.values()))
    return node


def _auto_open(root: _Node, max_rows: int) -> dict[str, str]:
    """The rows ``depth=None`` opens, into ``"kids"`` or ``"layers"``: partly frozen
    ones, breadth-first, within max_rows. A subtree of stacks frozen alike shows its
    runs of layers once rather than opening into its leaves."""
    tops = [_chain(c) for c in root.kids()]
    count, opened = len(tops), {}
    queue = collections.deque(tops)
    while queue:
        node = queue.popleft()
        stack = node.stack()
        if stack is not None:
            n_runs = len(runs(np.array(stack[1])))
            if count + n_runs <= max_rows:
                opened[node.row.name] = "layers"
                count += n_runs
            elif not node.is_leaf:
                node.row.note = f"partly frozen: {n_runs} rows inside (max_rows=, depth=)"
            continue
        if node.row.status != "mixed" or not node.opens():
            continue
        kids = [_chain(c) for c in node.kids()]
        if count + len(kids) > max_rows:
            node.row.note = f"partly frozen: {len(kids)} rows inside (max_rows=, depth=)"
            continue
        opened[node.row.name] = "kids"
        count += len(kids)
        queue.extend(kids)
    return opened


def _layout(root: _Node, depth: int | None, max_rows: int) -> list[Row]:
    """The module rows in table order (pre-order), each with its level set."""
    opened = _auto_open(root, max_rows) if depth is None else {}
    out: list[Row] = []

    def emit(node: _Node, level: int) -> None:
        if depth is None:
            node = _chain(node)
        node.row.level = level
        out.append(node.row)
        if depth is None:
            how = opened.get(node.row.name)
        elif level < depth and node.opens():
            how = "kids"
        else:  # the deepest row shown: a stack (or a group of stacks) shows its layers
            how = "layers" if node.stack() is not None else None
        if how == "kids":
            for kid in node.kids():
                emit(kid, level + 1)
        elif how == "layers":
            out.extend(node.layer_rows(level + 1))

    for top in root.kids():
        emit(top, 1)
    return out


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
    moved = [
        found
        for (path, a), (_, b), m in zip(fb.entries, fa.entries, masks, strict=True)
        if m is not False and (found := _moved(path, a, b, m, compare))
    ]
    if moved:
        noun = "leaf" if len(moved) == 1 else "leaves"
        raise AssertionError(f"{len(moved)} frozen {noun} moved: " + "; ".join(moved))


def _values(x: Any, path: str) -> Any:
    """What assert_frozen compares: NumPy values (a PRNG key's data), or the object."""
    if isinstance(x, jax.ShapeDtypeStruct):
        raise TypeError(
            f"jf.assert_frozen: the leaf at path {path!r} is a jax.ShapeDtypeStruct; "
            "compare concrete values."
        )
    if is_array(x) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.asarray(x) if _is_param(x) else x


def _moved(path: str, a: Any, b: Any, m: Mask, compare: str) -> str:
    """How one frozen leaf moved ("" if it did not)."""
    a, b = _values(a, path), _values(b, path)
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
        # Not arrays (an Equinox module's activation function): the same object, or equal.
        return "" if a is b or a == b else f"{path!r} (was {a!r}, now {b!r})"
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{path!r} (was {a.dtype}{list(a.shape)}, now {b.dtype}{list(b.shape)})"
    bits_a, bits_b = _bit_view(a), _bit_view(b)
    same = (bits_a == bits_b).all(-1) if compare == "bits" else _same_values(a, b)
    changed = ~same & (True if m is True else np.broadcast_to(m, a.shape))
    k = int(np.sum(changed))
    if not k:
        return ""
    n = a.size if m is True else int(np.sum(np.broadcast_to(m, a.shape)))
    i = tuple(int(j) for j in np.argwhere(changed)[0])
    where = f"first at {list(i)}: " if i else ""
    return (
        f"{path!r} ({k} of {n} frozen elements{_moved_layers(a, m, changed)}; "
        f"{where}{a[i]} ({_hex(bits_a[i])}) -> {b[i]} ({_hex(bits_b[i])}))"
    )


def _moved_layers(x: np.ndarray, m: Mask, changed: np.ndarray) -> str:
    """``", in layer 3 of 12 on axis 0"`` for a stack frozen by whole layers, else ``""``."""
    stack = _stack_of(x, m)
    if stack is None:
        return ""
    axis, frozen = stack
    others = tuple(j for j in range(x.ndim) if j != axis)
    spans = [range(a, b) for a, b, v in runs(np.asarray(changed.any(axis=others))) if v]
    text = ", ".join(str(r.start) if len(r) == 1 else f"{r.start}-{r.stop - 1}"
                     for r in spans)
    word = "layer" if len(spans) == 1 and len(spans[0]) == 1 else "layers"
    return f", in {word} {text} of {len(frozen)} on axis {axis}"
