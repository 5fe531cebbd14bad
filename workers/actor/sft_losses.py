"""Latent-SFT update rules: one loss composer per stage, applied to a policy through `optimizer_step`.

Every stage minimises  L = sft.ce_weight · CE_w + sft.align_weight · D, with CE_w = Σ_t w_t·CE_t / Σ_t w_t over the
supervised tokens of the whole step (w = `sft.observation_weight` on observation text, 1 elsewhere) and D:
- monet1:  none (plain SFT on the interleaved chains, auxiliary images in the sequence);
- monet2:  A = mean over observation tokens and `sft.align_layers` of 1 − cos(student, teacher) hidden states, the
           teacher being the frozen stage-1 model with the auxiliary images; its gradient reaches the parameters only
           through the latents: D = A − A|z (the same A with the latents detached), whose value is 0 and whose
           gradient is dA/dθ − ∂A/∂θ|z = Σ_k ∂A/∂z_k · dz_k/dθ;
- monet3:  mean over latents and `sft.align_layers` of 1 − cos(h_l(p_k), h*_l(p_k)) at each latent pad p_k, h* the
           stored stage-2 states; layers as transformers numbers them, 0 being the pad's input (its latent z_k):
           all = 0..N (Monet's released `--alignment_layer all_layers`), last = [0], the latents alone;
- mirage1: mean over latents of 1 − cos(h(p_k − 1), c_k), the helper image's merged patches mean-pooled into K chunks
           c_k and fed as the latents (teacher forcing);
- mirage2: none (CE with the hidden-state recurrence).
Latents come from the KV-cached recurrence (monet_models.transformers.latent_recurrence); FSDP ranks run the same
number of rounds. Means are global: `counts` holds the step's CE weight sum, `meta["align_items"]` its latent or
observation count, so shares summed over micro-batches and ranks are the step's means.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common.atomic import atomic_path
from monet_models.transformers.latent_recurrence import (base_model, captured_layers, count_rounds, image_features,
                                                         recurrent_latent_forward)
from monet_models.transformers.packing import unpack
from workers.actor.model_inputs import forward_args
from workers.actor.policy import Policy
from workers.actor.updates import GlobalCounts, optimizer_step, run_epochs


# ---- inputs and forwards --------------------------------------------------------------------------------------
def model_batch(micro, device, prefix: str = "") -> dict:
    """input_ids, attention_mask, pixel_values and image_grid_thw of `micro` (its teacher sequence with prefix)."""
    tensors, non = micro.tensors, micro.non_tensors
    pixels = [p for p in non[f"{prefix}pixel_values"] if len(p)]
    grids = [g for g in non[f"{prefix}image_grid_thw"] if len(g)]
    _same_on_every_rank(bool(pixels), "images")
    return {"input_ids": tensors[f"{prefix}input_ids"].to(device),
            "attention_mask": tensors[f"{prefix}attention_mask"].to(device),
            "pixel_values": torch.cat(pixels).to(device) if pixels else None,
            "image_grid_thw": torch.cat(grids).to(device) if grids else None}


def _same_on_every_rank(flag: bool, what: str) -> None:
    """FSDP ranks must run the same modules: a micro-batch with images on one rank and none on another would hang."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    value = torch.tensor([int(flag), -int(flag)], device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    if value[0] != -value[1]:
        raise RuntimeError(f"some ranks' micro-batches have {what} and others none; FSDP needs every rank to run the "
                           "same modules: give every row an image, or none")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synced_rounds(inputs: dict, pad_id: int, view) -> int:
    """The most recurrence rounds any rank needs for its micro-batch (every rank runs that many)."""
    rounds = torch.tensor(count_rounds(inputs["input_ids"], inputs["attention_mask"], pad_id, view), device=_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
    return int(rounds)


def packed_forward(module, inputs: dict, padding_free: bool, *, latent_embeds=None, layers=(),
                   compute_logits: bool = True) -> tuple:
    """(logits, hidden, {layer: states}) of a teacher-forced pass, padding-free when asked, in the padded layout."""
    ids, common, keep, _ = forward_args(base_model(module), {**inputs, "latent_embeds": latent_embeds}, padding_free)
    with captured_layers(module, layers) as calls:
        out = module(input_ids=ids, compute_logits=compute_logits, latent_mode=True, **common)
    if not padding_free:
        return out.logits, out.hidden_states, {i: values[0] for i, values in calls.items()}
    logits = unpack(out.logits, keep) if compute_logits else None
    return logits, unpack(out.hidden_states, keep), {i: unpack(values[0], keep) for i, values in calls.items()}


def student_forward(module, micro, inputs: dict, *, layers=(), latents=None, image_embeds=None,
                    checkpoint: bool = False, compute_logits: bool = True):
    """The recurrence over the micro-batch's student sequences (hidden spans and views included)."""
    device = inputs["input_ids"].device
    hidden, view = micro.tensors["hidden"].to(device), micro.tensors["view"].to(device)
    rounds = synced_rounds(inputs, base_model(module).latent_tokens.pad, view)
    pixels = None if image_embeds is not None else inputs["pixel_values"]
    return recurrent_latent_forward(module, inputs["input_ids"], inputs["attention_mask"], pixels,
                                    inputs["image_grid_thw"], image_embeds=image_embeds, latents=latents,
                                    hidden=hidden, view=view, layers=layers, checkpoint=checkpoint, rounds=rounds,
                                    compute_logits=compute_logits)


# ---- loss terms -----------------------------------------------------------------------------------------------
def weighted_ce(logits, input_ids, weights, counts: GlobalCounts) -> torch.Tensor:
    """This micro-batch's share of Σ w·CE / Σ w over the step (token t is predicted at position t − 1)."""
    selected = weights[:, 1:] > 0
    ce = F.cross_entropy(logits[:, :-1][selected].float(), input_ids[:, 1:][selected], reduction="none")
    values = torch.zeros_like(weights)
    values[:, 1:][selected] = ce
    return counts.mean(values, weights, "token")


def cosine_share(a: torch.Tensor, b: torch.Tensor, items: float) -> torch.Tensor:
    """Σ (1 − cos(a, b)) over the rows of this micro-batch, divided by the step's item count."""
    if a.numel() == 0:
        return a.sum() * 0.0
    return (1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1)).sum() / max(float(items), 1.0)


def resolve_layers(align_layers, num_layers: int) -> list[int]:
    """`sft.align_layers`: all | last | a list of decoder layers 1..N (N = the final, post-norm hidden state)."""
    if align_layers == "all":
        return list(range(1, num_layers + 1))
    if align_layers == "last":
        return [num_layers]
    return sorted(int(layer) for layer in align_layers)


def latent_layers(align_layers, num_layers: int) -> list[int]:
    """monet3's `sft.align_layers` at the latent pads, numbered as transformers' `hidden_states`: 0 = the pad's input,
    i.e. its latent (the final state of the position before), 1..N−1 the decoder layers' outputs, N the final post-norm
    state. all: 0..N, what Monet's stage 3 aligns (`--alignment_layer all_layers`); last: [0], the latents only."""
    if align_layers == "all":
        return list(range(num_layers + 1))
    if align_layers == "last":
        return [0]
    layers = sorted(int(layer) for layer in align_layers)
    if layers[0] < 0 or layers[-1] > num_layers:
        raise ValueError(f"sft.align_layers: monet3 aligns layers 0..{num_layers} of this model, got {align_layers!r}")
    return layers


def pad_states(out, latents, pads, layers: list[int], num_layers: int) -> torch.Tensor:
    """(latents, layers, D): the states at the latent pads (bool (B, L), row-major like `latents`), layer 0 being the
    latents themselves."""
    return torch.stack([latents if layer == 0 else (out.hidden_states if layer == num_layers else out.layers[layer])
                        [pads] for layer in layers], dim=1)


def layer_states(hidden, captured: dict, layers: list[int], num_layers: int, positions) -> torch.Tensor:
    """(items, layers, D): the chosen layers' states at `positions` (bool (B, L)); layer N is the post-norm state."""
    return torch.stack([(hidden if layer == num_layers else captured[layer])[positions] for layer in layers], dim=1)


def compose(policy: Policy, ce: torch.Tensor, align: torch.Tensor | None, sft, reported_align=None):
    """(loss, shares, means) of  ce_weight·CE_w + align_weight·D."""
    loss = sft.ce_weight * ce
    shares = {"sft/ce": ce.detach()}
    if align is not None:
        loss = loss + sft.align_weight * align
        shares["sft/align"] = (align if reported_align is None else reported_align).detach()
    shares["sft/loss"] = (sft.ce_weight * ce + sft.align_weight * shares.get("sft/align", 0.0)).detach()
    return loss, shares, {}


# ---- one composer per stage -----------------------------------------------------------------------------------
def monet1_loss(policy: Policy, micro, counts: GlobalCounts, config, teacher=None):
    inputs = model_batch(micro, policy.model.device)
    logits, _, _ = packed_forward(policy.model.module, inputs, config.worker.actor.padding_free)
    ce = weighted_ce(logits, inputs["input_ids"], micro.tensors["response_mask"].to(logits.device), counts)
    return compose(policy, ce, None, config.sft)


def monet2_loss(policy: Policy, micro, counts: GlobalCounts, config, teacher=None):
    module, device = policy.model.module, policy.model.device
    num_layers = base_model(module).config.text_config.num_hidden_layers
    layers = resolve_layers(config.sft.align_layers, num_layers)
    captured = [layer for layer in layers if layer < num_layers]
    target = teacher_states(teacher, micro, layers, config.worker.actor.padding_free)
    inputs = model_batch(micro, device)
    checkpoint = config.worker.actor.model.enable_gradient_checkpointing
    out, latents = student_forward(module, micro, inputs, layers=captured, checkpoint=checkpoint)
    obs = micro.tensors["obs"].to(device)
    items = micro.meta["align_items"] * len(layers)
    align = cosine_share(layer_states(out.hidden_states, out.layers, layers, num_layers, obs), target, items)
    # The same alignment with the latents held fixed: subtracting it leaves only the gradient through the latents.
    direct, _ = student_forward(module, micro, inputs, layers=captured, latents=latents.detach(),
                                image_embeds=out.image_embeds, checkpoint=checkpoint, compute_logits=False)
    fixed = cosine_share(layer_states(direct.hidden_states, direct.layers, layers, num_layers, obs), target, items)
    ce = weighted_ce(out.logits, inputs["input_ids"], micro.tensors["response_mask"].to(device), counts)
    return compose(policy, ce, align - fixed, config.sft, reported_align=align)


@torch.no_grad()
def teacher_states(teacher, micro, layers: list[int], padding_free: bool) -> torch.Tensor:
    """(observation tokens, layers, D) of the frozen teacher on the sequences with the auxiliary images."""
    if teacher is None:
        raise RuntimeError("sft.stage=monet2 needs the teacher model: the trainer starts it with init_teacher")
    teacher.module.eval()
    inputs = model_batch(micro, teacher.device, prefix="teacher_")
    num_layers = base_model(teacher.module).config.text_config.num_hidden_layers
    captured = [layer for layer in layers if layer < num_layers]
    _, hidden, states = packed_forward(teacher.module, inputs, padding_free, layers=captured, compute_logits=False)
    obs = micro.tensors["teacher_obs"].to(teacher.device)
    student_obs = micro.tensors["obs"]
    if not torch.equal(obs.sum(-1).cpu(), student_obs.sum(-1)):
        raise ValueError(f"observation tokens differ between teacher and student sequences: "
                         f"{obs.sum(-1).tolist()} vs {student_obs.sum(-1).tolist()}")
    return layer_states(hidden, states, layers, num_layers, obs)


def monet3_loss(policy: Policy, micro, counts: GlobalCounts, config, teacher=None):
    module = policy.model.module
    num_layers = base_model(module).config.text_config.num_hidden_layers
    layers = latent_layers(config.sft.align_layers, num_layers)
    inputs = model_batch(micro, policy.model.device)
    out, latents = student_forward(module, micro, inputs, layers=[layer for layer in layers if 0 < layer < num_layers],
                                   checkpoint=config.worker.actor.model.enable_gradient_checkpointing)
    targets = stored_targets(micro, len(layers)).to(latents.device)
    pads = inputs["input_ids"] == base_model(module).latent_tokens.pad
    states = pad_states(out, latents, pads, layers, num_layers)
    align = cosine_share(states, targets, micro.meta["align_items"] * len(layers))
    ce = weighted_ce(out.logits, inputs["input_ids"], micro.tensors["response_mask"].to(latents.device), counts)
    return compose(policy, ce, align, config.sft)


def stored_targets(micro, num_layers: int) -> torch.Tensor:
    """(latents, layers, D) stage-2 states of the micro-batch; refuses targets written for other `sft.align_layers`
    (targets of one layer may be stored (n, D), as before the layers were stored)."""
    targets = torch.cat([t if t.dim() == 3 else t[:, None] for t in micro.non_tensors["targets"]])
    if targets.shape[1] != num_layers:
        raise ValueError(f"sft.align_layers: the stored stage-2 targets hold {targets.shape[1]} layers per latent, "
                         f"the setting asks for {num_layers}; delete sft.latent_targets (or point it elsewhere) to "
                         "write them again")
    return targets


def mirage1_loss(policy: Policy, micro, counts: GlobalCounts, config, teacher=None):
    module, device = policy.model.module, policy.model.device
    inputs = model_batch(micro, device)
    targets = helper_targets(module, micro, config.sft.latent_size, device)
    logits, hidden, _ = packed_forward(module, inputs, config.worker.actor.padding_free, latent_embeds=targets)
    pads = inputs["input_ids"] == base_model(module).latent_tokens.pad
    produced = hidden[:, :-1][pads[:, 1:]]  # h(p − 1) for every latent pad p, row-major like the targets
    align = cosine_share(produced, targets, micro.meta["align_items"])
    ce = weighted_ce(logits, inputs["input_ids"], micro.tensors["response_mask"].to(device), counts)
    return compose(policy, ce, align, config.sft)


@torch.no_grad()
def helper_targets(module, micro, latent_size: int, device) -> torch.Tensor:
    """Each helper image's merged patches (frozen tower + merger), the last N mod K dropped, mean-pooled into K
    consecutive chunks: (samples · K, D), in sample order."""
    pixels = torch.cat(list(micro.non_tensors["helper_pixel_values"])).to(device)
    grids = torch.cat(list(micro.non_tensors["helper_image_grid_thw"])).to(device)
    features = image_features(module, pixels, grids)
    merge = base_model(module).config.vision_config.spatial_merge_size
    counts = (grids.prod(-1) // merge ** 2).tolist()
    pooled = []
    for patches in torch.split(features, counts):
        group = patches.shape[0] // latent_size
        pooled.append(patches[:group * latent_size].view(latent_size, group, -1).mean(1))
    return torch.cat(pooled)


def mirage2_loss(policy: Policy, micro, counts: GlobalCounts, config, teacher=None):
    inputs = model_batch(micro, policy.model.device)
    out, _ = student_forward(policy.model.module, micro, inputs,
                             checkpoint=config.worker.actor.model.enable_gradient_checkpointing)
    ce = weighted_ce(out.logits, inputs["input_ids"], micro.tensors["response_mask"].to(out.logits.device), counts)
    return compose(policy, ce, None, config.sft)


SFT_LOSSES = {"monet1": monet1_loss, "monet2": monet2_loss, "monet3": monet3_loss, "mirage1": mirage1_loss,
              "mirage2": mirage2_loss}


def sft_update(policy: Policy, batch, config, stage: str, teacher=None) -> dict:
    """One optimizer step of `stage` over this rank's shard of the step, in micro-batches of sft.micro_batch_size."""
    loss_fn = lambda pol, micro, counts: SFT_LOSSES[stage](pol, micro, counts, config, teacher)  # noqa: E731
    step = lambda mini: optimizer_step(policy, mini, loss_fn, config.sft.micro_batch_size,  # noqa: E731
                                       config.worker.actor.max_grad_norm)
    return run_epochs(policy, batch, len(batch), 1, step)


# ---- the stage-2 latents that monet3 learns -------------------------------------------------------------------
@torch.no_grad()
def stage2_latents(teacher, batch, micro_size: int) -> list[torch.Tensor]:
    """Per sample, the states (n, layers, D) the stage-2 model produces at its latent pads on its own layout
    (auxiliary image + block), for the layers `batch.meta["align_layers"]` (`sft.align_layers`, `latent_layers`)."""
    teacher.module.eval()
    pad = base_model(teacher.module).latent_tokens.pad
    num_layers = base_model(teacher.module).config.text_config.num_hidden_layers
    layers = latent_layers(batch.meta.get("align_layers", "last"), num_layers)
    per_sample = []
    for micro in batch.split(micro_size):
        inputs = model_batch(micro, teacher.device)
        pads = inputs["input_ids"] == pad
        out, latents = student_forward(teacher.module, micro, inputs, compute_logits=False,
                                       layers=[layer for layer in layers if 0 < layer < num_layers])
        states = pad_states(out, latents, pads, layers, num_layers).cpu()
        per_sample += list(torch.split(states, pads.sum(-1).tolist()))
    return per_sample


def save_latents(path: str, latents: dict[str, torch.Tensor]) -> None:
    """One rank's latents for one part, written under a temporary name and renamed (never half a file)."""
    from safetensors.torch import save_file

    with atomic_path(path) as partial:
        save_file({key: value.contiguous() for key, value in latents.items()}, str(partial))
