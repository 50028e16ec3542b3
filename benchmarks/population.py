"""A population of K frozen models per step through one probe: jfreeze vs PyTorch.

    python -m benchmarks.population                    # CPU defaults (a few minutes on 2 cores)
    python -m benchmarks.population --quick            # seconds
    python -m benchmarks.population --gpu              # bf16 frozen models, larger sizes
    python -m benchmarks.population --threads 1        # pin both frameworks to 1 core
    python -m benchmarks.population --jax-extra all --torch-compile   # every formulation
    python -m benchmarks.population --config 1 --profile   # where XLA:CPU spends the time
    python -m benchmarks.population --json out/population.json

Each step: noise ``z`` (K models x P probes) -> trainable pre-MLP -> a soft sequence for
each of the K frozen transformers -> trainable post layers -> BCE; Adam updates the
probe only. The same sizes, weights and FLOPs in each variant:

* ``jf_vmap``: the parameters ``{"probe", "zoo"}`` are ``jf.split`` with
  ``frozen=jf.paths("zoo/**")``; the step differentiates the probe only and
  ``jax.vmap``-s the transformer over the stacked frozen parameters, in one ``jax.jit``;
  the stacked models are split over one JAX CPU device per core (``jf.shard_stacked``),
  the probe replicated, so the cores run independent shares of the population.
* ``jf_vmap_models``: the README's population path, written with the library only
  (``library_population_step``): ``jf.vmap_models`` (stop_gradient, ``dots_saveable``
  remat, vmap, the ``models`` mesh axis) over a transformer whose LayerNorm backward is
  one ``custom_vjp`` (the README's recipe), ``jf.models_mesh`` + ``jf.shard_stacked``,
  and ``jax.jit(compiler_options=jf.population_compiler_options(mesh))``. It compiles to the
  same HLO ops as ``jf_vmap``, which reaches ``jf.vmap_models`` through ``Formulation``.
* ``jf_vmap_models_t``: the same, plus the README's second recipe: every frozen kernel also
  stored transposed, read by the input-gradient matmuls (twice the frozen memory).
* ``torch_loop``: K ``nn.Module``-s with ``requires_grad_(False)`` called in a Python loop.
* ``torch_vmap``: ``torch.func.vmap`` over ``torch.func.functional_call`` with the K
  models' parameters stacked by ``torch.func.stack_module_state``.
* ``torch_vmap_compile`` (``--torch-compile``): the same vmapped function under
  ``torch.compile``.

``--jax-extra`` adds other JAX formulations of the same step (see ``JAX_FORMULATIONS`` and
``benchmarks/NOTES.md``). Cores are equalised: ``--threads N`` pins the process to N
cores before JAX or torch start (XLA sizes its intra-op pool from the cores it may use),
sets ``torch.set_num_threads(N)`` and gives JAX N CPU devices (``--devices`` overrides);
by default both use every available core. The ``cores busy`` column is process CPU time
over wall time per step.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jfreeze as jf
from benchmarks import measure
from benchmarks.models import (
    Sizes,
    batch,
    bce,
    ideal_matmul_flops,
    init_probe,
    init_transformer,
    post,
    pre,
    transformer,
    with_transposed_kernels,
)

VARIANTS = ("jf_vmap", "jf_vmap_models", "jf_vmap_models_t", "torch_loop", "torch_vmap")
LR = 1e-3


@dataclasses.dataclass(frozen=True)
class Formulation:
    """One way to write the population step in JAX (same math, same FLOPs)."""

    doc: str
    mapper: str = "vmap"  # "vmap" (one batched program) or "lax_map" (a loop over models)
    layout: str = "tokens"  # attention einsum layout: "tokens" or "heads" (models.ATTENTION)
    ln: str = "plain"  # LayerNorm: "plain" (autodiff) or "custom_vjp" (models.LAYER_NORM)
    compiler_options: tuple[tuple[str, Any], ...] = ()  # per-compile XLA options
    flax: bool = False  # flax.linen modules instead of the plain functions
    remat: str = ""  # a jax.checkpoint_policies name applied to each frozen model's forward
    # frozen kernels also stored transposed (models.with_transposed_kernels)
    pretransposed: bool = False
    # split the K models over every JAX device (jf.shard_stacked, a "models" mesh)
    shard: bool = False


NO_YNN = (("xla_cpu_experimental_ynn_fusion_type", ""),)

# The row `jf_vmap` uses JAX_FORMULATIONS[DEFAULT_FORMULATION]; `--jax-extra` adds others
# as rows named `jax_<name>`. benchmarks/NOTES.md has what each one showed.
JAX_FORMULATIONS = {
    "tuned": Formulation(
        "vmap; custom-VJP LayerNorm; remat policy dots_saveable; XLA:CPU without YNNPACK fusions; "
        "the models sharded over one CPU device per core", ln="custom_vjp", remat="dots_saveable",
        compiler_options=NO_YNN, shard=True),
    "tuned_1dev": Formulation(
        "tuned, on one device (XLA's intra-op threads only)", ln="custom_vjp",
        remat="dots_saveable", compiler_options=NO_YNN),
    "tuned_pretransposed": Formulation(
        "tuned; frozen kernels also stored transposed (2x frozen memory)", ln="custom_vjp",
        remat="dots_saveable", compiler_options=NO_YNN, pretransposed=True, shard=True),
    "vmap": Formulation("jax.vmap of the plain transformer over the stacked frozen params"),
    "ln_custom_vjp": Formulation("vmap; custom-VJP LayerNorm", ln="custom_vjp"),
    "no_ynn": Formulation("vmap; XLA:CPU without YNNPACK fusions (Eigen dots)",
                          compiler_options=NO_YNN),
    "ln_no_ynn": Formulation("vmap; custom-VJP LayerNorm; without YNNPACK fusions", ln="custom_vjp",
                             compiler_options=NO_YNN),
    "tuned_ynn": Formulation("tuned, but with XLA:CPU's default YNNPACK fusions", ln="custom_vjp",
                             remat="dots_saveable"),
    "ynn_dot_only": Formulation(
        "vmap; YNNPACK for individual dots only (nothing fused into them)",
        compiler_options=(("xla_cpu_experimental_ynn_fusion_type",
                           "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"),)),
    "heads_major": Formulation("vmap; attention einsums in a heads-major layout", layout="heads"),
    "lax_map": Formulation("jax.lax.map over models: a loop of unbatched matmuls",
                           mapper="lax_map"),
    "flax": Formulation("vmap of flax.linen modules (MultiHeadDotProductAttention, LayerNorm)",
                        flax=True),
}
DEFAULT_FORMULATION = "tuned"
# The straightforward step; tuned on one device; tuned at 2x frozen memory.
DEFAULT_EXTRA = ("vmap", "tuned_1dev", "tuned_pretransposed")

PRESETS: dict[str, list[Sizes]] = {
    # batch = probes per frozen model, models = K. frozen_layers = layers: all frozen.
    "quick": [Sizes(batch=2, seq=8, d_model=32, heads=2, layers=2, frozen_layers=2, d_noise=16,
                    d_hidden=32, models=4)],
    "cpu": [
        Sizes(batch=4, seq=16, d_model=64, heads=4, layers=2, frozen_layers=2, d_noise=64,
              d_hidden=128, models=32),
        Sizes(batch=4, seq=32, d_model=128, heads=4, layers=4, frozen_layers=4, d_noise=64,
              d_hidden=128, models=32),
    ],
    "gpu": [
        Sizes(batch=8, seq=64, d_model=256, heads=8, layers=4, frozen_layers=4, d_noise=128,
              d_hidden=256, models=256),
        Sizes(batch=8, seq=128, d_model=512, heads=8, layers=6, frozen_layers=6, d_noise=128,
              d_hidden=512, models=64),
    ],
}
TIMING = {"quick": (1, 2), "cpu": (4, 4), "gpu": (5, 10)}  # (rounds, steps per round)


def _flax_transformer(s: Sizes):
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm(epsilon=1e-5, dtype=x.dtype)(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=s.heads, dtype=x.dtype)(h)
            h = nn.LayerNorm(epsilon=1e-5, dtype=x.dtype)(x)
            h = nn.Dense(s.mlp_ratio * s.d_model, dtype=x.dtype)(h)
            return x + nn.Dense(s.d_model, dtype=x.dtype)(nn.gelu(h))

    class Transformer(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(s.layers):
                x = Block(name=f"block_{i}")(x)
            return x

    return Transformer()


@dataclasses.dataclass
class JaxVariant:
    name: str
    step: Any  # compiled (state, frozen, z, y) -> (state, loss); state donated
    state: Any
    frozen: Any
    z: Any
    y: Any
    loss0: float = float("nan")
    hlo: str = ""

    def __call__(self):
        self.state, loss = self.step(self.state, self.frozen, self.z, self.y)
        return measure.block(loss)


def make_jax_variant(name: str, form: Formulation, probe, zoo, s: Sizes, dtype, z, y,
                     extra_options=None) -> tuple[JaxVariant, dict]:
    """The jitted population step of one formulation, compiled; and its compiled stats."""
    if form.flax:
        module = _flax_transformer(s)
        keys = jax.random.split(jax.random.PRNGKey(1), s.models)
        x0 = jnp.zeros((s.batch, s.seq, s.d_model), dtype)
        zoo = jax.vmap(lambda k: module.init(k, x0)["params"])(keys)

        def one(p, x):
            return module.apply({"params": p}, x)
    else:
        def one(p, x):
            return transformer(p, x, s.heads, form.layout, form.ln)

    zoo = jax.tree.map(lambda a: a.astype(dtype), zoo)
    if form.pretransposed:
        zoo = with_transposed_kernels(zoo)
    # The most devices (up to all) that split the K models evenly; None: one device.
    mesh = jf.models_mesh(s.models) if form.shard else None
    mesh = mesh if mesh is not None and mesh.size > 1 else None
    if form.mapper == "vmap":
        # The library call: stop_gradient, remat around each model, vmap, the "models" axis.
        frozen_part = jf.vmap_models(one, remat=form.remat or None, mesh=mesh)
    else:
        def frozen_part(zoo, x):
            return jax.lax.map(lambda a: one(*a), (zoo, x))

    def loss(params, z, y):
        x = pre(params["probe"]["pre"], z, s)  # (K, P, T, d)
        h = frozen_part(params["zoo"], x.astype(dtype)).astype(jnp.float32)
        return bce(post(params["probe"]["post"], h), y)

    adam = optax.adam(LR)
    params = {"probe": jax.tree.map(jnp.array, probe), "zoo": zoo}
    if mesh is not None:
        # Each device runs K / devices of the frozen models (and their probes' inputs);
        # the probe is replicated, and jit all-reduces only its gradients.
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        params = {"probe": jax.device_put(params["probe"], replicated),
                  "zoo": jf.shard_stacked(zoo, mesh)}
        z, y = jf.shard_stacked((z, y), mesh)
    trainable, frozen = jf.split(params, frozen=jf.paths("zoo/**"))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, frozen, z, y):
        t, opt = state
        value, g = jax.value_and_grad(lambda t: loss(jf.merge(t, frozen), z, y))(t)
        updates, opt = adam.update(g, opt, t)
        return (optax.apply_updates(t, updates), opt), value

    state = (trainable, adam.init(trainable))
    # xla_cpu_* options are for XLA:CPU only.
    options = dict(form.compiler_options) if jax.default_backend() == "cpu" else {}
    options.update(extra_options or {})
    return _compiled_variant(name, step, (state, frozen, z, y),
                             mesh.size if mesh is not None else 1, options)


def _compiled_variant(name: str, step, args, devices: int, options=None
                      ) -> tuple[JaxVariant, dict]:
    """``step(state, frozen, z, y)`` compiled (with ``options`` on top of its jit's own),
    its compiled stats, and a variant that has taken its first step."""
    compiled = step.lower(*args).compile(compiler_options=options or None)
    stats = measure.compiled_stats(compiled, devices=devices)
    # XLA's FLOPs of the step (per device, so times devices); compiler options change how XLA:CPU
    # fuses and calls the ops, not the ops it counts.
    stats["gflops"] = devices * jf.compiled_flops(step, *args) / 1e9
    stats["opt_state_bytes"] = measure.tree_bytes(args[0][1])
    stats["frozen_bytes"] = measure.tree_bytes(args[1])  # the stacked zoo the step reads
    v = JaxVariant(name, compiled, *args, hlo=compiled.as_text())
    v.loss0 = float(v())  # the first step's loss: at the initial parameters
    return v, stats


def library_population_step(s: Sizes, probe, zoo, z, y, dtype=jnp.float32, transposed=False):
    """The README's population path, with the library call only (row ``jf_vmap_models``).

    ``transposed``: also the README's second recipe, every frozen kernel stored transposed
    beside it (row ``jf_vmap_models_t``, twice the frozen memory).
    ``jax_num_cpu_devices`` (one CPU device per core) is set by ``main`` before JAX starts.
    Returns the jitted step ``(state, zoo, z, y) -> (state, loss)`` and its arguments.
    """
    mesh = jf.models_mesh(s.models)  # the most local devices that split the K models evenly
    zoo = jax.tree.map(lambda a: a.astype(dtype), zoo)
    zoo = with_transposed_kernels(zoo) if transposed else zoo
    zoo, z, y = jf.shard_stacked((zoo, z, y), mesh)
    probe = jax.device_put(probe, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    # LayerNorm with its backward as one custom_vjp: the README's recipe.
    frozen_forward = jf.vmap_models(
        lambda p, x: transformer(p, x, s.heads, ln="custom_vjp"), mesh=mesh)
    adam = optax.adam(LR)

    def loss(probe, zoo, z, y):
        x = pre(probe["pre"], z, s)  # (K, P, T, d): each model's probe inputs
        h = frozen_forward(zoo, x.astype(dtype)).astype(jnp.float32)
        return bce(post(probe["post"], h), y)

    @functools.partial(jax.jit, donate_argnums=0,
                       compiler_options=jf.population_compiler_options(mesh))
    def step(state, zoo, z, y):
        probe, opt = state
        value, grads = jax.value_and_grad(loss)(probe, zoo, z, y)
        updates, opt = adam.update(grads, opt, probe)
        return (optax.apply_updates(probe, updates), opt), value

    return step, ((probe, adam.init(probe)), zoo, z, y), mesh.shape["models"]


def make_library_variant(name: str, s: Sizes, probe, zoo, z, y, dtype) -> tuple[JaxVariant, dict]:
    # The step donates its state: a copy, so the other rows still read the first probe.
    probe = jax.tree.map(jnp.array, probe)
    transposed = name.endswith("_t")
    return _compiled_variant(name, *library_population_step(s, probe, zoo, z, y, dtype,
                                                            transposed))


def set_threads(n: int | None) -> int:
    """Pins this process to ``n`` cores (before XLA starts); returns the cores in use."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if n and cores and n < len(cores):
        os.sched_setaffinity(0, cores[:n])
        return n
    return len(cores) or os.cpu_count() or 1


def run_config(s: Sizes, *, dtype, variants, jax_extra, rounds, per_round, time_it, threads,
               torch_compile=False, profile=False, seed=0) -> list[dict]:
    key = jax.random.PRNGKey(seed)
    kp, kz, kd = jax.random.split(key, 3)
    probe = init_probe(kp, s)
    zoo = jax.vmap(lambda k: init_transformer(k, s))(jax.random.split(kz, s.models))
    z, y = batch(kd, s, lead=(s.models,))
    ideal = ideal_matmul_flops(s, frozen_models=s.models) / 1e9
    base = {**dataclasses.asdict(s), "probes": s.batch, "dtype": jnp.dtype(dtype).name,
            "ideal_gflops": ideal, "threads": threads}

    rows: dict[str, dict] = {}
    steps: dict[str, Any] = {}
    jax_rows = [("jf_vmap", DEFAULT_FORMULATION)] if "jf_vmap" in variants else []
    jax_rows += [(f"jax_{f}", f) for f in jax_extra if f != DEFAULT_FORMULATION or not jax_rows]
    for name, fname in jax_rows:
        form = JAX_FORMULATIONS[fname]
        if form.flax:
            try:
                import flax  # noqa: F401
            except ImportError:
                print(f"  skipping {name}: flax is not installed")
                continue
        v, stats = make_jax_variant(name, form, probe, zoo, s, dtype, z, y)
        rows[name] = {"variant": name, "framework": "jax", "formulation": fname, **base, **stats,
                      "loss0": v.loss0}
        steps[name] = v
        if profile and jax.default_backend() == "cpu":
            pv, _ = make_jax_variant(name, form, probe, zoo, s, dtype, z, y,
                                     measure.PROFILE_OPTIONS)
            print(f"{name}: slowest XLA:CPU ops, median over steps (dots may finish "
                  "asynchronously, so their times are lower bounds; see benchmarks/NOTES.md)")
            print(measure.profile_ops(pv.hlo, pv) + "\n")

    for name in ("jf_vmap_models", "jf_vmap_models_t"):
        if name in variants:
            v, stats = make_library_variant(name, s, probe, zoo, z, y, dtype)
            rows[name] = {"variant": name, "framework": "jax", "formulation": "library",
                          **base, **stats, "loss0": v.loss0}
            steps[name] = v
    torch_variants = [v for v in variants if v.startswith("torch")]
    if torch_compile and "torch_vmap_compile" not in torch_variants:
        torch_variants.append("torch_vmap_compile")
    if torch_variants:
        try:
            import torch
        except ImportError:
            torch = None
            print("  skipping the torch rows: torch is not installed (pip install -e '.[bench]')")
        if torch is not None:
            steps.update(_torch_rows(torch, torch_variants, rows, base, probe, zoo, s, z, y, dtype))

    if time_it:
        times = measure.time_interleaved(steps, rounds=rounds, per_round=per_round)
        for name, ms in times.items():
            rows[name].update(measure.summarize_times(ms))
            rows[name]["cores_busy"] = rows[name]["cpu_ms_median"] / rows[name]["step_ms_median"]
            rows[name]["models_probes_per_s"] = (
                s.models * s.batch / (rows[name]["step_ms_median"] / 1e3))
        for ref in ("torch_vmap", "torch_loop"):
            if ref in rows:
                for r in rows.values():
                    r[f"speed_vs_{ref}"] = rows[ref]["step_ms_median"] / r["step_ms_median"]
    for r in rows.values():
        if r.get("matmul_gflops") is not None:
            r["matmul_vs_ideal"] = r["matmul_gflops"] / ideal
    return list(rows.values())


def _torch_rows(torch, names, rows, base, probe, zoo, s, z, y, dtype) -> dict[str, Any]:
    from benchmarks.torch_models import Population

    gpu = torch.cuda.is_available() and jax.devices()[0].platform == "gpu"
    tdtype = torch.bfloat16 if dtype == jnp.bfloat16 else None
    pop = Population(probe, zoo, s, np.asarray(z), np.asarray(y), dtype=tdtype,
                     device="cuda" if gpu else "cpu")
    fns = {"torch_loop": pop.loss_loop, "torch_vmap": pop.loss_vmap}
    if "torch_vmap_compile" in names:
        compiled = torch.compile(torch.func.vmap(pop._one))
        fns["torch_vmap_compile"] = functools.partial(pop.loss_vmap, compiled)
    info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_device": "cuda: " + torch.cuda.get_device_name() if gpu else "cpu",
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}
    for name in names:  # before any update: the same parameters as JAX's first step
        with torch.no_grad():
            loss0 = float(fns[name]())
        rows[name] = {"variant": name, "framework": "torch", **base, "gflops": None,
                      "matmul_gflops": pop.matmul_flops(fns[name]) / 1e9, "temp_bytes": None,
                      "frozen_bytes": pop.frozen_bytes(), "loss0": loss0, **info}
    steps = {}
    for name in names:
        fn = fns[name]

        def run(fn=fn):
            loss = pop.train_step(fn)
            if gpu:
                torch.cuda.synchronize()
            return loss

        run()  # creates Adam's state
        rows[name]["opt_state_bytes"] = pop.opt_state_bytes()
        steps[name] = run
    return steps


COLUMNS = [
    ("variant", "variant", ""),
    ("matmul_gflops", "matmul GFLOPs", ".4f"),
    ("ideal_gflops", "ideal", ".4f"),
    ("gflops", "GFLOPs (XLA)", ".4f"),
    ("temp_bytes", "temp bytes", ",d"),
    ("frozen_bytes", "frozen bytes", ",d"),
    ("opt_state_bytes", "opt state bytes", ",d"),
    ("loss0", "loss0", ".6f"),
    ("step_ms_median", "median ms", ".2f"),
    ("step_ms_min", "min ms", ".2f"),
    ("cores_busy", "cores busy", ".2f"),
    ("models_probes_per_s", "models*probes/s", ",.0f"),
    ("speed_vs_torch_vmap", "x torch_vmap", ".2f"),
    ("speed_vs_torch_loop", "x torch_loop", ".2f"),
]


def main(argv=None) -> list[dict]:
    p = measure.common_args(__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--jax-extra", default=None,
                   help="extra JAX formulations as rows jax_<name>: "
                        f"{', '.join(JAX_FORMULATIONS)}, or "
                        f"all (default: {','.join(DEFAULT_EXTRA)}; none with --quick)")
    p.add_argument("--profile", action="store_true",
                   help="print each JAX row's slowest XLA:CPU ops (jax.profiler trace)")
    p.add_argument("--threads", type=int, help="cores for both frameworks (default: all available)")
    p.add_argument("--torch-compile", action="store_true", help="add torch_vmap_compile")
    p.add_argument("--devices", type=int,
                   help="JAX CPU devices to shard the models over (default: one per core in use)")
    args = p.parse_args(argv)
    threads = set_threads(args.threads)  # before XLA and torch create their thread pools
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # Before JAX starts its CPU backend. Only the CPU backend reads it.
        jax.config.update("jax_num_cpu_devices", args.devices or threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    preset, dtype, rounds, per_round = measure.run_settings(args, TIMING)
    peak = measure.peak_tflops(args.peak_tflops)
    if args.jax_extra is None:
        args.jax_extra = "" if args.quick else ",".join(DEFAULT_EXTRA)
    extra = (list(JAX_FORMULATIONS) if args.jax_extra == "all"
             else [f for f in args.jax_extra.split(",") if f])
    for f in extra:
        if f not in JAX_FORMULATIONS:
            p.error(f"unknown JAX formulation {f!r}; known: {', '.join(JAX_FORMULATIONS)}")
    info = measure.machine()
    print(f"population [{preset}] on {info['device']} ({info['cpu']}), {threads} core(s) for each "
          f"framework; {jax.device_count()} JAX device(s); jax {info['jax']}; "
          f"frozen models in {jnp.dtype(dtype).name}; "
          f"XLA_FLAGS={info['xla_flags']!r}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')!r}")
    print(f"timing: {rounds} interleaved rounds x {per_round} steps per variant, "
          "after 2 warm-up steps\n")
    all_rows = []
    configs = PRESETS[preset]
    if args.config:
        configs = [configs[int(i)] for i in args.config.split(",")]
    for s in configs:
        rows = run_config(s, dtype=dtype, variants=args.variants.split(","), jax_extra=extra,
                          rounds=rounds, per_round=per_round, time_it=not args.no_time,
                          threads=threads, torch_compile=args.torch_compile, profile=args.profile)
        measure.add_mfu(rows, peak)
        for r in rows:
            r.update({f"machine_{k}": v for k, v in info.items()})
        print(f"{s.short()} P={s.batch} probes per model: {s.models * s.batch} model*probe "
              f"passes per step; ideal {rows[0]['ideal_gflops']:.4f} GFLOPs")
        print(measure.format_table(rows, COLUMNS + ([("mfu", "MFU", ".1%")] if peak else [])))
        print()
        all_rows += rows
    if args.json:
        measure.write_json(args.json, all_rows)
        print(f"wrote {len(all_rows)} rows to {args.json}")
    return all_rows


if __name__ == "__main__":
    main(sys.argv[1:])
