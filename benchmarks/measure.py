"""Measuring a compiled step: matmul FLOPs from the optimized HLO, memory, timing, output.

``hlo_matmul_flops`` reads the text of the optimized HLO module
(``jax.jit(f).lower(...).compile().as_text()``) and sums ``2 * prod(result) * prod(contracted)``
over its ``dot`` ops (and ``convolution``s), wherever they sit (fusions included), times how
often their computation is called. XLA's cost analysis (``jf.compiled_flops``) is reported
beside it: it adds element-wise work, so it is not the number to compare with a matmul-only
ideal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

# --------------------------------------------------------------------------
# Optimized HLO text -> matmul FLOPs.

_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEES = re.compile(
    r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


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


def _dims(shape: str) -> list[int]:
    m = re.match(r"^[a-z0-9]+\[([^\]]*)\]", shape)
    if not m or not m.group(1):
        return []
    return [int(x.lstrip("<=")) for x in m.group(1).split(",")]


def _operands(body: str) -> list[str]:
    """Operand names of ``op(a, b), attrs`` (the text after the op name)."""
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
    names = []
    for tok in out.split(","):
        tok = tok.strip()
        if tok:
            names.append(tok.split()[-1].lstrip("%"))
    return names


def _int_list(attrs: str, key: str) -> list[int]:
    m = re.search(key + r"=\{([\d,]*)\}", attrs)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def hlo_matmul_ops(hlo_text: str) -> list[dict]:
    """Every dot/convolution of an optimized HLO module: name, computation, FLOPs, calls."""
    comps: dict[str, list[tuple[str, str, str]]] = {}  # comp -> [(name, type, rest)]
    entry, current = None, None
    for line in hlo_text.splitlines():
        h = _COMP_HEADER.match(line)
        if h:
            current = h.group(2)
            comps[current] = []
            if h.group(1):
                entry = current
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            typ, rest = _split_type(m.group(2))
            comps[current].append((m.group(1), typ, rest))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    # How many times each computation runs per execution of ENTRY.
    edges: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for comp, instrs in comps.items():
        for _, _, rest in instrs:
            trip = _TRIP.search(rest)
            times = int(trip.group(1)) if trip else 1
            for kind, callee in _CALLEES.findall(rest):
                edges[comp].append((callee, times if kind in ("body", "condition") else 1))
            for group in _BRANCHES.findall(rest):
                for callee in group.split(","):
                    edges[comp].append((callee.strip().lstrip("%"), 1))
    calls: dict[str, int] = defaultdict(int)
    order, seen = [], set()

    def visit(c):  # topological order (callers before callees)
        if c in seen:
            return
        seen.add(c)
        for callee, _ in edges.get(c, []):
            visit(callee)
        order.append(c)

    visit(entry)
    calls[entry] = 1
    for c in reversed(order):
        for callee, times in edges.get(c, []):
            calls[callee] += calls[c] * times

    ops = []
    for comp, instrs in comps.items():
        if not calls.get(comp):
            continue
        shapes = {name: typ for name, typ, _ in instrs}
        for name, typ, rest in instrs:
            op = rest.split("(", 1)[0].strip()
            if op == "dot":
                lhs = _dims(shapes[_operands(rest[len(op):])[0]])
                contracted = int(np.prod([lhs[i] for i in _int_list(rest, "lhs_contracting_dims")]))
                flops = 2 * int(np.prod(_dims(typ))) * contracted
            elif op == "convolution":
                kernel_name = _operands(rest[len(op):])[1]
                kdims = _dims(shapes[kernel_name])
                labels = re.search(r"dim_labels=\w*_(\w+)->", rest).group(1)
                per_out = int(np.prod([n for n, lab in zip(kdims, labels, strict=True)
                                       if lab != "o"]))
                flops = 2 * int(np.prod(_dims(typ))) * per_out
            else:
                continue
            ops.append({"name": name, "computation": comp, "flops": flops, "calls": calls[comp],
                        "shape": typ})
    return ops


def hlo_matmul_flops(hlo_text: str) -> int:
    """Total matmul FLOPs of one execution of an optimized HLO module."""
    return sum(op["flops"] * op["calls"] for op in hlo_matmul_ops(hlo_text))


# --------------------------------------------------------------------------
# A compiled step: FLOPs and memory.


def compiled_stats(compiled, devices: int = 1) -> dict[str, Any]:
    """``matmul_gflops`` (HLO dots) and memory_analysis bytes of a compiled step.

    (XLA's own FLOPs, which add element-wise work, come from ``jf.compiled_flops``.)
    An SPMD program over ``devices`` devices is one per-device program (its HLO and
    memory analyses are per device, the same on each), so FLOPs and bytes are multiplied
    by ``devices``: totals, comparable with a one-device step.
    """
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    return {
        "matmul_gflops": devices * hlo_matmul_flops(text) / 1e9,
        "temp_bytes": devices * int(getattr(mem, "temp_size_in_bytes", -1)),
        "argument_bytes": devices * int(getattr(mem, "argument_size_in_bytes", -1)),
        "output_bytes": devices * int(getattr(mem, "output_size_in_bytes", -1)),
        "alias_bytes": devices * int(getattr(mem, "alias_size_in_bytes", -1)),
        "hlo_fusions": text.count(" fusion("),
        "devices": devices,
    }


def tree_bytes(tree: Any) -> int:
    """Bytes of the array leaves of a pytree (optimizer state, parameters)."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


# --------------------------------------------------------------------------
# Timing: side by side, interleaved, so that machine load hits every variant alike.


def time_interleaved(
    steps: dict[str, Callable[[], Any]],
    *,
    rounds: int,
    per_round: int,
    warmup: int = 2,
) -> dict[str, dict[str, list[float]]]:
    """Wall-clock and process-CPU milliseconds per call of each step, interleaved.

    Each ``steps[name]()`` runs one step and blocks until its result is ready. After
    ``warmup`` calls of each, every round runs ``per_round`` timed calls of each
    variant in turn, so slow phases of a shared machine hit all variants alike.
    CPU time is the whole process's (every thread), so CPU / wall is the number of
    cores a step kept busy.
    """
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            for _ in range(per_round):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[name]["wall"].append((time.perf_counter() - t0) * 1e3)
                times[name]["cpu"].append((time.process_time() - c0) * 1e3)
    return times


def summarize_times(t: dict[str, Sequence[float]]) -> dict[str, float]:
    """Medians and minimum of one variant's ``time_interleaved`` entry."""
    return {"step_ms_median": statistics.median(t["wall"]), "step_ms_min": min(t["wall"]),
            "cpu_ms_median": statistics.median(t["cpu"]), "timed_steps": len(t["wall"])}


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


# --------------------------------------------------------------------------
# The machine, the table, the JSON.


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    dev = jax.devices()[0]
    return {
        "cpu": cpu,
        "cores_available": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                            else os.cpu_count()),
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', '')}",
        "jax": jax.__version__,
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


# Dense bf16 peak TFLOP/s (no sparsity) by device_kind substring, for MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10G": 70.0, "V100": 125.0, "TPU v5 lite": 197.0, "TPU v5": 459.0,
                    "TPU v4": 275.0}


def peak_tflops(override: float | None = None) -> float | None:
    """The device's dense bf16 peak (``override`` wins); None where unknown (CPUs)."""
    if override:
        return override
    kind = getattr(jax.devices()[0], "device_kind", "")
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)


def add_mfu(rows: list[dict], peak: float | None) -> None:
    """``mfu``: the ideal (model) FLOPs per second achieved, over ``peak`` TFLOP/s."""
    for r in rows:
        if peak and r.get("step_ms_median"):
            r["mfu"] = r["ideal_gflops"] / (r["step_ms_median"] / 1e3) / (peak * 1e3)
            r["peak_tflops"] = peak


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec) per column."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, spec in columns:
            v = r.get(key)
            line.append("-" if v is None else format(v, spec) if spec else str(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for j, line in enumerate(cells):
        out.append("  ".join(c.rjust(w) if j and i else c.ljust(w)
                             for i, (c, w) in enumerate(zip(line, widths, strict=True))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(path: str, rows: list[dict]) -> None:
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1, default=float)
        f.write("\n")


def common_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, few steps (seconds; run by the tests)")
    p.add_argument("--gpu", action="store_true", help="GPU preset: bf16 compute, larger sizes")
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list to PATH")
    p.add_argument("--rounds", type=int, help="timing rounds (interleaved over variants)")
    p.add_argument("--per-round", type=int, help="timed steps per variant per round")
    p.add_argument("--no-time", action="store_true", help="compile and count only; no timing")
    p.add_argument("--config",
                   help="comma-separated indices of the preset's sizes to run (default: all)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="compute dtype (default: float32, or bfloat16 with --gpu)")
    p.add_argument("--peak-tflops", type=float,
                   help="dense bf16 peak of the device, for the MFU column (default: known GPUs)")
    return p


# --------------------------------------------------------------------------
# Where the time goes: per-op times of a compiled XLA:CPU program.


PROFILE_OPTIONS = {"xla_cpu_enable_xprof_traceme": True}


def profile_ops(hlo_text: str, run_fn: Callable[[], Any], *, steps: int = 10, top: int = 25) -> str:
    """A table of the slowest ops of a step, with their matmul FLOPs and GFLOP/s.

    ``hlo_text`` is the optimized HLO of a program compiled with ``PROFILE_OPTIONS``
    (``compile(compiler_options=PROFILE_OPTIONS)``), so that XLA:CPU records each op in
    a ``jax.profiler`` trace; ``run_fn()`` runs one blocking step of it. Per op we report
    the median over ``steps`` steps, which is robust to a busy machine.
    """
    import glob
    import gzip
    import tempfile

    text = hlo_text
    by_comp: dict[str, int] = defaultdict(int)
    for op in hlo_matmul_ops(text):
        by_comp[op["computation"]] += op["flops"]
    kind, flops = {}, {}
    for line in text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        typ, rest = _split_type(m.group(2))
        op = rest.split("(", 1)[0]
        callee = re.search(r"calls=%?([\w.\-]+)", rest)
        kind[m.group(1)] = f"{typ.split('{')[0]} {op}" + (
            " ynn" if "__ynn_fusion" in rest else "")
        flops[m.group(1)] = by_comp.get(callee.group(1), 0) if callee else 0
    for op in hlo_matmul_ops(text):  # dots outside fusions
        flops[op["name"]] = flops.get(op["name"]) or op["flops"]
    for _ in range(3):
        run_fn()
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                run_fn()
        with gzip.open(glob.glob(f"{d}/**/*.json.gz", recursive=True)[0]) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    durs: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e["name"] in kind:
            durs[e["name"]].append(e["dur"] / 1e3)
    med = {k: statistics.median(v) for k, v in durs.items()}
    total = sum(med.values())
    mm = sum(t for k, t in med.items() if flops.get(k))
    gf = hlo_matmul_flops(text) / 1e9
    lines = [f"sum of per-op medians {total:.2f} ms; ops with matmuls {mm:.2f} ms "
             f"({gf:.3f} GFLOP, {gf * 1e3 / mm if mm else 0:.1f} GFLOP/s); "
             f"other ops {total - mm:.2f} ms"]
    for name, t in sorted(med.items(), key=lambda kv: -kv[1])[:top]:
        f = flops.get(name, 0)
        rate = f"{f / 1e6 / t:6.1f} GF/s" if f else " " * 11
        lines.append(f"{t:8.3f} ms {f / 1e6:9.1f} MF {rate}  {name:34s} {kind[name]}")
    return "\n".join(lines)
