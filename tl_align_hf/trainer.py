"""`TLAlignTrainer`: transformers' Trainer with mixed batches and the token-label aligned loss."""

from __future__ import annotations

import contextlib
import os

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from .collator import TLAlignCollator
from .config import TLAlignConfig
from .data import set_train_epoch
from .losses import alignment_metrics, mixed_batch_loss
from .metrics import compute_accuracy_metrics
from .mixer import MIXING_KEYS
from .model_card import tl_align_model_card
from .modeling import TLAlignMixin, to_tl_align

logger = logging.get_logger(__name__)


class _EpochCallback(TrainerCallback):
    """Tells the collator and a `TrainTransform` attached with `with_transform` the epoch, before its loader starts.

    Both derive their randomness from the epoch (and the data), so each epoch draws anew and a resumed run draws
    what the uninterrupted run drew.
    """

    def __init__(self, trainer: TLAlignTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = int((state.epoch or 0.0) + 1e-6)
        if self.trainer.train_dataset is not None:
            set_train_epoch(self.trainer.train_dataset, epoch)
        if isinstance(self.trainer.data_collator, TLAlignCollator):
            self.trainer.data_collator.set_epoch(epoch)


def _as_tl_align_config(args: TrainingArguments | None) -> TLAlignConfig:
    """`args` itself, or a plain `TrainingArguments` converted with the default mixing settings (logged)."""
    if args is None:
        return TLAlignConfig(output_dir="tmp_trainer")
    if isinstance(args, TLAlignConfig):
        return args
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"`args` must be a TLAlignConfig or TrainingArguments, got {type(args).__name__}.")
    values = args.to_dict()
    values.pop("push_to_hub_token", None)
    if values.get("label_smoothing_factor"):
        values["label_smoothing"] = values.pop("label_smoothing_factor")
    config = TLAlignConfig(**{key: value for key, value in values.items() if key in TLAlignConfig.__dataclass_fields__})
    logger.info(
        f"TLAlignTrainer got a plain {type(args).__name__}; training with the default mixing of TLAlignConfig: "
        f"{config.mixing_method} (cutmix_alpha={config.cutmix_alpha}, mixup_alpha={config.mixup_alpha}), TL-Align "
        f"{'on' if config.tl_align else 'off'}, label smoothing {config.label_smoothing}. Pass a TLAlignConfig to "
        "choose them."
    )
    return config


class TLAlignTrainer(Trainer):
    """Trainer for aligned image classifiers; a drop-in for `Trainer` in image-classification scripts.

    Training batches are mixed (by a [`TLAlignCollator`] built from `args` when no collator is given) and the loss
    is [`mixed_batch_loss`]: the soft-target cross-entropy against the aligned target (or the area target with
    `args.tl_align=False`). Evaluation and prediction run unmixed, with plain cross-entropy, top-1 and top-5 accuracy.
    Next to the loss, the trainer logs the means over all processes of `mix_lam`, `aligned_lam` and
    `alignment_gap` (their mean absolute difference).

    Args:
        model: an aligned model, or a vanilla model of a supported class (converted in place by `to_tl_align`).
        args: a [`TLAlignConfig`]; a plain `TrainingArguments` is converted with the default mixing settings.
        data_collator: defaults to `TLAlignCollator.from_model(model, args, seed=args.seed, rank=args.process_index)`.
        compute_metrics: defaults to top-1/top-5 accuracy.
        **kwargs: the other arguments of `Trainer`.
    """

    def __init__(self, model=None, args: TLAlignConfig | None = None, data_collator=None, compute_metrics=None, **kwargs):
        if model is None:
            raise ValueError("TLAlignTrainer needs a `model` (model_init is not supported).")
        args = _as_tl_align_config(args)
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("TLAlignTrainer computes the aligned loss itself; remove `compute_loss_func`.")
        model = to_tl_align(model)
        model.tl_align_attention_path = args.tl_align_attention_path
        if data_collator is None:
            data_collator = TLAlignCollator.from_model(model, args, seed=args.seed, rank=args.process_index)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            compute_metrics=compute_metrics or compute_accuracy_metrics,
            **kwargs,
        )
        self._alignment_sums = None  # summed `mixed_batch_loss` statistics since the last log, on the device
        self.add_callback(_EpochCallback(self))

    # ----------------------------------------------------------------------------------------------- data
    @contextlib.contextmanager
    def _unmixed_collation(self):
        """Evaluation and prediction batches are never mixed."""
        mixing_collator = self.data_collator
        if isinstance(mixing_collator, TLAlignCollator):
            self.data_collator = mixing_collator.collate_unmixed
        try:
            yield
        finally:
            self.data_collator = mixing_collator

    def get_eval_dataloader(self, eval_dataset=None):
        with self._unmixed_collation():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._unmixed_collation():
            return super().get_test_dataloader(test_dataset)

    def _remove_unused_columns(self, dataset, description=None):
        """Keep the columns of a dataset with a `with_transform`/`set_transform` transform: it reads them."""
        if (getattr(dataset, "format", None) or {}).get("type") == "custom":
            logger.info_once(
                "remove_unused_columns=True is ignored for datasets with a transform (with_transform/set_transform): "
                "the transform needs the raw columns. Set remove_unused_columns=False to silence this."
            )
            return dataset
        return super()._remove_unused_columns(dataset, description)

    # ----------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """[`mixed_batch_loss`] on mixed training batches; plain cross-entropy otherwise (evaluation).

        With `num_items_in_batch` (the samples of all accumulated micro-batches, across processes), the loss is
        the sum over this micro-batch divided by it, so gradient accumulation equals one large batch.
        """
        mixing = {name: inputs[name] for name in MIXING_KEYS if name in inputs}
        if not (model.training and len(mixing) == len(MIXING_KEYS)):
            outputs = model(pixel_values=inputs["pixel_values"])
            loss = torch.nn.functional.cross_entropy(outputs.logits.float(), inputs["labels"])
            return (loss, outputs) if return_outputs else loss
        outputs = model(pixel_values=inputs["pixel_values"], **(mixing if self.args.tl_align else {}))
        scale_over_processes = num_items_in_batch is not None and self.args.average_tokens_across_devices
        loss, alignment_sums = mixed_batch_loss(
            outputs,
            inputs,
            tl_align=self.args.tl_align,
            label_smoothing=self.args.label_smoothing,
            num_items_in_batch=num_items_in_batch,
            num_processes=self.accelerator.num_processes if scale_over_processes else 1,
        )
        self._alignment_sums = alignment_sums if self._alignment_sums is None else self._alignment_sums + alignment_sums
        return (loss, outputs) if return_outputs else loss

    # ----------------------------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the alignment metrics since the last training log, averaged over all processes.

        Every process calls `log` at the same steps, so the sums are reduced across processes here (the one sync).
        """
        if "loss" in logs and self._alignment_sums is not None:
            logs.update(alignment_metrics(self.accelerator.reduce(self._alignment_sums, reduction="sum")))
            self._alignment_sums = None
        super().log(logs, start_time)

    # ----------------------------------------------------------------------------------------------- checkpoints
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load weights the way `from_pretrained` does, with its key conversion (transformers issue 43701)."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_converted_weights(resume_from_checkpoint, model if model is not None else self.model)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        self._load_converted_weights(self.state.best_model_checkpoint, self.model)

    def _load_converted_weights(self, checkpoint: str, model) -> None:
        """Copy the weights of a saved checkpoint into `model`; every key must match."""
        target = self.accelerator.unwrap_model(model)
        parent_class = target.tl_align_parent if isinstance(target, TLAlignMixin) else type(target)
        loaded = parent_class.from_pretrained(checkpoint, dtype=next(target.parameters()).dtype)
        target.load_state_dict(loaded.state_dict(), strict=True)

    # ----------------------------------------------------------------------------------------------- model card
    def create_model_card(self, **kwargs) -> None:
        """Write the TL-Align model card (README.md) to `output_dir`: Trainer's card plus the mixing settings.

        Takes the arguments of `Trainer.create_model_card` (`finetuned_from`, `tasks`, `dataset`, `tags`, ...).
        """
        if not self.is_world_process_zero():
            return
        card = tl_align_model_card(
            self,
            **kwargs,
            mixing=self.args.mixing_settings_dict(),
            tl_align=self.args.tl_align,
            label_smoothing=self.args.label_smoothing,
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))
