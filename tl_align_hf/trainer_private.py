"""Every private `Trainer` method that [`TLAlignTrainer`] overrides, in one place, each with the reason.

transformers gives no public hook for these. Each override is a bet on transformers' next release, so each has a
contract test in `tests/test_private_trainer_methods.py` that fails, naming the method, when transformers changes its
signature or what it does; that file also checks that `TLAlignTrainer` overrides no other private method.

- `_get_output_dir`, `_save_checkpoint`: the atomic checkpoint (`tl_align_hf.support.checkpoints.
  atomic_checkpoint_save`). transformers 5.25 writes `checkpoint-N` in place and its `get_last_checkpoint` takes any
  `checkpoint-N` folder, so a kill during a save would lose the run; callbacks (`on_save`) run after the save.
- `_load_from_checkpoint`, `_load_best_model`: transformers 5.25 loads the saved file into the model as it is, with
  `strict=False`, without the key conversion of `from_pretrained`, so e.g. a ViT checkpoint loads nothing, silently
  (`tl_align_hf.support.checkpoints.load_saved_weights`). peft, DeepSpeed and FSDP checkpoints keep Trainer's load.
- `_get_train_sampler`: the repeated-augmentation sampler; `get_train_dataloader` hands this method to the private
  `_get_dataloader`, which builds the loader.

Private attributes of Trainer read or set elsewhere: `_train_batch_size` (the sampler's batch, here) and
`_created_lr_scheduler` (`TLAlignTrainer.create_scheduler` sets it, as Trainer's does, so that the next `train()`
makes a new scheduler); the same test file checks both.
"""

from __future__ import annotations

from transformers.trainer_utils import unwrap_peft_model

from .support.checkpoints import atomic_checkpoint_save, load_saved_weights
from .support.sampler import RepeatedAugmentationSampler

PRIVATE_TRAINER_METHODS = (
    "_get_output_dir", "_save_checkpoint", "_load_from_checkpoint", "_load_best_model", "_get_train_sampler",
)  # fmt: skip


class PrivateTrainerMethods:
    """Mixin for a `Trainer` subclass (before `Trainer` in its bases): the overrides named in `PRIVATE_TRAINER_METHODS`.

    Reads `args.repeated_augmentation` (a `TLAlignConfig`); sets `_repeated_augmentation_sampler` (the sampler, with
    `repeated_augmentation` > 1) and `_staging_dir` (while a checkpoint is written).
    """

    _staging_dir: str | None = None
    _repeated_augmentation_sampler: RepeatedAugmentationSampler | None = None

    def _get_output_dir(self, trial) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written into a staging folder and renamed into place when complete: a kill or a
        full disk never leaves a partial checkpoint-N."""
        with atomic_checkpoint_save(self, super()._get_output_dir(trial)) as staging_dir:
            self._staging_dir = staging_dir
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging_dir = None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        if self._loads_its_own_checkpoints(model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_saved_weights(resume_from_checkpoint, self.accelerator.unwrap_model(model))

    def _load_best_model(self) -> None:
        if self._loads_its_own_checkpoints(self.model):
            return super()._load_best_model()
        load_saved_weights(self.state.best_model_checkpoint, self.accelerator.unwrap_model(self.model))

    def _loads_its_own_checkpoints(self, model) -> bool:
        """Whether Trainer's load is kept: DeepSpeed, FSDP, or a peft model (its checkpoints hold only adapters)."""
        unwrapped = self.accelerator.unwrap_model(model)
        return self.is_deepspeed_enabled or self.is_fsdp_enabled or unwrap_peft_model(unwrapped) is not unwrapped

    def _get_train_sampler(self, train_dataset=None):
        """Trainer's sampler, or with `repeated_augmentation` > 1 a [`RepeatedAugmentationSampler`]."""
        if self.args.repeated_augmentation == 1:
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        self._repeated_augmentation_sampler = RepeatedAugmentationSampler(
            len(dataset), self.args.repeated_augmentation, self._train_batch_size, self.args.world_size, self.args.seed
        )
        return self._repeated_augmentation_sampler
