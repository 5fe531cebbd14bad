"""A latent-aware Qwen2.5-VL sharded with FSDP2 over the worker group, and its log-likelihoods.

One class serves three uses: the trainable full model (VLPO), a frozen reference copy, and a frozen base carrying one
LoRA adapter per named policy (self-evolution's solver and proposer, or a LoRA actor). Which adapter computes is
chosen per call inside `use(...)`, so the reference of a LoRA policy (adapters disabled) costs no second copy.
Text positions use token log-probs at the rollout temperature; latent positions the Gaussian log-density of the
recorded latent around the policy's mean (docs/design.md).

Loading: only rank 0 reads the checkpoint; the other ranks build the same module on the meta device, every rank shards
it, and rank 0's full state dict is broadcast into the shards (verl's fsdp2_load_full_state_dict), so one host holds
the full model once, not once per rank. Weights leave the shards through `stream_weights`, one parameter (or bucket)
gathered at a time.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
import torch.distributed as dist

from monet_models.run_settings import write_run_settings
from common.checkpoint_layout import torch_dtype
from monet_models.latent_tokens import LatentTokens, add_latent_tokens
from monet_models.processor import load_processor
from monet_models.transformers import LatentQwen2_5_VLForConditionalGeneration, load_latent_model
from workers.actor.fsdp import shard_model
from workers.actor.host_bucket import HostBucket, bucket_bytes_needed, row_sharded
from workers.actor.lora import apply_lora, is_adapter_key, saved_adapter_key
from workers.actor.model_inputs import micro_batches, model_inputs, position_rows, position_scores, unwrapped


class ShardedModel:
    def __init__(self, model_path: str, actor_config, *, trainable: bool, adapters: list[str] = (), fsdp=None,
                 offload=None):
        """`adapters` non-empty: a frozen base with one LoRA adapter per name; `fsdp`/`offload` default to the
        actor's sections (the reference passes its own)."""
        self.config, self.model_path, self.adapters = actor_config, model_path, list(adapters)
        fsdp, offload = fsdp or actor_config.fsdp, offload or actor_config.offload
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        model, self.processor = load_on_rank0(model_path, _load_dtype(actor_config, fsdp, trainable),
                                              actor_config.model.override_config)
        on_meta = model.device.type == "meta"
        if trainable and actor_config.model.enable_gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not trainable or self.adapters:
            model.requires_grad_(False)
        elif actor_config.model.freeze_vision_tower:
            model.model.visual.requires_grad_(False)
        if self.adapters:
            with torch.device("meta") if on_meta else nullcontext():  # the same modules, no memory, no RNG draws
                model = apply_lora(model, actor_config.model.lora, self.adapters)
        # Rank 0's full tensors, kept alive past sharding (which copies each rank's slice out of them and, on a GPU,
        # moves one module at a time to the device).
        self.module = shard_loaded(model, None if on_meta else model.state_dict(), fsdp, offload, self.device)
        self._bucket: HostBucket | None | bool = None  # the sync's shared bucket; False: ranks cannot share one

    # ---- which weights compute ---------------------------------------------------------------------------------
    @contextmanager
    def use(self, adapter: str | None):
        """Compute with `adapter` active; None is the base with every adapter disabled (the reference)."""
        if not self.adapters:
            yield
        elif adapter is None:
            with self.module.disable_adapter():
                yield
        else:
            # peft also switches requires_grad to the active adapter, so only its weights get gradients
            self.module.set_adapter(adapter)
            yield

    def trainable_parameters(self, adapter: str | None) -> list[torch.nn.Parameter]:
        if adapter is None:
            return [p for p in self.module.parameters() if p.requires_grad]
        return [p for name, p in self.module.named_parameters() if is_adapter_key(name, adapter)]

    # ---- log-probs -------------------------------------------------------------------------------------------
    def scores(self, micro, sigma: float, entropy: bool = False, rows_head=None, wanted=None
               ) -> tuple[torch.Tensor, ...]:
        """(B, R) log-likelihood of each response position of `micro` and the (latents, D) fp32 means of its
        latent steps in recorded order, with gradients when in train mode; with `entropy` also the (B, R)
        next-token entropy at each response position (text positions: `algorithms.entropy`); with `rows_head`
        last its rows at the `wanted` input positions, from the same forward (`model_inputs.position_scores`)."""
        cfg = self.config
        scores = position_scores(self.module, model_inputs(micro, self.device), cfg.temperature, sigma,
                                 cfg.latent_logprob_scale == "dim", cfg.padding_free, cfg.logprob_chunk_size, entropy,
                                 rows_head, wanted)
        width, per_position = micro.tensors["responses"].shape[1], (0, 2) if entropy else (0,)
        return tuple(value[:, -width:] if index in per_position else value for index, value in enumerate(scores))

    def rows(self, micro, rows_head, wanted) -> torch.Tensor:
        """`rows_head`'s rows at the `wanted` input positions of `micro` alone (`model_inputs.position_rows`)."""
        return position_rows(self.module, model_inputs(micro, self.device), self.config.padding_free, rows_head, wanted)

    @property
    def latent_pad_id(self) -> int:
        return unwrapped(self.module).latent_tokens.pad

    @torch.no_grad()
    def score(self, batch, sigma: float, adapter: str | None) -> torch.Tensor:
        """Log-probs of a whole batch (old or reference log-probs), in eval mode and micro-batches."""
        return self.score_with_means(batch, sigma, adapter)[0]

    @torch.no_grad()
    def score_with_means(self, batch, sigma: float, adapter: str | None, entropy: bool = False
                         ) -> tuple[torch.Tensor, ...]:
        """`score`, and the means of each sample's latent steps, (B, M, D) zero-padded to the most latents M of a
        sample, kept beside the log-probs so the latent KL to the reference can be exact (algorithms.kl); with
        `entropy` also the (B, R) next-token entropies (`scores`)."""
        self.module.eval()
        micro_size = self.config.micro_batch_size_per_device_for_experience
        budget = self.config.token_budget(update=False)
        log_probs, means, entropies = [], [], []
        with self.use(adapter):
            for micro in micro_batches(batch, micro_size, budget, self.config.padding_free):
                values, micro_means, *micro_entropy = self.scores(micro, sigma, entropy)
                log_probs.append(values.float().cpu())
                entropies += [part.float().cpu() for part in micro_entropy]
                counts = (micro.tensors["responses"] == self.latent_pad_id).sum(-1).tolist()
                means += micro_means.cpu().split(counts)
        scores = (torch.cat(log_probs, dim=0), torch.nn.utils.rnn.pad_sequence(means, batch_first=True))
        return scores + (torch.cat(entropies, dim=0),) if entropy else scores

    # ---- weights ---------------------------------------------------------------------------------------------
    def stream_weights(self, adapter: str | None = None, dtype: torch.dtype | None = None, bucket_bytes: int = 0
                       ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) pairs, one parameter at a time, on this rank's device: a collective generator that
        every rank must iterate to the end. Names are Hugging Face names (a tied weight once, under its first name);
        with `adapter`, only that adapter's tensors in peft's saved naming. Each shard is cast to `dtype` before it
        is gathered (half the traffic for a bf16 engine). `bucket_bytes` > 0 gathers a bucket of parameters of about
        that many bytes together and then yields them one by one (fewer waits, a bucket's tensors alive at once); 0
        gathers one tensor at a time. A tensor is valid until the next one is drawn (CPU ranks on one host gather
        through a shared bucket that the next gather overwrites, see host_bucket.py): a consumer that keeps tensors
        copies them."""
        buckets = list(_buckets(list(self._weight_entries(adapter)), dtype, bucket_bytes))
        host = self._host_bucket(buckets, dtype)
        for bucket in buckets:
            if host is not None:
                yield from host.gather(bucket, dtype, lambda value: _waited(_gather(value, dtype, self.device)))
                continue
            gathered = [(name, _gather(value, dtype, self.device)) for name, value in bucket]
            while gathered:
                name, tensor = gathered.pop(0)
                yield name, _waited(tensor)
                del tensor  # the consumer holds it as long as it needs it, the generator no longer

    def _host_bucket(self, buckets: list, dtype: torch.dtype | None) -> HostBucket | None:
        """The host's shared bucket, opened (or grown) when this stream needs more than it holds; None when nothing
        is sharded over several ranks or the ranks cannot share memory (then every stream all-gathers)."""
        sharded = next((value for bucket in buckets for _, value in bucket if row_sharded(value)), None)
        if sharded is None or sharded.device_mesh.size() == 1 or self._bucket is False:
            return None
        needed = bucket_bytes_needed(buckets, dtype)
        if self._bucket is None or self._bucket.nbytes < needed:
            self._bucket = None  # the old mapping goes before a larger one is made
            self._bucket = HostBucket.open(sharded.device_mesh.get_group(), needed) or False
        return self._bucket or None

    def _weight_entries(self, adapter: str | None):
        """(name, sharded tensor) of the whole model (parameters and persistent buffers, each storage once) or of
        one adapter (renamed to peft's saved naming)."""
        if adapter is not None:
            for name, param in self.module.named_parameters():
                if is_adapter_key(name, adapter):
                    yield saved_adapter_key(name, adapter), param.detach()
            return
        seen = set()
        for name, value in self.module.state_dict(keep_vars=True).items():
            if id(value) not in seen:
                seen.add(id(value))
                yield name, value.detach()

    def sharded_state(self, adapter: str | None = None) -> dict:
        """This rank's shards for torch.distributed.checkpoint: the whole model, or one adapter's tensors."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.module)
        return state if adapter is None else {k: v for k, v in state.items() if is_adapter_key(k, adapter)}

    def load_sharded_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.module, state, options=StateDictOptions(strict=not self.adapters))

    def save_hf_files(self, folder: str, settings: dict, adapter: str | None = None) -> None:
        """config.json, processor, the adapter's adapter_config.json (for merging later) and how to run the model:
        the run's `settings` (`monet_models.run_settings.settings_from_config`) as latent_config.json and
        generation_config.json, which every folder merged from this one carries."""
        base = unwrapped(self.module)
        base.config.save_pretrained(folder)
        write_run_settings(folder, settings, self.processor.tokenizer, base.generation_config)
        self.processor.save_pretrained(folder)
        if adapter is not None:
            config = self.module.peft_config[adapter]
            config.base_model_name_or_path = self.model_path
            config.save_pretrained(folder)


def _load_dtype(actor_config, fsdp, trainable: bool) -> str:
    """Trained weights stay fp32 (bf16 compute through FSDP mixed precision) unless the optimizer is adamw_bf16."""
    if not trainable:
        return fsdp.torch_dtype
    return "bf16" if actor_config.optim.strategy == "adamw_bf16" else "fp32"


# ---- loading: rank 0 reads, the others build on the meta device --------------------------------------------------
def load_on_rank0(path: str, dtype: str, overrides) -> tuple[torch.nn.Module, object]:
    """(model, processor): rank 0 loads the checkpoint (`load_latent_model`); every other rank builds the same module
    on the meta device from rank 0's config (the vocabulary already grown by the latent tokens, the attention
    implementation rank 0 chose), so it holds no weights until `broadcast_from_rank0` fills its shards."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return load_latent_model(path, dtype=dtype, config_overrides=overrides)
    if dist.get_rank() == 0:
        model, processor = load_latent_model(path, dtype=dtype, config_overrides=overrides)
        dist.broadcast_object_list([(model.config, model.generation_config)], src=0)
        return model, processor
    processor = load_processor(path)  # while rank 0 reads the weights
    add_latent_tokens(processor.tokenizer)
    configs = [None]
    dist.broadcast_object_list(configs, src=0)
    config, generation_config = configs[0]
    with torch.device("meta"):
        model = LatentQwen2_5_VLForConditionalGeneration._from_config(
            config, dtype=torch_dtype(dtype), attn_implementation=config._attn_implementation)
    model.generation_config = generation_config
    model.set_latent_tokens(LatentTokens.from_tokenizer(processor.tokenizer))
    return model, processor


def shard_loaded(model: torch.nn.Module, full_state: dict | None, fsdp, offload, device: torch.device):
    """`model` as loaded by `load_on_rank0`, sharded with FSDP2 (`fsdp`/`offload`: a worker's config sections), the
    other ranks getting rank 0's values (`full_state`: rank 0's full tensors, kept alive past sharding, which copies
    each rank's slice out of them; None on the ranks that built the model on the meta device). The actor, the
    reference and the critic all load this way."""
    compute_dtype = torch_dtype(fsdp.torch_dtype)
    loaded_dtype = next(model.parameters()).dtype  # a ValueModel has no .dtype; its backbone's comes first
    mixed = compute_dtype if loaded_dtype != compute_dtype else None
    offload_params = (offload.offload_params or offload.offload_optimizer) and torch.cuda.is_available()
    module = shard_model(model, param_dtype=mixed, reshard_after_forward=fsdp.enable_full_shard,
                         offload_params=offload_params, fsdp_size=fsdp.fsdp_size)
    if dist.get_world_size() > 1:
        broadcast_from_rank0(module, full_state, torch.device("cpu") if offload_params else device, device)
    return module


def broadcast_from_rank0(module: torch.nn.Module, full_state: dict | None, param_device: torch.device,
                         buffer_device: torch.device) -> None:
    """Fill every rank's shards from rank 0's `full_state` (a collective; None on the other ranks).

    The meta ranks first get real (uninitialised) storage: parameters where FSDP keeps their shards (host memory
    when offloaded), buffers on the compute device. Non-persistent buffers (the rotary `inv_freq`) are in no state
    dict, so they are broadcast as they are. Tied weights are one parameter in the module and load once."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers()):
        module.to_empty(device=param_device)
        for sub in module.modules():
            for name, buffer in sub._buffers.items():
                if buffer is not None and buffer.device != buffer_device:
                    sub._buffers[name] = buffer.to(buffer_device)
    set_model_state_dict(module, full_state or {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


# ---- streaming weights ----------------------------------------------------------------------------------------------
def _buckets(entries: list, dtype: torch.dtype | None, bucket_bytes: int):
    """Consecutive entries grouped up to `bucket_bytes` of gathered size (a larger tensor is a bucket alone)."""
    bucket, size = [], 0
    for name, value in entries:
        nbytes = value.numel() * (dtype or value.dtype).itemsize
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, value))
        size += nbytes
    if bucket:
        yield bucket


def _gather(value: torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """The full tensor of a shard (a DTensor; an all-gather that may still be in flight), cast to `dtype` first;
    offloaded shards are moved to the compute device for the collective."""
    from torch.distributed.tensor import DTensor

    if dtype is not None and value.is_floating_point() and value.dtype != dtype:
        value = value.to(dtype)
    if isinstance(value, DTensor):
        if value.device != device:
            value = value.to(device)
        return value.full_tensor()
    return value.to(device)


def _waited(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor: waits for an all-gather still in flight (functional collectives return it asynchronously)."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return tensor.trigger_wait() if isinstance(tensor, AsyncCollectiveTensor) else tensor
