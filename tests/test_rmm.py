"""VITA-RMM's whole pipeline on a real local Ray cluster with the tiny model: memory carried across items (and not
across items with per-item memory, and rebuilt on resume), text-only problems, an external feedback model (a chat
API on loopback, and a local model folder), and simulation -> LoRA SFT of the memory manager -> evaluation with the
base + adapter."""
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import ray

from RL.config import load_config
from RL.evaluate.__main__ import check
from RL.evaluate.memory import FEEDBACK_SYSTEM, MEMORY_SYSTEM
from RL.evaluate.rmm import COMBINED_DATA, typed_rate
from RL.evaluate.runner import evaluate, start_workers
from RL.trainer.ray_setup import init_ray
from tests.test_judge_api import env

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-rmm-scripted-0123456789"
PROBLEMS = [("alpha", "A square has a perimeter of 20 cm. What is its area?", "25"),
            ("beta", "A square has a perimeter of 36 cm. What is its area?", "81"),
            ("gamma", "A square has a perimeter of 8 cm. What is its area?", "4")]


class ScriptedChat:
    """An OpenAI chat-completions endpoint on loopback that plays both RMM roles by the system message: the critic
    always finds the attempt wrong; the manager writes one [FACT] naming the question's label. Records every call."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        chat = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                system, user = (message["content"] for message in body["messages"])
                chat.calls.append((system, user))
                label = re.search(r"\[(alpha|beta|gamma)\]", user)
                reply = {FEEDBACK_SYSTEM: "Step 2 is wrong.\nVERDICT: incorrect",
                         MEMORY_SYSTEM: f"[FACT] fact-{label.group(1) if label else 'none'}: area is (P/4)^2"}[system]
                data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def rmm_config(model, data_file, save_dir, name, **extra):
    values = {"worker.actor.model.model_path": model, "data.val_files": data_file, "eval.save_dir": save_dir,
              "eval.name": name, "eval.method": "rmm", "worker.rollout.name": "native", "worker.rollout.dtype": "fp32",
              "worker.rollout.latent_size": 3, "trainer.n_gpus_per_node": 1, "eval.max_new_tokens": 8,
              "eval.batch_size": 1, "eval.rmm_attempts": 2, "eval.rmm_critic_max_new_tokens": 8,
              "eval.rmm_memory_max_new_tokens": 24}
    values.update(extra)
    config = load_config([f"config={REPO / 'examples/config/vlpo_tiny_cpu.yaml'}"] +
                         [f"{key}={value}" for key, value in values.items()], require_inputs=False)
    check(config)
    return config


def read(folder, name="rmm"):
    return [json.loads(line) for line in open(Path(folder) / f"{name}.jsonl")]


@pytest.fixture(scope="module")
def rmm_cluster(tiny_model_dir, tmp_path_factory):
    """One evaluation worker on the tiny model for the module, and text-only square problems (no image)."""
    root = tmp_path_factory.mktemp("rmm")
    data = root / "squares.jsonl"
    data.write_text("".join(json.dumps({"problem": f"[{label}] {question}", "answer": answer, "images": []}) + "\n"
                            for label, question, answer in PROBLEMS))
    init_ray()
    group = start_workers(rmm_config(tiny_model_dir, str(data), root / "eval", "setup"))
    yield group, tiny_model_dir, str(data), root
    group.shutdown()
    ray.shutdown()


def test_memory_carries_a_fact_across_items_only_with_dataset_scope(rmm_cluster):
    group, model, data, root = rmm_cluster
    prompts = {}
    with env(OPENAI_API_KEY=KEY), ScriptedChat() as chat:
        for scope in ("per_item", "dataset"):
            config = rmm_config(model, data, root / "eval", scope, **{
                "eval.rmm_memory_scope": scope, "eval.rmm_feedback_model": "api:critic-model",
                "eval.rmm_memory_model": "api:memory-model", "eval.rmm_api_base_url": chat.base_url})
            summary = evaluate(config, group)
            rows = read(root / "eval" / scope)
            prompts[scope] = [[attempt["prompt"] for attempt in row["attempts"]] for row in rows]
            assert all(len(row["attempts"]) == 2 for row in rows)  # the critic never confirms
            assert set(summary["passes"]["rmm"]["rmm"]) == {"final_accuracy", "step_correctness",
                                                           "error_repetition_rate", "correction_effectiveness"}
        assert all(system in (FEEDBACK_SYSTEM, MEMORY_SYSTEM) for system, _ in chat.calls)
        calls = len(chat.calls)

        # a resumed data-set pass rebuilds the memory from the rows written: item 3 reads the same prompt
        folder = root / "eval" / "dataset"
        whole = (folder / "rmm.jsonl").read_text().splitlines(keepends=True)
        (folder / "rmm.jsonl").write_text("".join(whole[:2]))
        evaluate(config, group)
        assert len(chat.calls) - calls == 4  # item 3 only: two critiques, two manager calls
    fact = "[FACT] fact-alpha: area is (P/4)^2"
    per_item, dataset = prompts["per_item"], prompts["dataset"]
    assert fact in per_item[0][1] and fact not in per_item[1][0] and fact not in per_item[2][1]  # its own retry only
    assert fact in dataset[1][0] and fact in dataset[2][0] and "fact-beta" in dataset[2][0]  # carried forward
    assert "fact-beta" not in dataset[0][1] and "<|im_start|>user" in dataset[1][0]  # the prompt as the model read it
    assert "<|image_pad|>" not in "".join(dataset[0])  # text-only problems
    combined = json.loads((root / "eval" / "dataset" / COMBINED_DATA).read_text())
    assert len(combined) == 6 and combined[0]["memory_entry"] == fact  # per_item: 3, dataset: 6 manager calls
    assert {"reasoning", "feedback", "memory_entry", "problem", "response"} <= set(combined[0])
    assert combined[1]["problem"].startswith(MEMORY_SYSTEM) and fact in combined[1]["problem"]
    assert read(folder)[2]["attempts"][0]["prompt"] == dataset[2][0]


def test_simulation_training_and_evaluation_with_the_trained_manager(rmm_cluster):
    """1 -> 2 -> 3 on the tiny model: a local feedback model (the tiny model's folder) criticises, a scripted chat
    API writes the teacher memory; the rows train a LoRA manager on the tiny model; evaluation runs with the base +
    adapter as manager, whose replies are now typed entries (the base's never are)."""
    from RL.model_export import merge_checkpoint
    from RL.checkpoint import complete_steps
    from RL.train_sft import run_sft

    group, model, data, root = rmm_cluster
    with env(OPENAI_API_KEY=KEY), ScriptedChat() as chat:
        evaluate(rmm_config(model, data, root / "eval", "simulation", **{
            "eval.rmm_memory_scope": "dataset", "eval.rmm_feedback_model": model,
            "eval.rmm_memory_model": "api:memory-model", "eval.rmm_api_base_url": chat.base_url}), group)
        assert all(system == MEMORY_SYSTEM for system, _ in chat.calls)  # the critic was the local model
    rows = json.loads((root / "eval" / "simulation" / COMBINED_DATA).read_text())
    assert len(rows) >= 4 and all(row["response"].startswith("[FACT] fact-") for row in rows)

    sft = load_config([f"config={REPO / 'examples/config/rmm_tiny_cpu.yaml'}", f"worker.actor.model.model_path={model}",
                       f"data.train_files={root / 'eval' / 'simulation' / COMBINED_DATA}", "sft.steps=12",
                       "sft.batch_size=4", "sft.micro_batch_size=4", f"sft.output_dir={root / 'manager'}"],
                      require_inputs=False)
    run_sft(sft)
    (step, folder), = complete_steps(str(root / "manager-run"))
    adapter = merge_checkpoint(folder, "actor", root / "manager_adapter", adapter_only=True)
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()

    results = {}
    for name, manager in (("base", model), ("trained", str(adapter))):
        summary = evaluate(rmm_config(model, data, root / "eval", name, **{
            "eval.rmm_memory_scope": "dataset", "eval.rmm_feedback_model": model,
            "eval.rmm_memory_model": manager}), group)
        results[name] = typed_rate(read(root / "eval" / name))
        assert set(summary["passes"]["rmm"]["rmm"]) >= {"final_accuracy", "correction_effectiveness"}
    assert results["base"] == 0.0 and results["trained"] >= 0.5, results
