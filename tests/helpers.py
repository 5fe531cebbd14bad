"""Small builders shared by tests: chat prompts with images for the tiny model, entry points run as processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TIMING_PREFIXES = ("timing_s/", "perf/")  # wall-clock metrics: never equal between two runs


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def without_timing(rows: list[dict]) -> list[dict]:
    """The metrics lines without their timing keys, for comparing an interrupted run with an uninterrupted one."""
    return [{k: v for k, v in row.items() if not k.startswith(TIMING_PREFIXES)} for row in rows]


def run_module(module: str, args: list[str], log, crash_at: str | None = None) -> subprocess.Popen:
    """`python -m module args` in its own session (a SIGKILL reaches its Ray workers' group), output to `log`;
    `crash_at` arms the LATENT_RL_CRASH_AT failpoint."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("LATENT_RL_CRASH_AT", None)
    if crash_at:
        env["LATENT_RL_CRASH_AT"] = crash_at
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def coloured_image(rgb=(200, 30, 30), size=56) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


def encode_prompts(processor, questions, images):
    """Left-padded processor outputs for one image + question per prompt."""
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
        )
        for question in questions
    ]
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


ENGINE_QUESTIONS = ["What colour is the shape?", "Which?", "Describe the picture in a few words please"]


def native_engine_and_prompts(model_dir):
    """(model, processor, native engine, encoded batch, PromptInputs) of three image prompts of different lengths and
    image sizes (left padding included): what the engine tests share."""
    from monet_models.transformers import load_latent_model
    from workers.rollout import NativeRolloutEngine, prompt_inputs_from_batch

    model, processor = load_latent_model(model_dir, dtype="fp32")
    engine = NativeRolloutEngine(model.eval(), processor.tokenizer)
    enc = encode_prompts(processor, ENGINE_QUESTIONS, [coloured_image(), coloured_image((0, 200, 0), 84),
                                                       coloured_image((0, 0, 200), 112)])
    prompts = prompt_inputs_from_batch(enc["input_ids"], enc["attention_mask"], model.config.image_token_id,
                                       enc["pixel_values"], enc["image_grid_thw"])
    return model, processor, engine, enc, prompts


def latent_rollout_batch(model, processor, second_question: str, n: int, max_new_tokens: int, latent_size: int):
    """A rollout batch of two image prompts ("What colour is the shape?" on red, `second_question` on blue), `n`
    samples each from the native engine on `model`, with the latent start token pushed up so that every sample
    reasons in latents: what the actor, log-prob memory and self-evolution KL tests score and update."""
    from RL.trainer.rollout_batch import build_rollout_batch
    from workers.rollout import NativeRolloutEngine, PromptInput, SamplingParams

    enc = encode_prompts(processor, ["What colour is the shape?", second_question],
                         [coloured_image(), coloured_image((30, 30, 200))])
    items = [{"input_ids": enc["input_ids"][i][enc["attention_mask"][i].bool()],
              "pixel_values": enc["pixel_values"][16 * i:16 * (i + 1)],
              "image_grid_thw": enc["image_grid_thw"][i:i + 1], "uid": f"p{i}", "ground_truth": "red",
              "raw_prompt": "", "extra": {}} for i in range(2)]
    params = SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new_tokens, strategy="monet",
                            latent_size=latent_size, seed=0, logit_bias={model.latent_tokens.start: 8.0})
    samples = NativeRolloutEngine(model, processor.tokenizer).generate(
        [PromptInput(x["input_ids"], x["pixel_values"], x["image_grid_thw"]) for x in items], params)
    assert sum(s.num_latents for s in samples) > 0
    return build_rollout_batch(items, samples, n, processor.tokenizer.pad_token_id, max_new_tokens)


def assert_one_line(result, status: int, *fragments: str) -> str:
    """Exit `status`, no traceback on the console, the last stderr line `error: ...` holding every fragment."""
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, last
    return last


def gradients_of_one_step(module, optimizer, update):
    """(`update()`'s result, {name: full gradient}) of one optimizer step taken at learning rate 0, so the weights
    stay: the gradients are read in a step pre-hook, as the optimizer sees them (after clipping)."""
    from workers.actor.fsdp import full_tensor

    grads = {}

    def keep_gradients(optimizer, args, kwargs):
        grads.update({name: full_tensor(p.grad).detach().clone()
                      for name, p in module.named_parameters() if p.grad is not None})

    for group in optimizer.param_groups:
        group["lr"] = 0.0
    handle = optimizer.register_step_pre_hook(keep_gradients)
    try:
        return update(), grads
    finally:
        handle.remove()
