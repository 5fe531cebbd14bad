"""The RMM pass: reason -> critique -> typed memory -> retry with the memory in the prompt, up to `eval.rmm_attempts`
attempts, batched over the items of a batch (each step one generation round).

The critic is `eval.rmm_feedback_model`, the memory manager `eval.rmm_memory_model` (RL/evaluate/rmm_models.py: the
evaluated model, a local folder or adapter, or a chat API). An item stops when its critic says "VERDICT: correct" or
at the last attempt; its answer is its last attempt. The memory lives
- per item (`eval.rmm_memory_scope=per_item`, VITA-RMM's loop): fresh for every item, written only before a retry;
- across the data set (`dataset`): written after every critique, the last included, and carried to the items after
  it in item order, so the [FACT] one problem taught is in the next one's prompt (VITA-RMM's README example). A batch
  reads the memory as it was before the batch; a resumed pass rebuilds it from the rows already written.

Every attempt is judged against the gold answer by the harness (rules, then the API judge), for the metrics only:
neither the critic nor the manager ever sees it. Every manager call is also one row of RMM's combined data
(`rmm_combined_data.json` in the output folder): with a strong feedback model as manager this is the simulation that
makes the training rows of a small manager (`examples/rmm_train.sh`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from common.atomic import atomic_path
from common.seeding import derive_seed
from RL.data.format_prompt import FormatPrompt, IMAGE_MARKER
from RL.evaluate.evaluation import Evaluation
from RL.evaluate.item_prompts import encode, item_prompt, item_question
from RL.evaluate.judging import judge_rows
from RL.evaluate.memory import (FEEDBACK_SYSTEM, MEMORY_SYSTEM, MemoryBuffer, MemoryEntry, critic_text,
                                manager_prompt, memory_request, parse_critic, parse_entries, typed_text, with_memory)
from RL.evaluate.rmm_models import Ask, ChatClient, api_text
from RL.evaluate.store import read_rows
from rewards.answer import normalize_text

COMBINED_DATA = "rmm_combined_data.json"
_IMAGE_PADS = re.compile(r"(<\|image_pad\|>)+")


@dataclass
class ItemLoop:
    index: int
    item: dict
    memory: MemoryBuffer = field(default_factory=MemoryBuffer)
    attempts: list[dict] = field(default_factory=list)
    samples: list = field(default_factory=list)
    cost: dict = field(default_factory=lambda: {"tokens": 0, "forwards": 0})


class RmmPass:
    def __init__(self, evaluation: Evaluation, name: str):
        self.evaluation, self.ev = evaluation, evaluation.config.eval
        self.format_prompt = FormatPrompt(evaluation.config.data.format_prompt)
        self.carried = self.ev.rmm_memory_scope == "dataset"
        loaded: dict = {}  # a folder named as both critic and manager is loaded once
        self.critic = ChatClient(evaluation, self.ev.rmm_feedback_model, FEEDBACK_SYSTEM,
                                 self.ev.rmm_critic_max_new_tokens, True, loaded)
        self.manager = ChatClient(evaluation, self.ev.rmm_memory_model, MEMORY_SYSTEM,
                                  self.ev.rmm_memory_max_new_tokens, False, loaded)
        self.rows_path = evaluation.folder / f"{name}.jsonl"
        self.shared = replayed_memory(read_rows(self.rows_path)) if self.carried else MemoryBuffer()

    def __call__(self, batch: int, indices: list[int]) -> list[dict]:
        known = len(self.shared.entries)
        loops = [ItemLoop(index, self.evaluation.dataset[index], self.shared.copy()) for index in indices]
        active = loops
        for attempt in range(1, self.ev.rmm_attempts + 1):
            seed = derive_seed(self.ev.seed, "rmm", batch, attempt)
            self.reason(active, attempt, seed)
            confirmed = self.critique(active, seed)
            retrying = [loop for loop, done in zip(active, confirmed) if not done and attempt < self.ev.rmm_attempts]
            self.remember(active if self.carried else retrying, attempt, seed)
            active = retrying
            if not active:
                break
        for loop in loops:  # in item order: what a resumed pass replays
            if self.carried:
                self.shared.add(loop.memory.entries[known:])
        rows = [self.row(loop) for loop in loops]
        self.write_combined_data(rows)
        return rows

    def reason(self, loops: list[ItemLoop], attempt: int, seed: int) -> None:
        """One attempt per item (the item's own prompt while its memory is empty), judged against the gold answer."""
        ev, data, limit = self.evaluation, self.evaluation.config.data, self.ev.rmm_memory_max_entries
        prompts = [item_prompt(loop.item) if not loop.memory.entries else
                   encode(ev.processor, self.format_prompt(with_memory(item_question(loop.item), loop.memory, limit)),
                          loop.item["images"], data) for loop in loops]
        samples = ev.generate(prompts, ev.params(), seed)
        rows = [{"question": loop.item["question"], "response": ev.render(sample),
                 "ground_truth": str(loop.item["ground_truth"])} for loop, sample in zip(loops, samples)]
        judge_rows(rows, ev.judge)
        for loop, prompt, sample, row in zip(loops, prompts, samples, rows):
            loop.samples.append(sample)
            loop.attempts.append({"attempt": attempt, "memory": loop.memory.render(limit),
                                  "prompt": shown_prompt(ev.processor.tokenizer, prompt), "response": row["response"],
                                  "answer": row["answer"], "verdict": row["verdict"], "source": row["source"]})
            self._charge(loop, sample)

    def critique(self, loops: list[ItemLoop], seed: int) -> list[bool]:
        """The critic checks each item's last attempt (with the image unless it is a chat API; never the gold
        answer)."""
        texts = [critic_text(item_question(loop.item), loop.attempts[-1]["response"], loop.attempts[-1]["answer"])
                 for loop in loops]
        asks = [Ask(text, loop.item["images"], api_text(text)) for text, loop in zip(texts, loops)]
        critiques, samples = self.critic(asks, derive_seed(seed, "critic"))
        confirmed = []
        for loop, text, critique, sample in zip(loops, texts, critiques, samples):
            loop.attempts[-1].update(critic_prompt=text, critique=critique, critic_verdict=parse_critic(critique))
            self._charge(loop, sample)
            confirmed.append(loop.attempts[-1]["critic_verdict"] is True)
        return confirmed

    def remember(self, loops: list[ItemLoop], attempt: int, seed: int) -> None:
        """New typed entries from the manager, added to each item's buffer."""
        if not loops:
            return
        limit = self.ev.rmm_memory_max_entries
        requests = [memory_request(item_question(loop.item).replace(IMAGE_MARKER, "").strip(),
                                   loop.attempts[-1]["response"], loop.attempts[-1]["critique"], loop.memory, limit)
                    for loop in loops]
        replies, samples = self.manager([Ask(manager_prompt(request), [], request) for request in requests],
                                        derive_seed(seed, "memory"))
        for loop, request, reply, sample in zip(loops, requests, replies, samples):
            entries = parse_entries(reply, f"{loop.index}-{attempt}")
            loop.memory.add(entries)
            loop.attempts[-1].update(memory_request=request, memory_reply=reply,
                                     memory_added=[entry.to_dict() for entry in entries])
            self._charge(loop, sample)

    def row(self, loop: ItemLoop) -> dict:
        last = loop.attempts[-1]
        row = self.evaluation.row(loop.index, loop.item, loop.samples[-1], attempts=loop.attempts)
        row.update(answer=last["answer"], verdict=last["verdict"], source=last["source"], **loop.cost)
        return row

    def write_combined_data(self, new_rows: list[dict]) -> None:
        """RMM's combined data of every row so far (those already written and this batch's), rewritten whole."""
        files = self.evaluation.config.data.val_files
        dataset = Path(files if isinstance(files, str) else files[0]).stem
        rows = read_rows(self.rows_path) + new_rows
        with atomic_path(self.evaluation.folder / COMBINED_DATA) as partial:
            Path(partial).write_text(json.dumps(combined_rows(rows, dataset), indent=1, ensure_ascii=False) + "\n")

    @staticmethod
    def _charge(loop: ItemLoop, sample) -> None:
        if sample is not None:  # a chat API's tokens are not ours
            loop.cost["tokens"] += len(sample.response_ids)
            loop.cost["forwards"] += len(sample.response_ids)


def replayed_memory(rows: list[dict]) -> MemoryBuffer:
    """The data-set memory after the rows already written: their entries in item order, attempt order."""
    memory = MemoryBuffer()
    for row in sorted(rows, key=lambda row: row["index"]):
        for attempt in row["attempts"]:
            memory.add([MemoryEntry.from_dict(entry) for entry in attempt.get("memory_added", [])])
    return memory


def shown_prompt(tokenizer, prompt) -> str:
    """The prompt as the model read it (chat template included), each run of image pads written once with its count."""
    text = tokenizer.decode(prompt.input_ids)
    pad = "<|image_pad|>"
    return _IMAGE_PADS.sub(lambda match: f"{pad}×{len(match.group(0)) // len(pad)}", text)


def combined_rows(rows: list[dict], dataset: str) -> list[dict]:
    """One training row per manager call that added memory, in RMM's combined data format (`reasoning`, `feedback`,
    `memory_entry`, what its trainer reads, with its simulation's per-problem fields), plus `problem` and `response`:
    the manager's exact prompt and target, which `python -m RL.train_sft` reads as text rows (data.prompt_key=problem,
    data.format_prompt="")."""
    out = []
    for row in sorted(rows, key=lambda row: row["index"]):
        for k, attempt in enumerate(row["attempts"]):
            entries = [MemoryEntry.from_dict(entry) for entry in attempt.get("memory_added") or []]
            if not entries:
                continue
            target, following = typed_text(entries), row["attempts"][k + 1:k + 2]
            out.append({"problem_id": f"{row['id']}-{attempt['attempt']}", "dataset": dataset,
                        "question": row["question"].replace(IMAGE_MARKER, "").strip(),
                        "has_image": "<|image_pad|>" in attempt["prompt"],
                        "ground_truth": row["ground_truth"], "initial_solution": attempt["response"],
                        "reasoning": attempt["response"], "feedback": attempt["critique"],
                        "memory_before": attempt["memory"], "memory_entry": target,
                        "second_attempt": following[0]["response"] if following else "",
                        "problem": manager_prompt(attempt["memory_request"]), "response": target})
    return out


def rmm_metrics(rows: list[dict]) -> dict:
    """VITA-RMM's four metrics from the per-attempt verdicts (attempts without a verdict are left out); correction
    effectiveness counts, as VITA-RMM's does, the items whose first attempt was wrong among those retried."""
    finals = [row["verdict"] for row in rows if row["verdict"] is not None]
    steps = [a["verdict"] for row in rows for a in row["attempts"] if a["verdict"] is not None]
    pairs = [(before, after) for row in rows for before, after in zip(row["attempts"], row["attempts"][1:])
             if before["verdict"] == 0 and after["verdict"] is not None]
    repeated = [after["verdict"] == 0 and normalize_text(after["answer"]) == normalize_text(before["answer"])
                for before, after in pairs]
    wrong_first = [row for row in rows if len(row["attempts"]) >= 2 and row["attempts"][0]["verdict"] == 0]
    corrected = [row["attempts"][-1]["verdict"] == 1 for row in wrong_first]
    rate = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    return {"final_accuracy": rate([v > 0 for v in finals]), "step_correctness": rate([v > 0 for v in steps]),
            "error_repetition_rate": rate(repeated), "correction_effectiveness": rate(corrected)}


def typed_rate(rows: list[dict]) -> float:
    """The share of the manager's replies in the trained format (typed entries, not free text or nothing): how a
    trained manager's replies differ from its base's."""
    writes = [attempt["memory_added"] for row in rows for attempt in row["attempts"] if "memory_added" in attempt]
    typed = [bool(added) and not added[0]["metadata"].get("free_text") for added in writes]
    return sum(typed) / len(typed) if typed else float("nan")
