"""What the latent block carries on the pointer task (RL/toy_pointer_task.py), kept from regressing with a small saved
model: `tests/fixtures/pointer_model`, the VLPO model (latent noise 0.1, RL seed 1) of `examples/latent_evidence.sh`.
On 128 held-out questions it answers 79.7% with its own latents and 3.9% with zero vectors fed at the latent
positions (docs/evaluation.md §6.1). Latents that look like hidden states serve it as well as its own (shuffled ones
cost nothing), so the test also checks the latents it is fed against a plain forward over its answers: each is the
final hidden state one position earlier. Verified to fail with the engine broken both ways (zeros fed: no accuracy
lost to the zero ablation; the hidden state of the position before the right one: the latent check). One model load,
128 prompts, two greedy passes of the native engine and one scoring forward, in-process on the CPU."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from RL.toy_pointer_task import QUESTION, make_pointer_dataset
from rewards.answer import last_boxed
from tests.helpers import encode_prompts

FIXTURE = Path(__file__).parent / "fixtures" / "pointer_model"
QUESTIONS = 128  # docs/evaluation.md §6's held-out set: the pointer task drawn with seed 1000
MIN_DIRECT = 0.70  # the fixture's held-out accuracy with its own latents: 0.797 (text-only SFT and GRPO: 0.61-0.65)
MIN_ZERO_COST = 0.50  # what zeroed latents cost it: 0.758 (an engine that already feeds zeros: nothing)


@pytest.fixture(scope="module")
def pointer(tmp_path_factory):
    from monet_models.transformers import load_latent_model
    from workers.rollout import NativeRolloutEngine, prompt_inputs_from_batch

    data = make_pointer_dataset(tmp_path_factory.mktemp("pointer"), n_train=0, n_val=QUESTIONS, seed=1000)
    rows = [json.loads(line) for line in open(data / "val.jsonl")]
    model, processor = load_latent_model(str(FIXTURE), dtype="fp32")
    images = [Image.open(data / row["images"][0]).convert("RGB") for row in rows]
    enc = encode_prompts(processor, [QUESTION] * len(rows), images)
    prompts = prompt_inputs_from_batch(enc["input_ids"], enc["attention_mask"], model.config.image_token_id,
                                       enc["pixel_values"], enc["image_grid_thw"])
    latent_size = json.loads((FIXTURE / "latent_config.json").read_text())["latent_size"]
    return {"model": model.eval(), "processor": processor, "prompts": prompts, "rows": rows, "K": latent_size,
            "engine": NativeRolloutEngine(model.eval(), processor.tokenizer)}


def greedy(pointer, **override):
    """(samples, extracted answers) of one greedy pass with latent blocks (evaluation's direct decoding)."""
    from workers.rollout import SamplingParams

    params = SamplingParams(strategy="monet", temperature=0, max_new_tokens=40, latent_size=pointer["K"], seed=1,
                            **override)
    samples = pointer["engine"].generate(pointer["prompts"], params)
    tokenizer = pointer["processor"].tokenizer
    return samples, [last_boxed(tokenizer.decode(s.response_ids, skip_special_tokens=True)) for s in samples]


def test_the_pointer_answers_need_the_model_s_own_latents(pointer):
    from tests.test_rollout_native import rescore

    samples, direct = greedy(pointer)
    _, zero = greedy(pointer, latent_override="zero")
    gold = [row["answer"] for row in pointer["rows"]]
    accuracy = sum(a == g for a, g in zip(direct, gold)) / len(gold)
    zeroed = sum(a == g for a, g in zip(zero, gold)) / len(gold)
    assert all(len(s.block_positions) == 1 for s in samples)  # every answer reasons in one latent block first
    assert accuracy >= MIN_DIRECT, f"held-out accuracy {accuracy:.3f} with the model's own latents"
    assert accuracy - zeroed >= MIN_ZERO_COST, f"accuracy {accuracy:.3f}, {zeroed:.3f} with zeroed latents"
    # The latents fed are the final hidden states one position earlier, on a plain forward over 16 answers.
    some = samples[:16]
    ids, out, latents = rescore(pointer["model"], pointer["processor"], pointer["prompts"], some)
    expected = out.hidden_states[:, :-1][ids[:, 1:] == pointer["engine"].tokens.pad]
    assert latents.shape == expected.shape and torch.allclose(latents, expected, atol=1e-4), \
        f"latents differ from the previous position's hidden state by {(latents - expected).abs().max():.3g}"


def fake_pass(correct: int, items: int = 64, delta: float | None = None) -> dict:
    stats = {"items": items, "judged": items, "correct": correct, "accuracy": correct / items}
    if delta is not None:
        stats["delta_vs_direct"] = {"items": items, "delta": delta, "ci95": [delta - 0.1, delta + 0.1]}
    return stats


def test_evidence_tables_pool_seeds_and_draw_both_plots(tmp_path):
    """tools.latent_evidence on two seeds' summaries and RL metrics (no training): pooled Wilson cells, the RL gain
    over each arm's start, the ablation deltas, and the two PNGs."""
    from tools.latent_evidence import write_evidence

    for seed, bump in (("seed1", 0), ("seed2", 2)):
        passes = {"text_sft": {"direct": fake_pass(26 + bump)}, "grpo_text": {"direct": fake_pass(28 + bump)},
                  "stage3": {"direct": fake_pass(48 + bump), "ablate_zero": fake_pass(24, delta=-0.375)},
                  "vlpo_noise": {"direct": fake_pass(54 + bump), "ablate_zero": fake_pass(22, delta=-0.5)},
                  "vlpo_noise0": {"direct": fake_pass(50 + bump)}}
        for arm, found in passes.items():
            (tmp_path / seed / "eval" / arm).mkdir(parents=True)
            (tmp_path / seed / "eval" / arm / "summary.json").write_text(json.dumps({"passes": found}))
        for arm in ("vlpo_noise", "vlpo_noise0", "grpo_text"):
            (tmp_path / seed / "rl" / arm).mkdir(parents=True)
            lines = [{"step": step, "val/accuracy": 0.7 + step / 100} for step in (0, 10, 20)]
            (tmp_path / seed / "rl" / arm / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    text = write_evidence(tmp_path).read_text()
    assert "| text-only SFT (no latent block, same rows and steps) | 40.6 [" in text  # seed1: 26 of 64
    assert "| Monet stage 3 (latent SFT) | 75.0 [" in text and "| 76.6 [" in text  # pooled: 98 of 128
    assert "| VLPO, latent noise on (from stage 3) | +9.4 | +9.4 | +9.4 |" in text  # 54 - 48 of 64, both seeds
    assert "Δ -37.5 [-47.5, -27.5]" in text
    assert (tmp_path / "val_accuracy.png").stat().st_size > 0 and (tmp_path / "ablations.png").stat().st_size > 0


def test_pointer_rows_zoom_into_the_target_and_keep_the_hop_out_of_text(tmp_path):
    """The Monet row's auxiliary image is the arrow's target cell (its blob has the answer's colour), the observation
    names only that colour (never where the arrow points), and the text-only row is the same row without the block."""
    from RL.toy_pointer_task import COLOURS, IMAGE_SIZE

    prompts = [str(Path(__file__).parents[1] / "examples" / "format_prompt" / f"toy_{role}.jinja")
               for role in ("proposer", "solver")]
    out = make_pointer_dataset(tmp_path, n_train=6, n_val=0, seed=3, sft=True, selfplay_prompts=prompts)
    rows = [json.loads(line) for line in open(out / "train.jsonl")]
    monet, text = json.loads((out / "sft_monet.json").read_text()), json.loads((out / "sft_text.json").read_text())
    for row, chain, plain in zip(rows, monet, text):
        reply = chain["data"][1]["content"]
        zoom = Image.open(out / reply[1]["image"]).convert("RGB")
        centre = zoom.getpixel((IMAGE_SIZE // 2, IMAGE_SIZE // 2))
        assert centre == COLOURS[row["answer"]]
        assert reply[2]["text"] == plain["data"][1]["content"][0]["text"]  # the same text, without block and zoom
        assert f"a {row['answer']} blob" in reply[2]["text"] and "arrow" not in reply[2]["text"]
    solver = [json.loads(line) for line in open(out / "selfplay_sft.jsonl") if "-solver" in line]
    assert [s["answer"] for s in solver] == [row["answer"] for row in rows]
