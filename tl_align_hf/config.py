"""`TLAlignConfig`: the training arguments of TLAlignTrainer and of the example scripts, and `as_tl_align_config`,
which turns the plain `TrainingArguments` a user already has into one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.utils import logging

from .attention import ATTENTION_PATHS
from .settings import MixingSettings, check_label_smoothing

logger = logging.get_logger(__name__)

DEFAULT_LABEL_SMOOTHING = 0.1  # of `TLAlignConfig.label_smoothing` (DeiT's recipe)


@dataclass
class TLAlignConfig(TrainingArguments, MixingSettings):
    r"""
    Configuration class for [`TLAlignTrainer`]: [`~transformers.TrainingArguments`] plus data mixing and TL-Align.

    Parameters:
        > Parameters that control the data mixing: the fields of [`MixingSettings`] (`mixing_method`,
        `mixup_alpha`, `cutmix_alpha`, `cutmix_minmax`, `mix_prob`, `switch_prob`, `mix_mode`, `correct_lam`),
        which the trainer's mixer consumes as they are.

        > Parameters that control TL-Align and the loss

        tl_align (`bool`, *optional*, defaults to `True`):
            Train against the token-label aligned target. `False` gives plain mixing with area targets (baseline).
        label_smoothing (`float`, *optional*, defaults to `0.1`):
            Smoothing of each one-hot label before mixing. transformers' `label_smoothing_factor`, when set, is
            applied as `label_smoothing` (with a warning) and reset to `0`, so that transformers' own smoother never
            runs on mixed targets; setting both to different values is an error (`label_smoothing` at its default
            `0.1` counts as unset).
        tl_align_attention_path (`str`, *optional*, defaults to `"auto"`):
            How the shares are computed from attention: `"auto"`, `"eager"`, `"value_channel"` or `"explicit"`.
        interpolate_pos_encoding (`bool`, *optional*, defaults to `False`):
            Train and evaluate at an image size other than the config's `image_size`: passed to the model's forward,
            and the collator takes any size that is a whole number of patches.

        > Parameters of the DeiT / timm training recipe (see `docs/recipes.md`), each named after its timm meaning

        repeated_augmentation (`int`, *optional*, defaults to `1`):
            Copies of each image per batch, each augmented differently (DeiT's `RASampler`: 3); 1 disables.
        filter_bias_and_bn (`bool`, *optional*, defaults to `False`):
            No weight decay on 1-d parameters, position embeddings and prefix tokens (timm's optimizer factory);
            `False` keeps transformers' rule (no decay on biases and LayerNorm weights).
        lr_base_size (`int`, *optional*):
            `learning_rate` is per this many images and is scaled by the global batch (DeiT: 512).
        warmup_epochs, cooldown_epochs (`float`, *optional*):
            Warm-up and final constant epochs of timm's cosine schedule (with `lr_scheduler_type="cosine"`).
        warmup_lr, min_lr (`float`, *optional*):
            Start of the warm-up and floor of timm's cosine schedule (with `lr_scheduler_type="cosine"`).
        layer_decay (`float`, *optional*):
            Layer-wise learning-rate decay (BEiT): block i of L trains at `layer_decay ** (L - i)` times the rate.
        ema_decay (`float`, *optional*):
            Keep an exponential moving average of the weights, evaluated beside them and saved in `ema/`.

        > Parameters whose default differs from [`~transformers.TrainingArguments`]

        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            Datasets prepared with `with_transform` need their raw image column.
    """

    tl_align: bool = field(
        default=True,
        metadata={"help": "Train against the token-label aligned target; False gives plain mixing (area targets)."},
    )
    label_smoothing: float = field(
        default=DEFAULT_LABEL_SMOOTHING,
        metadata={
            "help": "Label smoothing of each one-hot label before mixing; label_smoothing_factor, when set, is applied "
            "as this (a different explicit value of both is an error)."
        },
    )
    tl_align_attention_path: str = field(
        default="auto",
        metadata={"help": "How token shares are computed from attention.", "choices": list(ATTENTION_PATHS)},
    )
    interpolate_pos_encoding: bool = field(
        default=False,
        metadata={
            "help": "Train and evaluate at an image size other than the model config's image_size (e.g. a 224 "
            "checkpoint at 384): the trainer passes interpolate_pos_encoding=True to the model, and the collator "
            "takes any size that is a whole number of patches. DINOv2 and timm ViTs built with dynamic_img_size "
            "take any size without it."
        },
    )
    # ------------------------------------------------------------------ the DeiT / timm recipe (docs/recipes.md)
    repeated_augmentation: int = field(
        default=1,
        metadata={"help": "Copies of each image in its batch, each augmented differently (repeated augmentation, "
                  "DeiT's RASampler: 3); an epoch keeps its number of steps. 1 disables."},
    )
    filter_bias_and_bn: bool = field(
        default=False,
        metadata={"help": "No weight decay on 1-d parameters (biases, norms), position embeddings and prefix tokens, "
                  "as timm's optimizer factory; False: transformers' rule (biases and LayerNorm weights)."},
    )
    lr_base_size: int | None = field(
        default=None,
        metadata={"help": "learning_rate is per this many images: it is scaled by the global batch (per-device batch "
                  "x processes x gradient accumulation) / lr_base_size (DeiT: 512)."},
    )
    warmup_epochs: float | None = field(
        default=None,
        metadata={"help": "Warm-up epochs of timm's cosine schedule (lr_scheduler_type cosine), instead of warmup_steps."},
    )
    warmup_lr: float | None = field(
        default=None,
        metadata={"help": "Learning rate the warm-up starts from (timm's warmup_lr; lr_scheduler_type cosine)."},
    )
    min_lr: float | None = field(
        default=None,
        metadata={"help": "Floor of timm's cosine schedule, reached at the end of the decay (lr_scheduler_type cosine)."},
    )
    cooldown_epochs: float = field(
        default=0.0,
        metadata={"help": "Last epochs trained at min_lr after the cosine decay (timm's cooldown; counted in "
                  "num_train_epochs)."},
    )
    layer_decay: float | None = field(
        default=None,
        metadata={"help": "Layer-wise lr decay (BEiT): block i of L trains at layer_decay ** (L - i) times the rate, "
                  "the embeddings at layer_decay ** (L + 1), the head at 1. For models with numbered blocks."},
    )
    ema_decay: float | None = field(
        default=None,
        metadata={"help": "Keep an exponential moving average of the weights (e.g. 0.9999), updated after every "
                  "optimizer step, evaluated beside them (eval_ema_*) and saved in <checkpoint>/ema."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Whether to remove dataset columns the model does not use (False: with_transform needs them)."},
    )

    def __post_init__(self):
        self.check_mixing_settings()
        if self.tl_align_attention_path not in ATTENTION_PATHS:
            raise ValueError(
                f"`tl_align_attention_path` (--tl_align_attention_path) must be one of {', '.join(ATTENTION_PATHS)}; "
                f"got {self.tl_align_attention_path!r}."
            )
        if self.label_smoothing_factor:
            self._apply_label_smoothing_factor()
        check_label_smoothing(self.label_smoothing, "`label_smoothing` (--label_smoothing)")
        self.check_recipe_settings()
        super().__post_init__()

    def _apply_label_smoothing_factor(self) -> None:
        """transformers' `label_smoothing_factor` becomes `label_smoothing` (smoothing before mixing) and is reset to 0.

        transformers' smoother would smooth the mixed target instead; TL-Align smooths each one-hot label before
        mixing. `label_smoothing` at its default counts as unset; a different explicit value is a conflict.
        """
        factor = self.label_smoothing_factor
        check_label_smoothing(factor, "`label_smoothing_factor` (applied as `label_smoothing`)")
        if self.label_smoothing not in (DEFAULT_LABEL_SMOOTHING, factor):
            raise ValueError(
                f"label_smoothing={self.label_smoothing} and label_smoothing_factor={factor} disagree: TLAlignTrainer "
                "smooths each label before mixing with `label_smoothing` (--label_smoothing); set only that one."
            )
        logger.warning_once(
            f"label_smoothing_factor={factor} is applied as label_smoothing={factor}: TLAlignTrainer smooths each "
            "one-hot label before mixing, and transformers' own label smoother (which would smooth the mixed target) "
            "is turned off (label_smoothing_factor=0). With TLAlignConfig, set --label_smoothing instead to silence this."
        )
        self.label_smoothing, self.label_smoothing_factor = factor, 0.0


    def check_recipe_settings(self) -> None:
        """ValueError naming the flag for a DeiT / timm recipe setting out of range or without its schedule."""
        if isinstance(self.repeated_augmentation, bool) or not isinstance(self.repeated_augmentation, int) or (
            self.repeated_augmentation < 1
        ):
            raise ValueError(f"`repeated_augmentation` (--repeated_augmentation) must be an integer >= 1 (1 disables it), "
                             f"got {self.repeated_augmentation!r}.")  # fmt: skip
        if self.lr_base_size is not None and self.lr_base_size < 1:
            raise ValueError(f"`lr_base_size` (--lr_base_size) must be a positive number of images, got {self.lr_base_size}.")
        for name in ("warmup_epochs", "warmup_lr", "min_lr", "cooldown_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"`{name}` (--{name}) must be >= 0, got {getattr(self, name)}.")
        timm_schedule = [name for name in ("warmup_epochs", "warmup_lr", "min_lr") if getattr(self, name) is not None]
        timm_schedule += ["cooldown_epochs"] if self.cooldown_epochs else []
        if timm_schedule and str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)) != "cosine":
            raise ValueError(
                f"{', '.join(timm_schedule)} set timm's cosine schedule: set lr_scheduler_type='cosine' "
                f"(--lr_scheduler_type cosine), got {self.lr_scheduler_type!r}."
            )
        if self.warmup_epochs is not None and self.warmup_steps:
            raise ValueError(f"Set either `warmup_epochs` (--warmup_epochs) or `warmup_steps`, not both (warmup_steps="
                             f"{self.warmup_steps}).")  # fmt: skip
        if (self.warmup_epochs is not None or self.cooldown_epochs) and self.max_steps > 0:
            raise ValueError(f"`warmup_epochs` and `cooldown_epochs` count epochs: set num_train_epochs and leave "
                             f"`max_steps` unset (got max_steps={self.max_steps}).")  # fmt: skip
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"`layer_decay` (--layer_decay) must be in (0, 1] (e.g. 0.65 or 0.75), got {self.layer_decay}.")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` (--ema_decay) must be in [0, 1) (e.g. 0.9999), got {self.ema_decay}.")

def as_tl_align_config(args: TrainingArguments | None) -> TLAlignConfig:
    """`args` itself if it is a [`TLAlignConfig`]; a plain `TrainingArguments` converted to one, field by field.

    Every field of `args` that `TLAlignConfig` has is copied as it is on the object (hub tokens, callbacks' and
    integrations' settings, `parallelism_config`, `remove_unused_columns`...): not through `to_dict()`, which masks
    tokens and serialises objects. The mixing settings, `tl_align`, `label_smoothing` and `tl_align_attention_path`
    take `TLAlignConfig`'s defaults (a `label_smoothing_factor` is applied as `label_smoothing`). `None` gives
    `TLAlignConfig(output_dir="tmp_trainer")`, as `Trainer` does. Used by `TLAlignTrainer` and
    `TLAlignCollator.from_model`.
    """
    if args is None:
        return TLAlignConfig(output_dir="tmp_trainer")
    if isinstance(args, TLAlignConfig):
        return args
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"`args` must be a TLAlignConfig or a TrainingArguments, got {type(args).__name__}.")
    own_fields = {item.name for item in dataclasses.fields(TLAlignConfig) if item.init}
    values = {item.name: getattr(args, item.name) for item in dataclasses.fields(args) if item.name in own_fields}
    return TLAlignConfig(**values)
