"""The config tree: typed dataclass sections with their defaults, the allowed choices, and secret-key names."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional


from monet_models.latent_tokens import default_latent_size
from rewards.config import JudgeConfig, RewardConfig

REPO_ROOT = Path(__file__).resolve().parent.parent.parent

class ConfigError(ValueError):
    """A configuration the system refuses to start with; the message names the dotted key(s)."""


def derived(default: Any, source: str) -> Any:
    """A field filled by `finalize` from the `source` key; users set the source key instead."""
    return field(default=default, init=False, metadata={"derived_from": source})


# ----------------------------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    train_files: Any = ""  # a file, a folder (its top-level data files) or a list; json/jsonl/parquet/save_to_disk
    val_files: Any = ""  # same forms; "" = no validation set
    prompt_key: str = "problem"
    answer_key: str = "answer"
    image_key: str = "images"
    image_dir: str = ""  # relative image paths resolve here; "" = the folder of the data file itself
    # self-evolution reads unlabeled images from image_dir: only these first-level subfolders ("" = all of them)
    include_subfolders: str = ""  # comma-separated, e.g. chartqa,ai2d
    max_prompt_length: int = 4096  # tokens after the chat template, image tokens included
    max_response_length: int = 4096
    rollout_batch_size: int = 64  # prompts per training step
    val_batch_size: int = 512  # prompts; -1 = the whole validation set in one batch
    format_prompt: str = "examples/format_prompt/monet_format.jinja"  # Jinja file with `content`; "" = none
    shuffle: bool = True
    seed: int = 1
    min_pixels: int = 262144
    max_pixels: int = 3136000
    max_image_pixels: int = 89_478_485  # a decoded image larger than this is skipped as image_too_large (PIL's bomb cap)
    filter_overlong_prompts: bool = True
    online_accum_size: int = 1024  # prompts per generation round of online difficulty sampling
    train_max_samples: int = -1  # -1 = all rows; otherwise the first N valid rows (none dropped beyond N)
    val_max_samples: int = -1
    dataloader_num_workers: int = 0  # worker processes that run the image processor while the step runs


# --------------------------------------------------------------------------------------------------------- actor
@dataclass
class LoraConfig:
    rank: int = 0  # 0 = full fine-tuning
    alpha: int = 64
    dropout: float = 0.0
    target_modules: Any = "all-linear"  # "all-linear" or a list of module names
    exclude_modules: Optional[str] = r".*visual.*"  # regex of modules never adapted


@dataclass
class ModelConfig:
    model_path: str = ""  # a local Qwen2.5-VL folder (or a hub id already in the local cache)
    override_config: dict[str, Any] = field(default_factory=dict)  # model config fields to override at load
    enable_gradient_checkpointing: bool = True
    freeze_vision_tower: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    strategy: str = "adamw"  # adamw | adamw_bf16
    lr_warmup_steps: int = 0
    lr_scheduler_type: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr


@dataclass
class FSDPConfig:
    torch_dtype: str = "bf16"  # fp32 | bf16: compute dtype (mixed precision over fp32 master weights)
    enable_full_shard: bool = True  # false keeps gathered parameters between forward and backward
    fsdp_size: int = -1  # -1 = shard over all devices; k = shard within groups of k, replicate across (HSDP)


@dataclass
class OffloadConfig:
    """CPU offload (GPU only). FSDP2 keeps the optimizer state beside the parameter shards, so either key offloads
    the shards, their gradients and the optimizer state together."""

    offload_params: bool = False
    offload_optimizer: bool = False


class TokenBudgets:
    """The token budgets of a section's micro-batches with `dynamic_batching` (verl's keys): `ppo_max_token_len_per_gpu`
    for the update, the section's FORWARD_BUDGET_KEY for its passes without gradients."""

    FORWARD_BUDGET_KEY: ClassVar[str]

    def budget_key(self, update: bool) -> str:
        return "ppo_max_token_len_per_gpu" if update else self.FORWARD_BUDGET_KEY

    def token_budget(self, update: bool) -> int:
        """Tokens per micro-batch on one device; 0 when dynamic batching is off (a fixed number of samples)."""
        return getattr(self, self.budget_key(update)) if self.dynamic_batching else 0


@dataclass
class ActorConfig(TokenBudgets):
    FORWARD_BUDGET_KEY: ClassVar[str] = "log_prob_max_token_len_per_gpu"  # old and reference log-probs

    global_batch_size: int = 16  # prompts per optimizer step (workers multiply by rollout.n)
    micro_batch_size_per_device_for_update: int = 2  # samples
    micro_batch_size_per_device_for_experience: int = 8  # samples, for log-prob passes
    max_grad_norm: float = 1.0
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.3
    clip_ratio_dual: float = 3.0
    ppo_epochs: int = 1
    loss_avg_mode: str = "token"  # token | seq
    # EasyR1's policy losses (algorithms/policy_loss.py): default (PPO clip, clip-higher, dual clip) | gspo |
    # gspo_token (a sequence-level ratio: needs latent_logprob_scale=dim when latent blocks are on, since a latent
    # step's log-ratio sums D dimensions and would decide the sequence's ratio alone) | cispo | sapo
    loss_type: str = "default"
    tau_positive: float = 1.0  # sapo: gate temperature where the advantage is >= 0
    tau_negative: float = 1.05  # sapo: gate temperature where the advantage is < 0
    # entropy bonus: loss −= entropy_coeff x the text tokens' entropy (EasyR1's former key, verl's); latent steps add
    # nothing (a Gaussian's entropy is a constant of sigma). actor/entropy is logged every step either way
    entropy_coeff: float = 0.0
    monet_rl_sigma: float = 10.0  # std of the latent Gaussian policy
    latent_logprob_scale: str = "none"  # none | dim (divide the latent log-density by the hidden size)
    padding_free: bool = True
    # positions whose full-vocabulary rows exist at once when computing token log-probs (from the final hidden
    # states through lm_head, recomputed per chunk in the backward): memory ~ chunk x vocab, not tokens x vocab;
    # 0 = all positions at once
    logprob_chunk_size: int = 1024
    # micro-batches of consecutive samples holding at most a token budget (prompt + response tokens when
    # padding_free, else the padded width) instead of a fixed number of samples; EasyR1's key, verl's budgets below
    dynamic_batching: bool = False
    ppo_max_token_len_per_gpu: int = 16384  # with dynamic_batching: tokens per update micro-batch on one device
    log_prob_max_token_len_per_gpu: int = 32768  # with dynamic_batching: tokens per old/reference log-prob micro-batch
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    # derived from algorithm.* and worker.rollout.* (the update reads them; the coefficient comes from the driver)
    use_kl_loss: bool = derived(True, "algorithm.use_kl_loss and not algorithm.disable_kl")
    kl_penalty: str = derived("low_var_kl", "algorithm.kl_penalty")
    temperature: float = derived(1.0, "worker.rollout.temperature")
    ref_monet_rl_sigma: float = derived(10.0, "worker.ref.monet_rl_sigma")  # the exact latent KL needs both σ


# ------------------------------------------------------------------------------------------------------- rollout
@dataclass
class MonetConfig:
    latent_noise_std: float = 0.0  # exploration noise added to each recorded latent (0: no latent gradient)
    latent_noise_scale: str = "absolute"  # absolute: std per dimension | rms: std x the hidden state's RMS
    select_acc_threshold: float = 0.6  # online difficulty sampling keeps groups with accuracy in (0, threshold]


@dataclass
class RolloutConfig:
    name: str = "auto"  # native | vllm | auto (vllm where installed with CUDA, else native)
    n: int = 8
    temperature: float = 1.0
    top_p: float = 0.99
    top_k: int = -1
    seed: int = 1
    sampling_strategy: str = "monet"  # monet (latent blocks) | sample | greedy
    latent_size: int = field(default_factory=default_latent_size)  # K; default from LATENT_SIZE, else 10
    monet: MonetConfig = field(default_factory=MonetConfig)
    online_difficulty_sampling: bool = False
    dtype: str = "bf16"
    gpu_memory_utilization: float = 0.6
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 16384
    enable_chunked_prefill: bool = False
    # vLLM: ranks per tensor-parallel group (consecutive ranks of the worker group; a group's ranks generate their
    # prompts together); must divide trainer.n_gpus_per_node. The native engine has none: 1
    tensor_parallel_size: int = 1
    enforce_eager: bool = True
    limit_images: int = 4  # max images per prompt for the engine; 0 = no limit
    block_size: int = 0  # vLLM KV-cache block in tokens; 0 = vLLM's default (on CPU 128; a multiple of 32 there)
    cpu_kvcache_space_gb: float = 0.0  # vLLM on CPU: KV cache GiB; 0 = VLLM_CPU_KVCACHE_SPACE, else what the batch needs (>= 1)
    repetition_penalty: float = 1.0
    # weight sync into the engine: MB of parameters whose all-gathers are issued together before they are handed over
    # one by one (fewer waits; a bucket's full tensors exist at once); 0 = one parameter at a time
    sync_bucket_mb: float = 0.0
    val_override_config: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.1, "n": 1})
    # derived from data.*
    prompt_length: int = derived(0, "data.max_prompt_length")
    response_length: int = derived(0, "data.max_response_length")
    max_model_len: int = derived(0, "data.max_prompt_length + data.max_response_length")


# ------------------------------------------------------------------------------------------- ref, placement, worker
@dataclass
class RefConfig:
    """The frozen reference policy. It scores exactly the actor's inputs (same micro-batches, packing, temperature
    and latent scale), so only its own σ and its FSDP/offload placement are settings of its own."""

    monet_rl_sigma: Optional[float] = None  # None = worker.actor.monet_rl_sigma
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    offload: OffloadConfig = field(default_factory=lambda: OffloadConfig(offload_params=True))


@dataclass
class CriticModelConfig:
    model_path: str = ""  # "" = worker.actor.model.model_path; another folder needs the actor's hidden size (latents)
    override_config: dict[str, Any] = field(default_factory=dict)  # model config fields to override at load
    enable_gradient_checkpointing: bool = True
    freeze_vision_tower: bool = False


@dataclass
class CriticConfig(TokenBudgets):
    """The value model for algorithm.adv_estimator=gae (read only then): the policy's latent-aware backbone and a
    scalar value head (zero-initialised, so the first values are 0), its own FSDP role on the policy workers, its
    own optimizer and checkpoint (`<step>/critic/`). V at a response position is read from the hidden state before
    it, where the actor reads a latent step's mean (docs/design.md, §4)."""

    FORWARD_BUDGET_KEY: ClassVar[str] = "forward_max_token_len_per_gpu"  # the value pass
    global_batch_size: int = 16  # prompts per critic optimizer step (workers multiply by rollout.n)
    micro_batch_size_per_device_for_update: int = 2  # samples
    micro_batch_size_per_device_for_experience: int = 8  # samples, for the value pass
    max_grad_norm: float = 1.0
    cliprange_value: float = 0.5  # the new value stays within this of the old one in the loss (PPO's value clip)
    loss_avg_mode: str = "token"  # token | seq
    ppo_epochs: int = 1
    padding_free: bool = True
    # micro-batches of consecutive samples holding at most a token budget instead of a fixed number of samples, as
    # worker.actor.dynamic_batching (EasyR1's key; its budget is the micro-batch size x the padded width, here
    # verl's critic budgets below)
    dynamic_batching: bool = False
    ppo_max_token_len_per_gpu: int = 16384  # with dynamic_batching: tokens per value-update micro-batch on one device
    forward_max_token_len_per_gpu: int = 32768  # with dynamic_batching: tokens per value-pass micro-batch
    model: CriticModelConfig = field(default_factory=CriticModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))  # EasyR1: the actor's 1e-6; verl: 1e-5
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)


@dataclass
class PlacementConfig:
    colocate: bool = True  # actor, rollout and ref share one process per device


@dataclass
class WorkerConfig:
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rule_based_judge: JudgeConfig = field(default_factory=JudgeConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)


# ------------------------------------------------------------------------------------------ algorithm, trainer, sft
@dataclass
class AlgorithmConfig:
    # grpo | rloo | reinforce_plus_plus | remax (one greedy rollout per prompt is the baseline) | grpo_passk (only
    # the best sample of a group, by its margin) | gae (a critic: worker.critic.*, trainer.critic_warmup)
    adv_estimator: str = "grpo"
    disable_kl: bool = False  # true = no reference model, no KL at all
    use_kl_loss: bool = True  # KL as a loss term (true) or as a per-token reward penalty (false, EasyR1's in-reward KL)
    kl_penalty: str = "low_var_kl"  # kl | abs | mse | low_var_kl
    kl_coef: float = 1e-2  # initial value for kl_type=adaptive
    kl_type: str = "fixed"  # fixed | adaptive (Ziegler et al.; moves by the step's sample count / kl_horizon)
    kl_target: float = 0.1
    kl_horizon: int = 10000
    gamma: float = 1.0  # discount of REINFORCE++ and GAE (a latent step is one step)
    lam: float = 1.0  # GAE's lambda
    # EasyR1's group filter: keep generating (trainer.max_try_make_batch tries) until data.rollout_batch_size groups
    # have a mean reward `filter_key` (a reward component, or overall) in (filter_low, filter_high); Monet's
    # worker.rollout.online_difficulty_sampling is the same loop on accuracy in (0, select_acc_threshold]
    online_filtering: bool = False
    filter_key: str = "overall"
    filter_low: float = 0.01
    filter_high: float = 0.99


@dataclass
class TrainerConfig:
    total_epochs: int = 1
    max_steps: Optional[int] = None  # None = total_epochs x batches per epoch
    project_name: str = "monet_rl"
    experiment_name: str = "vlpo"  # the run name: runs/<experiment_name>/
    logger: list[str] = field(default_factory=lambda: ["console", "jsonl"])  # console | jsonl | wandb | tensorboard
    # | mlflow | swanlab; files in the run folder (offline) unless WANDB_MODE / MLFLOW_TRACKING_URI / SWANLAB_MODE
    # say otherwise; mlflow and swanlab need their extra (pip install -e ".[mlflow]" / ".[swanlab]")
    nnodes: int = 1
    n_gpus_per_node: int = 8  # devices (CPU: processes) per node
    max_try_make_batch: int = 20  # online difficulty sampling rounds before giving up; -1 = unlimited
    critic_warmup: int = 0  # algorithm.adv_estimator=gae: the first N steps train the critic only, not the actor
    val_freq: int = 5  # -1 = never
    val_before_train: bool = True
    val_only: bool = False
    val_generations_to_log: int = 5
    save_freq: int = 10  # -1 = only at the end
    save_limit: int = 10  # checkpoints kept; -1 = all
    save_dir: str = "runs"
    resume: bool = True  # continue from the newest complete checkpoint of the run
    seed: int = 1
    placement_timeout_s: float = 120.0  # wait this long for the cluster to hold every worker, then say what is missing
    # GiB per device the start-up memory plan must fit (RL/memory_plan.py, docs/scale.md); 0 = the driver's GPU, else
    # (a local CPU run) host memory per rank; -1 = no check
    device_memory_gb: float = 0.0
    # a collective between workers that waits longer fails (a dead or hung rank) instead of hanging the run; raise it
    # when one rank can legitimately wait that long for another (e.g. a much longer rollout share)
    dist_timeout_s: float = 600.0
    max_restarts: int = 0  # after a lost worker or node: restart the workers from the newest checkpoint, up to N times
    # derived
    run_dir: str = derived("", "trainer.save_dir / trainer.experiment_name")


@dataclass
class SFTConfig:
    """Latent SFT on the policy workers: `python -m RL.train_sft stage=...` / `bash examples/sft_train.sh` (docs/sft.md).

    Rows are `data.train_files` (Monet SFT json, Mirage jsonl or RL rows with `response`), read with the other data.*
    keys. Model, FSDP, LoRA and optimizer settings are `worker.actor.*`; the keys here that repeat one of them (lr, ...)
    override it for the SFT run only (None keeps the actor's), so one YAML serves a warm start and the RL run after it.
    For the same reason the run's folder is its own: `<sft.output_dir>-run` beside `sft.output_dir` when that is set,
    else `<trainer.save_dir>/<trainer.experiment_name>-sft-<stage>`. It uses trainer.save_freq, save_limit, resume,
    logger, nnodes and n_gpus_per_node; re-running the command resumes it.
    """

    stage: str = "mirage2"  # monet1 | monet2 | monet3 | mirage1 | mirage2 (docs/sft.md)
    output_dir: str = ""  # the final model as a Hugging Face folder; "" = <run dir>/model
    steps: Optional[int] = None  # optimizer steps; None = epochs x (rows // batch_size)
    epochs: int = 1
    batch_size: int = 8  # rows per optimizer step over all devices
    micro_batch_size: int = 4  # rows per forward and backward on one device
    seed: int = 0  # the data order
    lr: Optional[float] = None  # None = worker.actor.optim.lr
    warmup_steps: Optional[int] = None  # None = worker.actor.optim.lr_warmup_steps
    weight_decay: Optional[float] = None  # None = worker.actor.optim.weight_decay
    max_grad_norm: Optional[float] = None  # None = worker.actor.max_grad_norm
    freeze_vision_tower: Optional[bool] = None  # None = worker.actor.model.freeze_vision_tower
    latent_size: Optional[int] = None  # K of an SFT latent block; None = worker.rollout.latent_size
    max_length: int = 8192  # rows with more tokens (images included) are skipped and counted
    ce_weight: float = 1.0  # L = ce_weight x CE + align_weight x alignment (Mirage stage 1: 0.1)
    observation_weight: float = 1.0  # CE weight of <observation> text (Monet: 2 in stage 1, 4 in stages 2 and 3)
    align_weight: float = 1.0  # monet2, monet3, mirage1
    # monet2: all | last | a list of decoder layers 1..N (N = the final hidden state), at the observation tokens;
    # monet3: all (0..N, Monet's released all_layers) | last (layer 0: the latents) | a list of 0..N, at latent pads
    align_layers: Any = "all"
    teacher_path: str = ""  # monet2: the teacher ("" = the model trained, i.e. stage 1); monet3: the stage-2 model
    latent_targets: str = ""  # monet3: folder of the stage-2 latents; "" = <run dir>/latent_targets


@dataclass
class SelfEvolutionConfig:
    """The proposer–solver loop (iReasoner / EvoLMM) from unlabeled images: `bash examples/ireasoner_train.sh`.

    Images per step are `data.rollout_batch_size`; solver answers per question are `worker.rollout.n`; the solver's
    answer length is `data.max_response_length` and its strategy `worker.rollout.sampling_strategy` (`monet` lets
    it reason with latent blocks). Both roles are LoRA adapters on one frozen base (`worker.actor.model.lora`).
    """

    proposer_prompt: str = "examples/format_prompt/ireasoner_proposer.jinja"  # Jinja file; `content` is empty
    solver_prompt: str = "examples/format_prompt/ireasoner_solver.jinja"  # Jinja file; `content` is the question
    questions_per_image: int = 1  # candidate questions per image (>= 2 for the proposer's grpo group)
    proposer_max_new_tokens: int = 128
    proposer_temperature: float = 1.0
    proposer_update_freq: int = 5  # the proposer is updated on steps divisible by this
    variant: str = "ireasoner"  # ireasoner: soft consistency + step agreement | evolmm: soft consistency only
    # solver reward r = (1 - w_t)·r_soft + w_t·r_step; w_t is 0 for the first warmup_frac of the run, then linear
    step_weight_start: float = 0.0
    step_weight_end: float = 0.7
    warmup_frac: float = 0.3
    soft_gamma: float = 0.7  # r_soft = p(a)^gamma · length factor
    len_penalty: float = 0.05  # length factor 1 − len_penalty·clip((words − target_words)/target_words, 0, 1)
    target_words: float = 64.0
    step_position_decay: float = 0.15
    step_density_gamma: float = 0.7
    step_temperature: float = 1.0
    embedder: str = "token"  # step embeddings: token (the policy's input embedding table) | minilm (.[embed] extra)
    entropy_mu: float = 0.9  # proposer reward exp(−(H − mu)² / (2 sigma²)), H in nats
    entropy_sigma: float = 0.35
    advantage: str = "ema_baseline"  # ema_baseline (released: r − EMA per role) | grpo (z-score within groups)
    ema_momentum: float = 0.9
    update: str = "batched"  # batched (one optimizer step per mini-batch) | sequential (one per sample, as released)
    kl_coef: float = 1e-3  # initial β per role; β ← clip(β·exp(kl_rate·(KL − kl_target)/kl_target), 1e-8, 100)
    kl_target: float = 0.02
    kl_rate: float = 0.1  # 0 keeps β fixed
    # sampled: algorithm.kl_penalty's estimate at the sampled token (low_var_kl = k3) | full: the exact KL(π‖π_ref)
    # over the whole vocabulary at each response text position (released; one more reference forward per micro-batch)
    kl: str = "sampled"
    # per_update: β moves once per role update, with its mean KL | per_step: after every optimizer step, with that
    # step's KL (released: with update=sequential, after every sample)
    kl_coef_update: str = "per_update"


@dataclass
class EvalConfig:
    """Evaluation with latent reasoning: `python -m RL.evaluate MODEL_DIR data.val_files=F [method=...] [ablate=...]`.

    Items come from `data.val_files` (the project's rows, DMLR's JSON list or a VLMEvalKit TSV); answers are judged as
    in training (`worker.rule_based_judge`); each pass writes `<save_dir>/<name>/<pass>.jsonl`, resumable by item.
    """

    name: str = ""  # output folder <save_dir>/<name>; "" = <model folder>-<first data file stem>
    save_dir: str = "runs/eval"
    method: str = "direct"  # direct | dmlr (test-time latent optimisation) | rmm (reasoning-memory loop)
    ablate: str = ""  # comma-separated zero,shuffle,noise,text: the direct pass, then each ablation of its latents
    strategy: str = "monet"  # monet: greedy text with latent blocks | greedy: text only
    max_new_tokens: int = 0  # 0 = data.max_response_length
    batch_size: int = 32  # items per generation round (split over the workers); also the unit of resumption
    category_column: str = "category"  # accuracy per value of this column, when the data has it
    seed: int = 1
    resume: bool = True  # false: start every pass over
    # An OpenAI-compatible endpoint answers instead of the model on Ray workers (python -m tools.serve, or an API model
    # as a baseline on the same items and judge): direct pass only (ablate=text sends latent=0). Its key, if it needs
    # one, comes from the environment variable EVAL_ENDPOINT_API_KEY only (never stored)
    endpoint: str = ""  # base URL, e.g. http://127.0.0.1:8000/v1; "" = the model folder on the workers
    endpoint_model: str = ""  # the model name the endpoint serves ("" = the first it lists at /models)
    # DMLR: antithetic evolution strategies on n thought latents, confidence reward; defaults from the released
    # main.py and README (the patch counts from its script/run.sh); docs/evaluation.md §DMLR says where each comes from
    dmlr_tokens: int = 8
    dmlr_steps: int = 20
    dmlr_lr: float = 5.0e-3
    dmlr_sigma: float = 0.1  # x the RMS of the initial thoughts (the paper's "10%"), or absolute (release: 20)
    dmlr_sigma_scale: str = "rms"  # rms: sigma relative to the thoughts' RMS | absolute: raw coordinates (released)
    dmlr_sigma_decay: float = 0.95
    dmlr_pairs: int = 1  # antithetic pairs per step (2 candidates each)
    dmlr_top_k: int = 10  # the reward is the mean top-k negative log-probability at the thoughts and the next position
    dmlr_init: str = "model"  # model: the model's own latent block | embedding: <|endoftext|>'s embedding (released)
    dmlr_inject: bool = True  # dynamic visual injection of image patches selected per thought
    dmlr_initial_patches: int = 1  # patches per thought at the start
    dmlr_patch_increment: int = 1  # patches tried per thought at each injection step, kept if the reward improves
    dmlr_max_patches: int = 16  # per thought
    dmlr_inject_start: int = 0  # first step with an injection trial
    dmlr_inject_interval: int = 1
    dmlr_inject_in_decode: bool = True  # the final decode sees the injected patches too (released code: false)
    dmlr_reward_threshold: float = 0.0  # > 0: stop optimising once the best evaluated reward reaches it
    # RMM: reason -> critique (never sees the gold answer) -> typed memory -> retry with the memory in the prompt;
    # every memory-manager call is also a training row in <name>/rmm_combined_data.json (docs/evaluation.md §RMM)
    rmm_attempts: int = 3
    rmm_feedback_model: str = "self"  # the critic: self (the evaluated model) | a Qwen2.5-VL folder | api:<model name>
    # the memory manager: self | a Qwen2.5-VL folder | a LoRA adapter folder (its base + the adapter: the trained
    # manager, examples/rmm_train.sh) | api:<model name>
    rmm_memory_model: str = "self"
    rmm_api_base_url: str = ""  # endpoint of api:<model name> ("" = the provider's, as for the judge)
    rmm_memory_scope: str = "per_item"  # per_item: fresh memory per item (VITA-RMM's loop) | dataset: carried across
    #   items in item order (a batch reads the memory as it was before the batch; batch_size 1 = strictly sequential)
    rmm_memory_max_entries: int = 16  # newest entries shown in a prompt (0 = all)
    rmm_critic_max_new_tokens: int = 256
    rmm_memory_max_new_tokens: int = 256


@dataclass
class RootConfig:
    data: DataConfig = field(default_factory=DataConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    self_evolution: SelfEvolutionConfig = field(default_factory=SelfEvolutionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def world_size(self) -> int:
        return self.trainer.nnodes * self.trainer.n_gpus_per_node


CHOICES: dict[str, tuple] = {
    "worker.actor.loss_avg_mode": ("token", "seq"),
    "worker.actor.latent_logprob_scale": ("none", "dim"),
    "worker.actor.optim.strategy": ("adamw", "adamw_bf16"),
    "worker.actor.optim.lr_scheduler_type": ("constant", "cosine"),
    "worker.actor.fsdp.torch_dtype": ("fp32", "bf16"),
    "worker.ref.fsdp.torch_dtype": ("fp32", "bf16"),
    "worker.rollout.name": ("native", "vllm", "auto"),
    "worker.rollout.sampling_strategy": ("monet", "sample", "greedy"),
    "worker.rollout.monet.latent_noise_scale": ("absolute", "rms"),
    "worker.rollout.dtype": ("fp32", "bf16", "fp16"),
    "worker.actor.loss_type": ("default", "gspo", "gspo_token", "cispo", "sapo"),
    "worker.critic.loss_avg_mode": ("token", "seq"),
    "worker.critic.optim.strategy": ("adamw", "adamw_bf16"),
    "worker.critic.optim.lr_scheduler_type": ("constant", "cosine"),
    "worker.critic.fsdp.torch_dtype": ("fp32", "bf16"),
    "algorithm.adv_estimator": ("grpo", "rloo", "reinforce_plus_plus", "remax", "grpo_passk", "gae"),
    # EasyR1's `full` needs both full vocabulary distributions in one pass; it is refused rather than half-done.
    "algorithm.kl_penalty": ("kl", "abs", "mse", "low_var_kl"),
    "algorithm.kl_type": ("fixed", "adaptive"),
    "sft.stage": ("monet1", "monet2", "monet3", "mirage1", "mirage2"),
    "self_evolution.variant": ("ireasoner", "evolmm"),
    "self_evolution.embedder": ("token", "minilm"),
    "self_evolution.advantage": ("ema_baseline", "grpo"),
    "self_evolution.update": ("batched", "sequential"),
    "self_evolution.kl": ("sampled", "full"),
    "self_evolution.kl_coef_update": ("per_update", "per_step"),
}
LOGGERS = ("console", "jsonl", "wandb", "tensorboard", "mlflow", "swanlab")
# the loggers whose package comes with an extra (setup.py), not with the base install: logger -> module
OPTIONAL_LOGGERS = {"mlflow": "mlflow", "swanlab": "swanlab"}
VAL_OVERRIDABLE = ("n", "temperature", "top_p", "top_k", "seed", "sampling_strategy", "repetition_penalty")
