"""What a rollout request tells the latent logits processor, carried in vLLM's `SamplingParams.extra_args`.

Only requests that carry these arguments are touched by the plugin, so one engine can also serve plain requests.
Plain Python values only: what vLLM's `extra_args` accepts (a multiprocess vLLM engine sends them as MessagePack).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

EXTRA_ARGS_KEY = "monet_latent"


@dataclass(frozen=True)
class LatentRequestArgs:
    key: str  # unique per request: how the worker extension hands back this request's record
    latent_size: int  # K
    allow_latents: bool  # False: `<abs_vis_token>` is masked like the other never-sampled ids
    log_prob_temperature: float  # recorded log-probs are log softmax(raw logits / this)
    noise_std: float = 0.0
    noise_relative: bool = False  # noise std in units of each hidden state's RMS
    noise_seed: int = 0  # seeds this request's own fp32 CPU generator for the latent noise
    logit_bias: list[tuple[int, float]] = field(default_factory=list)  # applied after the log-probs are recorded
    keep_record: bool = True  # False: forgotten when the request leaves the batch (a served request nobody collects)

    def to_extra_args(self) -> dict:
        args = asdict(self)
        args["logit_bias"] = [[int(t), float(v)] for t, v in self.logit_bias]
        return {EXTRA_ARGS_KEY: args}

    @classmethod
    def from_extra_args(cls, extra_args: dict | None) -> "LatentRequestArgs | None":
        """The request's arguments, or None for a request that is not a latent rollout request."""
        raw = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if raw is None:
            return None
        try:
            args = cls(**{**raw, "logit_bias": [(int(t), float(v)) for t, v in raw.get("logit_bias", [])]})
        except TypeError as error:
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] is malformed: {error}") from error
        if args.latent_size < 1 or args.log_prob_temperature <= 0 or args.noise_std < 0:
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]: need latent_size >= 1, log_prob_temperature > 0 "
                             f"and noise_std >= 0, got {raw}")
        return args
