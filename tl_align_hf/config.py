"""`TLAlignConfig`: the training arguments of TLAlignTrainer and of the example scripts."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

MIXING_METHODS = ("cutmix", "token_cutmix", "mixup", "token_mix", "none")
MIXING_MODES = ("batch", "pair", "elem")


@dataclass
class TLAlignConfig(TrainingArguments):
    r"""
    Configuration class for [`TLAlignTrainer`]: [`~transformers.TrainingArguments`] plus data mixing and TL-Align.

    Parameters:
        > Parameters that control the data mixing (names as in timm's `Mixup` where the meaning is the same)

        mixing_method (`str`, *optional*, defaults to `"token_cutmix"`):
            `"cutmix"` (pixel box, fractional patch shares), `"token_cutmix"` (box on the patch grid, the official
            TL-Align default), `"mixup"`, `"token_mix"` (random patch subset) or `"none"`.
        mixup_alpha (`float`, *optional*, defaults to `0.0`):
            Beta(alpha, alpha) parameter of Mixup; with a cut-style method and `cutmix_alpha > 0` too, each draw
            picks one of the two (see `switch_prob`).
        cutmix_alpha (`float`, *optional*, defaults to `1.0`):
            Beta(alpha, alpha) parameter of the CutMix box area.
        cutmix_minmax (`list[float]` or `None`, *optional*, defaults to `None`):
            Bounds of the CutMix box side as fractions of the image side; replaces `cutmix_alpha` when set.
        mix_prob (`float`, *optional*, defaults to `1.0`):
            Probability that a batch (or element, in `"elem"` mode) is mixed (timm's `prob`).
        switch_prob (`float`, *optional*, defaults to `0.5`):
            Probability of the cut-style method rather than Mixup when both alphas are positive (timm's meaning).
        mix_mode (`str`, *optional*, defaults to `"batch"`):
            `"batch"`, `"pair"` or `"elem"`: how many mixing draws a batch gets (timm's `mode`).
        correct_lam (`bool`, *optional*, defaults to `True`):
            Recompute the area share after clipping the CutMix box at the image border.

        > Parameters that control TL-Align and the loss

        tl_align (`bool`, *optional*, defaults to `True`):
            Train against the token-label aligned target. `False` gives plain mixing with area targets (baseline).
        label_smoothing (`float`, *optional*, defaults to `0.1`):
            Smoothing of each one-hot label before mixing. Use this instead of `label_smoothing_factor`.
        tl_align_attention_path (`str`, *optional*, defaults to `"auto"`):
            How the shares are computed from attention: `"auto"`, `"eager"`, `"value_channel"` or `"explicit"`.

        > Parameters whose default differs from [`~transformers.TrainingArguments`]

        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            Datasets prepared with `with_transform` need their raw image column.
    """

    mixing_method: str = field(
        default="token_cutmix",
        metadata={"help": "Mixing method.", "choices": list(MIXING_METHODS)},
    )
    mixup_alpha: float = field(default=0.0, metadata={"help": "Beta(alpha, alpha) parameter of Mixup; 0 disables it."})
    cutmix_alpha: float = field(default=1.0, metadata={"help": "Beta(alpha, alpha) parameter of CutMix; 0 disables it."})
    cutmix_minmax: list[float] | None = field(
        default=None,
        metadata={"help": "Min and max CutMix box side, as fractions of the image side; replaces cutmix_alpha."},
    )
    mix_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch or element (timm's prob)."})
    switch_prob: float = field(
        default=0.5,
        metadata={"help": "Probability of the cut-style method rather than Mixup when both alphas are positive."},
    )
    mix_mode: str = field(
        default="batch",
        metadata={"help": "One mixing draw per batch, per pair or per element (timm's mode).", "choices": list(MIXING_MODES)},
    )
    correct_lam: bool = field(
        default=True, metadata={"help": "Recompute the area share after clipping the CutMix box at the border."}
    )
    tl_align: bool = field(
        default=True,
        metadata={"help": "Train against the token-label aligned target; False gives plain mixing (area targets)."},
    )
    label_smoothing: float = field(
        default=0.1, metadata={"help": "Label smoothing of each one-hot before mixing (use instead of label_smoothing_factor)."}
    )
    tl_align_attention_path: str = field(
        default="auto",
        metadata={
            "help": "How token shares are computed from attention: auto, eager, value_channel or explicit.",
            "choices": ["auto", "eager", "value_channel", "explicit"],
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Whether to remove dataset columns the model does not use (False: with_transform needs them)."},
    )

    def __post_init__(self):
        self._check_mixing_fields()
        super().__post_init__()

    def _check_mixing_fields(self) -> None:
        if self.mixing_method not in MIXING_METHODS:
            raise ValueError(f"`mixing_method` must be one of {MIXING_METHODS}, got {self.mixing_method!r}.")
        if self.mix_mode not in MIXING_MODES:
            raise ValueError(f"`mix_mode` must be one of {MIXING_MODES}, got {self.mix_mode!r}.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"`label_smoothing` must be in [0, 1), got {self.label_smoothing}.")
        if self.label_smoothing_factor:
            raise ValueError(
                "TLAlignTrainer smooths labels before mixing: set `label_smoothing` instead of `label_smoothing_factor` "
                f"(got label_smoothing_factor={self.label_smoothing_factor})."
            )

    def collator_kwargs(self) -> dict:
        """The keyword arguments of `TLAlignCollator` that these settings stand for."""
        return dict(
            method=self.mixing_method,
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            cutmix_minmax=self.cutmix_minmax,
            prob=self.mix_prob,
            switch_prob=self.switch_prob,
            mode=self.mix_mode,
            correct_lam=self.correct_lam,
            seed=self.seed,
        )
