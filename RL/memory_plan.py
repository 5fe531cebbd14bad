"""The memory a run needs on each device, phase by phase, from the model's config.json (no weights read) and the
run's config: what the trainer checks at start-up (`RL.preflight`) and `python -m tools.plan_memory` prints.

A step of a colocated run passes through five phases, and each holds a different set of buffers (docs/scale.md):

| phase   | what runs                                     | what is live besides the resident state            |
|---------|-----------------------------------------------|----------------------------------------------------|
| load    | shard the actor (reference, critic), build the engine | rank 0's full state dict while it is broadcast |
| rollout | the engine generates                          | engine weights, KV cache, latent buffer            |
| scoring | old / reference log-probs (gae: the values)   | gathered FSDP units, activations, a log-prob chunk |
| update  | forward + backward + step (gae: the critic's) | gradients, saved activations, a log-prob chunk     |
| sync    | the actor's weights stream into the engine    | the engine's weights, one gathered tensor (or bucket) |

The resident state is the actor's weight shards and optimizer state, the reference's shards, with
`algorithm.adv_estimator=gae` the critic's shards and optimizer state (`worker.critic.*`), and whatever the engine keeps
while it sleeps. Each phase's figure is what is live at its peak moment; where two moments compete (loading the actor
vs building the engine; the actor's update vs the critic's) the larger is the phase's peak. On a GPU, offloaded state
(`worker.*.offload`, a sleeping vLLM engine's weights, rank 0's loading copy) is counted in host memory per rank
instead; on CPU everything is host memory, reported per rank.

Activation sizes per token per decoder layer were counted with `torch.autograd.graph.saved_tensors_hooks` on this
code path (packed sequences, sdpa): c·(8H + 4I) + 8H bytes without gradient checkpointing (c = bytes of the compute
dtype; the 8H are the RMSNorms' fp32 copies; K and V are stored at full width after `repeat_kv`), c·H with it.
`tools.bench_scale` measures every phase on a real-width probe and prints these figures beside the measurements.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from common.cli import InputError

GIB = 2 ** 30
PHASES = ("load", "rollout", "scoring", "update", "sync")
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
# Fixed costs per process, besides tensors. CPU: the resident set of a rank after importing torch, transformers and
# the project (measured: tools.bench_scale's "baseline"); vLLM's imports and engine state on top when it runs in the
# rank. GPU: the CUDA context, NCCL's buffers and the caching allocator's slack (an allowance, not a measurement).
CPU_RUNTIME = int(0.5 * GIB)  # measured 0.45 GiB
CPU_VLLM_RUNTIME = int(0.25 * GIB)  # measured 0.23 GiB with the tiny model, its 1 GiB KV cache aside
GPU_RUNTIME = int(1.5 * GIB)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class MemoryPlanError(InputError):
    """A plan that cannot fit its device; the message names the phase, the largest parts and the keys to change."""


# ---- the model, from config.json ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelDims:
    """The sizes of a Qwen2.5-VL that memory depends on, read from its config.json."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    vision_hidden: int
    vision_depth: int
    vision_intermediate: int
    patch: int
    temporal_patch: int
    merge: int
    in_channels: int
    out_hidden: int
    checkpoint_bytes: int = 2  # bytes per parameter in the checkpoint files (config.json's dtype; bf16 if unsaid)

    @classmethod
    def from_folder(cls, folder: str | Path, overrides: dict | None = None) -> "ModelDims":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json (worker.actor.model.model_path must be a model folder)")
        return cls.from_config(json.loads(path.read_text()), overrides)

    @classmethod
    def from_config(cls, config: dict, overrides: dict | None = None) -> "ModelDims":
        """Both layouts of Qwen2.5-VL's config.json: text fields at the top (released checkpoints) or under
        `text_config` (transformers 5); `overrides` are worker.actor.model.override_config."""
        config = _merged(config, overrides or {})
        text = {**config, **config.get("text_config", {})}
        vision = config.get("vision_config", {})
        heads = text["num_attention_heads"]
        return cls(
            hidden=text["hidden_size"], layers=text["num_hidden_layers"], heads=heads,
            kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            intermediate=text["intermediate_size"], vocab=text["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            vision_hidden=vision.get("hidden_size", 1280), vision_depth=vision.get("depth", 32),
            vision_intermediate=vision.get("intermediate_size", 3420), patch=vision.get("patch_size", 14),
            temporal_patch=vision.get("temporal_patch_size", 2), merge=vision.get("spatial_merge_size", 2),
            in_channels=vision.get("in_channels", vision.get("in_chans", 3)),
            out_hidden=vision.get("out_hidden_size", text["hidden_size"]),
            checkpoint_bytes=DTYPE_BYTES.get(str(config.get("dtype") or config.get("torch_dtype") or "bf16"), 2),
        )

    # parameter counts, as transformers builds Qwen2_5_VLForConditionalGeneration
    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def decoder_layer(self) -> int:
        h, i, kv = self.hidden, self.intermediate, self.kv_width
        attention = (h * self.heads * self.head_dim + self.heads * self.head_dim) + 2 * (h * kv + kv) \
            + self.heads * self.head_dim * h
        return attention + 3 * h * i + 2 * h

    @property
    def vision_block(self) -> int:
        h, i = self.vision_hidden, self.vision_intermediate
        return (3 * h * h + 3 * h) + (h * h + h) + 2 * (h * i + i) + (i * h + h) + 2 * h

    @property
    def embedding(self) -> int:
        return self.vocab * self.hidden

    @property
    def root(self) -> int:
        """Parameters outside the decoder layers and vision blocks: the root FSDP unit (embedding, lm_head, final
        norm, patch embedding, merger)."""
        merged = self.vision_hidden * self.merge ** 2
        patch_embed = self.vision_hidden * self.in_channels * self.temporal_patch * self.patch ** 2
        merger = self.vision_hidden + (merged * merged + merged) + (merged * self.out_hidden + self.out_hidden)
        return self.embedding * (1 if self.tied else 2) + self.hidden + patch_embed + merger

    @property
    def total(self) -> int:
        return self.root + self.layers * self.decoder_layer + self.vision_depth * self.vision_block

    @property
    def vision(self) -> int:
        merged = self.vision_hidden * self.merge ** 2
        patch_embed = self.vision_hidden * self.in_channels * self.temporal_patch * self.patch ** 2
        merger = self.vision_hidden + (merged * merged + merged) + (merged * self.out_hidden + self.out_hidden)
        return patch_embed + merger + self.vision_depth * self.vision_block

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest single parameter: what one tensor-at-a-time sync gathers at once."""
        merged = self.vision_hidden * self.merge ** 2
        return max(self.embedding, self.hidden * self.intermediate, merged * merged,
                   self.vision_hidden * self.vision_intermediate)

    @property
    def largest_unit(self) -> int:
        return max(self.decoder_layer, self.vision_block)

    def lora(self, rank: int, targets=LORA_TARGETS) -> int:
        """Parameters of one LoRA adapter of `rank` on `targets` of every decoder layer (never the vision tower)."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_width
        shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
                  "up_proj": (h, i), "down_proj": (i, h)}
        return self.layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_width * dtype_bytes


def _merged(config: dict, overrides: dict) -> dict:
    out = dict(config)
    for key, value in overrides.items():
        out[key] = _merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


# ---- the device ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    """What a rank runs on: `kind` "cuda" (memory per GPU, offload goes to host) or "cpu" (host memory per rank);
    `capacity` in bytes (None: unknown, nothing is refused); `source` says where the capacity came from."""

    kind: str
    capacity: int | None
    source: str

    @classmethod
    def detect(cls, gigabytes: float | None = None, ranks_per_node: int = 1, origin: str = "--device-gb"
               ) -> "Device":
        """`gigabytes` given: a GPU of that size. Else this machine's first GPU, else host memory / ranks per node."""
        if gigabytes:
            return cls("cuda", int(gigabytes * GIB), f"{origin}={gigabytes:g}")
        try:
            import torch

            if torch.cuda.is_available():
                total = torch.cuda.get_device_properties(0).total_memory
                return cls("cuda", total, f"torch.cuda device 0 ({total / GIB:.0f} GiB)")
        except ImportError:
            pass
        import psutil

        total = psutil.virtual_memory().total
        return cls("cpu", total // max(1, ranks_per_node),
                   f"host memory {total / GIB:.1f} GiB / {ranks_per_node} ranks on this node")


# ---- the plan ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Component:
    """Bytes one part occupies on the device and in host memory, per rank. `counted` False: shown for comparison
    (the other activation mode), not part of the phase's peak."""

    name: str
    device: int = 0
    host: int = 0
    note: str = ""
    counted: bool = True
    keys: tuple[str, ...] = ()  # the config keys that shrink it (named when a phase does not fit)


@dataclass
class Phase:
    name: str
    components: list[Component]
    where: str = "every rank"

    @property
    def device(self) -> int:
        return sum(c.device for c in self.components if c.counted)

    @property
    def host(self) -> int:
        return sum(c.host for c in self.components if c.counted)

    def largest(self, count: int = 3) -> list[Component]:
        """The largest parts on the device."""
        return sorted((c for c in self.components if c.counted and c.device), key=lambda c: -c.device)[:count]


@dataclass
class MemoryPlan:
    device: Device
    dims: ModelDims
    phases: list[Phase]
    settings: dict = field(default_factory=dict)  # what the figures were computed for (world, dtypes, tokens, ...)
    refusals: list[str] = field(default_factory=list)  # what no phase total shows (vLLM's budget without a sequence)

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda phase: phase.device)

    def problems(self) -> list[str]:
        """One message per phase that exceeds the device, naming its largest parts and the keys that shrink them."""
        if self.device.capacity is None:
            return []
        out = []
        for phase in self.phases:
            if phase.device > self.device.capacity:
                parts = ", ".join(f"{c.name} {c.device / GIB:.1f}" for c in phase.largest())
                keys = list(dict.fromkeys(key for c in phase.largest() for key in c.keys))
                out.append(f"memory plan: the {phase.name} phase needs {phase.device / GIB:.1f} GiB per "
                           f"{_unit(self.device)} ({parts} GiB ...), more than the {self.device.capacity / GIB:.1f} GiB "
                           f"of {self.device.source}; change {', '.join(keys) or 'the model or the device count'}")
        return out + self.refusals

    def check(self) -> None:
        """Raise MemoryPlanError for the plan's worst phase (naming the others that do not fit either)."""
        problems = self.problems()
        if not problems:
            return
        over = [phase.name for phase in self.phases if self.device.capacity and phase.device > self.device.capacity]
        message = problems[0] if not over else next(
            p for p in problems if f"the {self.peak.name} phase" in p)
        others = [name for name in over if name != self.peak.name]
        raise MemoryPlanError(message + (f" (the {', '.join(others)} phases do not fit either)" if others else "")
                              + "".join(f"; {p}" for p in self.refusals if p != message))

    def to_dict(self) -> dict:
        gib = lambda value: round(value / GIB, 3)  # noqa: E731
        return {
            "device": {"kind": self.device.kind, "capacity_gib": None if self.device.capacity is None
                       else gib(self.device.capacity), "source": self.device.source},
            "model": {"parameters": self.dims.total, "layers": self.dims.layers, "hidden": self.dims.hidden,
                      "vocab": self.dims.vocab},
            "settings": self.settings,
            "phases": {phase.name: {
                "where": phase.where, "device_gib": gib(phase.device), "host_gib": gib(phase.host),
                "components": {c.name: {"device_gib": gib(c.device), "host_gib": gib(c.host), "note": c.note,
                                        "counted": c.counted} for c in phase.components}}
                for phase in self.phases},
            "peak": {"phase": self.peak.name, "device_gib": gib(self.peak.device)},
            "fits": not self.problems(),
            "problems": self.problems(),
        }

    def table(self) -> str:
        unit = "host GiB per rank" if self.device.kind == "cpu" else "GiB per GPU (host GiB per rank)"
        count = f"{self.dims.total / 1e9:.2f} B" if self.dims.total >= 1e8 else f"{self.dims.total / 1e6:.2f} M"
        lines = [f"memory plan: {count} parameters, {self.settings.get('world')} ranks "
                 f"(shards of {self.settings.get('shard')}), {unit}; capacity {_capacity(self.device)}"]
        for phase in self.phases:
            lines.append(f"  {phase.name:<31} {_pair(phase.device, phase.host, self.device):>16}  ({phase.where})")
            for c in phase.components:
                if c.device or c.host or not c.counted:
                    mark = "" if c.counted else "  [not in effect]"
                    lines.append(f"    {c.name:<31} {_pair(c.device, c.host, self.device):>14}  {c.note}{mark}")
        peak = self.peak
        lines.append(f"  peak: {peak.name} {peak.device / GIB:.2f} GiB"
                     + ("" if self.device.capacity is None else f" of {self.device.capacity / GIB:.1f} GiB"))
        lines += [f"  REFUSED: {problem}" for problem in self.problems()]
        return "\n".join(lines)


def _unit(device: Device) -> str:
    return "rank (host memory)" if device.kind == "cpu" else "GPU"


def _capacity(device: Device) -> str:
    return "unknown (nothing refused)" if device.capacity is None else f"{device.capacity / GIB:.1f} GiB ({device.source})"


def _pair(device_bytes: int, host_bytes: int, device: Device) -> str:
    if device.kind == "cpu":
        return f"{(device_bytes + host_bytes) / GIB:.2f}"
    return f"{device_bytes / GIB:.2f} ({host_bytes / GIB:.2f})"


# ---- building the plan ---------------------------------------------------------------------------------------------
ROLES = ("actor", "ref", "rollout")
CRITIC = "critic"


def plan_memory(config, device: Device, dims: ModelDims | None = None, roles=ROLES) -> MemoryPlan:
    """The plan of `config` (a loaded RootConfig) on `device`; `dims` default to the model folder's config.json.
    `roles` are the PolicyWorker roles the trainer starts (SFT: the actor only); an RL run (one with the rollout)
    with algorithm.adv_estimator=gae starts the critic too (RL/trainer/vlpo.py), so it is added here."""
    actor = config.worker.actor
    dims = dims or ModelDims.from_folder(actor.model.model_path, dict(actor.model.override_config))
    roles = tuple(roles)
    if config.algorithm.adv_estimator == "gae" and "rollout" in roles and CRITIC not in roles:
        roles += (CRITIC,)
    return _Planner(config, device, dims, roles).plan()


class _Planner:
    def __init__(self, config, device: Device, dims: ModelDims, roles: tuple[str, ...]):
        self.config, self.device, self.dims, self.roles = config, device, dims, roles
        self.gpu = device.kind == "cuda"
        trainer, actor = config.trainer, config.worker.actor
        self.world = trainer.nnodes * trainer.n_gpus_per_node
        self.shard = self.shards(actor.fsdp)
        self.compute = DTYPE_BYTES[actor.fsdp.torch_dtype]
        self.has_critic = CRITIC in roles
        self.lora = actor.model.lora.rank > 0
        rollout, data = config.worker.rollout, config.data
        self.max_len = rollout.max_model_len or data.max_prompt_length + data.max_response_length
        # one sequence's keys and values on one engine (its tensor-parallel share)
        self.sequence_kv = dims.kv_bytes_per_token(DTYPE_BYTES[rollout.dtype]) * self.max_len \
            // max(1, rollout.tensor_parallel_size)
        self.refusals: list[str] = []

    def _refuse(self, message: str) -> None:
        if message not in self.refusals:
            self.refusals.append(message)

    def shards(self, fsdp) -> int:
        """Ranks a role's parameters are sharded over: the world, or `fsdp_size` with hybrid sharding."""
        return fsdp.fsdp_size if 0 < fsdp.fsdp_size < self.world else self.world

    def section(self, role: str):
        """`worker.<role>` of the config: the actor's or the critic's settings."""
        return getattr(self.config.worker, role)

    def compute_bytes(self, role: str) -> int:
        return DTYPE_BYTES[self.section(role).fsdp.torch_dtype]

    # -- the resident state ------------------------------------------------------------------------------------------
    def actor_state(self) -> dict[str, int]:
        """Per-rank bytes of the actor's weights, gradients and optimizer state (FSDP shards)."""
        actor, dims = self.config.worker.actor, self.dims
        if "actor" not in self.roles:
            return {"weights": 0, "gradients": 0, "optimizer": 0}
        bf16_weights = actor.optim.strategy == "adamw_bf16"
        param = 2 if bf16_weights else 4  # the trained model loads in fp32, or bf16 for adamw_bf16 (sharded_model.py)
        if self.lora:  # a frozen base, and fp32 adapters (peft's default) for each policy, two at most
            adapters = 2 * dims.lora(actor.model.lora.rank, self.lora_targets())
            return {"weights": (dims.total * param + adapters * 4) // self.shard,
                    "gradients": adapters * 4 // self.shard, "optimizer": adapters * 8 // self.shard}
        trainable = dims.total - (dims.vision if actor.model.freeze_vision_tower else 0)
        # adamw: fp32 exp_avg + exp_avg_sq; adamw_bf16 (KahanAdamW): the same fp32 moments and a bf16 compensation
        optimizer = trainable * (8 + (2 if bf16_weights else 0))
        return {"weights": dims.total * param // self.shard, "gradients": trainable * param // self.shard,
                "optimizer": optimizer // self.shard}

    def lora_targets(self):
        targets = self.config.worker.actor.model.lora.target_modules
        return LORA_TARGETS if targets in (None, "", "all-linear") else tuple(targets)

    def reference(self) -> int:
        if "ref" not in self.roles or self.lora or self.config.algorithm.disable_kl:
            return 0
        return self.dims.total * DTYPE_BYTES[self.config.worker.ref.fsdp.torch_dtype] // self.shard

    def critic_state(self) -> dict[str, int]:
        """Per-rank bytes of the critic's weights, gradients and optimizer state (FSDP shards over its own
        `fsdp_size`): the backbone and a (hidden + 1) value head, fp32 unless `worker.critic.optim.strategy=
        adamw_bf16` (workers/critic.py); an untied lm_head and a frozen vision tower get no gradient or state."""
        critic, dims = self.config.worker.critic, self.dims
        bf16_weights = critic.optim.strategy == "adamw_bf16"
        param, shard = (2 if bf16_weights else 4), self.shards(critic.fsdp)
        total = dims.total + dims.hidden + 1
        trainable = total - (0 if dims.tied else dims.embedding) \
            - (dims.vision if critic.model.freeze_vision_tower else 0)
        return {"weights": total * param // shard, "gradients": trainable * param // shard,
                "optimizer": trainable * (8 + (2 if bf16_weights else 0)) // shard}

    def offloaded(self, role: str = "actor") -> bool:
        offload = self.section(role).offload
        return self.gpu and (offload.offload_params or offload.offload_optimizer)

    def resident(self, gradients_of: str | None = None) -> list[Component]:
        """The actor's, reference's and critic's state, on the device or (offloaded, GPU) in host memory; with
        `gradients_of` ("actor" or "critic") that role's gradients too (freed after each optimizer step)."""
        state, ref = self.actor_state(), self.reference()
        off = self.offloaded()
        parts = [_placed("weights", state["weights"], off, "actor shards"),
                 _placed("optimizer", state["optimizer"], off, self.config.worker.actor.optim.strategy)]
        if gradients_of == "actor":
            parts.insert(1, _placed("gradients", state["gradients"], off, "sharded"))
        ref_off = self.gpu and self.config.worker.ref.offload.offload_params
        parts.append(_placed("reference", ref, ref_off, "frozen shards" if ref else "none (LoRA / no KL)"))
        if self.has_critic:
            critic, critic_off = self.critic_state(), self.offloaded(CRITIC)
            parts += [_placed("critic weights", critic["weights"], critic_off, "critic shards + value head"),
                      _placed("critic optimizer", critic["optimizer"], critic_off,
                              self.config.worker.critic.optim.strategy)]
            if gradients_of == CRITIC:
                parts.insert(-1, _placed("critic gradients", critic["gradients"], critic_off, "sharded"))
        return parts + ([Component("sync bucket", self.sync_buffer(), note="shared by the host's ranks, kept from the "
                                   "first sync on (workers/actor/host_bucket.py)")] if self.host_bucket() else [])

    def host_bucket(self) -> bool:
        """CPU ranks on one host, sharded on a 1-D mesh, streaming weights to an engine: the sync goes through a
        shared-memory bucket that every rank maps (counted per rank: each rank's resident set holds its pages)."""
        return (not self.gpu and self.world > 1 and self.shard == self.world and self.config.trainer.nnodes == 1
                and self.has_engine())

    def sync_buffer(self) -> int:
        """What one gather holds: one adapter's tensors with LoRA, else the larger of a bucket and the largest
        tensor, in the engine's dtype."""
        rollout = self.config.worker.rollout
        if self.lora:
            return self.dims.lora(self.config.worker.actor.model.lora.rank, self.lora_targets()) * 4
        return max(int(rollout.sync_bucket_mb * 2 ** 20), self.dims.largest_tensor * DTYPE_BYTES[rollout.dtype])

    def runtime(self, engine: bool | None = None) -> Component:
        """The process's fixed cost; `engine` (default: a colocated engine) adds vLLM's on CPU."""
        if self.gpu:
            return Component("runtime", GPU_RUNTIME, note="CUDA context, NCCL, allocator slack (allowance)")
        engine = self.has_engine() and self.colocated() if engine is None else engine
        extra = CPU_VLLM_RUNTIME if engine and self.engine_name() == "vllm" else 0
        return Component("runtime", CPU_RUNTIME + extra, note="process baseline (measured on CPU)")

    # -- the engine ----------------------------------------------------------------------------------------------
    def has_engine(self) -> bool:
        return "rollout" in self.roles

    def colocated(self) -> bool:
        return self.config.worker.placement.colocate

    def engine_name(self) -> str:
        name = self.config.worker.rollout.name
        if name != "auto":
            return name
        return "vllm" if self.gpu or importlib.util.find_spec("vllm") is not None else "native"

    def engine_weights(self) -> int:
        rollout = self.config.worker.rollout
        adapters = 2 * self.dims.lora(self.config.worker.actor.model.lora.rank, self.lora_targets()) if self.lora else 0
        return (self.dims.total * DTYPE_BYTES[rollout.dtype] + adapters * 4) // max(1, rollout.tensor_parallel_size)

    def rollout_sequences(self) -> int:
        """Sequences one rank decodes at once: its share of a generation round's prompts, n samples each."""
        data, rollout = self.config.data, self.config.worker.rollout
        prompts = data.online_accum_size if rollout.online_difficulty_sampling else data.rollout_batch_size
        return math.ceil(prompts / self.world) * rollout.n

    def engine_parts(self) -> list[Component]:
        """The engine while it generates: weights, KV cache, its own activations (and vLLM's latent buffer)."""
        rollout = self.config.worker.rollout
        weights = Component("engine weights", self.engine_weights(), note=f"{rollout.dtype}, full model")
        if self.engine_name() == "native":
            return [weights, *self._native_parts()]
        latent = Component("latent buffer", latent_buffer(rollout.max_num_seqs, self.dims.hidden, rollout.dtype),
                           note=f"{rollout.max_num_seqs} rows x {self.dims.hidden}")
        return [weights, *(self._vllm_gpu_parts() if self.gpu else self._vllm_cpu_parts()), latent]

    def _vllm_gpu_parts(self) -> list[Component]:
        """vLLM takes gpu_memory_utilization x the device: its KV cache is what its weights and activations leave."""
        rollout = self.config.worker.rollout
        budget = int(rollout.gpu_memory_utilization * (self.device.capacity or 0))
        activations = self.vllm_activations()
        kv = budget - self.engine_weights() - activations
        if self.device.capacity and kv < self.sequence_kv:
            self._refuse(
                f"memory plan: vLLM's budget worker.rollout.gpu_memory_utilization={rollout.gpu_memory_utilization} x "
                f"{self.device.capacity / GIB:.0f} GiB leaves {max(kv, 0) / GIB:.2f} GiB of KV cache after "
                f"{self.engine_weights() / GIB:.1f} GiB of weights, less than one {self.max_len}-token sequence needs "
                f"({self.sequence_kv / GIB:.2f} GiB); raise worker.rollout.gpu_memory_utilization or "
                "worker.rollout.tensor_parallel_size")
        sequences = max(kv, 0) // max(self.sequence_kv, 1)
        return [Component("KV cache", max(kv, 0), note=f"the rest of gpu_memory_utilization="
                          f"{rollout.gpu_memory_utilization} ({sequences} sequences of {self.max_len})"),
                Component("engine activations", activations, note="vLLM's profiled forward (estimate)")]

    def _vllm_cpu_parts(self) -> list[Component]:
        """vLLM on CPU: a KV cache of a fixed size (`workers.rollout.vllm_engine.cpu_kv_cache_bytes`), and a second
        copy of the weights its CPU kernels repack."""
        from workers.rollout.vllm_engine import CPU_BLOCK_SIZE, MIN_CPU_KV_CACHE_GB

        rollout = self.config.worker.rollout
        block = rollout.block_size or CPU_BLOCK_SIZE
        sequence = -(-self.max_len // block) * block * self.sequence_kv // max(1, self.max_len)
        given = int(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 0) or rollout.cpu_kvcache_space_gb
        kv = int(given * GIB) if given else max(int(MIN_CPU_KV_CACHE_GB * GIB), rollout.max_num_seqs * sequence)
        return [Component("engine weights (CPU copy)", self.engine_weights(),
                          note="vLLM's CPU kernels keep a repacked copy (measured 2.15x the weights in all)"),
                Component("KV cache", kv, note="cpu_kvcache_space_gb, else what max_num_seqs need, >= 1 GiB"),
                Component("engine activations", self.vllm_activations())]

    def _native_parts(self) -> list[Component]:
        """The native engine preallocates each decoded row's cache for max_model_len tokens."""
        dims, rollout = self.dims, self.config.worker.rollout
        sequences = self.rollout_sequences()
        prefill = math.ceil(sequences / rollout.n) * self.config.data.max_prompt_length
        activations = prefill * DTYPE_BYTES[rollout.dtype] * (3 * dims.hidden + 3 * dims.intermediate) \
            + sequences * dims.vocab * 4 * 3
        return [Component("KV cache", self.sequence_kv * sequences,
                          note=f"{sequences} sequences x {self.max_len} tokens, preallocated"),
                Component("engine activations", activations, note="prefill layer + (rows x vocab) fp32 logits")]

    def vllm_activations(self) -> int:
        """vLLM's profiling forward of max_num_batched_tokens tokens (one layer's intermediates at a time) and the
        sampler's fp32 logits of max_num_seqs rows (an estimate: vLLM measures its own at start-up)."""
        rollout, dims = self.config.worker.rollout, self.dims
        tokens = rollout.max_num_batched_tokens
        return tokens * DTYPE_BYTES[rollout.dtype] * (3 * dims.hidden + 3 * dims.intermediate) \
            + rollout.max_num_seqs * dims.vocab * 4 * 2

    def sleeping_engine(self) -> list[Component]:
        """What a colocated engine keeps between its generation phases (`RolloutEngine.sleep`)."""
        if not (self.has_engine() and self.colocated()):
            return []
        weights = self.engine_weights()
        if self.engine_name() == "vllm" and self.gpu:  # sleep mode level 1: weights to host, KV cache dropped
            return [Component("engine weights", 0, weights, note="asleep: in host memory (sleep level 1)")]
        if self.engine_name() == "vllm":  # vLLM refuses sleep mode on CPU: weights and KV cache stay
            kept = ("engine weights", "engine weights (CPU copy)", "KV cache")
            return [Component(c.name, c.device, note="asleep: CPU vLLM cannot free it")
                    for c in self.engine_parts() if c.name in kept]
        return [Component("engine weights", weights, note="asleep (the native engine keeps its own copy)")]

    # -- the actor's compute ----------------------------------------------------------------------------------------
    def tokens(self, update: bool, role: str = "actor") -> int:
        """Tokens of one micro-batch of `role` on one device: the token budget with dynamic batching, else samples x
        the longest sequence."""
        section, data = self.section(role), self.config.data
        if section.dynamic_batching:
            return section.token_budget(update)
        samples = section.micro_batch_size_per_device_for_update if update else \
            section.micro_batch_size_per_device_for_experience
        return samples * (data.max_prompt_length + data.max_response_length)

    def micro_batch_key(self, role: str, update: bool) -> str:
        """The key that sets the size of `role`'s micro-batches (named when their activations do not fit)."""
        section = self.section(role)
        if section.dynamic_batching:
            return f"worker.{role}.{section.budget_key(update)}"
        return f"worker.{role}.micro_batch_size_per_device_for_{'update' if update else 'experience'}"

    def patches(self, tokens: int) -> int:
        """Vision patches of a micro-batch of `tokens`: its prompt share as image tokens, 4 patches each (2x2 merge),
        at most limit_images images of max_pixels per sample."""
        data, rollout = self.config.data, self.config.worker.rollout
        prompt_share = tokens * data.max_prompt_length // (data.max_prompt_length + data.max_response_length)
        per_image = data.max_pixels // (self.dims.patch * self.dims.patch)
        samples = max(1, tokens // (data.max_prompt_length + data.max_response_length))
        cap = samples * per_image * (rollout.limit_images or 1)
        return min(prompt_share * self.dims.merge ** 2, cap)

    def activations(self, tokens: int, checkpointing: bool, role: str = "actor") -> int:
        """Saved activations of a forward with gradients over `tokens` tokens (module docstring), plus the backward's
        working set of one layer; the vision tower's patches likewise when it trains. The critic's backbone saves
        the same (its value head's input where the actor's log-prob head's is)."""
        dims, c = self.dims, self.compute_bytes(role)
        per_layer = c * (8 * dims.hidden + 4 * dims.intermediate) + 8 * dims.hidden
        outside = c * 3 * dims.hidden + 4 * dims.hidden  # embeddings, final norm, the log-prob head's input
        if checkpointing:
            text = tokens * (dims.layers * c * dims.hidden + per_layer + outside)
        else:
            text = tokens * (dims.layers * per_layer + outside)
        text += tokens * c * 2 * (dims.hidden + dims.intermediate)  # one layer's gradients in the backward
        return text + self.vision_activations(tokens, checkpointing, role)

    def vision_activations(self, tokens: int, checkpointing: bool, role: str = "actor") -> int:
        if (self.lora and role == "actor") or self.section(role).model.freeze_vision_tower:
            return 0  # frozen: nothing is saved for a backward
        dims, c, patches = self.dims, self.compute_bytes(role), self.patches(tokens)
        per_block = c * (8 * dims.vision_hidden + 4 * dims.vision_intermediate) + 8 * dims.vision_hidden
        blocks = dims.vision_depth * (c * dims.vision_hidden if checkpointing else per_block)
        return patches * (blocks + (per_block if checkpointing else 0))

    def scoring_activations(self, tokens: int, role: str = "actor") -> int:
        """A forward without gradients: one layer's intermediates at a time, the residual stream and the final
        hidden states (kept for the latent means, or the critic's value head); the vision tower's largest block over
        its patches."""
        dims, c = self.dims, self.compute_bytes(role)
        text = tokens * c * (3 * dims.hidden + 3 * dims.intermediate + 2 * dims.hidden)
        return text + self.patches(tokens) * c * 3 * (dims.vision_hidden + dims.vision_intermediate)

    def logprob_chunk(self, tokens: int, backward: bool) -> int:
        """One chunk of positions x vocabulary (`worker.actor.logprob_chunk_size`): the logits in the compute dtype,
        their fp32 copy (none when they already are fp32) and logsumexp's fp32 temporary; the backward recomputes
        the chunk and adds the softmax and the logits' gradient."""
        chunk = self.config.worker.actor.logprob_chunk_size or tokens
        c = self.compute
        forward = c + (4 if c != 4 else 0) + 4
        return min(chunk, tokens) * self.dims.vocab * (forward + (c + 8 if backward else 0))

    def gathered(self, backward: bool, role: str = "actor") -> int:
        """FSDP's unsharded parameters while computing: the root unit (embedding, lm_head, merger) for the whole
        forward and backward, plus the current and the prefetched layer; in the backward the root's unsharded
        gradient and its fp32 reduce-scatter input (the critic's untied lm_head is frozen: no gradient). One rank
        alone still copies every unit out of its shard."""
        dims, c = self.dims, self.compute_bytes(role)
        units = (dims.root + 2 * dims.largest_unit) * c
        if backward and role == CRITIC:
            units += (dims.root - (0 if dims.tied else dims.embedding)) * (c + 4)
        elif backward and not self.lora:
            units += dims.root * (c + 4)
        return units

    def keys_for(self, name: str) -> tuple[str, ...]:
        """The config keys that shrink component `name` on this device (named when a phase does not fit)."""
        gpu = self.gpu
        checkpointing = {role: () if self.section(role).model.enable_gradient_checkpointing else (
            f"worker.{role}.model.enable_gradient_checkpointing",) for role in ("actor", CRITIC)}
        kv = ("worker.rollout.gpu_memory_utilization",) if gpu and self.engine_name() == "vllm" else (
            ("worker.rollout.cpu_kvcache_space_gb",) if self.engine_name() == "vllm" else
            ("data.rollout_batch_size", "worker.rollout.n"))
        keys = {
            "weights": ("worker.actor.offload.offload_params",) * gpu + ("trainer.nnodes",),
            "gradients": ("worker.actor.offload.offload_params",) * gpu + ("trainer.nnodes",),
            "optimizer": ("worker.actor.offload.offload_optimizer",) * gpu + ("trainer.nnodes",),
            "reference": ("worker.ref.offload.offload_params",) * gpu + ("algorithm.disable_kl",),
            "activations": checkpointing["actor"] + (self.micro_batch_key("actor", True),),
            "scoring activations": (self.micro_batch_key("actor", False),),
            "critic weights": ("worker.critic.offload.offload_params",) * gpu + ("trainer.nnodes",),
            "critic gradients": ("worker.critic.offload.offload_params",) * gpu + ("trainer.nnodes",),
            "critic optimizer": ("worker.critic.offload.offload_optimizer",) * gpu + ("trainer.nnodes",),
            "critic activations": checkpointing[CRITIC] + (self.micro_batch_key(CRITIC, True),),
            "value activations": (self.micro_batch_key(CRITIC, False),),
            "log-prob chunk": ("worker.actor.logprob_chunk_size",),
            "engine weights": ("worker.rollout.tensor_parallel_size",),
            "engine weights (CPU copy)": ("worker.rollout.name",),
            "KV cache": kv,
            "engine activations": ("worker.rollout.max_num_batched_tokens",),
            "sync buffer": ("worker.rollout.sync_bucket_mb",),
        }
        return keys.get(name, ())

    # -- phases --------------------------------------------------------------------------------------------------
    def plan(self) -> MemoryPlan:
        phases = [self.load(), self.update()]
        if "actor" in self.roles:
            phases.insert(1, self.scoring())
        if self.has_engine():
            phases.insert(1, self.rollout())
            phases.append(self.sync())
        phases.sort(key=lambda phase: PHASES.index(phase.name))
        actor = self.config.worker.actor
        settings = {
            "world": self.world, "shard": self.shard, "engine": self.engine_name() if self.has_engine() else None,
            "compute_dtype": actor.fsdp.torch_dtype, "optimizer": actor.optim.strategy, "lora_rank": actor.model.lora.rank,
            "offload": self.offloaded(), "gradient_checkpointing": actor.model.enable_gradient_checkpointing,
            "update_tokens": self.tokens(True), "scoring_tokens": self.tokens(False),
            "logprob_chunk_size": actor.logprob_chunk_size,
            "critic": {"update_tokens": self.tokens(True, CRITIC), "value_tokens": self.tokens(False, CRITIC),
                       "gradient_checkpointing": self.config.worker.critic.model.enable_gradient_checkpointing,
                       "offload": self.offloaded(CRITIC)} if self.has_critic else None,
        }
        for phase in phases:
            phase.components = [replace(c, keys=self.keys_for(c.name)) for c in phase.components]
        return MemoryPlan(self.device, self.dims, phases, settings, self.refusals)

    def load(self) -> Phase:
        """Rank 0 reads the checkpoint and broadcasts it into every rank's shards (workers/actor/sharded_model.py):
        its full copy (in the load dtype) lives while the actor is sharded, then the reference's while it is, then
        the critic's; then every rank builds its engine from the checkpoint. Reading maps the checkpoint's files into
        the process (their pages count until the load returns). The largest of these moments is the phase's peak
        (rank 0's)."""
        state, ref = self.actor_state(), self.reference()
        off, ref_off = self.offloaded(), self.gpu and self.config.worker.ref.offload.offload_params
        weights = _placed("weights", state["weights"], off, "actor shards")
        reference = _placed("reference", ref, ref_off, "frozen shards")
        files = _placed("checkpoint files", self.dims.total * self.dims.checkpoint_bytes, self.gpu,
                        "mapped while a copy is read")
        note = "rank 0's full state dict while sharding"
        moments = [[self.runtime(), files, _placed("load buffer", state["weights"] * self.shard, self.gpu, note)],
                   [self.runtime(), weights, _placed("load buffer", state["weights"] * self.shard, self.gpu, note)]]
        if ref:
            moments.append([self.runtime(), weights, reference, _placed("load buffer", ref * self.shard, self.gpu,
                                                                        note + " (reference)")])
        sharded = [weights, reference]
        if self.has_critic:
            critic = self.critic_state()["weights"]
            sharded.append(_placed("critic weights", critic, self.offloaded(CRITIC), "critic shards + value head"))
            moments.append([self.runtime(), *sharded, _placed(
                "load buffer", critic * self.shards(self.config.worker.critic.fsdp), self.gpu, note + " (critic)")])
        if self.has_engine() and self.colocated():
            engine = [Component("engine weights", self.engine_weights(), note="built after the shards"), files]
            if self.engine_name() == "vllm" and not self.gpu:  # its KV cache is allocated at construction
                engine += [c for c in self.engine_parts() if c.name in ("engine weights (CPU copy)", "KV cache")]
            moments.append([self.runtime(), *sharded, *engine])
        return Phase("load", max(moments, key=lambda parts: sum(c.device + c.host for c in parts)), "rank 0")

    def rollout(self) -> Phase:
        """The engine generating; colocated, beside the actor's resident state. With vLLM on a GPU the engine's parts
        add up to its budget, gpu_memory_utilization x the device."""
        if self.colocated():
            return Phase("rollout", [self.runtime(), *self.resident(), *self.engine_parts()])
        return Phase("rollout", [self.runtime(engine=True), *self.engine_parts()], "the rollout group's devices")

    def scoring(self) -> Phase:
        """Old and reference log-probs; with a critic also its value pass, a moment of its own (the larger counts)."""
        tokens = self.tokens(False)
        parts = [self.runtime(), *self.resident(), *self.sleeping_engine(),
                 Component("gathered parameters", self.gathered(False), note="root unit + 2 layers, unsharded"),
                 Component("scoring activations", self.scoring_activations(tokens), note=f"{tokens} tokens, no grad"),
                 Component("log-prob chunk", self.logprob_chunk(tokens, False), note=_chunk_note(self, tokens))]
        if not self.has_critic:
            return Phase("scoring", parts)
        tokens = self.tokens(False, CRITIC)
        values = [self.runtime(), *self.resident(), *self.sleeping_engine(),
                  Component("critic gathered parameters", self.gathered(False, CRITIC),
                            note="root unit + 2 layers, unsharded"),
                  Component("value activations", self.scoring_activations(tokens, CRITIC),
                            note=f"{tokens} tokens, no grad")]
        return Phase("scoring", _larger_moment({"log-prob pass": parts, "value pass": values}))

    def update(self) -> Phase:
        """The actor's forward, backward and optimizer step; with a critic also the critic's, a moment of its own
        (each role's gradients are freed after its step; the larger moment counts)."""
        tokens = self.tokens(True)
        ckpt = self.config.worker.actor.model.enable_gradient_checkpointing
        parts = [self.runtime(), *self.resident(gradients_of="actor"), *self.sleeping_engine(),
                 Component("gathered parameters", self.gathered(True),
                           note="root unit + 2 layers; root gradient + fp32 reduce input"),
                 Component("activations", self.activations(tokens, ckpt),
                           note=f"{tokens} tokens, {'with' if ckpt else 'without'} gradient checkpointing"),
                 Component("activations" + (" (no checkpointing)" if ckpt else " (checkpointing)"),
                           self.activations(tokens, not ckpt), note="the other setting, for comparison", counted=False),
                 Component("log-prob chunk", self.logprob_chunk(tokens, True), note=_chunk_note(self, tokens))]
        if not self.has_critic:
            return Phase("update", parts)
        tokens = self.tokens(True, CRITIC)
        ckpt = self.config.worker.critic.model.enable_gradient_checkpointing
        critic = [self.runtime(), *self.resident(gradients_of=CRITIC), *self.sleeping_engine(),
                  Component("critic gathered parameters", self.gathered(True, CRITIC),
                            note="root unit + 2 layers; root gradient + fp32 reduce input"),
                  Component("critic activations", self.activations(tokens, ckpt, CRITIC),
                            note=f"{tokens} tokens, {'with' if ckpt else 'without'} gradient checkpointing")]
        return Phase("update", _larger_moment({"actor update": parts, "critic update": critic}))

    def sync(self) -> Phase:
        """The engine's weights are awake (its KV cache is not yet), and one tensor or bucket is gathered at a time
        in the engine's dtype (`ShardedModel.stream_weights`); with LoRA each adapter's tensors are collected whole.
        CPU ranks on one host gather through the host bucket (counted in `resident`); otherwise NCCL gathers into
        the output tensor itself, while DTensor.full_tensor over gloo holds the all-gather's output and the full
        tensor made from it (measured: 2.0x the tensor)."""
        rollout = self.config.worker.rollout
        copies = 0 if self.host_bucket() else 1 if self.gpu or self.lora else 2
        buffer = self.sync_buffer() * copies
        if self.host_bucket():
            note = "the host bucket (resident)"
        elif self.lora:
            note = "one adapter's tensors"
        else:
            note = (f"a bucket of {rollout.sync_bucket_mb:g} MiB" if rollout.sync_bucket_mb * 2 ** 20 >
                    self.dims.largest_tensor * DTYPE_BYTES[rollout.dtype] else "the largest tensor") \
                + ", gathered and cast" + ("" if self.gpu else " (2x on gloo)")
        if not self.colocated():  # rank 0 collects the model in host memory for the rollout pool (export_weights)
            export = self.engine_weights() if not self.lora else buffer
            return Phase("sync", [self.runtime(), *self.resident(), Component("sync buffer", buffer, note=note),
                                  Component("export copy", 0, export, note="rank 0's copy for the rollout pool")])
        engine = [c for c in self.sleeping_engine() if c.name in ("engine weights (CPU copy)", "KV cache")]
        parts = [self.runtime(), *self.resident(),
                 Component("engine weights", self.engine_weights(), note="awake, being overwritten"), *engine,
                 Component("sync buffer", buffer, note=note)]
        return Phase("sync", parts)


def _larger_moment(moments: dict[str, list[Component]]) -> list[Component]:
    """The parts of the moment that needs the most device memory (then host memory), and each other moment's total
    as one uncounted line for comparison: the worker runs them one after another, never at once."""
    def total(parts):
        return sum(c.device for c in parts if c.counted), sum(c.host for c in parts if c.counted)

    peak = max(moments, key=lambda name: total(moments[name]))
    return moments[peak] + [Component(f"{name} (another moment)", *total(parts), note="its peak, not at once",
                                      counted=False) for name, parts in moments.items() if name != peak]


def _placed(name: str, size: int, offloaded: bool, note: str) -> Component:
    return Component(name, 0, size, note + " (in host memory)") if offloaded else Component(name, size, 0, note)


def _chunk_note(planner: _Planner, tokens: int) -> str:
    chunk = planner.config.worker.actor.logprob_chunk_size
    return f"{min(chunk, tokens) if chunk else tokens} positions x vocab {planner.dims.vocab}"


def latent_buffer(max_num_seqs: int, hidden: int, dtype: str) -> int:
    """The vLLM plugin's latent side buffer (`monet_models.vllm.channel.latent_buffer_bytes`, its one home)."""
    from common.checkpoint_layout import torch_dtype
    from monet_models.vllm import latent_buffer_bytes

    return latent_buffer_bytes(max_num_seqs, hidden, torch_dtype(dtype))
