"""Each SFT stage's loss, computed by its composer on the real sharded policy, equals an independent computation on
the plain model (stock forwards, the per-latent recurrence, formulas written out); monet2's alignment gradient
reaches the parameters only through the latents, and never the teacher."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from RL.config import load_config
from RL.data.sft_dataset import collate_sft, sft_dataset
from RL.train_sft import sft_run_config
from monet_models import load_processor
from monet_models.transformers import load_latent_model
from monet_models.transformers.exact_recurrence import exact_latent_forward, visibility_mask
from workers.actor.policy import Policy
from workers.actor.sft_losses import SFT_LOSSES
from workers.actor.sharded_model import ShardedModel
from workers.actor.updates import GlobalCounts

K = 3
TOL = 1e-4
FILES = {"monet1": "sft_monet.json", "monet2": "sft_monet.json", "monet3": "sft_monet.json",
         "mirage1": "sft_mirage.jsonl", "mirage2": "train.jsonl"}


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """The composers run on a real FSDP model: a one-rank gloo group in this process."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()


def stage_setup(stage, model_dir, data_dir, **sft):
    values = {"sft.stage": stage, "data.train_files": f"{data_dir}/{FILES[stage]}", "sft.latent_size": K,
              "sft.observation_weight": 3.0, "sft.ce_weight": 0.5, "sft.align_weight": 2.0, "sft.micro_batch_size": 4,
              "sft.freeze_vision_tower": True, **sft}
    config = sft_run_config(load_config(["config=examples/config/sft_tiny_cpu.yaml", f"worker.actor.model.model_path="
                                         f"{model_dir}", "trainer.n_gpus_per_node=1"]
                                        + [f"{key}={value}" for key, value in values.items()]))
    processor = load_processor(model_dir)
    dataset = sft_dataset(config, processor, K)
    items = [dataset[i] for i in range(3)]
    if stage == "monet3":  # any targets do: the loss is checked, not their origin (layers 0..N of the 2-layer model)
        generator = torch.Generator().manual_seed(0)
        layers = 3 if values.get("sft.align_layers", "all") == "all" else 1
        for item in items:
            pads = int((item["input_ids"] == dataset.tokens.pad).sum())
            item["targets"] = torch.randn(pads, layers, 128, generator=generator)
    batch = collate_sft(items, processor.tokenizer.pad_token_id)
    key = "obs" if stage == "monet2" else None
    pads = batch.tensors["input_ids"] == dataset.tokens.pad
    batch.meta["align_items"] = float(batch.tensors["obs"].sum() if key else pads.sum())
    return config, batch


def composer_loss(stage, config, batch, model_dir):
    model = ShardedModel(model_dir, config.worker.actor, trainable=True)
    policy = Policy.build("actor", model, None, config.worker.actor.optim, 1)
    teacher = ShardedModel(model_dir, config.worker.actor, trainable=False) if stage == "monet2" else None
    counts = GlobalCounts.of(batch.tensors["response_mask"].float())
    loss, shares, _ = SFT_LOSSES[stage](policy, batch, counts, config, teacher)
    return loss, shares, model, teacher


def weighted_ce(logits, ids, weights):
    """Σ w_t · CE(token t | logits at t − 1) / Σ w_t, one token at a time."""
    total, norm = 0.0, 0.0
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if weights[b, t] > 0:
                total += weights[b, t] * F.cross_entropy(logits[b, t - 1].float()[None], ids[b, t][None])
                norm += weights[b, t]
    return total / norm


def inputs(batch, prefix=""):
    pixels = torch.cat(list(batch.non_tensors[f"{prefix}pixel_values"]))
    grid = torch.cat(list(batch.non_tensors[f"{prefix}image_grid_thw"]))
    return batch.tensors[f"{prefix}input_ids"], batch.tensors[f"{prefix}attention_mask"], pixels, grid


def all_layers(model, ids, mask, pixels, grid, latents=None, hidden=None, view=None):
    """Every layer's hidden states (1..N, N post-norm) of one teacher-forced pass, from transformers' own outputs."""
    images = torch.cat(model.model.get_image_features(pixels, grid, return_dict=True).pooler_output)
    embeds = model.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == model.config.image_token_id)[..., None], images)
    if latents is not None:
        embeds = embeds.masked_scatter((ids == model.latent_tokens.pad)[..., None], latents)
    positions, _ = model.mrope_positions(ids, mask, grid)
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=visibility_mask(mask, hidden, view),
                                     position_ids=positions, output_hidden_states=True)
    return out.hidden_states[1:]


def alignment(student, teacher, obs, teacher_obs):
    distances = [1 - F.cosine_similarity(s[obs], t[teacher_obs], dim=-1) for s, t in zip(student, teacher)]
    return torch.cat(distances).mean()


@pytest.mark.parametrize("stage", ["monet1", "monet3", "monet3-last", "mirage1", "mirage2"])
def test_stage_loss_equals_the_independent_computation(stage, tiny_model_dir, sft_data_dir):
    """monet3 (align_layers all, Monet's release): 1 − cos at each latent pad over transformers' hidden_states 0..N of
    the pass with the latents in place (0 = the latent itself); monet3-last: the latents alone."""
    stage, _, layers = stage.partition("-")
    config, batch = stage_setup(stage, tiny_model_dir, sft_data_dir, **{"sft.align_layers": layers or "all"})
    loss, shares, _, _ = composer_loss(stage, config, batch, tiny_model_dir)
    model, _ = load_latent_model(tiny_model_dir, dtype="fp32")
    ids, mask, pixels, grid = inputs(batch)
    weights = batch.tensors["response_mask"]
    pads = ids == model.latent_tokens.pad
    with torch.no_grad():
        if stage == "monet1":
            types = (ids == model.config.image_token_id).int()  # what the processor gives the stock forward
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                           mm_token_type_ids=types).logits
            align = None
        elif stage == "mirage1":
            helper = model.model.get_image_features(torch.cat(list(batch.non_tensors["helper_pixel_values"])),
                                                    torch.cat(list(batch.non_tensors["helper_image_grid_thw"])),
                                                    return_dict=True).pooler_output
            targets = torch.cat([f[:len(f) // K * K].view(K, -1, f.shape[-1]).mean(1) for f in helper])
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                        latent_embeds=targets, latent_mode=True)
            logits = out.logits
            align = (1 - F.cosine_similarity(out.hidden_states[:, :-1][pads[:, 1:]], targets, dim=-1)).mean()
        else:
            out, latents, _ = exact_latent_forward(model, ids, mask, pixels, grid)
            logits, align = out.logits, None
            if stage == "monet3":
                targets = torch.cat(list(batch.non_tensors["targets"]))
                states = [latents] if layers == "last" else \
                    [latents] + [h[pads] for h in all_layers(model, ids, mask, pixels, grid, latents)]
                assert len(states) == targets.shape[1]
                align = torch.stack([1 - F.cosine_similarity(state, targets[:, i], dim=-1)
                                     for i, state in enumerate(states)]).mean()
    ce = weighted_ce(logits, ids, weights)
    assert abs(float(shares["sft/ce"]) - float(ce)) <= TOL
    expected = 0.5 * ce + (0.0 if align is None else 2.0 * align)
    assert abs(loss.item() - expected.item()) <= TOL
    if align is not None:
        assert abs(float(shares["sft/align"]) - align.item()) <= TOL and align.item() > 1e-3
    assert weights[pads].abs().sum() == 0 and weights[ids == model.latent_tokens.end].abs().sum() == 0


def test_monet2_alignment_reaches_the_parameters_only_through_the_latents(tiny_model_dir, sft_data_dir):
    """With CE off, the update's gradient is Σ_k ∂A/∂z_k · dz_k/dθ (∂A/∂z with the other latents fixed, dz/dθ through
    the whole recurrence), computed here from the per-latent recurrence; the teacher gets no gradient."""
    config, batch = stage_setup("monet2", tiny_model_dir, sft_data_dir, **{"sft.ce_weight": 0.0})
    loss, shares, sharded, teacher = composer_loss("monet2", config, batch, tiny_model_dir)
    loss.backward()
    got = {name: p.grad.full_tensor() for name, p in sharded.module.named_parameters() if p.grad is not None}
    assert all(p.grad is None and not p.requires_grad for p in teacher.module.parameters())

    model, _ = load_latent_model(tiny_model_dir, dtype="fp32")
    model.model.visual.requires_grad_(False)
    ids, mask, pixels, grid = inputs(batch)
    hidden, view = batch.tensors["hidden"], batch.tensors["view"]
    with torch.no_grad():
        target = all_layers(model, *inputs(batch, "teacher_"))
    _, latents, _ = exact_latent_forward(model, ids, mask, pixels, grid, hidden=hidden, view=view)
    fixed = latents.detach().requires_grad_()
    student = all_layers(model, ids, mask, pixels, grid, fixed, hidden, view)
    align = alignment(student, target, batch.tensors["obs"], batch.tensors["teacher_obs"])
    assert abs(float(shares["sft/align"]) - align.item()) <= TOL
    (partial,) = torch.autograd.grad(align, fixed)
    model.zero_grad(set_to_none=True)
    (2.0 * (latents * partial).sum()).backward()
    expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert set(expected) <= set(got) and all(got[k].abs().max() == 0 for k in set(got) - set(expected))
    assert max(float((got[k] - expected[k]).abs().max()) for k in expected) <= TOL
    assert sum(float(g.abs().sum()) for g in got.values()) > 1e-3  # the latents do carry a gradient
    assert got["lm_head.weight"].abs().max() == 0  # the head shapes no latent: no alignment gradient reaches it
