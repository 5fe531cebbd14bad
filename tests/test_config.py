"""Config: defaults, precedence, refusals that name the key, derived fields, redaction."""
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from RL.config import ConfigError, RootConfig, load_config, to_yaml

REPO = Path(__file__).resolve().parent.parent
REQUIRED = ["data.train_files=train.jsonl", "worker.actor.model.model_path=/models/tiny"]


def load(*overrides: str) -> RootConfig:
    return load_config(REQUIRED + list(overrides))


def refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as error:
        load(*overrides)
    return str(error.value)


def test_defaults_load_with_derived_fields(monkeypatch):
    monkeypatch.delenv("LATENT_SIZE", raising=False)
    cfg = load()
    assert cfg.data.prompt_key == "problem" and cfg.algorithm.adv_estimator == "grpo"
    assert cfg.worker.rollout.latent_size == 10 and cfg.worker.actor.temperature == cfg.worker.rollout.temperature
    assert cfg.worker.rollout.prompt_length == cfg.data.max_prompt_length
    assert cfg.worker.rollout.response_length == cfg.data.max_response_length
    assert cfg.worker.actor.kl_penalty == cfg.algorithm.kl_penalty and cfg.worker.actor.use_kl_loss
    assert cfg.worker.ref.monet_rl_sigma == cfg.worker.actor.monet_rl_sigma
    assert cfg.worker.actor.model.model_path == "/models/tiny"
    assert Path(cfg.data.train_files).is_absolute()
    assert Path(cfg.data.format_prompt).is_file()  # the bundled Jinja file, found from any working directory
    assert cfg.trainer.run_dir == str(Path("runs").resolve() / cfg.trainer.experiment_name)
    assert cfg.world_size == cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node


def test_latent_size_default_follows_environment(monkeypatch):
    monkeypatch.setenv("LATENT_SIZE", "6")
    assert load().worker.rollout.latent_size == 6
    monkeypatch.setenv("LATENT_SIZE", "zero")
    with pytest.raises(ConfigError, match="worker.rollout.latent_size"):
        load()


def test_yaml_then_dotted_override_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("worker:\n  rollout:\n    n: 4\n    temperature: 0.7\ntrainer:\n  experiment_name: from_yaml\n")
    cfg = load(f"config={path}", "worker.rollout.n=6", "trainer.logger=[console,wandb]")
    assert cfg.worker.rollout.n == 6  # the command line beats the YAML
    assert cfg.worker.rollout.temperature == 0.7 and cfg.worker.actor.temperature == 0.7  # YAML beats defaults
    assert cfg.trainer.experiment_name == "from_yaml" and cfg.trainer.logger == ["console", "wandb"]
    assert cfg.trainer.run_dir.endswith("from_yaml")


def test_unknown_key_names_dotted_key_and_suggests():
    message = refused("data.prompt_kye=question")
    assert "data.prompt_kye" in message and "data.prompt_key" in message
    message = refused("worker.rollout.monet_rl_sigma=5")  # right name, wrong section
    assert "worker.rollout.monet_rl_sigma" in message and "worker.actor.monet_rl_sigma" in message


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("algorithm:\n  kl_coeff: 0.1\n")
    message = refused(f"config={path}")
    assert "algorithm.kl_coeff" in message and "algorithm.kl_coef" in message and str(path) in message


def test_wrong_type_names_key():
    assert "worker.rollout.n" in refused("worker.rollout.n=many")
    assert "trainer.logger" in refused("trainer.logger=console")
    assert "data.train_files" in load_error_for_files({"a": 1})


def load_error_for_files(value) -> str:
    from RL.config import finalize

    cfg = load()
    cfg.data.train_files = value
    with pytest.raises(ConfigError) as error:
        finalize(cfg)
    return str(error.value)


def test_derived_keys_cannot_be_set():
    message = refused("worker.actor.kl_penalty=kl")
    assert "worker.actor.kl_penalty" in message and "algorithm.kl_penalty" in message


@pytest.mark.parametrize("overrides, keys", [
    (["data.rollout_batch_size=20"], ["data.rollout_batch_size", "worker.actor.global_batch_size"]),
    (["worker.rollout.n=1"], ["algorithm.adv_estimator", "worker.rollout.n"]),
    (["worker.rollout.n=1", "algorithm.adv_estimator=rloo"], ["algorithm.adv_estimator", "worker.rollout.n"]),
    (["worker.rollout.sampling_strategy=beam"], ["worker.rollout.sampling_strategy"]),
    (["worker.rollout.latent_size=0"], ["worker.rollout.latent_size"]),
    (["worker.actor.monet_rl_sigma=0"], ["worker.actor.monet_rl_sigma"]),
    (["worker.ref.monet_rl_sigma=-1"], ["worker.ref.monet_rl_sigma"]),
    (["worker.actor.clip_ratio_low=-0.1"], ["worker.actor.clip_ratio_low"]),
    (["worker.actor.clip_ratio_dual=0.5"], ["worker.actor.clip_ratio_dual"]),
    (["worker.rollout.online_difficulty_sampling=true", "worker.rollout.monet.select_acc_threshold=0"],
     ["worker.rollout.monet.select_acc_threshold"]),
    (["algorithm.disable_kl=true"], ["algorithm.disable_kl", "algorithm.use_kl_loss"]),
    (["algorithm.kl_penalty=huge"], ["algorithm.kl_penalty"]),
    (["trainer.logger=[console,comet]"], ["trainer.logger"]),
    (["trainer.n_gpus_per_node=3"], ["trainer.n_gpus_per_node"]),
    (["data.min_pixels=100", "data.max_pixels=10"], ["data.min_pixels", "data.max_pixels"]),
    (["worker.rollout.val_override_config={beam: 2}"], ["worker.rollout.val_override_config"]),
    (["trainer.experiment_name=a/b"], ["trainer.experiment_name"]),
])
def test_impossible_combinations_name_their_keys(overrides, keys):
    message = refused(*overrides)
    for key in keys:
        assert key in message


def test_missing_inputs_refused_but_printable():
    with pytest.raises(ConfigError, match="data.train_files"):
        load_config(["worker.actor.model.model_path=/m"])
    with pytest.raises(ConfigError, match="worker.actor.model.model_path"):
        load_config(["data.train_files=x.jsonl"])
    assert load_config([], require_inputs=False).data.train_files == ""


def test_all_errors_reported_at_once():
    message = refused("worker.rollout.latent_size=0", "worker.actor.monet_rl_sigma=0")
    assert "worker.rollout.latent_size" in message and "worker.actor.monet_rl_sigma" in message


def test_redaction_in_written_yaml(tmp_path):
    cfg = load("worker.rule_based_judge.api_kwargs.api_key=sk-very-secret",
               "worker.reward.reward_function_kwargs.hf_token=hf_abc",
               "worker.rule_based_judge.api_kwargs.client_secret=s3",
               "worker.rule_based_judge.api_kwargs.password=pw")
    text = to_yaml(cfg, redact=True, path=tmp_path / "config.yaml")
    assert (tmp_path / "config.yaml").read_text() == text
    for secret in ("sk-very-secret", "hf_abc", "s3", "pw"):
        assert secret not in text.split()
    written = yaml.safe_load(text)
    assert written["worker"]["rule_based_judge"]["api_kwargs"]["api_key"] == "***"
    assert written["worker"]["reward"]["reward_function_kwargs"]["hf_token"] == "***"
    assert written["data"]["prompt_key"] == "problem"  # column names and tokenizer paths are no secrets
    assert written["worker"]["actor"]["model"]["model_path"] == "/models/tiny"
    assert written["worker"]["rule_based_judge"]["api_kwargs"]["max_tokens"] == 1024
    assert "sk-very-secret" in to_yaml(cfg, redact=False)


def test_written_yaml_reloads_and_stated_derived_values_are_checked(tmp_path):
    cfg = load("worker.rollout.n=4", "worker.rollout.temperature=0.7")
    path = tmp_path / "config.yaml"
    to_yaml(cfg, redact=False, path=path)
    again = load_config([f"config={path}"])
    assert to_yaml(again, redact=False) == path.read_text()
    path.write_text(path.read_text().replace("kl_penalty: low_var_kl\n    temperature: 0.7",
                                             "kl_penalty: low_var_kl\n    temperature: 0.5"))
    message = str(pytest.raises(ConfigError, load_config, [f"config={path}"]).value)
    assert "worker.actor.temperature" in message and "worker.rollout.temperature" in message


@pytest.mark.parametrize("name", ["vlpo_monet.yaml", "vlpo_tiny_cpu.yaml"])
def test_example_configs_load(name):
    cfg = load_config([f"config={REPO / 'examples/config' / name}"] + REQUIRED)
    assert cfg.worker.rollout.sampling_strategy == "monet"
    if name == "vlpo_monet.yaml":
        assert cfg.worker.rollout.n == 8 and cfg.worker.rollout.temperature == 0.5
        assert cfg.worker.actor.monet_rl_sigma == 10.0 and cfg.algorithm.kl_coef == 0.01
        assert cfg.data.rollout_batch_size == 64 and cfg.worker.rollout.online_difficulty_sampling


def test_print_cli():
    result = subprocess.run([sys.executable, "-m", "RL.config", "--print", "worker.rollout.n=3"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["worker"]["rollout"]["n"] == 3
    from RL.config import main

    with pytest.raises(ConfigError, match="worker.rollout.nn"):  # in-process callers get the error itself
        main(["--print", "worker.rollout.nn=3"])


def test_online_accum_size_below_the_batch_is_refused():
    from RL.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.online_accum_size, data.rollout_batch_size"):
        load_config(["worker.actor.model.model_path=m", "data.train_files=t.jsonl",
                     "worker.rollout.online_difficulty_sampling=true", "data.rollout_batch_size=64",
                     "data.online_accum_size=16", "worker.actor.global_batch_size=16"])


def float_keys(section: type = RootConfig, prefix: str = "") -> list[str]:
    """Every user-settable float key (Optional[float] included) of the schema."""
    keys = []
    for item in dataclasses.fields(section):
        hint = typing.get_type_hints(section)[item.name]
        if dataclasses.is_dataclass(hint):
            keys += float_keys(hint, f"{prefix}{item.name}.")
        elif hint in (float, typing.Optional[float]) and "derived_from" not in item.metadata:
            keys.append(prefix + item.name)
    return keys


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_key_refuses_non_finite_values(value):
    keys = float_keys()
    assert {"worker.rollout.temperature", "worker.ref.monet_rl_sigma", "worker.actor.optim.lr"} <= set(keys)
    for key in keys:
        assert f"{key}: must be a finite number" in refused(f"{key}={value}"), key


def test_non_finite_values_in_yaml_lists_and_dicts_are_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("worker:\n  actor:\n    optim:\n      betas: [0.9, .inf]\n"
                    "  rollout:\n    val_override_config: {temperature: .nan, n: 1}\n")
    message = refused(f"config={path}")
    assert "worker.actor.optim.betas[1]: must be a finite number" in message
    assert "worker.rollout.val_override_config.temperature: must be a finite number" in message


def test_empty_value_is_empty_string_or_none():
    """`key=` is what bash leaves of `key=''`: "" for plain fields, None for Optional ones."""
    cfg = load("worker.rule_based_judge.api_name=", "data.val_files=", "data.format_prompt=",
               "worker.ref.monet_rl_sigma=", "trainer.max_steps=")
    assert cfg.worker.rule_based_judge.api_name == "" and cfg.data.val_files == "" and cfg.data.format_prompt == ""
    assert cfg.trainer.max_steps is None
    assert cfg.worker.ref.monet_rl_sigma == cfg.worker.actor.monet_rl_sigma  # None: the actor's
    assert "worker.rollout.n" in refused("worker.rollout.n=")  # a number can not be empty


def test_secrets_never_reach_config_yaml_by_value_or_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_API_KEY", "ds-env-SECRET-value-4444")
    monkeypatch.setenv("MY_GATEWAY_TOKEN", "gw-env-SECRET-value-5555")
    cfg = load("worker.rule_based_judge.api_base_url=https://alice:url-SECRET-pw@gw.example/v1",
               "worker.reward.reward_function_kwargs.note=ds-env-SECRET-value-4444",
               "worker.reward.reward_function_kwargs.header=Bearer bearer-SECRET-0123456789",
               "trainer.project_name=gw-env-SECRET-value-5555",
               "worker.rule_based_judge.api_kwargs.extra=AIzaSyA-google-SECRET-0123456789")
    text = to_yaml(cfg, redact=True, path=tmp_path / "config.yaml")
    assert "SECRET" not in (tmp_path / "config.yaml").read_text() and "SECRET" not in text
    written = yaml.safe_load(text)
    assert written["worker"]["rule_based_judge"]["api_base_url"] == "https://***@gw.example/v1"
    assert written["worker"]["reward"]["reward_function_kwargs"]["header"] == "Bearer ***"
    assert written["data"]["prompt_key"] == "problem"
