"""Judge prompts (plain yes/no and the repetition-aware 1/0/−1 variant) and the strict reply parser.

The parser accepts exactly one token (after trimming whitespace, quotes, markdown emphasis, a final period and any
``<think>`` block); anything else is "no verdict" (None). Monet parsed by substring, which turned replies like
"no, wait, yes" or error text into a score.
"""
from __future__ import annotations

import re

PLAIN_SYSTEM = (
    "You are a strict answer judge. You are given a question, the reference answer and a model's prediction. "
    "Decide whether the prediction's final answer is equivalent to the reference answer (same value, same meaning; "
    "ignore formatting, units written differently and wording). Reply with exactly one word: yes or no.")

REPETITION_SYSTEM = (
    "You are a strict answer judge. You are given a question, the reference answer and a model's full response. "
    "Reply with exactly one token:\n"
    "1  if the response's final answer is equivalent to the reference answer;\n"
    "0  if it is incorrect;\n"
    "-1 if it is incorrect AND the response contains repeated, looping or illogical content.\n\n"
    "Example: reference 4; response \"The count is 3. The count is 3. The count is 3. The count is 3...\" -> -1\n"
    "Example: reference blue; response \"Let me look again. Let me look again. Let me look again. \\boxed{red}\" -> -1\n"
    "Reply with 1, 0 or -1 and nothing else.")

_BOXED_INSTRUCTION_RE = re.compile(r"[^.?!\n]*\\boxed[^.?!\n]*[.?!]?", re.IGNORECASE)
_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_PLAIN = {"yes": 1, "no": 0}
_REPETITION = {"1": 1, "0": 0, "-1": -1, "+1": 1}


def clean_question(question: str) -> str:
    """Drop the "put the final answer in \\boxed{}" instruction: it is for the policy, not the judge."""
    return re.sub(r"\n{3,}", "\n\n", _BOXED_INSTRUCTION_RE.sub("", question or "")).strip()


def system_prompt(repetition: bool) -> str:
    return REPETITION_SYSTEM if repetition else PLAIN_SYSTEM


def user_prompt(question: str, prediction: str, ground_truth: str) -> str:
    """Delimited sections so a prediction cannot impersonate the reference."""
    return (f"[Question]\n{clean_question(question)}\n\n[Reference answer]\n{ground_truth}\n\n"
            f"[Prediction]\n{prediction}\n[End of prediction]")


def parse_verdict(reply: str | None, repetition: bool) -> int | None:
    """Exact-token verdict: yes/no → 1/0, or 1/0/−1 in repetition mode; None when unreadable."""
    if not isinstance(reply, str):
        return None
    token = _THINK_RE.sub("", reply).strip().strip("*_`\"' ").rstrip(".!").strip().lower()
    token = token.replace("\u2212", "-").replace("\u2013", "-")
    return (_REPETITION if repetition else _PLAIN).get(token)
