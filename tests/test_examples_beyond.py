"""examples/gradual_unfreezing.py checks its own claims; run it as a user would."""

import os
import pathlib
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "gradual_unfreezing.py"


def test_gradual_unfreezing_example_claims_hold():
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    out = subprocess.run([sys.executable, str(EXAMPLE), "--quick"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all claims checked" in out.stdout
