"""Aligned subclasses of transformers' image classifiers, and :func:`to_tl_align` for loaded models.

The subclasses add no weights and rename no modules. Called without mixing arguments they are their parent class.
Called with the batch contract (``mix_index``, ``token_weights``, ``mix_lam``, as :class:`TLAlignCollator` produces
it) they create a :class:`TokenLabelAligner`, pass it down to every attention call through the model's ``**kwargs``,
and return ``aligned_lam``: the share of each sample's own label in its aligned target. With ``labels`` they also
return the soft-target loss against that target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    PreTrainedModel,
    ViTForImageClassification,
)
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.deit.modeling_deit import DeiTForImageClassificationWithTeacherOutput

from .aligner import MIXING_ARGUMENTS, TokenLabelAligner, validate_mixing_inputs
from .attention import ATTENTION_PATHS, base_attention_implementation, routed_attention_implementation
from .losses import mixing_loss


@dataclass
class TLAlignImageClassifierOutput(ImageClassifierOutput):
    """:class:`ImageClassifierOutput` plus ``aligned_lam`` `(B,)`, present when mixing arguments were given."""

    aligned_lam: torch.FloatTensor | None = None


@dataclass
class TLAlignDeiTWithTeacherOutput(DeiTForImageClassificationWithTeacherOutput):
    """DeiT's two-head output plus the aligned ``loss`` (mean over both heads) and ``aligned_lam`` `(B,)`."""

    loss: torch.FloatTensor | None = None
    aligned_lam: torch.FloatTensor | None = None


def _patch_grid_size(config, pixel_values: torch.Tensor) -> int:
    patch_size = config.patch_size
    patch_h, patch_w = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    return (pixel_values.shape[-2] // patch_h) * (pixel_values.shape[-1] // patch_w)


class TLAlignMixin:
    """Token-label alignment for a transformers image classifier whose attention uses the attention interface.

    Subclasses set ``tl_align_parent`` (the transformers class they extend) and ``tl_align_num_prefix_tokens``
    (tokens before the patch tokens, all starting at ``mix_lam``), and may override :meth:`tl_align_readout`.
    ``tl_align_attention_path`` picks how shares are computed (``"auto"``; see :mod:`tl_align_hf.attention`).
    """

    tl_align_parent: type[PreTrainedModel]
    tl_align_num_prefix_tokens: int = 1
    tl_align_attention_path: str = "auto"

    def __init__(self, config, *args, **kwargs):
        # A config taken from another aligned model carries the routed name; transformers must see the backend.
        config._attn_implementation_internal = base_attention_implementation(config._attn_implementation)
        super().__init__(config, *args, **kwargs)
        self.tl_align_route_attention()

    def tl_align_route_attention(self) -> None:
        """Route every attention call of the model through the aligned wrapper of its current backend."""
        for module in self.modules():
            if isinstance(module, PreTrainedModel):
                backend = base_attention_implementation(module.config._attn_implementation) or "eager"
                module.config._attn_implementation_internal = routed_attention_implementation(backend)

    @property
    def base_attn_implementation(self) -> str:
        """The attention backend in use (``"sdpa"``, ``"eager"``...), without the routing prefix."""
        return base_attention_implementation(self.config._attn_implementation)

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        """Switch the attention backend, as in transformers; the aligned routing is kept."""
        if isinstance(attn_implementation, str):
            attn_implementation = base_attention_implementation(attn_implementation)
        for module in self.modules():
            if isinstance(module, PreTrainedModel):
                module.config._attn_implementation_internal = base_attention_implementation(
                    module.config._attn_implementation
                )
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        self.tl_align_route_attention()

    def save_pretrained(self, *args, **kwargs):
        """Save a plain transformers checkpoint: ``config.architectures`` names the parent class."""
        aligned_class = type(self)
        self.__class__ = self.tl_align_parent
        try:
            return self.save_pretrained(*args, **kwargs)
        finally:
            self.__class__ = aligned_class

    def tl_align_readout(self, shares: torch.Tensor) -> torch.Tensor:
        """`(B, N)` final token shares -> `(B,)` aligned share; CLS-pooled models read the CLS token."""
        return shares[:, 0]

    def _start_aligner(self, pixel_values, mix_index, token_weights, mix_lam) -> TokenLabelAligner:
        missing = [name for name, value in zip(MIXING_ARGUMENTS, (mix_index, token_weights, mix_lam)) if value is None]
        if missing:
            raise ValueError(
                f"TL-Align needs all of {MIXING_ARGUMENTS} or none of them; missing {missing}. "
                "Pass the whole batch from TLAlignCollator, or none of the three for a plain forward pass."
            )
        if pixel_values is None:
            raise ValueError("`pixel_values` is required.")
        if self.tl_align_attention_path not in ATTENTION_PATHS:
            raise ValueError(
                f"`tl_align_attention_path` must be one of {ATTENTION_PATHS}, got {self.tl_align_attention_path!r}."
            )
        num_patches = _patch_grid_size(self.config, pixel_values)
        validate_mixing_inputs(mix_index, token_weights, mix_lam, pixel_values.shape[0], num_patches)
        return TokenLabelAligner(token_weights, mix_lam, self.tl_align_num_prefix_tokens, self.tl_align_attention_path)

    def _aligned_forward(self, pixel_values, labels, mix_index, token_weights, mix_lam, kwargs):
        """Run the parent's forward with an aligner; return (parent outputs, `(B,)` aligned_lam)."""
        if labels is not None and (labels.dtype.is_floating_point or labels.dim() != 1):
            raise TypeError(
                f"`labels` must be a (batch_size,) integer tensor of each sample's own class, got dtype {labels.dtype} "
                f"and shape {tuple(labels.shape)}. Mixed soft targets are built from `mix_index` and the aligned shares."
            )
        aligner = self._start_aligner(pixel_values, mix_index, token_weights, mix_lam)
        kwargs["return_dict"] = True
        outputs = super().forward(pixel_values, token_label_aligner=aligner, **kwargs)
        aligner.close(expected_updates=self.config.num_hidden_layers)
        return outputs, self.tl_align_readout(aligner.shares)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mix_index: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
        mix_lam: torch.Tensor | None = None,
        target_smoothing: float = 0.0,
        **kwargs,
    ):
        """The parent's forward; with ``mix_index``, ``token_weights`` and ``mix_lam``, also the aligned target.

        Args:
            pixel_values: `(B, C, H, W)` images (mixed when mixing arguments are given).
            labels: `(B,)` integer class of each sample itself.
            mix_index: `(B,)` long, partner of each sample.
            token_weights: `(B, num_patches)` share of each patch from the sample itself, patch-grid row-major.
            mix_lam: `(B,)` share of the whole image from the sample itself.
            target_smoothing: label smoothing of each one-hot before mixing, for the aligned loss. (Not named
                `label_smoothing`: transformers takes every forward argument with "label" in its name for a label.)
        Returns:
            The parent's output with ``aligned_lam`` `(B,)` added; ``loss`` is the soft-target cross-entropy
            against the aligned target when ``labels`` are given.
        """
        if mix_index is None and token_weights is None and mix_lam is None:
            return self._plain_forward(pixel_values, labels, **kwargs)
        return_dict = kwargs.pop("return_dict", None)
        outputs, aligned_lam = self._aligned_forward(pixel_values, labels, mix_index, token_weights, mix_lam, kwargs)
        loss = None
        if labels is not None:
            loss = self.tl_align_loss(outputs, labels, mix_index, aligned_lam, target_smoothing)
        result = self._aligned_output(outputs, loss, aligned_lam)
        return result.to_tuple() if return_dict is False else result

    def _plain_forward(self, pixel_values, labels, **kwargs):
        return super().forward(pixel_values, labels=labels, **kwargs)

    def _aligned_output(self, outputs, loss, aligned_lam) -> TLAlignImageClassifierOutput:
        return TLAlignImageClassifierOutput(
            loss=loss,
            logits=outputs.logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aligned_lam=aligned_lam,
        )

    def tl_align_loss(
        self,
        outputs,
        labels: torch.Tensor,
        mix_index: torch.Tensor,
        own_share: torch.Tensor,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Soft-target cross-entropy of the classification head(s) in ``outputs`` against the mixed target.

        ``own_share`` is ``aligned_lam`` for TL-Align or the area ``mix_lam`` for plain mixing.
        """
        return mixing_loss(outputs.logits, labels, mix_index, own_share, label_smoothing, reduction)


class TLAlignViTForImageClassification(TLAlignMixin, ViTForImageClassification):
    """:class:`~transformers.ViTForImageClassification` with token-label alignment (CLS read-out)."""

    tl_align_parent = ViTForImageClassification
    tl_align_num_prefix_tokens = 1


class TLAlignDeiTForImageClassification(TLAlignMixin, DeiTForImageClassification):
    """:class:`~transformers.DeiTForImageClassification` with token-label alignment.

    CLS and distillation tokens both start at ``mix_lam``; the target is read from the CLS token.
    """

    tl_align_parent = DeiTForImageClassification
    tl_align_num_prefix_tokens = 2


class TLAlignDeiTForImageClassificationWithTeacher(TLAlignMixin, DeiTForImageClassificationWithTeacher):
    """:class:`~transformers.DeiTForImageClassificationWithTeacher` with token-label alignment.

    Both heads are trained against the same aligned target, read from the CLS token, as the official code does;
    the loss is the mean of the two heads' soft-target cross-entropies. (Distillation from a teacher is separate.)
    """

    tl_align_parent = DeiTForImageClassificationWithTeacher
    tl_align_num_prefix_tokens = 2

    def _plain_forward(self, pixel_values, labels, **kwargs):
        if labels is not None:
            raise ValueError(
                "DeiTForImageClassificationWithTeacher computes no loss from `labels` alone; pass the mixing "
                "arguments too, or use TLAlignDeiTForImageClassification for plain training."
            )
        return super(TLAlignMixin, self).forward(pixel_values, **kwargs)

    def _aligned_output(self, outputs, loss, aligned_lam) -> TLAlignDeiTWithTeacherOutput:
        return TLAlignDeiTWithTeacherOutput(
            logits=outputs.logits,
            cls_logits=outputs.cls_logits,
            distillation_logits=outputs.distillation_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            loss=loss,
            aligned_lam=aligned_lam,
        )

    def tl_align_loss(self, outputs, labels, mix_index, own_share, label_smoothing=0.0, reduction="mean"):
        """Mean of the two heads' soft-target cross-entropies against the same target."""
        head_losses = [
            mixing_loss(logits, labels, mix_index, own_share, label_smoothing, reduction)
            for logits in (outputs.cls_logits, outputs.distillation_logits)
        ]
        return 0.5 * (head_losses[0] + head_losses[1])


ALIGNED_CLASSES: dict[type[PreTrainedModel], type[TLAlignMixin]] = {
    ViTForImageClassification: TLAlignViTForImageClassification,
    DeiTForImageClassification: TLAlignDeiTForImageClassification,
    DeiTForImageClassificationWithTeacher: TLAlignDeiTForImageClassificationWithTeacher,
}


def to_tl_align(model: PreTrainedModel) -> PreTrainedModel:
    """Turn a loaded model of a supported class into its aligned subclass, in place; return it.

    Works on models from ``AutoModelForImageClassification.from_pretrained(...)``. No weights change.

    Raises:
        ValueError: the model's class is not supported (nothing is changed).
    """
    if isinstance(model, TLAlignMixin):
        return model
    aligned_class = ALIGNED_CLASSES.get(type(model))
    if aligned_class is None:
        supported = ", ".join(cls.__name__ for cls in ALIGNED_CLASSES)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"TL-Align does not support {type(model).__name__} (model_type={model_type!r}). Supported classes: "
            f"{supported}."
        )
    model.__class__ = aligned_class
    model.tl_align_route_attention()
    return model
