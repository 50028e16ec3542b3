"""The namespace rule of jfreeze/__init__.py and the layering of docs/ARCHITECTURE.md."""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys

import jfreeze as jf

PACKAGE = pathlib.Path(jf.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
PUBLIC = [m for m in MODULES if not m.startswith("_")]
ADAPTERS = {"flax"}  # submodules whose types come from an optional dependency


def test_every_public_name_has_one_path_at_the_top_level():
    owners: dict[str, list[str]] = {}
    for name in PUBLIC:
        if name in ADAPTERS:
            continue
        module = importlib.import_module(f"jfreeze.{name}")
        for symbol in module.__all__:
            owners.setdefault(symbol, []).append(name)
            assert getattr(jf, symbol) is getattr(module, symbol), (name, symbol)
    assert {s: m for s, m in owners.items() if len(m) > 1} == {}
    from_private = {"path_str", "Mask"}  # defined in the private tree layer
    assert sorted(jf.__all__) == sorted(set(owners) | from_private)
    assert jf.__all__ == sorted(jf.__all__)


def test_no_module_is_named_like_a_public_function():
    assert not set(MODULES) & set(jf.__all__)


def test_every_module_has_a_sorted_all():
    for name in MODULES:
        module = importlib.import_module(f"jfreeze.{name}")
        assert module.__all__ == sorted(module.__all__), name
        assert all(hasattr(module, s) for s in module.__all__), name


def test_no_private_name_crosses_a_module_boundary():
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jfreeze"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"


def test_no_function_body_is_long():
    # Code lines, docstrings excluded (the public entry points carry long, tested docs).
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = node.body[0]
                has_doc = isinstance(first, ast.Expr) and isinstance(
                    getattr(first, "value", None), ast.Constant
                ) and isinstance(first.value.value, str)
                start = first.end_lineno + 1 if has_doc else node.lineno
                assert (node.end_lineno or 0) - start + 1 <= 60, (path.name, node.name)


def test_import_jfreeze_loads_no_optional_dependency():
    code = (
        "import sys, jfreeze as jf\n"
        "assert not [m for m in ('flax', 'orbax', 'equinox') if m in sys.modules]\n"
        "jf.flax\n"
        "assert 'flax' in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_version_is_written_once():
    assert jf.__version__
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'attr = "jfreeze.__version__"' in pyproject
