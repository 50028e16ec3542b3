"""The headline example (examples/probe/): task, cache, step, a --quick run, 8 devices."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import optax

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

from probe import task, transformer, zoo  # noqa: E402
from probe.probe import ProbeConfig, init_probe, make_probe_fns  # noqa: E402


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(EXAMPLES), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def test_task_labels_are_satisfiability():
    tokens, mask, label = task.sample_batch(jax.random.key(0), 512, 12, 2, 12, 4)
    np.testing.assert_array_equal(task.is_satisfiable(tokens, mask), np.asarray(label))
    assert 0.4 < float(np.mean(label)) < 0.6  # balanced classes at every length
    assert (np.asarray(tokens)[~np.asarray(mask)] == 8).all()  # PAD past the length


def test_zoo_cache_round_trip(tmp_path):
    cfg = zoo.ZooConfig(models=3, d_model=8, n_heads=2, d_mlp=8, max_len=8, test_len=(6, 8))
    params = _stacked_models(cfg, 3)
    saved = {"params": jax.tree.map(np.asarray, params), "settings": zoo.zoo_settings(cfg),
             "train_acc": np.ones(3), "test_acc": np.zeros(3), "train_seconds": 1.0}
    path = zoo.cache_path(cfg, tmp_path)
    assert path == tmp_path / f"zoo-{cfg.key()}.npz"
    zoo.save_zoo(path, saved, cfg)
    loaded, cached = zoo.load_or_train(cfg, tmp_path)  # found: nothing is trained
    assert cached
    jax.tree.map(np.testing.assert_array_equal, saved["params"], loaded["params"])
    assert not np.asarray(loaded["params"]["pos"][0]).any()  # "none": an all-zero table
    # The key depends on the config, and is the one the caches under out/zoo were written with.
    assert zoo.ZooConfig(models=4).key() != zoo.ZooConfig(models=3).key()
    assert zoo.ZooConfig(models=24, steps=80, n_layers=1, eval_batch=128).key() == "7518658b02ed"


def _stacked_models(cfg, n):
    return jax.vmap(lambda k, p: transformer.init_model(k, cfg, p))(
        jax.random.split(jax.random.key(0), n), np.arange(n) % 3)


def test_step_differentiates_the_probe_only_and_changes_nothing_else():
    # jf.split is bookkeeping: the cheap step updates the probe bit for bit as the step
    # that also differentiates the frozen models, whose weight gradients it never builds.
    cfg = zoo.ZooConfig(models=4, d_model=8, n_heads=2, d_mlp=8, n_layers=1, max_len=8)
    pc = ProbeConfig(queries=2, query_len=8, min_query_len=4, d_noise=4, hidden=8,
                     batch_models=2)
    rows = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[1:]), _stacked_models(cfg, 4))
    row_labels = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    tx = optax.adamw(1e-2)
    fns = make_probe_fns(cfg, pc, tx)
    probe = init_probe(jax.random.key(1), pc, 2 * cfg.n_vars)
    args = (rows, row_labels, jax.random.key(2))
    full = jax.jit(fns["step_with_frozen_grads"])(probe, tx.init(probe), *args)
    cheap = fns["step"](probe, tx.init(probe), *args)
    for a, b in zip(jax.tree.leaves(cheap[:3]), jax.tree.leaves(full[:3]), strict=True):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
    assert any(np.abs(g).sum() > 0 for g in jax.tree.leaves(full[3]))  # gradients do reach them


def test_folds_share_one_jitted_step_and_predict_in_chunks():
    # Every fold and cross-fitted probe of one config gets the same jitted functions (a
    # fold's seed is not part of them: a compile per argument shape only); predict runs
    # in fixed-size chunks of models, the last one wrapping around.
    from probe import train

    cfg = zoo.ZooConfig(models=5, d_model=8, n_heads=2, d_mlp=8, n_layers=1, max_len=8)
    pc = ProbeConfig(queries=2, query_len=8, min_query_len=4, d_noise=4, hidden=8)
    key, fns, tx = train.probe_fns(cfg, pc)
    assert train.probe_fns(cfg, dataclasses.replace(pc, seed=3)) == (key, fns, tx)
    assert train.probe_fns(cfg, dataclasses.replace(pc, lr=1.0))[1] is not fns
    probe, params = init_probe(jax.random.key(1), pc, 2 * cfg.n_vars), _stacked_models(cfg, 5)
    logits = train.predict_logits(fns["predict"], probe, params, jax.random.key(0))
    assert logits.shape == (5,) and np.isfinite(logits).all()
    one = train.predict_logits(fns["predict"], probe, jax.tree.map(lambda x: x[:1], params),
                               jax.random.key(0))
    np.testing.assert_allclose(one, logits[:1], rtol=1e-6)  # chunk 0 draws the same noise


def test_quick_run(tmp_path):
    # --devices 2 without XLA_FLAGS: the example asks JAX for two CPU devices itself.
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "probe_population.py"), "--quick", "--devices", "2",
         "--cache-dir", str(tmp_path / "zoo"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=_env(), timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "compiled FLOPs per step" in out.stdout
    assert "weight stats" in out.stdout and "majority" in out.stdout
    assert out.stdout.rstrip().endswith("all claims checked")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["devices"] == 2
    # Frozen weight gradients are never computed: asking for them costs more.
    assert summary["flops"]["with_frozen_grads"] > 1.05 * summary["flops"]["probe_step"]
    assert set(summary["scores"]) == {"majority", "weight stats", "probe", "probe + w.stats"}
    # Every method also within each setup group the zoo varies (pooled held-out models).
    within = summary["within_groups"]
    assert set(within) == {"pos_kind", "train_len", "lr", "wd"}
    assert sum(g["n"] for g in within["pos_kind"].values()) == sum(summary["test_models"])
    assert set(within["pos_kind"]["none"]) >= {"n", "majority_rate", "probe", "probe + w.stats"}
    assert "within setup groups" in out.stdout
    assert (tmp_path / "out" / "probe_population.png").stat().st_size > 10_000
    assert list((tmp_path / "zoo").glob("zoo-*.npz"))


SHARDED = textwrap.dedent("""
    import jax, numpy as np
    from probe.probe import ProbeConfig
    from probe.train import train_probe
    from probe.transformer import init_model
    from probe.zoo import ZooConfig
    assert jax.device_count() == 8
    cfg = ZooConfig(models=16, d_model=8, n_heads=2, d_mlp=8, n_layers=1, max_len=8)
    pc = ProbeConfig(queries=4, query_len=8, min_query_len=4, d_noise=4, hidden=8,
                     steps=3, batch_models=8)
    params = jax.vmap(lambda k, p: init_model(k, cfg, p))(
        jax.random.split(jax.random.key(0), 16), np.arange(16) % 3)
    labels = np.arange(16) % 2
    runs = [train_probe(params, labels, cfg, pc, devices=d, verbose=False,
                        flops_check=False) for d in (1, 8)]
    assert not runs[1]["frozen_moved"]
    for a, b in zip(jax.tree.leaves(runs[0]["probe"]), jax.tree.leaves(runs[1]["probe"]),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runs[0]["curves"]["loss"], runs[1]["curves"]["loss"], rtol=1e-5)
    hlo = runs[1]["hlo"]
    assert "all-reduce" in hlo and "all-gather" not in hlo, hlo.count("all-gather")
    print("sharded OK")
""")


def test_eight_devices_match_one():
    out = subprocess.run(
        [sys.executable, "-c", SHARDED], capture_output=True, text=True, timeout=300,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sharded OK" in out.stdout
