"""The latent-block logits processor: the token layout's state machine inside vLLM's sampler.

For every request that carries `LatentRequestArgs` it:
- forces the block: after `<abs_vis_token>`, K `<abs_vis_token_pad>` then `</abs_vis_token>`; nothing is sampled
  inside a block, and the never-sampled ids (pads, vision tokens, padding vocabulary) are masked outside;
- places the latents: when it forces a pad it records z = h + sigma * eps, with h the final-norm hidden state of
  the request's last position and eps drawn from the request's own generator, and leaves z for the model to feed;
- records log softmax(raw logits / T) of every sampled token (0 at forced positions), before the request's logit
  bias, so the log-probs are those the training forward recomputes.

It must run for greedy requests too (`is_argmax_invariant` is False). The sampled token of a step is only known at
the next `update_state`, where the live output lists that vLLM hands over are read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from monet_models.latent_tokens import noise_scale
from monet_models.vllm.channel import LatentChannel
from monet_models.vllm.request import LatentRequestArgs

TEXT = -1


@dataclass
class LatentRecord:
    """One request's progress and what it produced; `count` is TEXT or the pads placed in the open block."""

    args: LatentRequestArgs
    outputs: list[int]  # vLLM's live list of this request's output tokens
    generator: torch.Generator | None
    row: int | None  # its row of the latent side buffer while it is in the batch (LatentChannel.acquire)
    seen: int = 0
    count: int = TEXT
    pending: int | None = None  # row of the last step's log-prob table, for a sampled token not yet seen
    collected: bool = False
    log_probs: list[float] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)

    def result(self) -> dict:
        """Tensors for the rollout engine (in the same process: vLLM's in-process engine hands them over as they
        are): fp32 log-probs (T,), fp32 CPU latents (num_latents, D) or None, and whether a block is still open."""
        latents = torch.stack(self.latents).float().cpu() if self.latents else None
        return {"log_probs": torch.tensor(self.log_probs, dtype=torch.float32), "latents": latents,
                "open_block": self.count != TEXT}


class LatentBlockLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.rows: dict[int, LatentRecord] = {}
        self.finished: dict[str, LatentRecord] = {}  # left the batch, not yet collected
        self._step: tuple[torch.Tensor, torch.Tensor] | None = None  # (scaled logits, logsumexp) of text rows
        self._channel: LatentChannel | None = None
        self._text_bias: torch.Tensor | None = None  # (2, V): masks of text mode without / with latents

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        args = LatentRequestArgs.from_extra_args(sampling_params.extra_args)
        if args is not None and sampling_params.n != 1:
            raise ValueError(f"latent request {args.key}: n must be 1 (one request per sample, each with its own key "
                             "and noise seed)")

    def request_args(self, params) -> LatentRequestArgs | None:
        """What a request asks of the blocks (None: a request this processor leaves alone). The rollout engine's
        requests carry `LatentRequestArgs`; the server's processor (`serving.py`) also builds them from flat keys."""
        return LatentRequestArgs.from_extra_args(params.extra_args)

    def is_argmax_invariant(self) -> bool:
        return False

    # --------------------------------------------------------------------------------------- batch bookkeeping
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self._catch_up(list(self.rows.values()))
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._leave(index)
        for index, params, _, outputs in batch_update.added:
            self._leave(index)
            args = self.request_args(params)
            if args is not None:
                self.rows[index] = self._admit(args, outputs)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.UNIDIRECTIONAL:
                self._leave(b)  # a one-way move overwrites whatever request was at b
            first, second = self.rows.pop(a, None), self.rows.pop(b, None)
            if first is not None:
                self.rows[b] = first
            if second is not None:
                self.rows[a] = second

    def _leave(self, index: int) -> None:
        record = self.rows.pop(index, None)
        if record is None:
            return
        self.channel.release(record.row)
        record.row = None
        if not record.collected and record.args.keep_record:
            self.finished[record.args.key] = record

    def _admit(self, args: LatentRequestArgs, outputs: list[int]) -> LatentRecord:
        record = self.finished.pop(args.key, None)
        if record is not None or outputs:  # back after preemption: fine unless latents were already fed
            if record is None or record.latents:
                raise RuntimeError(f"latent request {args.key} was preempted and would be recomputed, which cannot "
                                   "reproduce its latents: give the engine more KV cache or fewer sequences")
            record.outputs, record.row = outputs, self.channel.acquire()
            return record
        generator = None
        if args.noise_std > 0:
            generator = torch.Generator().manual_seed(args.noise_seed)
        return LatentRecord(args, outputs, generator, self.channel.acquire())

    def _catch_up(self, records: list[LatentRecord]) -> None:
        """Read the tokens vLLM appended since the last step and advance each request's block state."""
        gather = [(r, r.pending, r.outputs[r.seen]) for r in records
                  if r.pending is not None and len(r.outputs) > r.seen]
        if gather:
            scaled, lse = self._step
            rows = torch.tensor([row for _, row, _ in gather], device=scaled.device)
            tokens = torch.tensor([token for _, _, token in gather], device=scaled.device)
            values = (scaled[rows, tokens] - lse[rows]).tolist()
            for (record, _, _), value in zip(gather, values):
                record.log_probs.append(value)
                record.seen += 1
                self._advance(record, record.outputs[record.seen - 1])
        for record in records:
            record.pending = None
            while record.seen < len(record.outputs):  # forced tokens (log-prob 0)
                record.log_probs.append(0.0)
                record.seen += 1
                self._advance(record, record.outputs[record.seen - 1])

    def _advance(self, record: LatentRecord, token: int) -> None:
        tokens, K = self.channel.tokens, record.args.latent_size
        if record.count == TEXT:
            if token == tokens.start and record.args.allow_latents:
                record.count = 0
        elif record.count < K:
            if token != tokens.pad:
                raise RuntimeError(f"request {record.args.key}: expected a forced latent pad, got token {token}")
            record.count += 1
        else:
            if token != tokens.end:
                raise RuntimeError(f"request {record.args.key}: expected the forced block end, got token {token}")
            record.count = TEXT

    # ---------------------------------------------------------------------------------------------- the step
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        text = [(row, r) for row, r in self.rows.items() if r.count == TEXT]
        forced = [(row, r) for row, r in self.rows.items() if r.count != TEXT]
        if text:
            self._text_step(logits, text)
        if forced:
            self._forced_step(logits, forced)
        return logits

    def _text_step(self, logits: torch.Tensor, text: list[tuple[int, LatentRecord]]) -> None:
        rows = torch.tensor([row for row, _ in text], device=logits.device)
        temperature = torch.tensor([r.args.log_prob_temperature for _, r in text], device=logits.device)
        scaled = logits[rows] / temperature.unsqueeze(-1)
        self._step = (scaled, torch.logsumexp(scaled, dim=-1))
        for index, (_, record) in enumerate(text):
            record.pending = index
        allow = torch.tensor([int(r.args.allow_latents) for _, r in text], device=logits.device)
        logits[rows] += self.text_bias(logits)[allow]
        for row, record in text:
            if record.args.logit_bias:
                ids, values = zip(*record.args.logit_bias)
                logits[row, list(ids)] += torch.tensor(values, dtype=logits.dtype, device=logits.device)

    def _forced_step(self, logits: torch.Tensor, forced: list[tuple[int, LatentRecord]]) -> None:
        tokens = self.channel.tokens
        rows = torch.tensor([row for row, _ in forced], device=logits.device)
        ids = torch.tensor([tokens.pad if r.count < r.args.latent_size else tokens.end for _, r in forced],
                           device=logits.device)
        logits[rows] = float("-inf")
        logits[rows, ids] = 0.0
        placing = [(row, r) for row, r in forced if r.count < r.args.latent_size]
        if placing:
            self._place_latents(placing)

    def _place_latents(self, placing: list[tuple[int, LatentRecord]]) -> None:
        """Record z = h + sigma * eps for each request that gets a pad now, and leave it for the next forward."""
        channel = self.channel
        rows = torch.tensor([row for row, _ in placing], device=channel.hidden.device)
        latents = channel.hidden[rows].float()
        noise = [torch.randn(channel.hidden_size, generator=r.generator, dtype=torch.float32)
                 * float(noise_scale(latent[None], r.args.noise_std, r.args.noise_relative))
                 if r.generator is not None else None for latent, (_, r) in zip(latents, placing)]
        if any(n is not None for n in noise):
            eps = torch.stack([torch.zeros(channel.hidden_size) if n is None else n.view(-1) for n in noise])
            latents = latents + eps.to(latents.device)
        for (_, record), latent in zip(placing, latents):
            record.latents.append(latent)
        own_rows = torch.tensor([r.row for _, r in placing])
        channel.write(own_rows, channel.last_slots[rows.to(channel.last_slots.device)], latents)

    # ------------------------------------------------------------------------------------------- helpers
    @property
    def channel(self) -> LatentChannel:
        if self._channel is None:
            self._channel = LatentChannel.current()
        return self._channel

    def text_bias(self, logits: torch.Tensor) -> torch.Tensor:
        """(2, V) additive masks for text mode: row 0 without latents (start masked too), row 1 with them."""
        if self._text_bias is None or self._text_bias.shape[-1] != logits.shape[-1]:
            tokens = self.channel.tokens
            bias = torch.zeros(2, logits.shape[-1], dtype=logits.dtype, device=logits.device)
            bias[:, list(tokens.never_sampled) + [tokens.end]] = float("-inf")
            bias[:, self.channel.real_vocab_size:] = float("-inf")
            bias[0, tokens.start] = float("-inf")
            self._text_bias = bias
        return self._text_bias

    def collect(self, keys: list[str]) -> dict[str, dict]:
        """`LatentRecord.result` of the given requests (finished or still in the batch); they are forgotten here."""
        self._catch_up(list(self.rows.values()))
        live = {r.args.key: r for r in self.rows.values()}
        out = {}
        for key in keys:
            record = self.finished.pop(key, None) or live.get(key)
            if record is None:
                raise KeyError(f"no latent record for request {key}")
            record.collected = True
            out[key] = record.result()
        return out
