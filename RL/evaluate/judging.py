"""Verdicts for evaluation rows with training's judge: rules first, rule negatives (and answers the rules cannot find,
which go whole, latents stripped) to the API judge when `worker.rule_based_judge.api_name` is set.

A verdict is 1, 0 or None. None means the API was asked and gave no readable answer: such an item is reported as
"no verdict" and left out of the accuracy, never counted wrong.
"""
from __future__ import annotations

from RL.data.format_prompt import IMAGE_MARKER
from rewards.answer import extract_answer
from rewards.judges import ApiJudge
from rewards.vlpo import judge_responses


def build_judge(config, folder):
    """The API judge (verdicts cached in the output folder), or None for rules only."""
    judge_config = config.worker.rule_based_judge
    if not judge_config.api_name:
        return None
    return ApiJudge(judge_config, repetition=False, run_dir=str(folder))


def judge_rows(rows: list[dict], judge) -> None:
    """Set `answer`, `verdict` and `source` (rule | api | cache | no_verdict) of rows holding `question`, `response`
    and `ground_truth`."""
    judged = judge_responses([(row["question"].replace(IMAGE_MARKER, "").strip(), row["response"],
                               str(row["ground_truth"])) for row in rows], judge)
    for row, judgement in zip(rows, judged):
        row["answer"] = extract_answer(row["response"])
        if not judgement.asked:
            row["verdict"], row["source"] = judgement.rule, "rule"
        elif judgement.api_verdict is None:
            row["verdict"], row["source"] = None, "no_verdict"
        else:
            row["verdict"], row["source"] = int(judgement.api_verdict > 0), judgement.api_source
