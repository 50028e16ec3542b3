"""Private: FLOPs of an optimized HLO module, loops counted by their trip count.

XLA's cost analysis (``compiled.cost_analysis()``) visits the body of a ``while``
loop once, whatever its trip count. This module reads the text of the optimized
module (``compiled.as_text()``), where XLA's loop analysis writes the trip count
of each loop it understands (``backend_config={..."known_trip_count":{"n":"8"}}``),
and counts every computation as often as it runs.

Per instruction it mirrors XLA's ``HloCostAnalysis``: a dot is ``2 * output
elements * contracted elements`` (a convolution likewise per kernel window, a
cuBLAS GEMM custom call from its dimension numbers), an element-wise arithmetic
op one FLOP per output element (transcendentals are not FLOPs), a reduce one
application of its reducer per input element beyond the output, a fusion or call
what its computation costs, a conditional its most expensive branch, a loop its
body and condition. ``extra_loop_flops`` is the difference between counting loops
by their trip counts and once: added to XLA's own figure it keeps every loop-free
program exactly at XLA's count and adds, for loops, ``(trips - 1)`` bodies.
Dots and convolutions are exact; the element-wise part of a loop body is the
estimate above (tested against XLA on loop-free programs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

__all__ = ["Instr", "LoopCount", "count", "matmul_ops", "parse"]

_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEES = re.compile(
    r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')

# One FLOP per output element (HloCostAnalysis::HandleElementwiseOp); the
# transcendentals (exp, log, tanh, ...) are counted apart by XLA, not as FLOPs.
_ELEMENTWISE = frozenset({
    "abs", "add", "and", "ceil", "clamp", "compare", "complex", "convert",
    "count-leading-zeros", "divide", "floor", "imag", "is-finite", "maximum", "minimum",
    "multiply", "negate", "not", "or", "popcnt", "real", "reduce-precision", "remainder",
    "round-nearest-afz", "round-nearest-even", "select", "shift-left",
    "shift-right-arithmetic", "shift-right-logical", "sign", "stochastic-convert",
    "subtract", "xor",
})
_REDUCING = frozenset({"reduce", "all-reduce", "reduce-scatter", "all-reduce-start"})
_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul", "__cudnn$matmul")


@dataclasses.dataclass(frozen=True)
class Instr:
    """One HLO instruction: its name, result type, opcode and the text after the type."""

    name: str
    type: str
    op: str
    rest: str

    def callees(self, *kinds: str) -> list[str]:
        """Computations it calls through the attributes ``kinds`` (all when empty)."""
        out = [c for k, c in _CALLEES.findall(self.rest) if not kinds or k in kinds]
        if not kinds or "branch_computations" in kinds:
            for group in _BRANCHES.findall(self.rest):
                out += [c.strip().lstrip("%") for c in group.split(",")]
        return out

    def trip_count(self) -> int | None:
        m = _TRIP.search(self.rest)
        return int(m.group(1)) if m else None

    def label(self) -> str:
        """The instruction and the JAX operation it comes from, for messages."""
        m = _OP_NAME.search(self.rest)
        return f"{self.name} ({m.group(1)})" if m else self.name


def _split_type(rest: str) -> tuple[str, str]:
    """``'f32[2,3]{1,0} dot(...), ...'`` -> (type, the rest after it)."""
    if rest.startswith("("):  # tuple type: up to the matching parenthesis
        depth = 0
        for i, c in enumerate(rest):
            depth += c == "("
            depth -= c == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    i = rest.find(" ")
    return rest[:i], rest[i + 1 :]


def parse(hlo_text: str) -> tuple[dict[str, list[Instr]], str]:
    """``({computation: its instructions}, entry computation name)``."""
    comps: dict[str, list[Instr]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        h = _COMP_HEADER.match(line)
        if h:
            current = h.group(2)
            comps[current] = []
            entry = current if h.group(1) else entry
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            typ, rest = _split_type(m.group(2))
            comps[current].append(Instr(m.group(1), typ, rest.split("(", 1)[0].strip(), rest))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _dims(shape: str) -> list[int]:
    """Dimensions of an array type (the first array of a tuple type)."""
    m = re.search(r"[a-z0-9]+\[([^\]]*)\]", shape)
    if not m or not m.group(1):
        return []
    return [int(x.lstrip("<=")) for x in m.group(1).split(",")]


def _elements(shape: str) -> int:
    return math.prod(_dims(shape))


def _operands(instr: Instr) -> list[str]:
    """Operand names of ``op(a, b), attrs``."""
    body = instr.rest[len(instr.op):]
    depth, out = 0, ""
    for c in body:
        if c == "(":
            depth += 1
            if depth == 1:
                continue
        elif c == ")":
            depth -= 1
            if depth == 0:
                break
        if depth >= 1:
            out += c
    return [tok.strip().split()[-1].lstrip("%") for tok in out.split(",") if tok.strip()]


def _int_list(text: str, key: str) -> list[int]:
    m = re.search(key + r"=\{([\d,]*)\}", text)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def _matmul(instr: Instr, shapes: dict[str, str]) -> int:
    """FLOPs of a dot, convolution or GEMM custom call (0 for anything else)."""
    if instr.op == "dot":
        lhs = _dims(shapes[_operands(instr)[0]])
        contracted = math.prod(lhs[i] for i in _int_list(instr.rest, "lhs_contracting_dims"))
        return 2 * _elements(instr.type) * contracted
    if instr.op == "convolution":
        kernel = _dims(shapes[_operands(instr)[1]])
        m = re.search(r"dim_labels=\w*_(\w+)->", instr.rest)
        labels = m.group(1) if m else ""
        per_out = math.prod(n for n, lab in zip(kernel, labels, strict=True) if lab != "o")
        return 2 * _elements(instr.type) * per_out
    if instr.op == "custom-call" and any(t in instr.rest for t in _GEMM_TARGETS):
        lhs = _dims(shapes[_operands(instr)[0]])
        m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', instr.rest)
        dims = [int(x.strip('" ')) for x in m.group(1).split(",") if x.strip()] if m else []
        return 2 * _elements(instr.type) * math.prod(lhs[i] for i in dims)
    return 0


def matmul_ops(hlo_text: str) -> list[dict]:
    """Every dot/convolution of an optimized HLO module: name, computation, FLOPs,
    calls (how often its computation runs per execution, loops by trip count)."""
    comps, entry = parse(hlo_text)
    calls = _calls(comps, entry)
    ops = []
    for comp, instrs in comps.items():
        if not calls.get(comp):
            continue
        shapes = {i.name: i.type for i in instrs}
        for i in instrs:
            flops = _matmul(i, shapes)
            if flops:
                ops.append({"name": i.name, "computation": comp, "flops": flops,
                            "calls": calls[comp], "shape": i.type})
    return ops


def _calls(comps: dict[str, list[Instr]], entry: str) -> dict[str, int]:
    """How many times each computation runs per execution of ``entry`` (a loop's
    body and condition by its trip count, or once when unknown)."""
    edges: dict[str, list[tuple[str, int]]] = {}
    for comp, instrs in comps.items():
        for i in instrs:
            times = (i.trip_count() or 1) if i.op == "while" else 1
            edges.setdefault(comp, []).extend((c, times) for c in i.callees())
    order: list[str] = []
    seen: set[str] = set()

    def visit(c: str) -> None:  # callees before callers
        if c not in seen:
            seen.add(c)
            for callee, _ in edges.get(c, []):
                visit(callee)
            order.append(c)

    visit(entry)
    calls = dict.fromkeys(order, 0)
    calls[entry] = 1
    for c in reversed(order):
        for callee, times in edges.get(c, []):
            calls[callee] += calls[c] * times
    return calls


@dataclasses.dataclass(frozen=True)
class LoopCount:
    """What :func:`count` found in one optimized module.

    ``extra_flops``: FLOPs to add to XLA's cost analysis so that every loop body
    counts by its trip count (0.0 for a loop-free program). ``once_flops``: this
    module's own count with every loop once, i.e. its estimate of XLA's cost
    analysis (what the tests compare with XLA). ``matmul_flops``: dot
    and convolution FLOPs, loops by trip count. ``unknown_trips``: the loops whose
    trip count XLA does not know (counted once).
    """

    extra_flops: float
    once_flops: float
    matmul_flops: int
    unknown_trips: tuple[str, ...]


def count(hlo_text: str) -> LoopCount:
    """Counts an optimized HLO module's loops by their trip counts (see the module)."""
    comps, entry = parse(hlo_text)
    unknown: list[str] = []

    @functools.cache
    def total(comp: str, trips: bool) -> tuple[float, int]:
        """(FLOPs, matmul FLOPs) of one run of ``comp``, loops once or by trip count."""
        flops, matmul = 0.0, 0
        shapes = {i.name: i.type for i in comps[comp]}
        for i in comps[comp]:
            f, m = _instr_flops(i, shapes, lambda c: total(c, trips))
            if i.op == "while":
                n = i.trip_count()
                if n is None and trips:
                    unknown.append(i.label())
                f, m = ((n or 1) * f, (n or 1) * m) if trips else (f, m)
            flops, matmul = flops + f, matmul + m
        return flops, matmul

    with_trips, matmul = total(entry, True)
    once, _ = total(entry, False)
    return LoopCount(with_trips - once, once, matmul, tuple(unknown))


def _instr_flops(i: Instr, shapes: dict[str, str], total) -> tuple[float, int]:
    """(FLOPs, matmul FLOPs) of one run of an instruction; ``total(comp)`` gives a
    called computation's. A loop's figures are for one iteration."""
    if i.op == "while":
        parts = [total(c) for c in i.callees("body", "condition")]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)
    if i.op == "conditional":  # XLA: the most expensive branch
        parts = [total(c) for c in i.callees("true_computation", "false_computation",
                                             "branch_computations")]
        return max(parts, default=(0.0, 0))
    if i.op == "sort":  # XLA: n log2(n) for n elements, whatever the comparator
        n = _elements(shapes[_operands(i)[0]])
        return float(n * math.ceil(math.log2(max(n, 1)))), 0
    if i.op in _REDUCING or i.op in ("map", "scatter", "reduce-window"):
        per = sum(total(c)[0] for c in i.callees("to_apply"))
        return per * _applications(i, shapes), 0
    # fusions and async wrappers name their computation calls=, a call to_apply=
    called = i.callees("calls") + (i.callees("to_apply") if i.op == "call" else [])
    if called:
        parts = [total(c) for c in called]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)
    matmul = _matmul(i, shapes)
    if matmul:
        return float(matmul), matmul
    return (float(_elements(i.type)) if i.op in _ELEMENTWISE else 0.0), 0


def _applications(i: Instr, shapes: dict[str, str]) -> int:
    """How often a reducing op applies its ``to_apply`` computation."""
    operands = _operands(i)
    if i.op == "reduce":
        return _elements(shapes[operands[0]]) - _elements(i.type)
    if i.op == "scatter":
        return _elements(shapes[operands[-1]])
    if i.op == "reduce-window":
        window = re.search(r"window=\{size=([\dx]+)", i.rest)
        size = math.prod(int(x) for x in window.group(1).split("x")) if window else 1
        return _elements(i.type) * (size - 1)
    return _elements(i.type)  # map, all-reduce, reduce-scatter: one per output element
