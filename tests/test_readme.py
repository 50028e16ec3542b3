"""The README's opening example runs and prints what the README shows."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_opening_example_runs_and_matches_printed_table():
    code = _blocks("python")[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    shown = _blocks("text")[0].strip()
    assert out.getvalue().strip() == shown


def test_flax_snippet_runs():
    code = next(b for b in _blocks("python") if "class Classifier" in b)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    import jax

    import jfreeze as jf

    flat = jax.tree_util.tree_flatten_with_path(scope["optimizer"].opt_state)[0]
    paths = [jf.path_str(p) for p, _ in flat]
    assert any("head" in p for p in paths)
    assert not any("backbone" in p for p in paths)  # optimizer state for the head only


def test_ci_runs_the_two_commands_as_written():
    # Each README command starts with its own install step, names an extra that exists, and
    # stands word for word in .ci/run (which runs it from a fresh virtual environment).
    import tomllib

    root = README.parent
    section = README.read_text().split("## Two commands", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block is not None
    commands = [line.split("  #", 1)[0].strip()
                for line in block.group(1).splitlines() if line.strip()]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    ci_lines = (root / ".ci" / "run").read_text().splitlines()
    assert len(commands) == 2
    for cmd in commands:
        install, _, run = cmd.partition(" && ")
        extra = re.fullmatch(r'pip install -e "\.\[(\w+)\]"', install)
        assert extra and extra.group(1) in project["optional-dependencies"], cmd
        assert run in ("python examples/probe_population.py", "pytest"), cmd
        assert any(line.startswith(cmd) for line in ci_lines), f".ci/run does not run {cmd!r}"


def test_population_snippet_runs_on_a_device_per_core():
    # A fresh process: the snippet asks for one CPU device per core before JAX starts.
    import subprocess
    import sys

    code = next(b for b in _blocks("python") if "jf.vmap_models(apply" in b)
    check = """
import jfreeze as jf
assert jax.device_count() == len(os.sched_getaffinity(0)) >= 1
assert zoo["w1"].sharding.spec == jax.sharding.PartitionSpec("models")
jf.assert_frozen(jf.stack(models), jax.device_get(zoo), frozen=jf.everything)
print("LOSS", float(value))
"""
    out = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.split("LOSS")[1]) < 0.69  # below chance (log 2) after 20 steps


def test_layer_norm_recipe_matches_autodiff():
    import jax
    import jax.numpy as jnp
    import numpy as np

    scope: dict = {}
    exec(compile(next(b for b in _blocks("python") if "def _ln_bwd" in b), "README.md", "exec"),
         scope)

    def plain(x, scale, bias, eps=1e-5):
        xc = x - x.mean(-1, keepdims=True)
        return xc / jnp.sqrt((xc * xc).mean(-1, keepdims=True) + eps) * scale + bias

    rng = np.random.default_rng(0)
    x, s, b, w = (jnp.asarray(rng.normal(size=shape), jnp.float32)
                  for shape in [(3, 5, 8), (8,), (8,), (3, 5, 8)])
    for ln in (scope["layer_norm"], jax.jit(scope["layer_norm"])):
        np.testing.assert_allclose(ln(x, s, b), plain(x, s, b), rtol=1e-5, atol=1e-5)
        got = jax.grad(lambda *a, ln=ln: (ln(*a) * w).sum(), argnums=(0, 1, 2))(x, s, b)
        want = jax.grad(lambda *a: (plain(*a) * w).sum(), argnums=(0, 1, 2))(x, s, b)
        for g, h in zip(got, want, strict=True):
            np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)


def test_frozen_matmul_recipe_matches_autodiff():
    import jax
    import jax.numpy as jnp
    import numpy as np

    scope: dict = {}
    exec(compile(next(b for b in _blocks("python") if "def _fm_bwd" in b), "README.md", "exec"),
         scope)

    def check(mm, x, w, c):
        w_t = jnp.swapaxes(w, -1, -2)
        np.testing.assert_allclose(mm(x, w, w_t), x @ w, rtol=1e-5)
        got = jax.grad(lambda x, w: (mm(x, w, w_t) * c).sum().real, argnums=(0, 1))(x, w)
        want = jax.grad(lambda x, w: ((x @ w) * c).sum().real, argnums=(0, 1))(x, w)
        tol = 2e-2 if jnp.bfloat16 in (x.dtype, w.dtype) else 1e-5
        for g, h in zip(got, want, strict=True):
            assert g.dtype == h.dtype
            np.testing.assert_allclose(np.asarray(g.astype(jnp.complex64)),
                                       np.asarray(h.astype(jnp.complex64)), rtol=tol, atol=tol)
        # The stored copy is not a second weight: no gradient reaches it.
        g_t = jax.grad(lambda w_t: mm(x, w, w_t).real.sum())(w_t)
        assert not np.any(np.asarray(g_t))

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.complex64):
        imag = 1j if dtype is np.complex64 else 0
        x, w, c = (jnp.asarray((rng.normal(size=shape) + imag * rng.normal(size=shape))
                               .astype(dtype)) for shape in [(3, 5, 8), (8, 4), (3, 5, 4)])
        check(scope["frozen_matmul"], x, w, c)
        check(jax.jit(scope["frozen_matmul"]), x, w, c)
        check(scope["frozen_matmul"], x[0, 0], w, c[0, 0])  # one vector: an outer product
    # Mixed precision: each gradient in its own input's dtype, as autodiff gives it.
    x, w, c = (jnp.asarray(rng.normal(size=shape), np.float32)
               for shape in [(3, 5, 8), (8, 4), (3, 5, 4)])
    check(scope["frozen_matmul"], x, w.astype(jnp.bfloat16), c)
    check(jax.jit(scope["frozen_matmul"]), x.astype(jnp.bfloat16), w, c)
