"""Two VLPO steps through the real trainer (`python -m RL.train_vlpo`) on a Thyme-RL shaped parquet, used unchanged: no
`<image>` markers, plain base64 images, Thyme's column names, Monet's format prompt, bad rows that must be skipped."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.thyme_data import write_thyme_parquet

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # a VLPO run on Ray
def test_two_vlpo_steps_on_a_thyme_parquet(tmp_path, tiny_model_dir):
    thyme = write_thyme_parquet(tmp_path / "thyme.parquet", "base64", good=8)
    args = [f"config={REPO / 'examples/config/vlpo_tiny_cpu.yaml'}", f"worker.actor.model.model_path={tiny_model_dir}",
            f"data.train_files={thyme.path}", "data.val_files=''", "data.prompt_key=question",
            "data.answer_key=solution", f"data.image_key={thyme.image_key}",
            f"data.format_prompt={REPO / 'examples/format_prompt/monet_format.jinja'}",
            "data.rollout_batch_size=4", "worker.actor.global_batch_size=4", "worker.rollout.n=2",
            "worker.rollout.latent_size=3", "data.max_response_length=16", "trainer.val_before_train=false",
            "trainer.val_freq=-1", "trainer.logger=[jsonl]", "trainer.max_steps=2", "trainer.save_freq=-1",
            "trainer.n_gpus_per_node=1", f"trainer.save_dir={tmp_path / 'runs'}", "trainer.experiment_name=thyme"]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a local cluster of its own
    done = subprocess.run([sys.executable, "-m", "RL.train_vlpo", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    metrics = [json.loads(line) for line in open(tmp_path / "runs/thyme/metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2]
    assert "8 rows had images but no <image> marker" in log
    for reason in thyme.bad:
        assert f"{reason} 1 (e.g. thyme.parquet#{thyme.bad[reason]}: " in log
    assert max(map(len, log.splitlines())) < 2000  # no base64 image in any log line
