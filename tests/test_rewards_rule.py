"""Rule rewards, the reward-function contract and the RewardManager (no API judge here)."""
import contextlib
import pickle

import pytest

from rewards import RewardFunctionError, RewardInput, RewardManager, load_reward_function
from rewards.accuracy import rule_accuracy
from rewards.answer import extract_answer, judge_prediction, last_boxed
from rewards.config import JudgeConfig, RewardConfig
from rewards.format_reward import boxed_format_reward
from rewards.length import LengthReference, group_length_penalties, length_penalty
from rewards.vlpo import vlpo_reward


@pytest.mark.parametrize("response, truth, expected", [
    (r"so \boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{x^2+1}", "1+x^2", 1.0),
    ("The answer is 12.", "12", 1.0),
    (r"The color is \boxed{Red}", "red", 1.0),
    ("The car is red.", "red", 1.0),  # fallback: text after the last "is"
    (r"\boxed{\text{B}}", "B", 1.0),
    (r"<latent×10> then \boxed{4}", "4", 1.0),
    (r"\boxed{blue}", "red", 0.0),
    (r"\boxed{2}", "20", 0.0),
    (r"\boxed{-5}", "5", 0.0),  # the grader's normalisation keeps a sign
    ("I think 3", "3", 0.0),  # no box, no "is": nothing to grade
    ("", "3", 0.0),
])
def test_rule_accuracy(response, truth, expected):
    assert rule_accuracy(response, truth) == expected


def test_answer_extraction_and_format():
    assert last_boxed(r"\boxed{a} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{unclosed") is None
    assert extract_answer("It is big. The answer is 7.") == "7"
    assert boxed_format_reward(r"answer: \boxed{3}") == 1.0
    assert boxed_format_reward(r"<latent×4> \boxed {3}") == 1.0
    assert boxed_format_reward("answer: 3") == 0.0
    assert boxed_format_reward(r"\boxed{3") == 0.0
    assert boxed_format_reward(r"\boxed{a{b}") == 0.0  # unbalanced: the grader could not read it either


def test_judge_prediction_is_the_answer_or_the_whole_response_without_latents():
    assert judge_prediction(r"<latent×3> so \boxed{7}") == "7"
    assert judge_prediction("<latent×3> I think <abs_vis_token></abs_vis_token>seven ") == "I think seven"
    assert judge_prediction(r"loop loop \boxed{7}", repetition=True) == r"loop loop \boxed{7}"
    assert judge_prediction("<latent×3>") == ""  # nothing to judge: never sent


def test_length_penalty_records_before_lookup():
    assert length_penalty(120, 100) == 20 and length_penalty(80, 100) == 0 and length_penalty(500, 0) == 0
    ref = LengthReference()
    # First epoch: the group's own shortest correct answer is already the reference (Monet's was always 0).
    assert group_length_penalties(["p"] * 3, [100, 150, 130], [True, False, True], ref) == [0, 50, 30]
    assert ref.ref_len("p") == 100
    assert group_length_penalties(["q"] * 2, [100, 200], [False, False], ref) == [0, 50]  # running mean 150
    restored = LengthReference()
    restored.load_state_dict(ref.state_dict())
    assert restored.ref_len("p") == 100 and restored.ref_len("q") == 150


def _sample(response, truth="4", group="g", length=10, prompt="How many?"):
    return RewardInput(prompt=prompt, response=response, ground_truth=truth, response_length=length, group_id=group)


def test_vlpo_reward_rules_only():
    samples = [_sample(r"\boxed{4}"), _sample("four apples is 5"), _sample(r"\boxed{5}")]
    scores = vlpo_reward(samples)
    assert [s["overall"] for s in scores] == pytest.approx([1.0, 0.0, 0.1])
    assert [s["accuracy"] for s in scores] == [1.0, 0.0, 0.0]
    assert [s["api_judged"] for s in scores] == [0.0] * 3 and [s["api_no_verdict"] for s in scores] == [0.0] * 3
    assert [vlpo_reward([_sample(text)])[0]["unextractable"] for text in ("I think 4", r"\boxed{4}")] == [1.0, 0.0]
    with_penalty = vlpo_reward([_sample(r"\boxed{4}", length=10), _sample(r"\boxed{4}", length=30)],
                               length_penalty_weight=0.01)
    assert [s["overall"] for s in with_penalty] == pytest.approx([1.0, 1.0 - 0.2])


BATCH_FN = '''
def score(samples, bonus=0.0):
    sizes = {}
    for s in samples:
        sizes[s.group_id] = sizes.get(s.group_id, 0) + 1
    return [{"overall": 1.0 + bonus, "group_size": sizes[s.group_id]} for s in samples]

def seq(sample):
    return {"overall": float(len(sample.response)), "chars": len(sample.response)}

def wrong_len(samples):
    return [{"overall": 1.0}]

def no_overall(sample):
    return {"score": 1.0}

def not_number(sample):
    return {"overall": "high"}
'''


@pytest.fixture
def reward_file(tmp_path):
    (tmp_path / "my_reward.py").write_text(BATCH_FN)
    with contextlib.chdir(tmp_path):  # relative paths resolve against the current directory
        yield "my_reward.py"


def test_manager_batch_sees_groups_and_metrics(reward_file):
    cfg = RewardConfig(reward_function=f"{reward_file}:score", reward_function_kwargs={"bonus": 0.5})
    manager = RewardManager(cfg, JudgeConfig())
    result = manager.compute([_sample("a", group="x"), _sample("b", group="x"), _sample("c", group="y")])
    assert result.overall == [1.5, 1.5, 1.5]
    assert result.components["group_size"] == [2.0, 2.0, 1.0]
    assert result.metrics["reward/mean"] == 1.5 and result.metrics["reward/group_size"] == pytest.approx(5 / 3)
    clone = pickle.loads(pickle.dumps(manager))
    assert clone.compute([_sample("z")]).overall == [1.5]


def test_manager_sequential(reward_file):
    manager = RewardManager(RewardConfig(reward_function=f"{reward_file}:seq", reward_type="sequential"))
    assert manager.compute([_sample("abc"), _sample("de")]).components["chars"] == [3.0, 2.0]


@pytest.mark.parametrize("fn, rtype, message", [
    ("wrong_len", "batch", "expected a list of 2 dicts"),
    ("no_overall", "sequential", "no 'overall' key"),
    ("not_number", "sequential", "'overall' is not a number"),
])
def test_manager_wrong_shape_names_the_function(reward_file, fn, rtype, message):
    manager = RewardManager(RewardConfig(reward_function=f"{reward_file}:{fn}", reward_type=rtype))
    with pytest.raises(RewardFunctionError, match=message) as err:
        manager.compute([_sample("a"), _sample("b")])
    assert f"my_reward.py:{fn}" in str(err.value)


@pytest.mark.parametrize("spec, message", [
    ("missing.py:fn", "does not exist"),
    ("my_reward.py:nope", "has no attribute 'nope'"),
    ("no_such_pkg.mod:fn", "cannot import module"),
    ("just_a_name", "expected 'path.py:function'"),
])
def test_load_errors(reward_file, spec, message):
    with pytest.raises(RewardFunctionError, match=message) as err:
        load_reward_function(spec)
    assert spec in str(err.value)


def test_default_config_and_examples_load(reward_file):
    default = RewardManager(RewardConfig())  # rewards/vlpo.py, found from the project root
    assert default.compute([_sample(r"\boxed{4}")]).overall == [pytest.approx(1.0)]
    module_spec = RewardManager(RewardConfig(reward_function="rewards.vlpo:vlpo_reward"))
    assert module_spec.compute([_sample("no")]).overall == [0.0]
    example = RewardManager(RewardConfig(reward_function="examples/reward_function/vlpo_reward.py:compute_score"))
    assert example.compute([_sample(r"\boxed{4}")]).metrics["reward/format"] == 1.0
    custom = RewardManager(RewardConfig(reward_function="examples/reward_function/length_penalty_example.py:compute_score",
                                        reward_type="sequential", reward_function_kwargs={"budget": 5, "weight": 0.1}))
    assert custom.compute([_sample(r"\boxed{4}", length=8)]).overall == [pytest.approx(0.7)]


def test_bad_reward_type_refused():
    with pytest.raises(RewardFunctionError, match="reward_type"):
        RewardManager(RewardConfig(reward_type="parallel"))
