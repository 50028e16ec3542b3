"""Measuring a compiled step: matmul FLOPs from the optimized HLO, memory, timing, output.

``hlo_matmul_flops`` reads the text of the optimized HLO module
(``jax.jit(f).lower(...).compile().as_text()``) and sums ``2 * prod(result) * prod(contracted)``
over its ``dot`` ops (and ``convolution``s), wherever they sit (fusions included), times how
often their computation is called (loops by trip count): the parser of
``jf.compiled_flops(..., matmul_only=True)``. ``jf.compiled_flops`` (XLA's cost analysis, loops
by trip count) is reported beside it: it adds element-wise work, so it is not the number to
compare with a matmul-only ideal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jfreeze import _hlo

# --------------------------------------------------------------------------
# Optimized HLO text -> matmul FLOPs: the library's parser (the one behind
# ``jf.compiled_flops``), not a copy.


def hlo_matmul_ops(hlo_text: str) -> list[dict]:
    """Every dot/convolution of an optimized HLO module: name, computation, FLOPs, calls."""
    return _hlo.matmul_ops(hlo_text)


def hlo_matmul_flops(hlo_text: str) -> int:
    """Total matmul FLOPs of one execution of an optimized HLO module (loops by trip
    count): ``jf.compiled_flops(..., matmul_only=True)`` for an already compiled step."""
    return _hlo.count(hlo_text).matmul_flops


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


def run_settings(args: argparse.Namespace, timing: dict) -> tuple[str, Any, int, int]:
    """``(preset, dtype, rounds, per_round)`` from :func:`common_args`' flags: the preset
    (quick / gpu / cpu), its compute dtype (bf16 on GPU) and its timing, flags first."""
    import jax.numpy as jnp

    preset = "quick" if args.quick else "gpu" if args.gpu else "cpu"
    dtype = jnp.dtype(args.dtype or ("bfloat16" if args.gpu else "float32"))
    rounds, per_round = timing[preset]
    return preset, dtype, args.rounds or rounds, args.per_round or per_round


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
    for instr in (i for instrs in _hlo.parse(text)[0].values() for i in instrs):
        callee = instr.callees("calls")
        kind[instr.name] = f"{instr.type.split('{')[0]} {instr.op}" + (
            " ynn" if "__ynn_fusion" in instr.rest else "")
        flops[instr.name] = by_comp.get(callee[0], 0) if callee else 0
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
