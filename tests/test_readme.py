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


def test_two_commands_each_install_what_they_need():
    # CI runs them as written from fresh virtual environments (.ci/readme_command.py);
    # here: each starts with its own install step, and the extras it names exist.
    import subprocess
    import sys
    import tomllib

    root = README.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for n in (1, 2):
        cmd = subprocess.run([sys.executable, str(root / ".ci" / "readme_command.py"), str(n)],
                             capture_output=True, text=True, check=True).stdout.strip()
        install, _, run = cmd.partition(" && ")
        extra = re.fullmatch(r'pip install -e "\.\[(\w+)\]"', install)
        assert extra and extra.group(1) in extras, cmd
        assert run in ("python examples/probe_population.py", "pytest"), cmd
