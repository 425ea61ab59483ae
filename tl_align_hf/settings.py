"""The mixing settings of a run, declared, checked and documented in one place.

:class:`MixingSettings` declares the data mixing settings (timm's `Mixup` parameters: `prob`, `switch_prob`, `mode`,
`cutmix_minmax`, `correct_lam`) and checks them when it is built; `TLAlignConfig` inherits it, and the mixer takes
its own copy (:meth:`MixingSettings.from_config`). :func:`check_label_smoothing` is the one range check of a label
smoothing, wherever a user gives one (the config, the loss functions, the model's forward, the card).
:func:`training_settings` is what a run is trained with, as one flat dict (the resume record and the model card).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

MIXING_METHODS = ("cutmix", "token_cutmix", "mixup", "token_mix", "none")
CUT_METHODS = ("cutmix", "token_cutmix", "token_mix")
MIXING_MODES = ("batch", "pair", "elem")


def check_label_smoothing(value: Any, subject: str = "`label_smoothing`", note: str = "") -> None:
    """Raise a ValueError `"{subject} must be in [0, 1){note}, got {value!r}."` unless `value` is a number in [0, 1).

    The one check of a label smoothing: `TLAlignConfig` (subject "`label_smoothing` (--label_smoothing)"), the loss
    functions, the aligned model's `target_smoothing` and the model card call it with the raw value they were given.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"{subject} must be in [0, 1){note}, got {value!r}.")


def _check_number(value: Any, name: str, low: float, high: float = math.inf) -> None:
    """Raise a ValueError naming `name` and its flag unless `value` is a finite number in `[low, high]`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high or math.isinf(value):
        bounds = f"in [{low}, {high}]" if high < math.inf else f">= {low} and finite"
        raise ValueError(f"`{name}` (--{name}) must be a number {bounds}, got {value!r}.")


@dataclass
class MixingSettings:
    r"""
    The data mixing settings: which method, how often, how many draws per batch.

    Parameters:
        mixing_method (`str`, *optional*, defaults to `"token_cutmix"`):
            `"cutmix"` (pixel box, fractional patch shares at the box edges), `"token_cutmix"` (box on the patch
            grid, the official TL-Align default), `"mixup"`, `"token_mix"` (a random subset of patches) or `"none"`.
        mixup_alpha (`float`, *optional*, defaults to `0.0`):
            Beta(alpha, alpha) parameter of Mixup. Required > 0 for `"mixup"`; with a cut-style method,
            `mixup_alpha > 0` switches between that method and Mixup as timm's `Mixup` does (see `switch_prob`).
        cutmix_alpha (`float`, *optional*, defaults to `1.0`):
            Beta(alpha, alpha) parameter of the cut-style methods' area share.
        cutmix_minmax (`list[float]` or `None`, *optional*, defaults to `None`):
            `[min, max]` box side as fractions of the image (or patch grid) side, for `"cutmix"` and
            `"token_cutmix"`; replaces `cutmix_alpha` when set, as in timm.
        mix_prob (`float`, *optional*, defaults to `1.0`):
            Probability that a batch (`"batch"` mode) or a sample (`"pair"`, `"elem"`) is mixed (timm's `prob`).
            Unmixed samples keep their pixels, `token_weights = 1` and `mix_lam = 1`; `0` turns mixing off.
        switch_prob (`float`, *optional*, defaults to `0.5`):
            Probability of the cut-style method rather than Mixup when `mixup_alpha > 0` is set with one.
        mix_mode (`str`, *optional*, defaults to `"batch"`):
            `"batch"`: one draw (lambda and box or token subset) for the whole batch; `"pair"`: one per mutual pair
            `i <-> j`; `"elem"`: one per sample (timm's `mode`).
        correct_lam (`bool`, *optional*, defaults to `True`):
            `mix_lam` of `"cutmix"` is the true share after the box is clipped at the border. `False` keeps the
            drawn lambda as timm does (it then differs from `token_weights.mean(1)`).
    """

    mixing_method: str = field(
        default="token_cutmix",
        metadata={"help": "Mixing method: cutmix, token_cutmix, mixup, token_mix or none.", "choices": list(MIXING_METHODS)},
    )
    mixup_alpha: float = field(default=0.0, metadata={"help": "Beta(alpha, alpha) parameter of Mixup; 0 disables it."})
    cutmix_alpha: float = field(
        default=1.0, metadata={"help": "Beta(alpha, alpha) parameter of the cut-style methods; 0 disables them."}
    )
    cutmix_minmax: list[float] | None = field(
        default=None,
        metadata={"help": "Min and max CutMix box side, as fractions of the image side; replaces cutmix_alpha."},
    )
    mix_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch or sample (timm's prob)."})
    switch_prob: float = field(
        default=0.5,
        metadata={"help": "Probability of the cut-style method rather than Mixup when both alphas are positive."},
    )
    mix_mode: str = field(
        default="batch",
        metadata={"help": "One mixing draw per batch, pair or element (timm's mode).", "choices": list(MIXING_MODES)},
    )
    correct_lam: bool = field(
        default=True, metadata={"help": "Recompute the area share after clipping the CutMix box at the border."}
    )

    def __post_init__(self) -> None:
        self.check_mixing_settings()

    def check_mixing_settings(self) -> None:
        """Raise a ValueError naming the setting (and its command-line flag) unless the settings are usable."""
        for name, value, choices in (
            ("mixing_method", self.mixing_method, MIXING_METHODS),
            ("mix_mode", self.mix_mode, MIXING_MODES),
        ):
            if value not in choices:
                raise ValueError(f"`{name}` (--{name}) must be one of {', '.join(choices)}; got {value!r}.")
        _check_number(self.mix_prob, "mix_prob", 0.0, 1.0)
        _check_number(self.switch_prob, "switch_prob", 0.0, 1.0)
        _check_number(self.mixup_alpha, "mixup_alpha", 0.0)
        _check_number(self.cutmix_alpha, "cutmix_alpha", 0.0)
        if self.cutmix_minmax is not None:
            minmax = self.cutmix_minmax
            if not isinstance(minmax, tuple | list) or len(minmax) != 2 or not 0 < minmax[0] < minmax[1] <= 1:
                raise ValueError(
                    f"`cutmix_minmax` (--cutmix_minmax) must be [min, max] with 0 < min < max <= 1, got {minmax!r}."
                )
            if self.mixing_method not in ("cutmix", "token_cutmix"):
                raise ValueError(
                    f"`cutmix_minmax` is used by mixing_method 'cutmix' or 'token_cutmix' only, not "
                    f"{self.mixing_method!r}; remove it or change the method."
                )
            self.cutmix_minmax = [float(minmax[0]), float(minmax[1])]
        if self.mixing_method in CUT_METHODS and self.cutmix_alpha <= 0 and self.cutmix_minmax is None:
            raise ValueError(
                f"mixing_method={self.mixing_method!r} needs `cutmix_alpha` > 0 (e.g. --cutmix_alpha 1.0) or "
                "`cutmix_minmax`; for Mixup alone use --mixing_method mixup."
            )
        if self.mixing_method == "mixup" and self.mixup_alpha <= 0:
            raise ValueError("mixing_method='mixup' needs `mixup_alpha` > 0 (e.g. --mixup_alpha 0.8).")
        if self.switch_prob != 0.5 and not self.switches_to_mixup:
            logger.warning(
                "switch_prob=%s has no effect: it picks between a cut-style method and Mixup, which needs "
                "mixing_method cutmix, token_cutmix or token_mix together with mixup_alpha > 0.",
                self.switch_prob,
            )

    @property
    def switches_to_mixup(self) -> bool:
        """Whether draws pick between the cut-style method and Mixup (with `switch_prob`)."""
        return self.mixing_method in CUT_METHODS and self.mixup_alpha > 0

    @classmethod
    def from_config(cls, config: Any) -> MixingSettings:
        """The mixing settings of `config`: a `MixingSettings` (a `TLAlignConfig` included) or a mapping with its
        fields (e.g. the `settings` of a run's record, see :func:`training_settings`); the one way to take them out
        of a larger object. The copy is checked as it is built, so a config changed after it was made is caught."""
        get = config.get if isinstance(config, Mapping) else lambda name: getattr(config, name)
        return cls(**{item.name: get(item.name) for item in dataclasses.fields(cls)})

    def mixing_settings(self) -> MixingSettings:
        """These settings as a plain :class:`MixingSettings` (e.g. taken from a `TLAlignConfig`)."""
        return MixingSettings.from_config(self)

    def mixing_settings_dict(self) -> dict[str, Any]:
        """The mixing settings of a run as `{field name: value}` (the fields of :class:`MixingSettings` only), e.g.
        for a model card or a log line."""
        return dataclasses.asdict(self.mixing_settings())


def training_settings(mixing: MixingSettings, tl_align: bool, label_smoothing: float) -> dict[str, Any]:
    """What a model is trained with, as one flat dict: the mixing settings (a `MixingSettings`, e.g. a
    `TLAlignConfig`; its fields, see :meth:`MixingSettings.mixing_settings_dict`), `tl_align` and `label_smoothing`.

    The resume record of a run (`tl_align_hf.support.checkpoints.TrainingRecord`, `LoopRecord`) and its model card
    hold this; :meth:`MixingSettings.from_config` takes the mixing settings back out of it.
    """
    return {**mixing.mixing_settings_dict(), "tl_align": tl_align, "label_smoothing": label_smoothing}
