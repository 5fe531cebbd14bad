"""A deterministic, resumable prompt loader: the data order is a function of (seed, epoch), and the position inside
the epoch is part of the checkpoint, so a resumed run continues with exactly the batches it would have seen."""
from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
from torch.utils.data import DataLoader, Dataset

from RL.data.errors import DataError
from common.seeding import derive_seed


def item_list(items: list) -> list:
    """The "collate": the dataset items themselves (the rollout engines and the SFT workers pad per request)."""
    return list(items)


class StatefulPromptLoader:
    """Batches of `batch_size` prompts (-1 = the whole dataset) in a seeded order per epoch.

    A batch is a list of dataset items.

    `state_dict()` counts batches handed out, not batches prefetched by worker processes, so it is exact.
    Iterating yields the rest of the current epoch; `next_batch()` crosses epochs for callers that pull on demand.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 1,
                 drop_last: bool = True, num_workers: int = 0):
        self.dataset = dataset
        self.batch_size = len(dataset) if batch_size == -1 else batch_size
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or -1, got {batch_size}")
        if drop_last and len(dataset) < self.batch_size:
            raise DataError(f"{len(dataset)} prompts cannot fill one batch of {self.batch_size}; "
                            "lower data.rollout_batch_size or add data")
        self.shuffle, self.seed, self.drop_last, self.num_workers = shuffle, seed, drop_last, num_workers
        self.epoch, self.position = 0, 0
        self._stream: Optional[Iterator] = None

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full if self.drop_last or not rest else full + 1

    def order(self, epoch: int) -> np.ndarray:
        """Dataset indices of `epoch`, the same for every run with this seed."""
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.default_rng(derive_seed(self.seed, "data_order", epoch)).permutation(len(self.dataset))

    def _batches(self, epoch: int) -> list[list[int]]:
        order = self.order(epoch).tolist()
        return [order[start * self.batch_size:(start + 1) * self.batch_size] for start in range(len(self))]

    def __iter__(self) -> Iterator[Any]:
        """The remaining batches of the current epoch; afterwards the loader stands at the next epoch."""
        remaining = self._batches(self.epoch)[self.position:]
        if remaining:
            loader = DataLoader(self.dataset, batch_sampler=remaining, collate_fn=item_list,
                                num_workers=self.num_workers)
            for batch in loader:
                self.position += 1
                yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def next_batch(self) -> Any:
        """The next batch, moving into the next epoch when this one is used up."""
        for _ in range(2):
            if self._stream is None:
                self._stream = iter(self)
            try:
                return next(self._stream)
            except StopIteration:
                self._stream = None
        raise RuntimeError("the loader yields no batches")

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_prompts": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position; refuses if the data or the seed changed (the order would differ)."""
        if state["num_prompts"] != len(self.dataset) or state["seed"] != self.seed:
            raise DataError(f"the checkpoint's loader state is for {state['num_prompts']} prompts with seed "
                            f"{state['seed']}, this run has {len(self.dataset)} with seed {self.seed}: the data order "
                            "would differ; resume with the data and seed it was trained on, or start a new run "
                            "(another trainer.experiment_name)")
        self.epoch, self.position = state["epoch"], state["position"]
        self._stream = None


def build_loader(dataset: Dataset, data_config, split: str = "train",
                 batch_size: Optional[int] = None) -> StatefulPromptLoader:
    """The train loader (rollout_batch_size, shuffled, full batches) or the val loader (val_batch_size, in order,
    nothing dropped) of the `data` config section; `batch_size` overrides (e.g. data.online_accum_size)."""
    train = split == "train"
    size = batch_size or (data_config.rollout_batch_size if train else data_config.val_batch_size)
    return StatefulPromptLoader(dataset, size, shuffle=train and data_config.shuffle,
                                seed=data_config.seed, drop_last=train,
                                num_workers=data_config.dataloader_num_workers)
