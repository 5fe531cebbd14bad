"""Answers from an OpenAI-compatible endpoint (`eval.endpoint`, `eval.endpoint_model`) instead of the model on Ray
workers: our served model (`python -m tools.serve`) or any API model, as a baseline on the same items and judge.

Each item goes as one chat request: the question as the dataset prepared it (the model folder's prompt template,
one image per `<image>` marker, in place) with its images, already fitted to the pixel range, as PNG data URLs;
greedy (temperature 0), the evaluation's max_new_tokens and a per-item seed. Text-only passes (`strategy=greedy`,
`ablate=text`) add `vllm_xargs: {latent: 0}`, which only our server understands. The items of a batch go in parallel.
The key, when the endpoint needs one, is read from EVAL_ENDPOINT_API_KEY when the client is built and never stored
in the config, the output folder or the logs.
"""
from __future__ import annotations

import base64
import io
import os
from concurrent.futures import ThreadPoolExecutor

from RL.data.format_prompt import IMAGE_MARKER
from RL.evaluate import EvaluationError
from RL.evaluate.item_prompts import item_question
from common.seeding import derive_seed
from monet_models.vllm.serve_args import count_latents

KEY_VARIABLE = "EVAL_ENDPOINT_API_KEY"
PARALLEL_REQUESTS = 16
FINISH = {"stop": "eos", "length": "length"}


class EndpointAnswers:
    def __init__(self, url: str, model: str, timeout_s: float = 600.0):
        from openai import OpenAI

        self.url = url
        self.client = OpenAI(base_url=url, api_key=os.environ.get(KEY_VARIABLE) or "EMPTY", timeout=timeout_s,
                             max_retries=2)
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        try:
            models = [model.id for model in self.client.models.list()]
        except Exception as error:  # noqa: BLE001 - every client failure means the same to the user
            raise EvaluationError(f"eval.endpoint: cannot list the models of {self.url} ({type(error).__name__}: "
                                  f"{str(error)[:200]}); is the server up?") from None
        if not models:
            raise EvaluationError(f"eval.endpoint: {self.url} serves no model; set eval.endpoint_model")
        return models[0]

    def rows(self, evaluation, indices: list[int], items: list[dict], params, seed: int) -> list[dict]:
        """The items' rows (unjudged), answered by the endpoint with `params`' length and strategy."""
        xargs = {} if params.uses_latents else {"vllm_xargs": {"latent": 0}}
        requests = [(self.messages(evaluation.dataset.format_prompt(item_question(item)), item["images"]),
                     derive_seed(seed, "item", index)) for index, item in zip(indices, items)]
        with ThreadPoolExecutor(max_workers=min(PARALLEL_REQUESTS, len(requests))) as pool:
            answers = list(pool.map(lambda request: self.ask(*request, params.max_new_tokens, xargs), requests))
        return [evaluation.text_row(index, item, **answer) for index, item, answer in zip(indices, items, answers)]

    def ask(self, messages: list[dict], seed: int, max_tokens: int, extra_body: dict) -> dict:
        try:
            reply = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0.0,
                                                        max_tokens=max_tokens, seed=seed, extra_body=extra_body or None)
        except Exception as error:  # noqa: BLE001
            raise EvaluationError(f"eval.endpoint: {self.url} ({self.model}) failed a request: "
                                  f"{type(error).__name__}: {str(error)[:300]}") from None
        choice = reply.choices[0]
        text = choice.message.content or ""
        blocks, latents = count_latents(text)
        tokens = reply.usage.completion_tokens if reply.usage else 0
        return {"response": text, "finish_reason": FINISH.get(choice.finish_reason, choice.finish_reason or "eos"),
                "tokens": tokens, "blocks": blocks, "latents": latents}

    @staticmethod
    def messages(text: str, images: list) -> list[dict]:
        """One user message: the text split on `<image>` markers, each marker replaced by its image."""
        content, pictures = [], iter(images)
        for position, chunk in enumerate(text.split(IMAGE_MARKER)):
            if position:
                content.append({"type": "image_url", "image_url": {"url": data_url(next(pictures))}})
            if chunk:
                content.append({"type": "text", "text": chunk})
        return [{"role": "user", "content": content}]


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
