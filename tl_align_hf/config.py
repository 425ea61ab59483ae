"""`TLAlignConfig`: the training arguments of TLAlignTrainer and of the example scripts."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .attention import ATTENTION_PATHS
from .mixer import MixingSettings


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
            Smoothing of each one-hot label before mixing. Use this instead of `label_smoothing_factor`.
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
        default=0.1, metadata={"help": "Label smoothing of each one-hot before mixing (use instead of label_smoothing_factor)."}
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
        if isinstance(self.label_smoothing, bool) or not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"`label_smoothing` (--label_smoothing) must be in [0, 1), got {self.label_smoothing!r}.")
        if self.label_smoothing_factor:
            raise ValueError(
                "TLAlignTrainer smooths labels before mixing: set `label_smoothing` (--label_smoothing) instead of "
                f"`label_smoothing_factor` (got label_smoothing_factor={self.label_smoothing_factor})."
            )
        super().__post_init__()
