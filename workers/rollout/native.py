"""The native rollout engine: batched, KV-cached decoding with torch + transformers, latent blocks included.

Per chunk of prompts: images are encoded once, the unique prompts are prefilled once (left-padded, explicit
mRoPE positions) and the cache is repeated n times. Each decode step is one forward for the whole batch with
explicit (3, B, 1) positions (unpadded index + per-row rope delta; transformers 5.x ignores cache positions), and
inputs that are either token embeddings or, at latent steps, the previous final-norm hidden state (+ noise).
Finished rows are dropped from the cache and every per-row tensor once enough of them have finished, so the
cost shrinks with the batch. `continue_from` runs the same decoding after a context the caller ran through the model
itself (test-time latent optimisation), and `SamplingParams.latent_override` replaces the latents fed (ablations).
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass

import torch

from common.checkpoint_layout import PEFT_PREFIX
from common.padding import left_pad, left_pad_mask
from monet_models.latent_tokens import LatentTokens, noise_scale
from workers.rollout.kv_cache import RolloutCache
from workers.rollout.base import (LATENT_OVERRIDES, WAKE_TAGS, PromptInput, RolloutEngine, RolloutSample,
                                  SamplingParams, wake_order, weights_items)
from workers.rollout.latent_state import LatentLayout, LatentStates
from workers.rollout.records import RolloutRecorder
from workers.rollout.sampling import LatentNoise, Sampler, base_seed, log_probs_of, make_generator


@dataclass
class _Batch:
    """Per-row decode state of the live batch; `rows` maps live rows to recorder rows."""

    rows: torch.Tensor
    cache: RolloutCache
    mask: torch.Tensor  # (B, prompt_len + max_new) bool, every generated column already True
    base_position: torch.Tensor  # (B,) unpadded prompt length + rope delta
    hidden: torch.Tensor  # (B, D) final-norm hidden state of the last position
    logits: torch.Tensor  # (B, V) fp32
    done: torch.Tensor  # (B,) bool
    end_at: torch.Tensor  # (B,) response length once done
    seen: torch.Tensor | None  # (B, V) bool for the repetition penalty
    states: LatentStates
    needs_mask: bool

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        for name in ("rows", "mask", "base_position", "hidden", "logits", "done", "end_at"):
            setattr(self, name, getattr(self, name)[keep])
        if self.seen is not None:
            self.seen = self.seen[keep]
        self.states.select(keep)
        self.needs_mask = not bool(self.mask.all())


@dataclass
class Continuation:
    """A context of one sequence the caller already ran through the model (DMLR: the prompt and its optimised latent
    block, with injected patches): decoding goes on from its KV cache as `generate`'s does after a prefill."""

    cache: object  # a transformers DynamicCache over `length` positions, batch 1; consumed by `continue_from`
    hidden: torch.Tensor  # (D,) final-norm hidden state at the last position
    logits: torch.Tensor  # (V,) logits at the last position
    length: int
    next_position: int  # mRoPE position (all three axes) of the first response token


class LatentOverride:
    """What `SamplingParams.latent_override` feeds instead of h, for the rows of one decode (row = request - first).

    Only the vectors change: the block layout, the positions and everything sampled around them stay the engine's.
    """

    def __init__(self, params: SamplingParams, seed: int, first_request: int):
        self.kind, self.given, self.first = params.latent_override, params.given_latents, first_request
        self.noise = LatentNoise(1.0, seed, first_request) if self.kind == "noise" else None
        self.placed: dict[int, int] = {}

    def __call__(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """(len(rows), D) fp32 latents for rows placing a pad now, whose hidden states are `hidden`."""
        if self.kind == "zero":
            return torch.zeros_like(hidden)
        if self.kind == "noise":  # a random direction with h's norm: the scale of a latent, none of its content
            eps = self.noise.draw(rows, hidden.shape[-1]).to(hidden.device)
            return eps * (hidden.norm(dim=-1, keepdim=True) / eps.norm(dim=-1, keepdim=True))
        return torch.stack([self._given(row, hidden.shape[-1]) for row in rows]).to(hidden.device)

    def _given(self, row: int, dim: int) -> torch.Tensor:
        request = self.first + row
        vectors = self.given[request]
        if vectors is None or len(vectors) == 0 or vectors.shape[-1] != dim:
            shape = None if vectors is None else tuple(vectors.shape)
            raise ValueError(f"request {request} places a latent but given_latents[{request}] is {shape}; "
                             f"need (m >= 1, {dim})")
        count = self.placed.get(row, 0)
        self.placed[row] = count + 1
        return vectors[count % len(vectors)].float()


class NativeRolloutEngine(RolloutEngine):
    """`generate` for a `LatentQwen2_5_VLForConditionalGeneration` (see `monet_models.transformers`).

    max_batch_prompts bounds memory (prompts decoded together; their n samples share the batch);
    compact_fraction is the share of finished rows that triggers compaction.

    Memory between calls: the KV caches live only inside a `generate` call (one `RolloutCache` per chunk, reserved
    for the response at prefill), so `sleep` has no cache to drop; it makes sure none survives (a reference cycle
    would keep one until the next garbage collection) and, on a GPU, moves the weights to host memory.
    """

    latent_overrides = LATENT_OVERRIDES

    def __init__(self, model, tokenizer, max_batch_prompts: int | None = None, compact_fraction: float = 0.25,
                 progress: bool = False):
        self.model = model
        self.tokens = LatentTokens.from_tokenizer(tokenizer)
        if getattr(model, "latent_tokens", None) is None:
            model.set_latent_tokens(self.tokens)
        self.real_vocab_size = len(tokenizer)
        self.max_batch_prompts = max_batch_prompts
        self.compact_fraction = compact_fraction
        self.progress = progress
        language_model = model.model.language_model
        self._ready_mask = (model.config._attn_implementation == "sdpa"
                            and not getattr(language_model, "has_sliding_layers", False))
        self.stats: dict[str, int] = {}  # of the last generate: decode forwards, rows x forwards, compactions
        self.home_device = self.device  # where the weights compute; sleep moves them off a GPU
        self.asleep: set[str] = set()  # WAKE_TAGS that sleep

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def stop_ids(self, params: SamplingParams) -> torch.Tensor:
        """The tokenizer's EOS, the generation config's EOS ids (Qwen lists two) and the params' extra stops."""
        config_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if config_eos is None:
            config_eos = []
        elif isinstance(config_eos, int):
            config_eos = [config_eos]
        ids = {self.tokens.eos, *config_eos, *params.stop_token_ids}
        return torch.tensor(sorted(ids), device=self.device)

    def generate(self, prompts: list[PromptInput], params: SamplingParams, lora: str | None = None
                 ) -> list[RolloutSample]:
        """`lora` names a PEFT adapter already loaded into the model (None = the model as it is)."""
        self._check_awake()
        if params.given_latents is not None and len(params.given_latents) != len(prompts) * params.n:
            raise ValueError(f"given_latents has {len(params.given_latents)} entries for {len(prompts) * params.n} "
                             "requests (prompts x n)")
        chunk = self.max_batch_prompts or max(len(prompts), 1)
        samples: list[RolloutSample] = []
        layout = self.layout(params)
        with self._session(params, lora) as (generator, seed):
            for offset in range(0, len(prompts), chunk):
                batch = self._prefill(prompts[offset:offset + chunk], params, layout)
                samples += self._decode_batch(batch, params, layout, generator, seed, offset)
        return samples

    def continue_from(self, start: Continuation, params: SamplingParams) -> list[RolloutSample]:
        """`params.n` responses after a context the caller ran through the model itself (see `Continuation`)."""
        given = params.given_latents
        if params.repetition_penalty != 1.0 or (given is not None and len(given) != params.n):
            raise ValueError("continue_from: no repetition penalty (the context ids are not kept), and given_latents "
                             "needs one entry per sample")
        self._check_awake()
        with self._session(params, None) as (generator, seed):
            layout = self.layout(params)
            return self._decode_batch(self._continued(start, params, layout), params, layout, generator, seed, 0)

    @contextlib.contextmanager
    def _session(self, params: SamplingParams, lora: str | None):
        """Eval mode, no gradients, the adapter selected, fresh stats; yields (sampling generator, noise seed)."""
        self.stats = {"forwards": 0, "row_forwards": 0, "compactions": 0}
        was_training = self.model.training
        # Eval mode: under gradient checkpointing, train-mode layers silently drop the KV cache.
        self.model.eval()
        try:
            self._select_adapter(lora)
            with torch.no_grad():
                yield make_generator(params.seed, self.device), base_seed(params.seed)
        finally:
            self.model.train(was_training)

    def _lora_layers(self, name: str) -> list:
        from peft.tuners.lora import LoraLayer

        layers = [module for module in self.model.modules() if isinstance(module, LoraLayer)]
        if not layers or name not in layers[0].lora_A:
            known = sorted(layers[0].lora_A) if layers else []
            raise KeyError(f"no LoRA adapter named {name!r} in the native engine's model; known: {known}")
        return layers

    def _select_adapter(self, lora: str | None) -> None:
        """Make `lora` the active adapter of every LoRA layer (the model holds the base once and every adapter)."""
        if lora is not None:
            for layer in self._lora_layers(lora):
                layer.set_adapter(lora)

    def update_adapter(self, name: str, tensors, config=None) -> None:
        """Copy peft-named LoRA tensors (a Mapping or (name, tensor) pairs) into adapter `name` (already injected into
        the model, see apply_lora), in memory."""
        self._lora_layers(name)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for key, value in weights_items(tensors):
                target = key.removeprefix(PEFT_PREFIX).replace(".lora_A.", f".lora_A.{name}.").replace(
                    ".lora_B.", f".lora_B.{name}.")
                if target not in params:
                    raise KeyError(f"update_adapter: the model has no LoRA parameter {target}")
                _copy_into(params[target], value, target)

    def update_weights(self, weights) -> None:
        """Copy new weights (HF names; (name, tensor) pairs or a state dict, possibly a subset) into the model's own
        tensors one at a time, as the iterator yields them: no second state dict is built."""
        targets = self.model.state_dict(keep_vars=True)  # names -> the live parameters and buffers (tied: both names)
        with torch.no_grad():
            for name, value in weights_items(weights):
                if name not in targets:
                    raise KeyError(f"update_weights: the model has no parameters named {name}")
                _copy_into(targets[name], value, name)

    # ---- memory between generation phases ------------------------------------------------------------------------
    def sleep(self) -> None:
        """Free what generation holds and, on a GPU, move the weights to host memory (CPU: they stay, being the
        engine's own copy). Idempotent; `generate` refuses to run until `wake_up`."""
        if "weights" not in self.asleep and self.home_device.type != "cpu":
            self.model.to("cpu")
        self.asleep.update(WAKE_TAGS)
        gc.collect()  # a decode's cache caught in a reference cycle would otherwise outlive the phase

    def wake_up(self, tags=WAKE_TAGS) -> None:
        """Weights back to their device; the KV cache needs nothing (each `generate` reserves its own)."""
        for tag in wake_order(tags):
            if tag == "weights" and "weights" in self.asleep and self.home_device.type != "cpu":
                self.model.to(self.home_device)
            self.asleep.discard(tag)

    def _check_awake(self) -> None:
        if self.asleep:
            raise RuntimeError(f"the native engine's {' and '.join(sorted(self.asleep))} sleep: call wake_up() before "
                               "generating")

    def layout(self, params: SamplingParams) -> LatentLayout:
        vocab = self.model.get_output_embeddings().weight.shape[0]
        return LatentLayout(self.tokens, params.latent_size, params.uses_latents, vocab, self.real_vocab_size)

    def _decode_batch(self, batch: _Batch, params, layout, generator, seed: int, offset: int) -> list[RolloutSample]:
        """Decode a prefilled batch whose rows are requests offset * n + row; latent noise and overrides drawn per
        request from `seed`."""
        first = offset * params.n
        noise = None
        if params.uses_latents and params.latent_noise_std > 0:
            noise = LatentNoise(params.latent_noise_std, seed, first, params.latent_noise_relative)
        override = LatentOverride(params, seed, first) if params.latent_override != "none" else None
        recorder = RolloutRecorder(len(batch.rows), params.max_new_tokens, self.tokens.pad_token, self.device)
        self._decode(batch, params, layout, generator, recorder, noise, override)
        return recorder.to_samples(params.n, offset, layout)

    def _prefill(self, prompts: list[PromptInput], params: SamplingParams, layout: LatentLayout) -> _Batch:
        """Prefill each unique prompt once, then repeat its cache and state for its n samples."""
        model, device = self.model, self.device
        ids = left_pad([p.input_ids for p in prompts], self.tokens.pad_token).long().to(device)
        mask = left_pad_mask([len(p.input_ids) for p in prompts], ids.shape[1]).to(device)
        grids = [p.image_grid_thw for p in prompts if p.has_images]
        grid = torch.cat(grids).to(device) if grids else None
        image_embeds = None
        if grid is not None:
            visual = getattr(model.model, "visual", None)
            dtype = visual.dtype if visual is not None else model.dtype
            pixels = torch.cat([p.pixel_values for p in prompts if p.has_images]).to(device, dtype)
            image_embeds = model.encode_images(pixels, grid)
        positions, deltas = model.mrope_positions(ids, mask, grid)
        cache = RolloutCache(model.config, reserve=params.max_new_tokens)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, image_embeds=image_embeds,
                    past_key_values=cache, use_cache=True, compute_logits=False, latent_mode=True)
        hidden = out.hidden_states[:, -1]
        logits = model.lm_head(hidden).float()
        base = mask.sum(-1) + deltas.view(-1).to(device)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(len(prompts), layout.vocab_size, dtype=torch.bool, device=device)
            seen.scatter_(1, ids, mask.bool())
        n = params.n
        if n > 1:
            cache.batch_repeat_interleave(n)
            mask, base, hidden, logits = (t.repeat_interleave(n, 0) for t in (mask, base, hidden, logits))
            seen = None if seen is None else seen.repeat_interleave(n, 0)
        return self._new_batch(cache, mask.bool(), base, hidden, logits, seen, params, layout)

    def _continued(self, start: Continuation, params: SamplingParams, layout: LatentLayout) -> _Batch:
        n, device = params.n, self.device
        if n > 1:
            start.cache.batch_repeat_interleave(n)
        mask = torch.ones(n, start.length, dtype=torch.bool, device=device)
        base = torch.full((n,), start.next_position, dtype=torch.long, device=device)
        hidden = start.hidden.to(device).view(1, -1).repeat(n, 1)
        logits = start.logits.to(device).float().view(1, -1).repeat(n, 1)
        return self._new_batch(start.cache, mask, base, hidden, logits, None, params, layout)

    def _new_batch(self, cache, mask, base, hidden, logits, seen, params: SamplingParams, layout) -> _Batch:
        """The decode state of rows whose context mask is `mask` (B, context length) bool."""
        rows, device = mask.shape[0], self.device
        full_mask = torch.cat([mask, mask.new_ones(rows, params.max_new_tokens, dtype=torch.bool)], dim=1)
        return _Batch(
            rows=torch.arange(rows, device=device), cache=cache, mask=full_mask, base_position=base, hidden=hidden,
            logits=logits, done=torch.zeros(rows, dtype=torch.bool, device=device),
            end_at=torch.full((rows,), params.max_new_tokens, dtype=torch.long, device=device), seen=seen,
            states=LatentStates(layout, rows, device), needs_mask=not bool(mask.all()),
        )

    def _decode(self, batch: _Batch, params, layout, generator, recorder: RolloutRecorder, noise, override) -> None:
        sampler = Sampler(params, layout.blocked_in_text(self.device), generator)
        stop_ids = None if params.ignore_eos else self.stop_ids(params)
        prompt_len = batch.mask.shape[1] - params.max_new_tokens
        steps = range(params.max_new_tokens)
        if self.progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc="rollout", unit="tok")
        for t in steps:
            tokens, feed = self._step(batch, sampler, stop_ids, params, t, recorder)
            # One host sync per step: it decides latent recording, stopping and compaction.
            num_done, num_feed = torch.stack([batch.done.sum(), feed.sum()]).tolist()
            latents = self._latents(batch, feed, num_feed, noise, override)
            if num_feed:
                recorder.record_latents(batch.rows[feed], t, latents[feed])
            if num_done == len(tokens) or t == params.max_new_tokens - 1:
                break
            inputs = self.model.get_input_embeddings()(tokens)
            if num_feed:
                inputs = torch.where(feed.unsqueeze(-1), latents.to(inputs.dtype), inputs)
            if num_done >= max(1, self.compact_fraction * len(tokens)):
                inputs = inputs[self._compact(batch, recorder)]
            self._forward(batch, inputs, prompt_len, t)
        recorder.record_end(batch.rows, batch.end_at, batch.done, batch.states.in_block)

    def _step(self, batch: _Batch, sampler: Sampler, stop_ids, params, t: int, recorder: RolloutRecorder):
        """Sample (text rows) or force (block rows) response position t; returns (tokens, rows feeding a latent)."""
        step = batch.states.advance(sampler(batch.logits, batch.seen))
        tokens = step.tokens
        log_probs = torch.where(step.sampled, log_probs_of(batch.logits, tokens, params.log_prob_temperature), 0.0)
        recorder.record_step(batch.rows, t, tokens, log_probs)
        feed = step.feed_latent & ~batch.done
        if stop_ids is not None:
            stopped = step.sampled & torch.isin(tokens, stop_ids) & ~batch.done
            batch.end_at = torch.where(stopped, t + 1, batch.end_at)
            batch.done |= stopped
        if batch.seen is not None:
            batch.seen[torch.arange(len(tokens), device=tokens.device), tokens] = True
        return tokens, feed

    def _compact(self, batch: _Batch, recorder: RolloutRecorder) -> torch.Tensor:
        """Drop finished rows (recording how they ended); returns the kept live-row indices."""
        keep = (~batch.done).nonzero().flatten()
        gone = batch.done.nonzero().flatten()
        recorder.record_end(batch.rows[gone], batch.end_at[gone], batch.done[gone], batch.states.in_block[gone])
        batch.select(keep)
        self.stats["compactions"] += 1
        return keep

    @staticmethod
    def _latents(batch: _Batch, feed: torch.Tensor, num_feed: int, noise: LatentNoise | None,
                 override: LatentOverride | None):
        """z = h + sigma * eps for every row (only feeding rows use it), or the override's vectors; None when no row
        feeds a latent. eps is drawn per request, at placement, only for the rows that place a pad (`LatentNoise`)."""
        if not num_feed:
            return None
        latents = batch.hidden.float()
        if noise is None and override is None:
            return latents
        rows = feed.nonzero().flatten()
        requests = batch.rows[rows].tolist()
        latents = latents.clone()
        if noise is not None:
            eps = noise.draw(requests, latents.shape[-1]).to(latents.device)
            latents[rows] += eps * noise_scale(latents[rows], noise.std, noise.relative)
        if override is not None:
            latents[rows] = override(latents[rows], requests)
        return latents

    def _forward(self, batch: _Batch, inputs: torch.Tensor, prompt_len: int, t: int) -> None:
        """Feed response position t (sequence column prompt_len + t); its mRoPE position is base + t on all rows."""
        rows = inputs.shape[0]
        self.stats["forwards"] += 1
        self.stats["row_forwards"] += rows
        positions = (batch.base_position + t).view(1, rows, 1).expand(3, rows, 1)
        mask = None
        if batch.needs_mask:
            mask = batch.mask[:, :prompt_len + t + 1]
            # sdpa takes a ready (B, 1, 1, L) padding mask as-is: no per-step mask construction in transformers.
            mask = mask[:, None, None, :] if self._ready_mask else mask
        out = self.model(inputs_embeds=inputs.unsqueeze(1), attention_mask=mask, position_ids=positions,
                         past_key_values=batch.cache, use_cache=True, latent_mode=True)
        batch.hidden = out.hidden_states[:, -1]
        batch.logits = out.logits[:, -1].float()


def _copy_into(target: torch.Tensor, value: torch.Tensor, name: str) -> None:
    """Copy `value` into `target` in place (cast to its dtype and device); a shape mismatch is refused by name
    (copy_ would broadcast a (1, D) row over a (V, D) matrix silently)."""
    if target.shape != value.shape:
        raise ValueError(f"weights for {name}: shape {tuple(value.shape)}, the engine's is {tuple(target.shape)}")
    target.copy_(value)
