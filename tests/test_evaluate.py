"""The evaluation harness end to end on a real local Ray cluster with two evaluation workers (data parallel), on the
tiny model after a short latent SFT: accuracy against a direct computation, resumption, ablations, DMLR and RMM."""
import json
from pathlib import Path

import pytest
import ray
import torch

from RL.config import ConfigError, load_config
from RL.evaluate.__main__ import check
from RL.evaluate.runner import evaluate, start_workers
from RL.evaluate.stats import paired_difference, wilson
from rewards.accuracy import rule_accuracy
from RL.trainer.ray_setup import init_ray
from tests.test_judge_api import env

REPO = Path(__file__).resolve().parent.parent
K = 3  # the SFT fixture's latent block size


def eval_config(model, data_files, save_dir, name, **extra):
    values = {"worker.actor.model.model_path": model, "data.val_files": data_files, "eval.save_dir": save_dir,
              "eval.name": name, "worker.rollout.name": "native", "worker.rollout.dtype": "fp32",
              "worker.rollout.latent_size": K, "trainer.n_gpus_per_node": 2, "eval.max_new_tokens": 16,
              "eval.batch_size": 4, "eval.category_column": "kind"}
    values.update(extra)
    config = load_config([f"config={REPO / 'examples/config/vlpo_tiny_cpu.yaml'}"] +
                         [f"{key}={value}" for key, value in values.items()], require_inputs=False)
    check(config)
    return config


def read(folder, name):
    return [json.loads(line) for line in open(Path(folder) / f"{name}.jsonl")]


# The tests on `cluster` are slow: they evaluate on a Ray cluster a model made by a latent SFT on Ray.
@pytest.fixture(scope="module")
def cluster(vlpo_sft_model):
    """One Ray cluster and one pair of evaluation workers for the module (the model and engine settings match)."""
    model, data, root = vlpo_sft_model
    init_ray()
    group = start_workers(eval_config(model, f"{data}/val.jsonl", root / "eval", "setup"))
    yield group, model, data, root / "eval"
    group.shutdown()
    ray.shutdown()


@pytest.mark.slow
def test_accuracy_equals_a_direct_computation(cluster):
    """Eight labelled toy items over two workers in batches of four: the harness's numbers equal the engine run
    in-process on the same items and graded by hand with the rule grader."""
    from monet_models.transformers import load_latent_model
    from RL.data import RLPromptDataset
    from RL.evaluate.item_prompts import item_prompt
    from RL.trainer.rollout_batch import render_response
    from workers.rollout import NativeRolloutEngine, SamplingParams

    group, model_dir, data, save_dir = cluster
    config = eval_config(model_dir, f"{data}/val.jsonl", save_dir, "accuracy")
    summary = evaluate(config, group)
    rows = read(save_dir / "accuracy", "direct")
    assert [row["index"] for row in rows] == list(range(8))

    model, processor = load_latent_model(model_dir, dtype="fp32")
    engine = NativeRolloutEngine(model.eval(), processor.tokenizer)
    dataset = RLPromptDataset(f"{data}/val.jsonl", processor, config.data, name="check")
    items = [dataset[i] for i in range(len(dataset))]
    samples = engine.generate([item_prompt(item) for item in items],
                              SamplingParams(strategy="monet", temperature=0, max_new_tokens=16, latent_size=K))
    responses = [render_response(processor.tokenizer, s.response_ids, engine.tokens) for s in samples]
    assert [row["response"] for row in rows] == responses
    assert any(f"<latent×{K}>" in r for r in responses), "the SFT model opens latent blocks"
    correct = [rule_accuracy(r, item["ground_truth"]) for r, item in zip(responses, items)]
    direct = summary["passes"]["direct"]
    assert (direct["correct"], direct["judged"], direct["accuracy"]) == (sum(correct), 8, sum(correct) / 8)
    assert direct["ci95"] == pytest.approx(list(wilson(sum(correct), 8)))
    for kind, stats in direct["per_category"].items():
        chosen = [c for c, item in zip(correct, items) if item["extra"]["kind"] == kind]
        assert (stats["items"], stats["correct"]) == (len(chosen), sum(chosen))
    assert direct["tokens_per_answer"] == pytest.approx(sum(len(s.response_ids) for s in samples) / 8)
    assert direct["blocks_per_answer"] == pytest.approx(sum(len(s.block_positions) for s in samples) / 8)
    assert "| direct | 8 |" in (save_dir / "accuracy" / "summary.md").read_text()
    results = json.loads((save_dir / "accuracy" / "direct.results.json").read_text())
    assert results["correct"] == sum(correct) and [e["is_correct"] for e in results["entries"]] == correct


@pytest.mark.slow
def test_a_resumed_evaluation_equals_an_uninterrupted_one(cluster):
    group, model, data, save_dir = cluster
    config = eval_config(model, f"{data}/val.jsonl", save_dir, "resume", **{"eval.ablate": "noise"})
    evaluate(config, group)
    folder = save_dir / "resume"
    whole = {name: read(folder, name) for name in ("direct", "ablate_noise")}
    for name, rows in whole.items():  # a crash after the first batch, in the middle of writing the second
        lines = (folder / f"{name}.jsonl").read_text().splitlines(keepends=True)
        (folder / f"{name}.jsonl").write_text("".join(lines[:4]) + lines[4][:25])
    evaluate(config, group)
    timing = ("latency_s", "seconds")
    for name, rows in whole.items():
        resumed = read(folder, name)
        assert resumed[:4] == rows[:4], "finished items are kept as they were, not redone"
        assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == \
            [{k: v for k, v in r.items() if k not in timing} for r in rows]
    with pytest.raises(ConfigError, match="max_new_tokens"):
        evaluate(eval_config(model, f"{data}/val.jsonl", save_dir, "resume", **{"eval.max_new_tokens": 12}), group)


@pytest.mark.slow
def test_ablations_are_reported_against_direct(cluster):
    group, model, data, save_dir = cluster
    config = eval_config(model, f"{data}/val.jsonl", save_dir, "ablations",
                         **{"eval.ablate": "zero,shuffle,noise,text", "data.val_max_samples": 6})
    passes = evaluate(config, group)["passes"]
    folder = save_dir / "ablations"
    direct = read(folder, "direct")
    assert list(passes) == ["direct", "ablate_zero", "ablate_shuffle", "ablate_noise", "ablate_text"]
    for name in list(passes)[1:]:
        rows = read(folder, name)
        base, other = [int(r["verdict"] > 0) for r in direct], [int(r["verdict"] > 0) for r in rows]
        expected = paired_difference(base, other)
        assert passes[name]["delta_vs_direct"]["delta"] == pytest.approx(expected[0])
        assert passes[name]["delta_vs_direct"]["ci95"] == pytest.approx(list(expected[1:]))
    shuffled = read(folder, "ablate_shuffle")
    with_latents = [r["index"] for r in direct if r["latents"]]
    assert len(with_latents) >= 2 and all(r["donor"] != r["index"] for r in shuffled if r["index"] in with_latents)
    donor = torch.load(folder / "latents" / "direct" / f"{shuffled[0]['donor']}.pt", weights_only=True)
    assert donor.shape[-1] == 128 and donor.shape[0] == direct[shuffled[0]["donor"]]["latents"]
    assert all(r["blocks"] == 0 and "<latent" not in r["response"] for r in read(folder, "ablate_text"))
    assert "ablate_shuffle" in (folder / "summary.md").read_text()


@pytest.mark.slow
def test_dmlr_pass(cluster):
    group, model, data, save_dir = cluster
    config = eval_config(model, f"{data}/val.jsonl", save_dir, "dmlr",
                         **{"eval.method": "dmlr", "data.val_max_samples": 3, "eval.dmlr_tokens": K,
                            "eval.dmlr_steps": 3, "eval.dmlr_initial_patches": 1, "eval.dmlr_patch_increment": 1})
    stats = evaluate(config, group)["passes"]["dmlr"]
    rows = read(save_dir / "dmlr", "dmlr")
    for row in rows:
        assert row["response"].startswith(f"<latent×{K}>") and row["best_reward"] >= row["initial_reward"]
        assert row["evaluations"] >= 1 + 3 * 2 and row["forwards"] > row["evaluations"] + K
    assert stats["cost_per_item"]["forwards"] == pytest.approx(sum(r["forwards"] for r in rows) / 3)
    entries = json.loads((save_dir / "dmlr" / "dmlr.results.json").read_text())["entries"]
    assert set(entries[0]) >= {"data_idx", "prompt", "model_output", "answer", "ground_truth", "is_correct",
                               "best_reward", "best_reward_step", "stop_reason"}
    assert entries[0]["best_reward"] == rows[0]["best_reward"]


@pytest.mark.slow
def test_rmm_loop_never_shows_the_gold_answer(cluster, tmp_path):
    from rewards.judges.local_server import LocalJudgeServer

    group, model, data, save_dir = cluster
    rows = [json.loads(line) for line in open(f"{data}/val.jsonl")][:3]
    gold = [f"zebra-{i}-gold" for i in range(3)]  # answers that appear nowhere else
    (tmp_path / "gold.jsonl").write_text("".join(
        json.dumps({**row, "answer": answer, "images": [f"{data}/{row['images'][0]}"]}) + "\n"
        for row, answer in zip(rows, gold)))
    key = "sk-eval-memory-key-0123456789"
    with env(OPENAI_API_KEY=key), LocalJudgeServer(key=key) as server:
        config = eval_config(model, str(tmp_path / "gold.jsonl"), save_dir, "rmm", **{
            "eval.method": "rmm", "eval.rmm_attempts": 2, "eval.rmm_memory_model": "api:memory-model",
            "eval.rmm_api_base_url": server.base_url + "/v1", "eval.rmm_critic_max_new_tokens": 12})
        stats = evaluate(config, group)["passes"]["rmm"]
        assert server.total_hits() == sum(1 for r in read(save_dir / "rmm", "rmm") if len(r["attempts"]) > 1)
    results = read(save_dir / "rmm", "rmm")
    for row, answer in zip(results, gold):
        assert 1 <= len(row["attempts"]) <= 2
        for attempt in row["attempts"]:
            assert answer not in attempt["critic_prompt"] and answer not in attempt.get("memory_request", "")
            assert attempt["verdict"] == 0  # judged against the gold answer all the same
        if len(row["attempts"]) == 2:  # the API's reply became memory, and the retry's prompt shows it
            assert row["attempts"][0]["memory_added"][0]["content"] == "I cannot tell."
            assert "- [INSIGHT] I cannot tell." in row["attempts"][1]["memory"]
    assert set(stats["rmm"]) == {"final_accuracy", "step_correctness", "error_repetition_rate",
                                 "correction_effectiveness"}


def test_entry_point_refuses_mistakes_before_heavy_imports(tmp_path):
    from tests.test_entry_points import HEAVY, assert_user_error, run

    cases = [([str(tmp_path / "none"), "data.val_files=x.jsonl"], ["no such folder"]),
             ([str(tmp_path)], ["data.val_files: required"]),
             ([str(tmp_path), "data.val_files=x", "ablate=zero,blur"], ["eval.ablate"]),
             ([str(tmp_path), "data.val_files=x", "ablate=zero", "worker.rollout.name=vllm"],
              ["worker.rollout.name", "native engine"]),
             ([str(tmp_path), "data.val_files=x", "method=rmm", "eval.rmm_memory_model=api:m"], ["OPENAI_API_KEY"]),
             ([str(tmp_path), "data.val_files=x", "eval.dmlr_stepz=3"], ["eval.dmlr_stepz: unknown key"])]
    for args, fragments in cases:
        result, imported, messages = run("RL.evaluate", *args, OPENAI_API_KEY="")
        assert_user_error(result, messages, *fragments)
        assert not imported & HEAVY, f"imported {sorted(imported & HEAVY)} before refusing {args}"
