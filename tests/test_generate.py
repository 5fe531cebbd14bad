"""`python -m tools.generate`: one prompt answered with latent reasoning from a checkpoint, as a user runs it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import coloured_image
from tests.test_entry_points import HEAVY, assert_user_error, run

REPO = Path(__file__).resolve().parent.parent


def generate(*args: str):
    return subprocess.run([sys.executable, "-m", "tools.generate", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow  # its model is a latent SFT on Ray (vlpo_sft_model)
def test_generate_prints_latent_blocks_on_the_native_engine(vlpo_sft_model, tmp_path):
    model, _, _ = vlpo_sft_model  # latent SFT with K = 3: its answers open a block first
    coloured_image((30, 60, 220)).save(tmp_path / "blue.png")
    result = generate("--model", model, "--image", str(tmp_path / "blue.png"), "--prompt", "What colour is the shape?",
                      "--latent-size", "3", "--max-new-tokens", "20")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("<latent×3>"), result.stdout
    assert "abs_vis_token" not in result.stdout
    again = generate("--model", model, "--image", str(tmp_path / "blue.png"), "--prompt", "What colour is the shape?",
                     "--latent-size", "3", "--max-new-tokens", "20", "--strategy", "greedy")
    assert again.returncode == 0 and "<latent" not in again.stdout, again.stdout  # text only: blocks disallowed


def test_generate_refuses_mistakes_before_loading_anything(tmp_path):
    result, imported, messages = run("tools.generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert_user_error(result, messages, "--model: no such folder")
    assert not imported & HEAVY
    result, imported, messages = run("tools.generate", "--model", str(tmp_path), "--prompt", "hi", "--image", "no.png")
    assert_user_error(result, messages, "--image: no such file no.png")
    assert not imported & HEAVY
