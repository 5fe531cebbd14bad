"""The latent-SFT trainer: the same policy workers, run folder and loop as RL, with one SFT update rule per stage.

A step: the next `sft.batch_size` rows (a resumable, seeded order) → padded into a Batch → each rank's shard →
`update_sft` (the stage's loss composer through `optimizer_step`) → metrics. Only the actor role starts (no rollout
engine, no reference); monet2 adds a frozen teacher on the same workers; monet3 first has the stage-2 model write its
target latents (once; a restart skips the parts already written).
"""
from __future__ import annotations

from pathlib import Path

from RL.checkpoint import crash_point
from RL.data.latent_targets import LatentTargets
from RL.data.loader import StatefulPromptLoader
from RL.data.sft_dataset import collate_sft
from RL.protocol import object_array
from RL.trainer.base import RayTrainer, mean_dicts, timed

POLICY = "actor"


class SFTTrainer(RayTrainer):
    title = "latent SFT"
    policy_names = (POLICY,)
    roles = ("actor",)

    def __init__(self, config, dataset, processor, total_steps: int):
        self.dataset, self.stage, self.sft = dataset, config.sft.stage, config.sft
        super().__init__(config, total_steps, has_validation=False)
        self.pad_id = processor.tokenizer.pad_token_id
        self.loader = StatefulPromptLoader(dataset, self.sft.batch_size, shuffle=config.data.shuffle,
                                           seed=self.sft.seed, num_workers=config.data.dataloader_num_workers)
        if self.stage == "monet3":
            dataset.targets = self.write_targets()

    def start_workers(self) -> None:
        super().start_workers()
        if self.stage == "monet2":  # the frozen teacher lives on the workers: a restart loads it again
            self.policy.call("init_teacher", self.sft.teacher_path)

    def train_step(self, step: int) -> dict:
        timing: dict = {}
        self.pop_busy_time()
        with timed(timing, "step"):
            batch = self.make_batch(self.loader.next_batch())
            with timed(timing, "update_actor"):
                metrics = mean_dicts(self.policy.dispatch("update_sft", batch, POLICY, self.stage))
        timing["timing_s/worker_busy"] = self.pop_busy_time()
        tokens = float(batch.tensors["attention_mask"].sum())
        return {"step": step, **metrics, **timing, "sft/tokens": tokens,
                "perf/tokens_per_s": tokens / timing["timing_s/step"] / self.world_size}

    def make_batch(self, items: list[dict]):
        """The step's Batch; `align_items` counts what the alignment averages over: observation tokens (monet2) or
        latents (monet3, mirage1), over the whole step."""
        batch = collate_sft(items, self.pad_id)
        if self.stage == "monet2":
            batch.meta["align_items"] = float(batch.tensors["obs"].sum())
        else:
            batch.meta["align_items"] = float((batch.tensors["input_ids"] == self.dataset.tokens.pad).sum())
        return batch

    def validate(self, step: int) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])

    # ---- monet3's targets ----------------------------------------------------------------------------------------
    def write_targets(self) -> LatentTargets:
        """The stage-2 model's states at the latent pads (the layers of sft.align_layers) on every row, written by the
        ranks in parts of sft.batch_size rows."""
        store = LatentTargets(self.sft.latent_targets)
        if store.complete():
            written = store.manifest().get("align_layers", "last")  # targets written before the key: the latents
            if written != self.align_layers:
                raise ValueError(f"sft.align_layers: {self.sft.latent_targets} holds the stage-2 states of "
                                 f"align_layers={written!r}, this run asks for {self.align_layers!r}; delete the "
                                 "folder or set sft.latent_targets to another one")
            return store
        ids = self.dataset.row_ids
        duplicates = sorted({row for row in ids if ids.count(row) > 1})
        if duplicates:
            raise ValueError(f"monet3 stores latents by row id, and these repeat: {duplicates[:5]}")
        Path(self.sft.latent_targets).mkdir(parents=True, exist_ok=True)
        self.policy.call("init_teacher", self.sft.teacher_path)
        size = self.sft.batch_size
        for part, start in enumerate(range(0, len(self.dataset), size)):
            if not store.part_done(part):
                self._write_part(store, part, list(range(start, min(start + size, len(self.dataset)))))
                crash_point("latent_targets", part)
        self.policy.call("release_teacher")
        store.finish({"rows": len(self.dataset), "latent_size": self.sft.latent_size,
                      "teacher_path": self.sft.teacher_path, "align_layers": self.align_layers})
        return store

    @property
    def align_layers(self) -> str | list[int]:
        """`sft.align_layers` as plain JSON (all, last or a list of ints)."""
        layers = self.sft.align_layers
        return layers if isinstance(layers, str) else [int(layer) for layer in layers]

    def _write_part(self, store: LatentTargets, part: int, indices: list[int]) -> None:
        keep = [True] * len(indices)
        while len(indices) % self.world_size:  # every rank runs the same forwards: pad with rows not written
            indices, keep = indices + indices[:1], keep + [False]
        items = [self.dataset.item(index, "hidden") for index in indices]
        batch = collate_sft(items, self.pad_id)
        batch.non_tensors["write"] = object_array(keep)
        batch.meta["align_layers"] = self.align_layers  # which layers' states the teacher stores
        paths = [{"path": str(store.shard_path(part, rank))} for rank in range(self.world_size)]
        self.policy.dispatch("write_latent_targets", batch, per_rank=paths)
        store.mark_done(part)
