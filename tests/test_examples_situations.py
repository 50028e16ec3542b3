"""The situation examples (2-5) and the fine-tuning examples check their own claims; run them as a user would."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
NAMES = [
    "frozen_feature_extractor.py",   # situation 2
    "freeze_output_unit.py",         # situation 3
    "freeze_elements.py",            # situation 4
    "reuse_without_update.py",       # situation 5
    "finetune_trainstate.py",        # linen + TrainState transfer learning
    "finetune_nnx.py",               # the NNX variant
]


@pytest.mark.parametrize("name", NAMES)
def test_example_claims_hold(name):
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    out = subprocess.run([sys.executable, str(EXAMPLES / name), "--quick"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all claims checked" in out.stdout
