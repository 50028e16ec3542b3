"""The benchmark scripts run, and their deterministic numbers hold (never their timings)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import measure  # noqa: E402
from benchmarks.models import Sizes, ideal_matmul_flops  # noqa: E402

HAVE_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs both scripts with --quick, side by side, and loads their JSON rows."""
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # LLVM's optimization level changes neither the HLO nor its FLOPs; at 0 compiling is faster.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    runs = {name: [name] for name in ("probe_step", "population")}
    # The --gpu preset's code path at quick sizes: bf16 frozen models and an MFU column.
    runs["population_bf16"] = ["population", "--dtype", "bfloat16", "--peak-tflops", "1",
                               "--variants", "jf_vmap"]
    procs = {
        key: subprocess.Popen(
            [sys.executable, "-m", f"benchmarks.{script}", "--quick", *extra,
             "--json", str(out / f"{key}.json")],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for key, (script, *extra) in runs.items()
    }
    rows = {}
    for key, p in procs.items():
        text, _ = p.communicate(timeout=600)
        assert p.returncode == 0, text
        assert "variant" in text  # the printed table
        rows[key] = json.loads((out / f"{key}.json").read_text())
    return rows


def by_variant(rows):
    groups: dict = {}
    for r in rows:
        key = (r["batch"], r["seq"], r["d_model"], r["layers"], r["frozen_layers"], r["models"])
        groups.setdefault(key, {})[r["variant"]] = r
    return groups


REQUIRED = {"variant", "gflops", "matmul_gflops", "ideal_gflops", "step_ms_median", "step_ms_min",
            "opt_state_bytes", "temp_bytes", "batch", "seq", "d_model", "layers", "heads"}


def test_probe_step_rows(results):
    for rows in by_variant(results["probe_step"]).values():
        assert set(rows) == {"full", "optax_multi_transform", "optax_multi_transform_gradnorm",
                             "jf_freeze", "jf_split"}
        for r in rows.values():
            assert set(r) >= REQUIRED, REQUIRED - set(r)


def test_probe_step_frozen_compute_is_gone(results):
    for rows in by_variant(results["probe_step"]).values():
        ideal = rows["full"]["ideal_gflops"]
        for name in ("jf_freeze", "jf_split", "optax_multi_transform"):
            # XLA may strength-reduce the final (n, 1) matmul: a hair under the ideal.
            assert 0.99 * ideal <= rows[name]["matmul_gflops"] <= 1.01 * ideal, name
        jf = rows["jf_split"]["matmul_gflops"]
        assert rows["full"]["matmul_gflops"] > 1.1 * jf
        # Logging the norm of all gradients brings the frozen weight gradients back ...
        assert rows["optax_multi_transform_gradnorm"]["matmul_gflops"] > 1.1 * jf
        # ... while jf_split logs the norm of the gradients it has, at the ideal cost.
        assert rows["jf_split"]["logs_grad_norm"]
        full = rows["full"]
        assert full["matmul_gflops"] == pytest.approx(full["ideal_full_finetune_gflops"], rel=0.01)


def test_probe_step_optimizer_state_is_trainable_only(results):
    for rows in by_variant(results["probe_step"]).values():
        for r in rows.values():
            assert r["opt_state_bytes"] == r["opt_state_expected_bytes"], r["variant"]
        assert rows["jf_freeze"]["opt_state_bytes"] < rows["full"]["opt_state_bytes"]


def test_population_rows(results):
    for rows in by_variant(results["population"]).values():
        jf = rows["jf_vmap"]
        assert set(jf) >= REQUIRED, REQUIRED - set(jf)
        # Sharded over (up to) one CPU device per core; FLOPs are those of all devices together.
        assert 1 <= jf["devices"] <= jf["threads"] and jf["models"] % jf["devices"] == 0
        assert 0.99 * jf["ideal_gflops"] <= jf["matmul_gflops"] <= 1.01 * jf["ideal_gflops"]
        assert jf["models_probes_per_s"] > 0
        assert jf["cpu_ms_median"] > 0
        # The README's path with the library call only: jf_vmap's ops, but with a device per
        # core each device runs them on one thread, and XLA then fuses (so counts) a little
        # element-wise work and assigns temporary buffers differently (at these tiny sizes
        # only: 112,284,208 bytes for both at the cpu preset's larger size).
        lib = rows["jf_vmap_models"]
        for key in ("matmul_gflops", "devices", "opt_state_bytes"):
            assert lib[key] == jf[key], key
        assert lib["temp_bytes"] > 0
        assert lib["gflops"] == pytest.approx(jf["gflops"], rel=5e-3)
        assert lib["loss0"] == pytest.approx(jf["loss0"], rel=1e-6)
        # The transposed-kernels recipe: the weight gradients it defines are dropped by XLA
        # (the same matmul FLOPs), at twice the frozen weights' bytes (biases aside).
        t = rows["jf_vmap_models_t"]
        assert t["matmul_gflops"] == lib["matmul_gflops"]
        assert lib["frozen_bytes"] < t["frozen_bytes"] < 2 * lib["frozen_bytes"]
        assert t["loss0"] == pytest.approx(lib["loss0"], rel=1e-6)
        torch_rows = {k: v for k, v in rows.items() if k.startswith("torch")}
        assert bool(torch_rows) == HAVE_TORCH
        for name, r in torch_rows.items():
            # Same FLOPs (torch's FlopCounterMode) and, from the same weights, the same loss.
            assert r["matmul_gflops"] == pytest.approx(r["ideal_gflops"], rel=1e-6), name
            assert r["loss0"] == pytest.approx(jf["loss0"], rel=1e-5, abs=1e-6), name


def test_population_bf16_with_mfu(results):
    (jf,) = results["population_bf16"]
    assert jf["variant"] == "jf_vmap" and jf["dtype"] == "bfloat16"
    assert 0.99 * jf["ideal_gflops"] <= jf["matmul_gflops"] <= 1.01 * jf["ideal_gflops"]
    # MFU = ideal FLOPs per second over the given peak (1 TFLOP/s here).
    # GFLOP/ms = TFLOP/s
    assert jf["mfu"] == pytest.approx(jf["ideal_gflops"] / jf["step_ms_median"])
    assert jf["loss0"] == pytest.approx(results["population"][0]["loss0"], abs=0.05)


def test_hlo_matmul_flops_counts_dots_in_fusions_and_loops():
    x, w = jnp.ones((8, 16)), jnp.ones((16, 4))
    grads = jax.jit(jax.grad(lambda x, w: jnp.tanh(x @ w).sum(), argnums=(0, 1)))
    text = grads.lower(x, w).compile().as_text()
    assert measure.hlo_matmul_flops(text) == 3 * 2 * 8 * 16 * 4  # forward, dx, dw

    def loop(x, ws):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    ws = jnp.ones((5, 16, 16))
    text = jax.jit(loop).lower(jnp.ones((8, 16)), ws).compile().as_text()
    assert measure.hlo_matmul_flops(text) == 5 * 2 * 8 * 16 * 16


def test_ideal_counts_full_finetuning_as_three_passes_of_the_frozen_part():
    s = Sizes(batch=4, seq=8, d_model=32, heads=2, layers=2, frozen_layers=2, d_noise=16,
              d_hidden=32)
    frozen, full = ideal_matmul_flops(s), ideal_matmul_flops(s, all_trainable=True)
    assert 1.3 < full / frozen < 1.5
    assert ideal_matmul_flops(s, frozen_models=3) > 2.9 * frozen


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    """``benchmarks.scanned --quick --no-time``: rows by (setup, variant); nothing timed."""
    out = tmp_path_factory.mktemp("scanned") / "scanned.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    p = subprocess.run([sys.executable, "-m", "benchmarks.scanned", "--quick", "--no-time",
                        "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return {(r["setup"], r["variant"]): r for r in json.loads(out.read_text())}


@pytest.mark.parametrize("setup", ["bottom", "middle"])
def test_scanned_stack_frozen_layers_cost_nothing(scanned, setup):
    rows = {v: r for (s, v), r in scanned.items() if s == setup}
    assert set(rows) == {"full", "optax_mask", "jf_layers", "jf_scan"}
    full, jf_scan = rows["full"], rows["jf_scan"]
    assert full["matmul_gflops"] == pytest.approx(full["ideal_full_finetune_gflops"], rel=0.01)
    # jf.scan: the ideal matmul FLOPs (no weight gradients of frozen layers, no backward
    # below the lowest trainable one) and Adam state for the trainable layers only.
    assert 0.99 * jf_scan["ideal_gflops"] <= jf_scan["matmul_gflops"] <= 1.01 * jf_scan[
        "ideal_gflops"]
    assert jf_scan["opt_state_bytes"] == 2 * jf_scan["trainable_bytes"] + 4
    # A plain lax.scan computes every layer's weight gradients, masked or not ...
    for name in ("optax_mask", "jf_layers"):
        assert rows[name]["matmul_gflops"] == pytest.approx(full["matmul_gflops"], rel=0.01)
        assert rows[name]["matmul_gflops"] > 1.05 * jf_scan["matmul_gflops"]
    # ... and plain optax keeps Adam state for the frozen layers; jf.freeze does not.
    assert rows["optax_mask"]["opt_state_bytes"] == full["opt_state_bytes"]
    assert rows["jf_layers"]["opt_state_bytes"] == jf_scan["opt_state_bytes"]
    for name in ("optax_mask", "jf_layers", "jf_scan"):
        assert rows[name]["frozen_bits_kept"], name
        assert rows[name]["loss0"] == pytest.approx(rows["jf_scan"]["loss0"], rel=1e-5), name
    assert "step_ms_median" not in jf_scan  # --no-time: nothing timed
