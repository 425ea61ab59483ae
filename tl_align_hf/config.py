"""`TLAlignConfig`: the training arguments of TLAlignTrainer and of the example scripts, and `as_tl_align_config`,
which turns the plain `TrainingArguments` a user already has into one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.utils import logging

from .attention import ATTENTION_PATHS
from .mixer import MixingSettings

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
        if isinstance(self.label_smoothing, bool) or not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"`label_smoothing` (--label_smoothing) must be in [0, 1), got {self.label_smoothing!r}.")
        super().__post_init__()

    def _apply_label_smoothing_factor(self) -> None:
        """transformers' `label_smoothing_factor` becomes `label_smoothing` (smoothing before mixing) and is reset to 0.

        transformers' smoother would smooth the mixed target instead; TL-Align smooths each one-hot label before
        mixing. `label_smoothing` at its default counts as unset; a different explicit value is a conflict.
        """
        factor = self.label_smoothing_factor
        if isinstance(factor, bool) or not 0.0 < factor < 1.0:
            raise ValueError(f"`label_smoothing_factor` (applied as `label_smoothing`) must be in [0, 1), got {factor!r}.")
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
