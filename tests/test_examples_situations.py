"""The situation examples (2-5) and the fine-tuning examples check their own claims; run them
as a user would."""

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
    "finetune_equinox.py",           # the Equinox variant, frozen by path (layers/0/*)
    "lora_nnx.py",                   # NNX LoRA: only the adapters train
]


@pytest.mark.parametrize("name", NAMES)
def test_example_claims_hold(name):
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    out = subprocess.run([sys.executable, str(EXAMPLES / name), "--quick"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all claims checked" in out.stdout


def test_a_failed_claim_exits_1_and_is_named(tmp_path):
    """The shared helper every example ends with: exit status 1, the failed claim named."""
    script = tmp_path / "fails.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(EXAMPLES)!r})\n"
        "import claims\n"
        "c = claims.Claims()\n"
        "c.check('holds', True)\n"
        "c.check('two is three', 2 == 3)\n"
        "def moved():\n"
        "    raise AssertionError('moved at x[0]')\n"
        "c.check('raises', moved)\n"
        "sys.exit(c.done())\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "all claims checked" not in out.stdout
    assert "FAILED claims: two is three; raises: moved at x[0]" in out.stderr
