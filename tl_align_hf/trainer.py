"""`TLAlignTrainer`: transformers' Trainer with mixed batches and the token-label aligned loss."""

from __future__ import annotations

import contextlib
import dataclasses
import logging as std_logging
import os

import torch
from datasets import ClassLabel
from transformers import DefaultDataCollator, Trainer, TrainingArguments, default_data_collator
from transformers.trainer_utils import get_last_checkpoint, unwrap_peft_model
from transformers.utils import logging

from .collator import PATCH_SEQUENCE_KEYS, TLAlignCollator
from .config import TLAlignConfig, as_tl_align_config
from .contract import MIXING_KEYS
from .losses import alignment_metrics, mixed_batch_loss
from .models import as_parent_class, to_tl_align
from .settings import MixingSettings
from .support.checkpoints import TrainingRecord, check_one_run_per_launch, check_writable, recorded_training
from .support.metrics import compute_accuracy_metrics
from .support.model_card import tl_align_model_card
from .support.optim import recipe_optimizer, recipe_scheduler
from .support.transforms import interpolation_kwargs
from .trainer_callbacks import EmaCallback, EpochCallback
from .trainer_private import PrivateTrainerMethods

logger = logging.get_logger(__name__)


def _conversion_notice(args: TrainingArguments, config: TLAlignConfig) -> str:
    """What a plain `args` became: the mixing settings it now trains with, and any of its fields that were dropped."""
    kept = {item.name for item in dataclasses.fields(TLAlignConfig)}
    dropped = [item.name for item in dataclasses.fields(args) if item.init and item.name not in kept]
    return (
        f"TLAlignTrainer got a plain {type(args).__name__}; training with the default mixing of TLAlignConfig: "
        f"{config.mixing_method} (cutmix_alpha={config.cutmix_alpha}, mixup_alpha={config.mixup_alpha}), TL-Align "
        f"{'on' if config.tl_align else 'off'}, label smoothing {config.label_smoothing}. Pass a TLAlignConfig to "
        "choose them." + (f" Fields TLAlignConfig lacks were dropped: {', '.join(dropped)}." if dropped else "")
    )


def _check_single_label_problem(config) -> None:
    """TL-Align trains against mixes of two single-label targets: refuse multi-label and regression models."""
    problem_type = getattr(config, "problem_type", None)
    if problem_type in (None, "single_label_classification"):
        return
    raise ValueError(
        f"TL-Align trains single-label classifiers (a mixed target is a share between two class labels, trained with "
        f"softmax cross-entropy), but the model has problem_type={problem_type!r}: its labels and loss are not "
        f"single-label, and the saved config would still say {problem_type!r}. For single-label data, load the model "
        "with problem_type='single_label_classification' (or set model.config.problem_type = None) and integer "
        "labels; train multi-label or regression models with a plain Trainer."
    )


def _check_class_label_feature(split_name: str, dataset, label_column_name: str | None, num_labels: int | None) -> None:
    """A `ClassLabel` label column with more classes than the model, read from the dataset's features alone (cheap,
    and known for streaming datasets too); the collator checks the labels of every batch."""
    if isinstance(dataset, dict):  # several evaluation datasets
        for name, split in dataset.items():
            _check_class_label_feature(f"{split_name}[{name!r}]", split, label_column_name, num_labels)
        return
    features = getattr(dataset, "features", None) or {}
    column = next((name for name in ([label_column_name] if label_column_name else ["labels", "label"]) if name in features), None)
    if num_labels is not None and column is not None and isinstance(features[column], ClassLabel):
        num_classes = features[column].num_classes
        if num_classes > num_labels:
            raise ValueError(
                f"{split_name} has {num_classes} classes in its label column {column!r} (a ClassLabel), outside the "
                f"model's classes [0, {num_labels}): check the label column and the model's num_labels / label2id."
            )


class TLAlignTrainer(PrivateTrainerMethods, Trainer):
    """Trainer for aligned image classifiers; a drop-in for `Trainer` in image-classification scripts.

    Training batches are mixed (by a [`TLAlignCollator`] built from `args` when no collator is given) and the loss
    is [`mixed_batch_loss`]: the soft-target cross-entropy against the aligned target (or the area target with
    `args.tl_align=False`). Evaluation and prediction run unmixed, with plain cross-entropy, top-1 and top-5 accuracy.
    Next to the loss, the trainer logs the means over all processes of `mix_lam`, `aligned_lam` and
    `alignment_gap` (their mean absolute difference). Any dataset works, iterable ones included (streaming `datasets`,
    torch's `IterableDataset`; give `max_steps`): the collator checks each batch's labels against the model's classes.
    With `args.interpolate_pos_encoding` every forward call interpolates the position embeddings to the image size.

    The DeiT / timm recipe fields of [`TLAlignConfig`] (`docs/recipes.md`) act through Trainer's hooks: the
    repeated-augmentation sampler, parameter groups without decay on 1-d parameters and prefix tokens, layer-wise
    lr decay, the batch-scaled learning rate, timm's cosine schedule, and a model EMA evaluated and saved beside
    the weights.

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
        config = as_tl_align_config(args)
        # Our loggers take the level Trainer gives transformers' (--log_level, --log_level_replica; "passive" keeps
        # transformers' verbosity), so that scripts that set it, as transformers' examples do, see our messages.
        std_logging.getLogger(__package__).setLevel(config.get_process_log_level())
        if config is not args and args is not None:
            logger.info(_conversion_notice(args, config))
        args = config
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("TLAlignTrainer computes the aligned loss itself; remove `compute_loss_func`.")
        num_labels = getattr(model.config, "num_labels", None)
        if num_labels is not None and num_labels < 2:
            raise ValueError(
                f"TL-Align needs at least two classes, but the model has num_labels={num_labels}: a mixed target is a "
                "share between two labels (with one class the loss is 0 and the accuracy 1). Check the label column."
            )
        _check_single_label_problem(model.config)
        default_collator = data_collator is default_data_collator or isinstance(data_collator, DefaultDataCollator)
        if default_collator and args.mixing_method != "none":
            raise ValueError(
                f"data_collator={data_collator!r} does not mix (no mix_index / token_weights / mix_lam), so mixing_method="
                f"{args.mixing_method!r} would be silently ignored. Leave data_collator unset (TLAlignTrainer builds a "
                "TLAlignCollator), or pass TLAlignCollator.from_model(model, args)."
            )
        check_one_run_per_launch(args.world_size)
        if args.should_save:
            check_writable(args.output_dir)  # before anything is trained (Trainer itself would fail at the first save)
        self._check_recipe_support(args, kwargs.get("train_dataset"))
        model = to_tl_align(model)
        aligned_model = unwrap_peft_model(model)  # the aligned model (inside a PeftModel, the base model)
        aligned_model.tl_align_attention_path = args.tl_align_attention_path
        self._model_kwargs = interpolation_kwargs(aligned_model, args.interpolate_pos_encoding)  # for every forward
        if data_collator is None:
            data_collator = TLAlignCollator.from_model(model, args, seed=args.seed, rank=args.process_index)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            compute_metrics=compute_metrics or compute_accuracy_metrics,
            **kwargs,
        )
        if self.args.label_names is None:  # the batch contract's key, also for models whose forward takes no labels
            self.label_names = ["labels"]  # (DeiT with teacher): evaluation then reports the loss and the accuracy
        for split_name, dataset in (("train_dataset", self.train_dataset), ("eval_dataset", self.eval_dataset)):
            _check_class_label_feature(split_name, dataset, getattr(self.data_collator, "label_column_name", None), num_labels)
        self._alignment_sums = None  # summed `mixed_batch_loss` statistics since the last log, on the device
        self._non_finite_loss = None  # a device flag: some training loss since the last log was NaN or infinite
        self._last_logged_step = 0
        self.add_callback(TrainingRecord())  # filled when training begins
        self._model_ema, self._resumed_from = None, None  # the EMA of the weights (ema_decay), made in training
        self.add_callback(EpochCallback(self))
        if args.ema_decay is not None:
            self.add_callback(EmaCallback(self))

    @staticmethod
    def _check_recipe_support(args: TLAlignConfig, train_dataset) -> None:
        """Recipe settings that this setup cannot honour, before anything is trained."""
        if args.repeated_augmentation > 1 and isinstance(train_dataset, torch.utils.data.IterableDataset):
            raise ValueError(
                f"repeated_augmentation={args.repeated_augmentation} needs a training set with a length (a sampler "
                "picks the copies); an IterableDataset streams its own order. Set repeated_augmentation=1."
            )
        if args.repeated_augmentation > 1 and args.train_sampling_strategy != "random":
            raise ValueError(
                f"repeated_augmentation={args.repeated_augmentation} is its own sampler: leave train_sampling_strategy "
                f"at 'random' (got {args.train_sampling_strategy!r})."
            )
        if args.ema_decay is not None and (args.fsdp or args.deepspeed):
            raise ValueError("ema_decay keeps a full copy of the weights on each process; it is not supported with "
                             "FSDP or DeepSpeed (the weights are sharded). Leave ema_decay unset.")  # fmt: skip

    # ----------------------------------------------------------------------------------------------- train
    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """`Trainer.train`, after checking that a checkpoint to resume from is whole."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if resume_from_checkpoint:
            missing = [name for name in ("trainer_state.json",) if not os.path.isfile(os.path.join(resume_from_checkpoint, name))]
            if missing or not os.path.isdir(resume_from_checkpoint):
                raise ValueError(
                    f"{resume_from_checkpoint} is not a complete checkpoint (no {', '.join(missing) or 'folder'}): it "
                    "was not written by Trainer, or its save was interrupted. Resume from an earlier checkpoint-N, "
                    "or remove this folder."
                )
        self._resumed_from = resume_from_checkpoint or None  # the EMA continues from its ema/ folder
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    # ----------------------------------------------------------------------------------------------- recipe
    def create_optimizer(self, model=None):
        """Trainer's optimizer; with `filter_bias_and_bn`, `layer_decay` or `lr_base_size`, the recipe's parameter
        groups ([`recipe_optimizer`]: timm's no-decay rule, layer-wise rates, the batch-scaled rate)."""
        recipe = recipe_optimizer(self, self.model if model is None else model) if self.optimizer is None else None
        if recipe is None:
            return super().create_optimizer(model)
        self.optimizer = recipe
        return recipe

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Trainer's scheduler; with `warmup_epochs`, `warmup_lr`, `min_lr` or `cooldown_epochs`, timm's cosine
        schedule per step ([`recipe_scheduler`])."""
        recipe = None
        if self.lr_scheduler is None:
            recipe = recipe_scheduler(self.args, optimizer if optimizer is not None else self.optimizer, num_training_steps)
        if recipe is None:
            return super().create_scheduler(num_training_steps, optimizer)
        # Trainer's private flag, set as for its own scheduler: the next `train()` makes a new one (see trainer_private)
        self.lr_scheduler, self._created_lr_scheduler = recipe, True
        return recipe

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Trainer's evaluation; with a model EMA (`ema_decay`, after training started) also of the averaged
        weights, as `<metric_key_prefix>_ema_*`."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if isinstance(self.eval_dataset if eval_dataset is None else eval_dataset, dict):
            return metrics  # Trainer evaluated each data set through this method, EMA included
        if self._model_ema is not None:
            with self._model_ema.swapped_into(self.model):
                metrics.update(super().evaluate(eval_dataset, ignore_keys, f"{metric_key_prefix}_ema"))
        return metrics

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer's save (also of each checkpoint). A peft model's base model is its parent class meanwhile, so
        that adapter_config.json (`auto_mapping`) names the transformers class, as for an unaligned model (an
        aligned model saves as its parent class by itself). With a model EMA, the averaged weights also as a model
        of their own in `ema/`."""
        base_model = unwrap_peft_model(self.model)
        with as_parent_class(base_model) if base_model is not self.model else contextlib.nullcontext():
            super().save_model(output_dir, _internal_call)
            if self._model_ema is not None:
                with self._model_ema.swapped_into(self.model):
                    super().save_model(os.path.join(output_dir or self.args.output_dir, "ema"), _internal_call=True)

    # ----------------------------------------------------------------------------------------------- data
    @contextlib.contextmanager
    def _loader_settings(self, dataset, mixed: bool):
        """While Trainer builds the loader of `dataset`: evaluation and prediction batches unmixed; a dataset with a
        `with_transform`/`set_transform` transform keeps the columns the transform reads (`remove_unused_columns`
        is off meanwhile; Trainer would remove them, and the transform would fail)."""
        collator, remove_columns = self.data_collator, self.args.remove_unused_columns
        if not mixed and isinstance(collator, TLAlignCollator):
            self.data_collator = collator.collate_unmixed
        if remove_columns and (getattr(dataset, "format", None) or {}).get("type") == "custom":
            logger.info_once(
                "remove_unused_columns=True is ignored for datasets with a transform (with_transform/set_transform): "
                "the transform needs the raw columns. Set remove_unused_columns=False to silence this."
            )
            self.args.remove_unused_columns = False
        try:
            yield
        finally:
            self.data_collator, self.args.remove_unused_columns = collator, remove_columns

    def get_train_dataloader(self):
        with self._loader_settings(self.train_dataset, mixed=True):
            return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset=None):
        named = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset
        with self._loader_settings(self.eval_dataset if named is None else named, mixed=False):
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._loader_settings(test_dataset, mixed=False):
            return super().get_test_dataloader(test_dataset)

    # ----------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """[`mixed_batch_loss`] on training batches; plain cross-entropy otherwise (evaluation).

        With `num_items_in_batch` (the samples of all accumulated micro-batches, across processes), the loss is
        the sum over this micro-batch divided by it, so gradient accumulation equals one large batch.
        """
        # the pixels, and for SigLIP 2 (NaFlex) patch sequences their mask and grids
        image_inputs = {key: inputs[key] for key in PATCH_SEQUENCE_KEYS if key in inputs}
        if not model.training:
            outputs = model(**image_inputs, **self._model_kwargs)
            loss = torch.nn.functional.cross_entropy(outputs.logits.float(), inputs["labels"])
            return (loss, outputs) if return_outputs else loss
        missing = [name for name in MIXING_KEYS if name not in inputs]
        if missing and self.args.mixing_method != "none":
            raise ValueError(
                f"The training batches have no {', '.join(missing)} (keys: {sorted(inputs)}), so "
                f"mixing_method={self.args.mixing_method!r} cannot be applied: the data collator "
                f"({type(self.data_collator).__name__}) does not mix. Use TLAlignCollator (the default when "
                "data_collator is not given), or set mixing_method='none' for unmixed training."
            )
        if missing:  # mixing_method="none" with a collator of the user's: each image is its own partner
            batch_size = inputs["labels"].shape[0]
            inputs = {**inputs, "mix_index": torch.arange(batch_size, device=inputs["labels"].device),
                      "mix_lam": torch.ones(batch_size, device=inputs["labels"].device)}  # fmt: skip
        aligned = self.args.tl_align and not missing
        mixing = {name: inputs[name] for name in MIXING_KEYS} if aligned else {}
        outputs = model(**image_inputs, **mixing, **self._model_kwargs)
        scale_over_processes = num_items_in_batch is not None and self.args.average_tokens_across_devices
        loss, alignment_sums = mixed_batch_loss(
            outputs,
            inputs,
            tl_align=aligned,
            label_smoothing=self.args.label_smoothing,
            num_items_in_batch=num_items_in_batch,
            num_processes=self.accelerator.num_processes if scale_over_processes else 1,
        )
        self._alignment_sums = alignment_sums if self._alignment_sums is None else self._alignment_sums + alignment_sums
        non_finite = ~torch.isfinite(loss.detach())  # kept on the device; read when logging
        self._non_finite_loss = non_finite if self._non_finite_loss is None else self._non_finite_loss | non_finite
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """`Trainer.prediction_step`, with the trainer's model arguments (`interpolate_pos_encoding`) also for
        batches without labels, which `Trainer` passes to the model as they are."""
        return super().prediction_step(model, {**inputs, **self._model_kwargs}, prediction_loss_only, ignore_keys)

    # ----------------------------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the alignment metrics since the last training log, averaged over all processes.

        Every process calls `log` at the same steps, so the sums are reduced across processes here (the one sync).
        """
        if ("loss" in logs or "train_loss" in logs) and self._alignment_sums is not None:  # train_loss: the last log
            logs.update(alignment_metrics(self.accelerator.reduce(self._alignment_sums, reduction="sum")))
            self._alignment_sums = None
            if bool(self.accelerator.reduce(self._non_finite_loss.float(), reduction="sum") > 0):
                raise RuntimeError(
                    f"A training loss was NaN or infinite after step {self._last_logged_step} and by step "
                    f"{self.state.global_step} (the logged loss hides it: Trainer's logging_nan_inf_filter). Check the "
                    "images (NaN or infinite pixels), the learning rate and fp16 overflow; checkpoints saved since "
                    f"step {self._last_logged_step} may hold non-finite weights."
                )
            self._non_finite_loss, self._last_logged_step = None, self.state.global_step
        super().log(logs, start_time)

    # ----------------------------------------------------------------------------------------------- model card
    def create_model_card(self, **kwargs) -> None:
        """Write the TL-Align model card (README.md) to `output_dir`: Trainer's card plus the mixing settings.

        Takes the arguments of `Trainer.create_model_card` (`finetuned_from`, `tasks`, `dataset`, `tags`, ...). The
        card describes what the weights were trained with: this trainer's training, or, when it has not trained
        (an evaluation-only run), the record saved with the weights it loaded (their folder's `trainer_state.json`,
        see `tl_align_hf.support.checkpoints.recorded_training`); with neither, it claims no training settings.
        """
        if not self.is_world_process_zero():
            return
        record = next(callback for callback in self.callback_handler.callbacks if isinstance(callback, TrainingRecord))
        trained = record.state()["args"] if record.settings is not None else None
        if trained is None:  # not trained here: what the loaded weights were trained with, if recorded
            weights_folder = getattr(self.accelerator.unwrap_model(self.model), "name_or_path", None)
            trained = recorded_training(weights_folder)
            if trained and trained.get("base_model") and kwargs.get("finetuned_from") in (None, weights_folder):
                kwargs["finetuned_from"] = trained["base_model"]  # not the folder of the trained weights themselves
        if trained is None:
            card = tl_align_model_card(self, **kwargs, training_recorded=False)
        else:
            settings = trained["settings"]
            card = tl_align_model_card(
                self,
                **kwargs,
                tl_align=settings["tl_align"],
                label_smoothing=settings["label_smoothing"],
                mixing=MixingSettings.from_config(settings).mixing_settings_dict(),
                hyperparameters=trained.get("hyperparameters") or {},
            )
        card.save(os.path.join(self.args.output_dir, "README.md"))
