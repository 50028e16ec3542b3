"""examples/freeze_scanned_layers.py checks its own claims; run it as a user would."""

import os
import pathlib
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "freeze_scanned_layers.py"


def test_freeze_scanned_layers_claims_hold():
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    out = subprocess.run([sys.executable, str(EXAMPLE), "--quick"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all claims checked" in out.stdout
    # The linen drop-in and the lax.scan one were both trained and measured.
    for name in ("jf.flax.scan", "jf.scan (lax.scan)"):
        assert f"ok      {name}: frozen layers 0-3 keep every bit" in out.stdout, name
