"""Rule accuracy: math equivalence through ``math_verify``, plus normalized string equality for word answers.

Math equivalence catches ``\\frac{1}{2}`` vs ``0.5``; string equality catches short answers (``red``, ``B``) that
``math_verify`` cannot parse. Either match counts as correct; a failure of the math parser is never an error.
"""
from __future__ import annotations

import threading

from .answer import extract_answer, normalize_text

_PARSE_TIMEOUT_S = 5


def _as_latex(text: str) -> str:
    """Wrap bare LaTeX in ``$...$`` so math_verify's LaTeX extractor sees it (``x^2+1`` is otherwise missed)."""
    return text if "$" in text or "\\boxed" in text else f"${text}$"


def math_equal(prediction: str, ground_truth: str) -> bool:
    """True when math_verify proves the two expressions equal; False on any parse failure or error."""
    from math_verify import parse, verify

    # math_verify's timeouts use SIGALRM, which only works on the main thread.
    timeout = _PARSE_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        for pred_text, gold_text in ((prediction, ground_truth), (_as_latex(prediction), _as_latex(ground_truth))):
            gold = parse(gold_text, parsing_timeout=timeout)
            pred = parse(pred_text, parsing_timeout=timeout)
            if gold and pred and verify(gold, pred, timeout_seconds=timeout):
                return True
    except Exception:  # noqa: BLE001 - a grader crash must read as "not proven equal", never kill a step
        return False
    return False


def answers_match(prediction: str, ground_truth: str) -> bool:
    """Extracted answer vs ground truth: normalized string equality first (cheap), then math equivalence."""
    if not prediction.strip() or not str(ground_truth).strip():
        return False
    if normalize_text(prediction) == normalize_text(str(ground_truth)):
        return True
    return math_equal(prediction, str(ground_truth))


def rule_accuracy(response: str, ground_truth: str) -> float:
    """1.0 when the response's extracted answer matches the ground truth, else 0.0."""
    return 1.0 if answers_match(extract_answer(response), str(ground_truth)) else 0.0
