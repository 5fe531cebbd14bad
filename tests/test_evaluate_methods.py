"""Evaluation parts without Ray: DMLR's search on rewards with a known optimum and its final decode on the tiny model,
RMM's memory and metrics, judging a hand-labelled set, the intervals, and the three input formats."""
import base64
import io
import json
import math

import pytest
import torch

from RL.evaluate.dmlr import DmlrSettings, LatentSearch, ModelScorer, noise_scale, run_dmlr
from RL.evaluate.judging import judge_rows
from RL.evaluate.memory import MemoryBuffer, critic_text, memory_request, parse_critic, parse_entries
from RL.evaluate.rmm import rmm_metrics
from RL.evaluate.stats import accuracy, paired_difference, wilson
from tests.helpers import coloured_image
from tests.test_judge_api import env


class KnownReward:
    """A stand-in for DMLR's reward with a known optimum: offset - ||T - T*||^2, plus a fixed bonus per injected
    patch."""

    def __init__(self, optimum: torch.Tensor, bonus: tuple[float, ...] = (), offset: float = 0.0):
        self.optimum, self.bonus, self.offset = optimum, bonus, offset

    def score(self, latents, patches):
        reward = self.offset - ((latents - self.optimum) ** 2).sum((-2, -1))
        return reward + sum(self.bonus[p] for chosen in patches for p in chosen), latents

    def select(self, hidden, patches, count, limit):
        """The next patches in index order (up to `limit` per thought)."""
        return tuple(tuple(chosen) + tuple(range(len(chosen), min(len(chosen) + count, limit, len(self.bonus))))
                     for chosen in patches)


def search(optimum, offset=0.0, **settings):
    base = dict(tokens=2, steps=30, lr=0.05, sigma=0.3, sigma_decay=1.0, pairs=8, inject=False)
    return LatentSearch(DmlrSettings.from_eval(**{**base, **settings}), KnownReward(optimum, offset=offset),
                        torch.Generator().manual_seed(0))


def test_es_step_moves_towards_higher_reward_and_ignores_a_constant_offset():
    optimum, start = torch.randn(2, 8, generator=torch.Generator().manual_seed(1)), torch.zeros(2, 8)
    step = search(optimum, pairs=256).es_step(start, ((), ()), sigma=0.3, step=1)
    direction = torch.nn.functional.cosine_similarity((step - start).flatten(), (optimum - start).flatten(), dim=0)
    assert direction > 0.9 and (step - optimum).norm() < (start - optimum).norm()
    shifted = search(optimum, offset=100.0, pairs=256)  # same noise, rewards + 100: the mean baseline cancels it
    assert torch.allclose(shifted.es_step(start, ((), ()), sigma=0.3, step=1), step, atol=1e-4)


def test_search_returns_the_best_evaluated_candidate():
    optimum = torch.randn(2, 8, generator=torch.Generator().manual_seed(2))
    result = search(optimum).run(torch.zeros(2, 8), scale=1.0)
    assert result.best.reward == max(entry["max"] for entry in result.trace)  # evaluated, not a mean never scored
    assert result.best.reward == pytest.approx(KnownReward(optimum).score(result.best.latents[None], ((), ()))[0][0])
    assert result.best.reward > result.initial_reward + 0.5 * abs(result.initial_reward)
    assert result.evaluations == 1 + 30 * 16 + 1 and result.stop == "steps"
    early = search(optimum, offset=1.0, reward_threshold=1.0).run(optimum.clone(), scale=1.0)  # optimal: stop
    assert early.stop == "threshold" and early.best.step == 0


def test_injection_keeps_patches_only_when_they_score_better():
    optimum = torch.zeros(1, 4)
    settings = DmlrSettings.from_eval(tokens=1, steps=1, inject=True, initial_patches=0, patch_increment=1, pairs=1)
    good = LatentSearch(settings, KnownReward(optimum, bonus=(1.0, -5.0, 2.0)), torch.Generator().manual_seed(0))
    assert good.inject_step(optimum, ((),), step=1) == ((0,),)  # +1: kept
    assert good.inject_step(optimum, ((0,),), step=2) == ((0,),)  # patch 1 scores -5: reverted
    assert good.best.patches == ((0,),) and good.best.reward == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    from monet_models.transformers import load_latent_model
    from workers.rollout import NativeRolloutEngine, prompt_inputs_from_batch
    from tests.helpers import encode_prompts

    model, processor = load_latent_model(tiny_model_dir, dtype="fp32")
    engine = NativeRolloutEngine(model.eval(), processor.tokenizer)
    enc = encode_prompts(processor, ["What colour is the shape?"], [coloured_image((20, 200, 40), 84)])
    prompt = prompt_inputs_from_batch(enc["input_ids"], enc["attention_mask"], model.config.image_token_id,
                                      enc["pixel_values"], enc["image_grid_thw"])[0]
    return model, engine, prompt


def test_dmlr_final_decode_continues_from_the_returned_latents(tiny_engine):
    from workers.rollout import SamplingParams

    model, engine, prompt = tiny_engine
    tokens, n = engine.tokens, 3
    params = SamplingParams(strategy="monet", temperature=0, max_new_tokens=10, latent_size=n,
                            logit_bias={tokens.start: 3.0})
    out = run_dmlr(engine, prompt, DmlrSettings.from_eval(tokens=n, steps=3, inject=False), params, seed=0)
    sample = out["sample"]
    block = [tokens.start] + [tokens.pad] * n + [tokens.end]
    ids = torch.cat([prompt.input_ids, torch.tensor(block), sample.response_ids])[None]

    def full_forward(thoughts):
        latents = [thoughts] + ([sample.latents] if sample.latents is not None else [])
        with torch.no_grad():
            return model(input_ids=ids, pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
                         latent_embeds=torch.cat(latents), latent_mode=True).logits[0].float().log_softmax(-1)

    log_probs = full_forward(out["latents"])
    end = len(prompt.input_ids) + n + 1  # the </abs_vis_token> position: it predicts the first response token
    response = log_probs[end:end + len(sample.response_ids)].gather(-1, sample.response_ids[:, None])[:, 0]
    sampled = sample.token_log_probs != 0
    assert (response[sampled] - sample.token_log_probs[sampled]).abs().max() < 1e-4  # decoded after those latents
    thoughts = log_probs[end - n:end + 1]  # the n thoughts and the position after them: DMLR's reward positions
    assert -thoughts.topk(10, dim=-1).values.mean() == pytest.approx(out["best_reward"], abs=1e-4)
    other = full_forward(torch.zeros_like(out["latents"]))[end:end + len(sample.response_ids)]
    assert (other.gather(-1, sample.response_ids[:, None])[:, 0] - response).abs().max() > 1e-3


def test_dmlr_scorer_uses_real_image_features_and_injects_them(tiny_engine):
    from workers.rollout import SamplingParams

    model, engine, prompt = tiny_engine
    scorer = ModelScorer(model, engine.tokens, prompt, top_k=10)
    image_tokens = int((prompt.input_ids == model.config.image_token_id).sum())
    assert scorer.features.shape[0] == image_tokens == len(scorer.image_hidden)
    latents = scorer.own_latents(2)
    _, hidden = scorer.score(latents[None], ((), ()))
    patches = scorer.select(hidden[0], ((), ()), count=2, limit=16)
    plain, _ = scorer.score(latents[None], ((), ()))
    injected, _ = scorer.score(latents[None], patches)
    continuation = scorer.continuation(latents, patches)
    assert all(len(chosen) == 2 for chosen in patches) and plain.item() != pytest.approx(injected.item())
    assert continuation.length == scorer.length + 2 + 4 + 1  # two thoughts, two patches each, </abs_vis_token>
    engine_block = engine.generate([prompt], SamplingParams(strategy="monet", temperature=0, max_new_tokens=4,
                                                            latent_size=2, logit_bias={engine.tokens.start: 1e4}))[0]
    assert torch.allclose(engine_block.latents, latents, atol=1e-4)  # the initial thoughts: the model's own block


def test_memory_entries_buffer_and_critic_parsing():
    typed = parse_entries("[CORRECTION] the shape is a circle\n- [fact]: it is on the left\nnoise", "7-1")
    assert [(e.entry_type, e.content, e.confidence) for e in typed] == [
        ("correction", "the shape is a circle", 0.9), ("fact", "it is on the left", 0.9)]
    free = parse_entries("Look closer at the edges.", "7-2")
    assert [(e.entry_type, e.confidence, e.id) for e in free] == [("insight", 0.7, "7-2-0")]
    assert not parse_entries("", "x")
    memory = MemoryBuffer(typed + free)
    assert memory.render().splitlines() == ["## Memory Buffer", "- [CORRECTION] the shape is a circle",
                                            "- [FACT] it is on the left", "- [INSIGHT] Look closer at the edges."]
    assert memory.get("7-1-1").content == "it is on the left" and len(memory.by_type("fact")) == 1
    assert parse_critic("step 2 is wrong.\nVERDICT: incorrect") is False and parse_critic("VERDICT: Correct.") is True
    assert parse_critic("looks fine") is None
    assert "[Final answer]\nblue" in critic_text("<image>What colour?", "It is blue.", "blue")
    assert "[Current memory]\n## Memory Buffer" in memory_request("What colour?", "It is blue.", "wrong", memory)


def test_rmm_metrics_from_logged_verdicts():
    def item(*attempts):
        verdicts = [a[0] for a in attempts]
        return {"verdict": verdicts[-1], "attempts": [{"verdict": v, "answer": a} for v, a in attempts]}

    rows = [item((0, "x"), (0, "X."), (1, "red")),  # the same wrong answer again, then corrected
            item((1, "blue")),  # right at once
            item((0, "y"), (0, "z")),  # a different wrong answer: not a repetition
            item((0, "q"), (None, "w"))]  # no verdict: left out, never counted wrong
    metrics = rmm_metrics(rows)
    assert metrics["final_accuracy"] == pytest.approx(2 / 3)
    assert metrics["step_correctness"] == pytest.approx(2 / 7)
    assert metrics["error_repetition_rate"] == pytest.approx(1 / 3)
    assert metrics["correction_effectiveness"] == pytest.approx(1 / 3)


def test_judging_a_hand_labelled_set_with_the_api_fallback():
    from rewards.config import JudgeConfig
    from rewards.judges import ApiJudge
    from rewards.judges.local_server import LocalJudgeServer

    rows = [("What colour?", "\\boxed{red}", "red", 1, "rule"),
            ("What colour?", "\\boxed{blue}", "red", 0, "api"),
            ("What colour?", "It is red, clearly", "red", 1, "api"),  # free text: only the API reads it right
            ("Which shape?", "no idea at all", "circle", 0, "api"),  # nothing extractable: sent whole
            ("[fault:500] What colour?", "\\boxed{purple}", "red", None, "no_verdict")]
    key = "sk-eval-test-key-0123456789"
    with env(OPENAI_API_KEY=key), LocalJudgeServer(key=key) as server:
        judge = ApiJudge(JudgeConfig(api_name="judge-model", api_base_url=server.base_url + "/v1", max_retries=1,
                                     retry_backoff_s=0.01, timeout_s=5.0, use_cache=False))
        judged = [{"question": q, "response": r, "ground_truth": t} for q, r, t, _, _ in rows]
        judge_rows(judged, judge)
    assert [(row["verdict"], row["source"]) for row in judged] == [(v, s) for *_, v, s in rows]
    assert judged[2]["answer"] == "red, clearly"
    stats = accuracy(judged)
    assert (stats["judged"], stats["correct"], stats["no_verdict"], stats["accuracy"]) == (4, 2, 1, 0.5)


def test_intervals():
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook Wilson example
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    base, other = [1, 1, 0, 0, 1, 0, 1, 0, 0, 1, 1, 0], [1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 0]
    diff, low, high = paired_difference(base, other)
    assert diff == pytest.approx(2 / 12) and low < diff < high
    assert paired_difference(other, base) == pytest.approx((-diff, -high, -low))  # swapping the passes mirrors it
    never = [0] * 10  # a base that is always wrong: the upper limit is other's own Wilson upper limit
    assert paired_difference(never, [1] * 3 + [0] * 7)[2] == pytest.approx(wilson(3, 10)[1])
    same = paired_difference(base, base)
    assert same[0] == 0 and same[1] <= 0 <= same[2] and math.isnan(paired_difference([], [])[0])


def image_base64(rgb) -> str:
    buffer = io.BytesIO()
    coloured_image(rgb).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_three_input_formats_load(tmp_path, tiny_model_dir, toy_data_dir):
    from monet_models import load_processor
    from RL.config import load_config
    from RL.data import RLPromptDataset
    from RL.evaluate.inputs import detect_format, prepare_files

    (tmp_path / "imgs").mkdir()
    coloured_image((0, 0, 200)).save(tmp_path / "imgs" / "b.png")
    dmlr = tmp_path / "mmvp.json"
    dmlr.write_text(json.dumps([{"prompt": "Is it blue?\nOptions: (a) Yes (b) No", "solution": "(a) Yes",
                                 "completion": "(a) Yes", "image_path": "imgs/b.png"},
                                {"prompt": "Colour?", "solution": "blue", "image_path": "imgs/b.png", "idx": 7}]))
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage"
    tsv = tmp_path / "bench.tsv"
    first = f"11\tWhat colour?\tLook.\tred\tblue\tgreen\t\tB\tcolour\t{image_base64((0, 0, 200))}"
    tsv.write_text("\n".join([header, first, "12\tWhich colour is absent?\t\tred\tgreen\t\t\tA\tcolour\t11"]) + "\n")
    assert [detect_format(p) for p in (dmlr, tsv, tmp_path / "x.jsonl")] == ["dmlr", "vlmevalkit", "project"]
    config = load_config(["config=examples/config/vlpo_tiny_cpu.yaml", f"data.val_files=[{dmlr},{tsv}]"],
                         require_inputs=False)
    files = prepare_files([str(dmlr), str(tsv), f"{toy_data_dir}/val.jsonl"], tmp_path / "out", config.data)
    dataset = RLPromptDataset(files, load_processor(tiny_model_dir), config.data, name="eval")
    items = [dataset[i] for i in range(len(dataset))]
    assert len(items) == 2 + 2 + 8 and not dataset.skipped
    assert [(it["row_id"], it["ground_truth"]) for it in items[:4]] == [
        ("mmvp.json#0", "(a) Yes"), ("7", "blue"), ("11", "B"), ("12", "A")]
    assert items[2]["question"] == "Hint: Look.\nWhat colour?\nOptions:\nA. red\nB. blue\nC. green"
    assert items[2]["extra"]["options"] == {"A": "red", "B": "blue", "C": "green"}
    assert items[3]["extra"]["category"] == "colour" and items[0]["extra"]["completion"] == "(a) Yes"
    assert all(len(it["images"]) == 1 and it["pixel_values"].shape[0] > 0 for it in items)
    assert torch.equal(items[3]["pixel_values"], items[2]["pixel_values"])  # the TSV's image given by reference


def test_dmlr_sigma_is_relative_to_the_thoughts_rms_or_absolute_as_released():
    thoughts = torch.tensor([[3.0, -4.0], [0.0, 5.0]])  # RMS sqrt((9 + 16 + 25) / 4)
    assert noise_scale(thoughts, DmlrSettings.from_eval()) == pytest.approx(math.sqrt(12.5))
    assert noise_scale(thoughts, DmlrSettings.from_eval(sigma_scale="absolute")) == 1.0
    released = DmlrSettings.from_eval()  # main.py's defaults (docs/evaluation.md §DMLR)
    assert (released.tokens, released.steps, released.lr, released.sigma_decay) == (8, 20, 5e-3, 0.95)
