"""The examples beyond freezing (gradual unfreezing, trainable-only checkpoints) check their own
claims; run them as a user would."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["gradual_unfreezing.py", "trainable_checkpoint.py"])
def test_example_claims_hold(name):
    if name == "trainable_checkpoint.py" and importlib.util.find_spec("orbax") is None:
        pytest.skip("needs orbax (pip install 'jfreeze[orbax]')")
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    out = subprocess.run([sys.executable, str(EXAMPLES / name), "--quick"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all claims checked" in out.stdout
