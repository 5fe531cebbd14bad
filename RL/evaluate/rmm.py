"""The RMM pass: reason -> self-critique -> typed memory -> retry with the memory in the prompt, up to
`eval.rmm_attempts` attempts, batched over the items of a batch (each step one generation round on the workers).

An item stops when its critic says "VERDICT: correct" or at the last attempt; its answer is its last attempt. Every
attempt is judged against the gold answer by the harness (rules, then the API judge), for the metrics only: neither
the critic nor the memory writer ever sees the gold answer. VITA-RMM's four metrics come from those logged verdicts:
final accuracy, step correctness (attempts judged correct), error repetition rate (a wrong answer given again at the
next attempt) and correction effectiveness (first attempt wrong, final right, among items with two or more attempts).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from RL.data.format_prompt import FormatPrompt, IMAGE_MARKER
from RL.evaluate.judging import judge_rows
from RL.evaluate.memory import (MemoryBuffer, ApiMemoryWriter, critic_text, memory_request, parse_critic,
                                parse_entries, with_memory)
from RL.evaluate.item_prompts import encode, item_prompt, item_question
from RL.evaluate.evaluation import Evaluation
from rewards.answer import normalize_text
from common.seeding import derive_seed


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
        self.writer = memory_writer(evaluation)

    def __call__(self, batch: int, indices: list[int]) -> list[dict]:
        loops = [ItemLoop(index, self.evaluation.dataset[index]) for index in indices]
        active = loops
        for attempt in range(1, self.ev.rmm_attempts + 1):
            seed = derive_seed(self.ev.seed, "rmm", batch, attempt)
            self.reason(active, attempt, seed)
            confirmed = self.critique(active, seed)
            active = [loop for loop, done in zip(active, confirmed) if not done]
            if not active or attempt == self.ev.rmm_attempts:
                break
            self.remember(active, attempt)
        return [self.row(loop) for loop in loops]

    def reason(self, loops: list[ItemLoop], attempt: int, seed: int) -> None:
        """One attempt per item (the first with the item's own prompt), judged against the gold answer."""
        ev, data = self.evaluation, self.evaluation.config.data
        prompts = [item_prompt(loop.item) if attempt == 1 else
                   encode(ev.processor, self.format_prompt(with_memory(item_question(loop.item), loop.memory)),
                          loop.item["images"], data) for loop in loops]
        samples = ev.generate(prompts, ev.params(), seed)
        rows = [{"question": loop.item["question"], "response": ev.render(sample),
                 "ground_truth": str(loop.item["ground_truth"])} for loop, sample in zip(loops, samples)]
        judge_rows(rows, ev.judge)
        for loop, sample, row in zip(loops, samples, rows):
            loop.samples.append(sample)
            loop.attempts.append({"attempt": attempt, "memory": loop.memory.render(), "response": row["response"],
                                  "answer": row["answer"], "verdict": row["verdict"], "source": row["source"]})
            self._charge(loop, sample)

    def critique(self, loops: list[ItemLoop], seed: int) -> list[bool]:
        """The model criticises its own last attempt (with the image, without the gold answer)."""
        ev = self.evaluation
        texts = [critic_text(item_question(loop.item), loop.attempts[-1]["response"], loop.attempts[-1]["answer"])
                 for loop in loops]
        prompts = [encode(ev.processor, text, loop.item["images"], ev.config.data) for text, loop in zip(texts, loops)]
        samples = ev.generate(prompts, ev.params(max_new_tokens=self.ev.rmm_critic_max_new_tokens),
                              derive_seed(seed, "critic"))
        confirmed = []
        for loop, text, sample in zip(loops, texts, samples):
            critique = ev.render(sample)
            loop.attempts[-1].update(critic_prompt=text, critique=critique, critic_verdict=parse_critic(critique))
            self._charge(loop, sample)
            confirmed.append(loop.attempts[-1]["critic_verdict"] is True)
        return confirmed

    def remember(self, loops: list[ItemLoop], attempt: int) -> None:
        """New typed entries from the writer, added to each item's buffer for its next attempt."""
        requests = [memory_request(item_question(loop.item).replace(IMAGE_MARKER, "").strip(),
                                   loop.attempts[-1]["response"], loop.attempts[-1]["critique"], loop.memory)
                    for loop in loops]
        replies, samples = self.writer(requests)
        for loop, request, reply, sample in zip(loops, requests, replies, samples):
            entries = parse_entries(reply, f"{loop.index}-{attempt}")
            loop.memory.add(entries)
            loop.attempts[-1].update(memory_request=request, memory_reply=reply,
                                     memory_added=[entry.to_dict() for entry in entries])
            if sample is not None:
                self._charge(loop, sample)

    def row(self, loop: ItemLoop) -> dict:
        last = loop.attempts[-1]
        row = self.evaluation.row(loop.index, loop.item, loop.samples[-1], attempts=loop.attempts, **loop.cost)
        row.update(answer=last["answer"], verdict=last["verdict"], source=last["source"])
        return row

    @staticmethod
    def _charge(loop: ItemLoop, sample) -> None:
        loop.cost["tokens"] += len(sample.response_ids)
        loop.cost["forwards"] += len(sample.response_ids)


def memory_writer(evaluation: Evaluation):
    """requests -> (replies, samples or Nones): the evaluated model on the workers (`self`), a local model loaded
    here (a folder), or a chat API (`api:<model name>`)."""
    ev, data = evaluation.config.eval, evaluation.config.data
    spec = ev.rmm_memory_model
    if spec.startswith("api:"):
        writer = ApiMemoryWriter(spec[4:], ev.rmm_api_base_url, evaluation.config.worker.rule_based_judge)
        return lambda requests: (writer.write(requests), [None] * len(requests))
    params = evaluation.params(strategy="greedy", max_new_tokens=ev.rmm_memory_max_new_tokens)
    if spec == "self":
        processor, generate = evaluation.processor, lambda prompts: evaluation.generate(prompts, params, ev.seed)
    else:
        from monet_models.transformers import load_latent_model
        from workers.rollout.native import NativeRolloutEngine

        model, processor = load_latent_model(spec, dtype=evaluation.config.worker.rollout.dtype)
        engine = NativeRolloutEngine(model.eval(), processor.tokenizer)
        generate = lambda prompts: engine.generate(prompts, params)  # noqa: E731

    def write(requests: list[str]):
        from RL.evaluate.memory import MEMORY_SYSTEM

        samples = generate([encode(processor, f"{MEMORY_SYSTEM}\n\n{request}", [], data) for request in requests])
        return [processor.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples], samples

    return write


def rmm_metrics(rows: list[dict]) -> dict:
    """VITA-RMM's four metrics from the per-attempt verdicts (attempts without a verdict are left out)."""
    finals = [row["verdict"] for row in rows if row["verdict"] is not None]
    steps = [a["verdict"] for row in rows for a in row["attempts"] if a["verdict"] is not None]
    pairs = [(before, after) for row in rows for before, after in zip(row["attempts"], row["attempts"][1:])
             if before["verdict"] == 0 and after["verdict"] is not None]
    repeated = [after["verdict"] == 0 and normalize_text(after["answer"]) == normalize_text(before["answer"])
                for before, after in pairs]
    retried = [row for row in rows if len(row["attempts"]) >= 2]
    corrected = [row["attempts"][0]["verdict"] == 0 and row["attempts"][-1]["verdict"] == 1 for row in retried]
    rate = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    return {"final_accuracy": rate([v > 0 for v in finals]), "step_correctness": rate([v > 0 for v in steps]),
            "error_repetition_rate": rate(repeated), "correction_effectiveness": rate(corrected)}
