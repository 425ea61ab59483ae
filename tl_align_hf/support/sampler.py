"""Repeated augmentation (Hoffer et al., 2020; Berman et al., 2019), the sampler of DeiT's recipe (`RASampler`).

Each batch holds `num_repeats` copies of each of its images; the training transform augments each copy differently
(`TrainTransform` seeds a copy by its rank among the equal images of its batch). An epoch has the batches of a
plain epoch (dropping the last incomplete step), so it sees about `1 / num_repeats` of the images, as in DeiT.

DeiT's `RASampler` is per process and sends the copies of an image to neighbouring processes at the same step.
This sampler is the one global order that transformers' `Trainer` and the Accelerate example hand to accelerate,
which deals the batches of `batch_size` to the `num_processes` processes in turn: the copies of an image sit in one
process's batch of one step, so they are different draws whatever the number of processes. The order is a pure
function of (`seed`, epoch): a resumed run skips into the very batches the uninterrupted run trained on.
"""

from __future__ import annotations

import torch


class RepeatedAugmentationSampler(torch.utils.data.Sampler[int]):
    """Dataset indices in batches of `batch_size` holding `num_repeats` copies of each of `ceil(batch_size /
    num_repeats)` images (the last one's copies cut to fill the batch), `num_processes` batches per step.

    Args:
        dataset_length: the number of training examples.
        num_repeats: copies of each image (DeiT: 3).
        batch_size: the batch size of one process (the DataLoader's `batch_size`).
        num_processes: the processes the batches are dealt to in turn (accelerate's `num_processes`).
        seed: with the epoch (`set_epoch`), the seed of the shuffle.

    Example (one process, batches of 4, 3 copies):
        >>> sampler = RepeatedAugmentationSampler(8, num_repeats=3, batch_size=4, seed=0)
        >>> len(sampler), list(sampler)  # 2 batches: 2 images per batch, the second with one copy left out
        (8, [4, 4, 4, 0, 7, 7, 7, 3])
    """

    def __init__(self, dataset_length: int, num_repeats: int, batch_size: int, num_processes: int = 1, seed: int = 0):
        self.num_steps = dataset_length // (batch_size * num_processes)
        if num_repeats < 1 or self.num_steps < 1:
            raise ValueError(
                f"Repeated augmentation needs num_repeats >= 1 (got {num_repeats}) and at least one full step of "
                f"{num_processes} process(es) x batch {batch_size} in the {dataset_length} training examples; lower "
                "the batch size or train on more examples."
            )
        self.dataset_length, self.num_repeats, self.batch_size = dataset_length, num_repeats, batch_size
        self.num_processes, self.seed, self.epoch = num_processes, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the order of `epoch` (called by Trainer and accelerate before each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_steps * self.num_processes * self.batch_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        images_per_batch = -(-self.batch_size // self.num_repeats)
        num_batches = self.num_steps * self.num_processes
        order = torch.randperm(self.dataset_length, generator=generator)[: num_batches * images_per_batch]
        batches = order.view(num_batches, images_per_batch).repeat_interleave(self.num_repeats, dim=1)
        return iter(batches[:, : self.batch_size].flatten().tolist())
