"""examples/optax_traps.py checks its own claims; run it as a user would."""

import pathlib
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "optax_traps.py"


def test_optax_traps_example_claims_hold():
    out = subprocess.run([sys.executable, str(EXAMPLE), "--quick"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all claims checked" in out.stdout
