"""The `TrainerCallback`s that [`TLAlignTrainer`] adds: the epoch of the data pipeline and the model EMA.

Both act through Trainer's public callback events (`on_train_begin`, `on_epoch_begin`, `on_epoch_end`,
`on_step_end`); they read and set the trainer's own attributes, so each takes the trainer.
"""

from __future__ import annotations

import os

from transformers import TrainerCallback

from .collator import TLAlignCollator
from .support.checkpoints import load_saved_weights
from .support.ema import ModelEma
from .support.transforms import set_train_epoch


class EpochCallback(TrainerCallback):
    """Tells the collator, a `TrainTransform` attached with `with_transform` and the repeated-augmentation sampler
    the epoch, before the training loader starts it.

    All of them derive their randomness from the epoch (and the data), so each epoch draws anew and a resumed run
    draws what the uninterrupted run drew. The epochs are counted here, from the one a run starts (or resumes) in:
    `state.epoch` cannot say it for iterable datasets, whose fraction of an epoch is counted in `max_steps`. The
    sampler follows the same count, also behind accelerate's `skip_first_batches` (the resumed epoch).
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.epoch = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.epoch = int((state.epoch or 0.0) + 1e-6)

    def on_epoch_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.train_dataset is not None:
            set_train_epoch(trainer.train_dataset, self.epoch)
        if isinstance(trainer.data_collator, TLAlignCollator):
            trainer.data_collator.set_epoch(self.epoch)
        if trainer._repeated_augmentation_sampler is not None:
            trainer._repeated_augmentation_sampler.set_epoch(self.epoch)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epoch += 1


class EmaCallback(TrainerCallback):
    """Keeps the trainer's [`ModelEma`] (`args.ema_decay`) in `trainer._model_ema`: made when training starts
    (restored from the checkpoint's `ema/` when the run resumes from `trainer._resumed_from`), updated after every
    optimizer step. The trainer evaluates and saves it (`evaluate`, `save_model`)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer._model_ema = ModelEma(trainer.model, args.ema_decay)
        if trainer._resumed_from is not None:
            ema_dir = os.path.join(trainer._resumed_from, "ema")
            if not os.path.isdir(ema_dir):
                raise ValueError(
                    f"ema_decay is set but {trainer._resumed_from} has no ema/ folder (it was saved without EMA), so "
                    "the average cannot continue. Resume without --ema_decay, or from a checkpoint saved with it."
                )
            with trainer._model_ema.swapped_into(trainer.model):
                load_saved_weights(ema_dir, trainer.accelerator.unwrap_model(trainer.model))

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._model_ema.update(self.trainer.model)
