"""Entry points: a user mistake is one `error:` line on stderr and exit status 2 with no traceback, and config
mistakes are found before torch, transformers or Ray are imported (so they take a second, not a minute)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = {"torch", "transformers", "ray"}


def run(module: str, *args: str, **env: str):
    """Run `python -X importtime -m module args`; returns (result, modules imported, stderr lines that are not
    import timings)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", module, *args], cwd=REPO,
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    lines = result.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    return result, imported, [line for line in lines if not line.startswith("import time:")]


def assert_user_error(result, messages, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len(messages) == 1 and messages[0].startswith("error: "), messages
    for fragment in fragments:
        assert fragment in messages[0]


@pytest.mark.parametrize("module, args, fragments", [
    ("RL.train_vlpo", ["worker.rollout.nn=1"], ["worker.rollout.nn: unknown key", "worker.rollout.n"]),
    ("RL.train_vlpo", ["worker.rollout.temperature=nan"], ["worker.rollout.temperature: must be a finite number"]),
    ("RL.train_vlpo", ["config=/no/such/run.yaml"], ["config: no such file /no/such/run.yaml"]),
    ("RL.train_sft", ["data.train_files=t.jsonl", "sft.stepz=3"], ["sft.stepz: unknown key", "sft.steps"]),
    ("RL.config", ["--print", "trainer.logger=console"], ["trainer.logger: wrong type"]),
    ("RL.config", ["--prnt"], ["unknown option '--prnt'"]),
    ("tools.judge", ["--api-name", "x", "--input", "/no/rows.jsonl", "--output", "o.jsonl"], ["/no/rows.jsonl"]),
    ("tools.judge", ["--api-name", "x", "--input", "i", "--output", "o", "--bogus"], ["--bogus"]),
])
def test_user_mistake_is_one_error_line_before_heavy_imports(module, args, fragments):
    result, imported, messages = run(module, *args)
    assert_user_error(result, messages, *fragments)
    assert not imported & HEAVY, f"{module} imported {sorted(imported & HEAVY)} before refusing the command"


def test_config_errors_are_masked_and_on_one_line():
    secret = "sk-entry-point-SECRET-0123456789"
    result, _, messages = run("RL.train_vlpo", f"worker.rollout.n={secret}", "worker.rollout.top_p=2")
    assert_user_error(result, messages, "worker.rollout.n")
    assert secret not in result.stderr
    result, _, messages = run("RL.train_vlpo", "worker.rollout.top_p=2", "worker.rollout.n=0")
    assert_user_error(result, messages, "worker.rollout.top_p", "worker.rollout.n")  # two problems, one line


@pytest.mark.parametrize("args, fragment", [(["/no/such/step_000010"], "is not a folder"),
                                            (["/tmp", "--dtype"], "--dtype")])
def test_merge_model_user_mistakes(args, fragment):
    result, _, messages = run("tools.merge_model", *args)
    assert_user_error(result, messages, fragment)


def test_run_cli_reports_bugs_as_failures_and_passes_exit_messages_on(capsys, monkeypatch, tmp_path):
    from common.cli import run_cli

    monkeypatch.setattr(sys, "argv", ["prog", "a"])
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the traceback of a run without a run folder goes
    with pytest.raises(SystemExit) as stop:  # a bug is a failed run (exit 1); its traceback goes to a log file
        run_cli(lambda argv: 1 / 0)
    assert stop.value.code == 1 and "ZeroDivisionError" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda argv: sys.exit("error: bad row\n  in line 3"))
    assert stop.value.code == 2 and capsys.readouterr().err == "error: bad row in line 3\n"
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda argv: 3 if argv == ["a"] else 0)  # a status main returns is passed on
    assert stop.value.code == 3


def test_import_monet_models_is_light_and_the_processor_module_registers():
    code = ("import sys, monet_models\n"
            "assert not {'torch', 'transformers'} & set(sys.modules), 'monet_models imported torch/transformers'\n"
            "import monet_models.processor\n"
            "from transformers import Qwen2_5_VLConfig\n"
            "from transformers.models.auto.processing_auto import PROCESSOR_MAPPING\n"
            "print(PROCESSOR_MAPPING[Qwen2_5_VLConfig].__name__)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ImageOnlyQwen2_5_VLProcessor"


def test_monet_without_latent_noise_warns_once_naming_the_key(tmp_path, caplog):
    from RL.config import load_config
    from RL.train_vlpo import prepare_run

    base = [f"trainer.save_dir={tmp_path}", "worker.actor.model.model_path=/m", "data.train_files=/d.jsonl",
            "worker.rule_based_judge.api_name="]
    with caplog.at_level("WARNING"):
        prepare_run(load_config(base + ["worker.rollout.monet.latent_noise_std=0"], require_inputs=False))
    assert [r.message.count("worker.rollout.monet.latent_noise_std") for r in caplog.records] == [1]
    caplog.clear()
    with caplog.at_level("WARNING"):
        prepare_run(load_config(base + ["worker.rollout.monet.latent_noise_std=0.1"], require_inputs=False))
    assert not caplog.records
