"""`TLAlignTrainer`: transformers' Trainer with mixed batches and the token-label aligned loss."""

from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict

import torch
from transformers import Trainer, TrainerCallback

from .aligner import MIXING_ARGUMENTS
from .collator import TLAlignCollator
from .config import TLAlignConfig
from .data import set_train_epoch
from .metrics import compute_accuracy_metrics
from .model_card import write_model_card
from .modeling import TLAlignMixin, to_tl_align

COLLATOR_STATE_NAME = "tl_align_collator_state_{process_index}.json"


class _TrainTransformEpochCallback(TrainerCallback):
    """Tells a `TrainTransform` attached with `with_transform` the epoch, so each epoch draws new augmentations."""

    def __init__(self, trainer: TLAlignTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.trainer.train_dataset is not None:
            set_train_epoch(self.trainer.train_dataset, int((state.epoch or 0.0) + 1e-6))


class TLAlignTrainer(Trainer):
    """Trainer for aligned image classifiers; a drop-in for `Trainer` in image-classification scripts.

    Training batches are mixed (by a [`TLAlignCollator`] built from `args` when no collator is given) and the loss
    is the soft-target cross-entropy against the aligned target (or the area target with `args.tl_align=False`).
    Evaluation and prediction run unmixed, with plain cross-entropy, top-1 and top-5 accuracy. Next to the loss, the
    trainer logs the mean `mix_lam`, the mean `aligned_lam` and `alignment_gap`, their mean absolute difference.

    Args:
        model: an aligned model, or a vanilla model of a supported class (converted in place by `to_tl_align`).
        args: a [`TLAlignConfig`].
        data_collator: defaults to `TLAlignCollator.from_model(model, **args.collator_kwargs())`.
        compute_metrics: defaults to top-1/top-5 accuracy.
        **kwargs: the other arguments of `Trainer`.
    """

    def __init__(self, model=None, args: TLAlignConfig | None = None, data_collator=None, compute_metrics=None, **kwargs):
        if model is None:
            raise ValueError("TLAlignTrainer needs a `model` (model_init is not supported).")
        if args is None:
            args = TLAlignConfig(output_dir="tmp_trainer")
        if not isinstance(args, TLAlignConfig):
            raise TypeError(
                f"`args` must be a TLAlignConfig (TrainingArguments plus mixing settings), got {type(args).__name__}. "
                "Build it with TLAlignConfig(output_dir=..., ...) using the same fields."
            )
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("TLAlignTrainer computes the aligned loss itself; remove `compute_loss_func`.")
        model = to_tl_align(model)
        model.tl_align_attention_path = args.tl_align_attention_path
        if data_collator is None:
            data_collator = TLAlignCollator.from_model(model, **args.collator_kwargs(), rank=args.process_index)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            compute_metrics=compute_metrics or compute_accuracy_metrics,
            **kwargs,
        )
        self._alignment_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._mixed_batches_trained = 0
        self.add_callback(_TrainTransformEpochCallback(self))

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

    # ----------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Aligned soft-target loss on mixed training batches; plain cross-entropy otherwise.

        With `num_items_in_batch` (the samples of all accumulated micro-batches, across processes), the loss is
        the sum over this micro-batch divided by it, so gradient accumulation equals one large batch.
        """
        labels = inputs["labels"]
        mixing = {name: inputs[name] for name in MIXING_ARGUMENTS if name in inputs}
        if not (model.training and len(mixing) == len(MIXING_ARGUMENTS)):
            outputs = model(pixel_values=inputs["pixel_values"])
            loss = torch.nn.functional.cross_entropy(outputs.logits.float(), labels)
            return (loss, outputs) if return_outputs else loss

        unwrapped = self.accelerator.unwrap_model(model)
        if self.args.tl_align:
            outputs = model(pixel_values=inputs["pixel_values"], **mixing)
            own_share = outputs.aligned_lam
        else:
            outputs = model(pixel_values=inputs["pixel_values"])
            own_share = mixing["mix_lam"]
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = unwrapped.tl_align_loss(
            outputs, labels, mixing["mix_index"], own_share, self.args.label_smoothing, reduction
        )
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:  # DDP averages gradients over processes; undo it
                loss = loss * self.accelerator.num_processes
        self._record_alignment(mixing["mix_lam"], own_share if self.args.tl_align else None)
        self._mixed_batches_trained += 1
        return (loss, outputs) if return_outputs else loss

    # ----------------------------------------------------------------------------------------------- logging
    def _record_alignment(self, mix_lam: torch.Tensor, aligned_lam: torch.Tensor | None) -> None:
        """Keep this step's mean shares on the device; they are read (one sync) only when logged."""
        metrics = self._alignment_metrics["train"]
        metrics["mix_lam"].append(mix_lam.detach().float().mean())
        if aligned_lam is not None:
            metrics["aligned_lam"].append(aligned_lam.detach().float().mean())
            metrics["alignment_gap"].append((aligned_lam.detach().float() - mix_lam.float()).abs().mean())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the alignment metrics averaged over the steps since the last log (training logs only)."""
        mode = "train" if "loss" in logs else "eval"
        metrics = self._alignment_metrics[mode]
        logs.update({name: torch.stack(values).mean().item() for name, values in metrics.items() if values})
        metrics.clear()
        super().log(logs, start_time)

    # ----------------------------------------------------------------------------------------------- checkpoints
    def _save_rng_state(self, output_dir: str) -> None:
        """Also save how many mixed batches were trained, so a resumed run continues the same mixing stream."""
        super()._save_rng_state(output_dir)
        state = {"mixed_batches_trained": self._mixed_batches_trained}
        if isinstance(self.data_collator, TLAlignCollator):
            state["collator"] = self.data_collator.state_dict(num_calls=self._mixed_batches_trained)
        path = os.path.join(output_dir, COLLATOR_STATE_NAME.format(process_index=self.args.process_index))
        with open(path, "w") as file:
            json.dump(state, file)

    def _restore_mixing_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, COLLATOR_STATE_NAME.format(process_index=self.args.process_index))
        if not os.path.isfile(path):
            return
        with open(path) as file:
            state = json.load(file)
        self._mixed_batches_trained = state["mixed_batches_trained"]
        if isinstance(self.data_collator, TLAlignCollator) and "collator" in state:
            self.data_collator.load_state_dict(state["collator"])

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load weights the way `from_pretrained` does, with its key conversion (transformers issue 43701)."""
        self._restore_mixing_state(resume_from_checkpoint)
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
    def create_model_card(self, finetuned_from: str | None = None, dataset=None, **kwargs) -> None:
        """Write the TL-Align model card (README.md) to `output_dir`: settings, final eval metrics, plain loading."""
        if not self.is_world_process_zero():
            return
        eval_logs = [entry for entry in self.state.log_history if "eval_loss" in entry]
        mixing = {key: value for key, value in self.args.collator_kwargs().items() if key != "seed"}
        model = self.accelerator.unwrap_model(self.model)
        write_model_card(
            self.args.output_dir,
            base_model=finetuned_from,
            dataset=dataset if isinstance(dataset, str) or dataset is None else dataset[0],
            mixing=mixing,
            tl_align=self.args.tl_align,
            label_smoothing=self.args.label_smoothing,
            metrics=eval_logs[-1] if eval_logs else {},
            model_class_name=type(model).__name__,
            repo_id=self.args.hub_model_id,
        )
