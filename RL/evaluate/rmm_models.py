"""The two models around RMM's loop besides the one evaluated: the critic (`eval.rmm_feedback_model`) and the memory
manager (`eval.rmm_memory_model`). Each is one of
- `self`: the evaluated model on the evaluation workers;
- a local folder, loaded once in this process (on the GPU when there is one): a Qwen2.5-VL folder, or a LoRA adapter
  folder (`adapter_config.json` without `config.json`), whose base (the adapter's `base_model_name_or_path`) is loaded
  and the adapter merged into it: the trained memory manager of `examples/rmm_train.sh`;
- `api:<model name>`: a chat API through the judge's provider clients (text only: it never sees an image).

A client takes `Ask`s and returns (replies, samples): the samples of local and worker generation give the cost; an
API's are None.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from RL.data.format_prompt import IMAGE_MARKER
from RL.evaluate import EvaluationError
from RL.evaluate.evaluation import Evaluation
from RL.evaluate.item_prompts import encode
from RL.evaluate.memory import ApiChat


@dataclass
class Ask:
    """One request: `text` (a local model's whole user turn, `<image>` markers for `images`) and `api_text` (what a
    chat API reads as its user message, beside its own system message)."""

    text: str
    images: list
    api_text: str


class ChatClient:
    """`client(asks, seed) -> (replies, samples or Nones)` for one model spec."""

    def __init__(self, evaluation: Evaluation, spec: str, system: str, max_new_tokens: int, latent: bool,
                 loaded: dict):
        """`latent`: the evaluated model (`self`) answers with the evaluation's strategy (latent blocks with
        `monet`) rather than greedy text; `loaded` holds the local models already loaded, by folder."""
        self.evaluation, self.spec = evaluation, spec
        ev = evaluation.config.eval
        strategy = {} if latent and spec == "self" else {"strategy": "greedy"}
        self.params = evaluation.params(max_new_tokens=max_new_tokens, **strategy)
        if spec.startswith("api:"):
            self.api = ApiChat(spec[4:], ev.rmm_api_base_url, evaluation.config.worker.rule_based_judge, system)
        elif spec != "self":
            if spec not in loaded:
                loaded[spec] = load_local(spec, evaluation.config.worker.rollout.dtype)
            self.model, self.processor = loaded[spec]

    def __call__(self, asks: list[Ask], seed: int) -> tuple[list[str], list]:
        ev = self.evaluation
        if self.spec.startswith("api:"):
            return self.api([ask.api_text for ask in asks]), [None] * len(asks)
        data = ev.config.data
        if self.spec == "self":
            prompts = [encode(ev.processor, ask.text, ask.images, data) for ask in asks]
            samples = ev.generate(prompts, self.params, seed)
            return [ev.render(sample) for sample in samples], samples
        prompts = [encode(self.processor, ask.text, ask.images, data) for ask in asks]
        samples = self.model.generate(prompts, dataclasses.replace(self.params, seed=seed))
        decode = self.processor.tokenizer.decode
        return [decode(sample.response_ids, skip_special_tokens=True) for sample in samples], samples


def load_local(path: str, dtype: str):
    """(engine, processor) of a local model folder or a LoRA adapter folder (its base with the adapter merged)."""
    import torch

    from monet_models.transformers import load_latent_model
    from workers.rollout.native import NativeRolloutEngine

    folder = Path(path)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        from peft import PeftConfig, PeftModel

        base = PeftConfig.from_pretrained(path).base_model_name_or_path
        if not base or not Path(base).is_dir():
            raise EvaluationError(f"{path}: the adapter's base model {base!r} (adapter_config.json) is not a folder "
                                  "here; the base weights are needed to run the adapter")
        model, processor = load_latent_model(base, dtype=dtype)
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    else:
        model, processor = load_latent_model(path, dtype=dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return NativeRolloutEngine(model.to(device).eval(), processor.tokenizer), processor


def api_text(text: str) -> str:
    """A prompt for a text-only chat API: its `<image>` markers replaced by a note (VITA-RMM's simulation's)."""
    if IMAGE_MARKER not in text:
        return text
    return "[This problem includes an image] " + text.replace(IMAGE_MARKER, "").strip()
