"""Aligned subclasses of transformers' image classifiers, and :func:`to_tl_align` for loaded models.

The subclasses add no weights and rename no modules. Called without mixing arguments they are their parent class.
Called with the batch contract (``mix_index``, ``token_weights``, ``mix_lam``, as :class:`TLAlignCollator` produces
it) they create a :class:`TokenLabelAligner`, pass it down to every attention call through the model's ``**kwargs``
(or, for attention modules that drop them, through :func:`~tl_align_hf.attention.pass_aligner_through`), and
return ``aligned_lam``: the share of each sample's own label in its aligned target. With ``labels`` they also return
the soft-target loss against that target.

Every family goes through the same mechanism (:mod:`tl_align_hf.attention` feeding a :class:`TokenLabelAligner`);
what differs between families is data on each subclass: the tokens in front of the patch tokens, the read-out that
mirrors the classifier's pooling, and, for Swin, how the tokens are re-arranged into windows and merged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import (
    BeitForImageClassification,
    CLIPForImageClassification,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    Dinov2ForImageClassification,
    Dinov2WithRegistersForImageClassification,
    IJepaForImageClassification,
    MetaClip2ForImageClassification,
    PreTrainedModel,
    SiglipForImageClassification,
    SwinForImageClassification,
    ViTForImageClassification,
    ViTMSNForImageClassification,
)
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.deit.modeling_deit import DeiTForImageClassificationWithTeacherOutput
from transformers.models.siglip.modeling_siglip import SiglipAttention
from transformers.models.swin.modeling_swin import SwinLayer, SwinStage, window_partition, window_reverse

from .aligner import TokenLabelAligner, validate_mixing_inputs
from .attention import (
    ATTENTION_PATHS,
    base_attention_implementation,
    pass_aligner_through,
    routed_attention_implementation,
)
from .losses import mixed_batch_loss
from .mixer import MIXING_KEYS


@dataclass
class TLAlignImageClassifierOutput(ImageClassifierOutput):
    """:class:`ImageClassifierOutput` plus ``aligned_lam`` `(B,)`, present when mixing arguments were given."""

    aligned_lam: torch.FloatTensor | None = None


@dataclass
class TLAlignDeiTWithTeacherOutput(DeiTForImageClassificationWithTeacherOutput):
    """DeiT's two-head output plus the aligned ``loss`` (mean over both heads) and ``aligned_lam`` `(B,)`."""

    loss: torch.FloatTensor | None = None
    aligned_lam: torch.FloatTensor | None = None


READOUTS = ("cls", "patch_mean", "cls_and_patch_mean")


def _vision_config(config):
    """The config holding the patch settings and blocks (composite models such as CLIP keep them in vision_config)."""
    return getattr(config, "vision_config", None) or config


def _patch_grid_size(config, pixel_values: torch.Tensor) -> int:
    patch_size = _vision_config(config).patch_size
    patch_h, patch_w = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    return (pixel_values.shape[-2] // patch_h) * (pixel_values.shape[-1] // patch_w)


def _configs(config) -> list:
    """``config`` and its sub-configs (vision and text configs of composite models)."""
    sub_configs = (getattr(config, name, None) for name in getattr(config, "sub_configs", {}))
    return [config, *(sub_config for sub_config in sub_configs if sub_config is not None)]


class TLAlignMixin:
    """Token-label alignment for a transformers image classifier whose attention uses the attention interface.

    Subclasses set ``tl_align_parent`` (the transformers class they extend), ``tl_align_num_prefix_tokens`` (tokens
    before the patch tokens, all starting at ``mix_lam``: CLS, distillation, registers) and ``tl_align_pooling``,
    the read-out that mirrors the classifier's pooling (see :meth:`tl_align_readout`). Families whose attention
    modules drop the forward's ``**kwargs`` list those classes in ``tl_align_kwargs_dropped_by`` (SigLIP); families
    whose attention sees the tokens re-arranged (Swin) also override :meth:`tl_align_install_hooks`.
    ``tl_align_attention_path`` picks how shares are computed (``"auto"``; see :mod:`tl_align_hf.attention`).
    """

    tl_align_parent: type[PreTrainedModel]
    tl_align_num_prefix_tokens: int = 1
    tl_align_pooling: str = "cls"
    tl_align_attention_path: str = "auto"
    # attention modules that take the forward's **kwargs but do not hand them to the attention function
    tl_align_kwargs_dropped_by: tuple[type[torch.nn.Module], ...] = ()

    def __init__(self, config, *args, **kwargs):
        # A config taken from another aligned model carries the routed name; transformers must see the backend.
        for sub_config in _configs(config):
            sub_config._attn_implementation_internal = base_attention_implementation(sub_config._attn_implementation)
        super().__init__(config, *args, **kwargs)
        self.tl_align_route_attention()
        self.tl_align_install_hooks()

    @property
    def tl_align_num_blocks(self) -> int:
        """Attention blocks in one forward pass: one share update each."""
        return _vision_config(self.config).num_hidden_layers

    def tl_align_install_hooks(self) -> None:
        """Register the module hooks a family needs: none, unless its attention modules drop the kwargs."""
        for module in self.modules():
            if isinstance(module, self.tl_align_kwargs_dropped_by):
                pass_aligner_through(module)

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
        """`(B, N)` final token shares -> `(B,)` aligned share, pooled as the classifier pools the tokens.

        ``tl_align_pooling``: ``"cls"`` reads the CLS token; ``"patch_mean"`` averages the tokens after the
        ``tl_align_num_prefix_tokens`` prefix tokens (all tokens when there are none); ``"cls_and_patch_mean"``
        (DINOv2, whose classifier reads ``[CLS, mean of patch tokens]``) is the mean of the CLS share and the mean
        patch share. Every read-out is a mean of shares, so the aligned target stays in [0, 1].
        """
        if self.tl_align_pooling == "cls":
            return shares[:, 0]
        patch_mean = shares[:, self.tl_align_num_prefix_tokens :].mean(dim=1)
        if self.tl_align_pooling == "patch_mean":
            return patch_mean
        return 0.5 * (shares[:, 0] + patch_mean)

    def _start_aligner(self, pixel_values, mix_index, token_weights, mix_lam) -> TokenLabelAligner:
        missing = [name for name, value in zip(MIXING_KEYS, (mix_index, token_weights, mix_lam)) if value is None]
        if missing:
            raise ValueError(
                f"TL-Align needs all of {MIXING_KEYS} or none of them; missing {missing}. "
                "Pass the whole batch from TLAlignCollator, or none of the three for a plain forward pass."
            )
        if pixel_values is None:
            raise ValueError("`pixel_values` is required.")
        if self.tl_align_attention_path not in ATTENTION_PATHS:
            raise ValueError(
                f"`tl_align_attention_path` must be one of {ATTENTION_PATHS}, got {self.tl_align_attention_path!r}."
            )
        if self.tl_align_pooling not in READOUTS:
            raise ValueError(f"`tl_align_pooling` must be one of {READOUTS}, got {self.tl_align_pooling!r}.")
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
        aligner.close(expected_updates=self.tl_align_num_blocks)
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
        result = self._aligned_output(outputs, None, aligned_lam)
        if labels is not None:
            batch = {"labels": labels, "mix_index": mix_index, "mix_lam": mix_lam}
            result.loss = mixed_batch_loss(result, batch, label_smoothing=target_smoothing)[0]
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


class TLAlignViTMSNForImageClassification(TLAlignMixin, ViTMSNForImageClassification):
    """:class:`~transformers.ViTMSNForImageClassification` with token-label alignment (CLS read-out)."""

    tl_align_parent = ViTMSNForImageClassification
    tl_align_num_prefix_tokens = 1


class TLAlignDinov2ForImageClassification(TLAlignMixin, Dinov2ForImageClassification):
    """:class:`~transformers.Dinov2ForImageClassification` with token-label alignment.

    The classifier reads ``[CLS, mean of the patch tokens]``, so the aligned share is the mean of the CLS share and
    the mean patch share (``tl_align_pooling = "cls_and_patch_mean"``): each half of the classifier input gets
    its own share, with equal weight.
    """

    tl_align_parent = Dinov2ForImageClassification
    tl_align_num_prefix_tokens = 1
    tl_align_pooling = "cls_and_patch_mean"


class TLAlignDinov2WithRegistersForImageClassification(TLAlignMixin, Dinov2WithRegistersForImageClassification):
    """:class:`~transformers.Dinov2WithRegistersForImageClassification` with token-label alignment.

    The register tokens start at ``mix_lam`` like CLS. The classifier reads ``[CLS, mean of the patch tokens]``
    (registers excluded), so the aligned share is the mean of the CLS share and the mean patch share.
    """

    tl_align_parent = Dinov2WithRegistersForImageClassification
    tl_align_pooling = "cls_and_patch_mean"

    @property
    def tl_align_num_prefix_tokens(self) -> int:
        return 1 + self.config.num_register_tokens


class TLAlignBeitForImageClassification(TLAlignMixin, BeitForImageClassification):
    """:class:`~transformers.BeitForImageClassification` with token-label alignment.

    The read-out follows ``config.use_mean_pooling``: the mean of the patch shares (the default), or the CLS share.
    The relative position bias reaches the attention as its mask, so the shares see it on every path.
    """

    tl_align_parent = BeitForImageClassification
    tl_align_num_prefix_tokens = 1

    @property
    def tl_align_pooling(self) -> str:
        return "patch_mean" if self.config.use_mean_pooling else "cls"


class TLAlignIJepaForImageClassification(TLAlignMixin, IJepaForImageClassification):
    """:class:`~transformers.IJepaForImageClassification` with token-label alignment.

    I-JEPA has no CLS token and its classifier averages all tokens: the aligned share is the mean share.
    """

    tl_align_parent = IJepaForImageClassification
    tl_align_num_prefix_tokens = 0
    tl_align_pooling = "patch_mean"


class TLAlignCLIPForImageClassification(TLAlignMixin, CLIPForImageClassification):
    """:class:`~transformers.CLIPForImageClassification` with token-label alignment (vision tower only).

    The classifier averages the patch tokens (not the CLS token): the aligned share is the mean patch share.
    """

    tl_align_parent = CLIPForImageClassification
    tl_align_num_prefix_tokens = 1
    tl_align_pooling = "patch_mean"


class TLAlignMetaClip2ForImageClassification(TLAlignMixin, MetaClip2ForImageClassification):
    """:class:`~transformers.MetaClip2ForImageClassification` with token-label alignment (mean patch share)."""

    tl_align_parent = MetaClip2ForImageClassification
    tl_align_num_prefix_tokens = 1
    tl_align_pooling = "patch_mean"


class TLAlignSiglipForImageClassification(TLAlignMixin, SiglipForImageClassification):
    """:class:`~transformers.SiglipForImageClassification` with token-label alignment.

    SigLIP has no CLS token and its classifier averages all tokens: the aligned share is the mean share. (The
    vision tower's attention-pooling head, which the classifier does not use, does not change the shares.)
    """

    tl_align_parent = SiglipForImageClassification
    tl_align_num_prefix_tokens = 0
    tl_align_pooling = "patch_mean"
    tl_align_kwargs_dropped_by = (SiglipAttention,)


# ----------------------------------------------------------------------------------------------------------- Swin
def _input_dimensions(args: tuple, kwargs: dict) -> tuple[int, int]:
    """The `(height, width)` token grid passed to a SwinLayer or SwinStage call."""
    return tuple(args[1]) if len(args) > 1 else tuple(kwargs["input_dimensions"])


class _SwinWindows:
    """The token layout of one SwinLayer's attention: the layer's own padding, cyclic shift and window partition.

    Padded positions (when the grid is not a whole number of windows) hold ``mix_lam``: like the CLS token, they
    carry no pixels of either image. The layer's window and shift sizes are read when the attention runs, after the
    layer has adapted them to its input (windows no larger than the grid, no shift then).
    """

    def __init__(self, layer: SwinLayer, height: int, width: int, fill: torch.Tensor):
        self.layer, self.height, self.width = layer, height, width
        self.fill = fill[:, None, None, None]  # (B, 1, 1, 1)

    def to_attention(self, shares: torch.Tensor) -> torch.Tensor:
        """`(B, H*W)` -> `(B * num_windows, window_size**2)`."""
        grid = shares.view(-1, self.height, self.width, 1) - self.fill
        grid, _ = self.layer.maybe_pad(grid, self.height, self.width)
        self.padded_size = tuple(grid.shape[1:3])
        windows = window_partition(self.layer.cyclic_shift(grid + self.fill), self.layer.window_size)
        return windows.reshape(windows.shape[0], -1)

    def from_attention(self, attended: torch.Tensor) -> torch.Tensor:
        """`(B * num_windows, window_size**2)` -> `(B, H*W)`."""
        window_size = self.layer.window_size
        windows = attended.view(-1, window_size, window_size, 1)
        grid = self.layer.cyclic_shift(window_reverse(windows, window_size, *self.padded_size), reverse=True)
        return grid[:, : self.height, : self.width].reshape(grid.shape[0], -1)


def _merge_2x2_shares(shares: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Swin's patch merging for shares: `(B, H*W)` -> `(B, ceil(H/2) * ceil(W/2))`, the mean of each 2x2 group.

    At an odd border Swin merges zero padding, which carries no content: the mean is over the real tokens.
    """
    grid = shares.view(-1, 1, height, width)
    padding = (0, width % 2, 0, height % 2)
    group_sums = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(grid, padding), 2, divisor_override=1)
    real_tokens = torch.nn.functional.pad(torch.ones_like(grid[:1]), padding)
    group_sizes = torch.nn.functional.avg_pool2d(real_tokens, 2, divisor_override=1)
    return (group_sums / group_sizes).flatten(1)


def _swin_layer_pre_hook(layer: SwinLayer, args: tuple, kwargs: dict) -> None:
    aligner = kwargs.get("token_label_aligner")
    if aligner is not None and not aligner.closed:
        aligner.layout = _SwinWindows(layer, *_input_dimensions(args, kwargs), aligner.mix_lam)


def _swin_stage_hook(stage: SwinStage, args: tuple, kwargs: dict, output) -> None:
    aligner = kwargs.get("token_label_aligner")
    if aligner is not None:
        aligner.layout = None
        if stage.downsample is not None:
            height, width = _input_dimensions(args, kwargs)
            aligner.merge_tokens(functools.partial(_merge_2x2_shares, height=height, width=width))


class TLAlignSwinForImageClassification(TLAlignMixin, SwinForImageClassification):
    """:class:`~transformers.SwinForImageClassification` with token-label alignment.

    The shares follow the tokens: each block's attention sees them padded, cyclically shifted and partitioned into
    windows exactly as the hidden states (the shift mask and relative position bias are part of the probabilities),
    and the update is mapped back to the token grid. Patch merging takes the mean of each 2x2 group of shares, and
    the aligned share is the mean of the final shares, as the classifier mean-pools the final tokens. ``token_weights``
    cover the first stage's token grid, which is the patch grid. Hooks on the Swin layers and stages tell the aligner
    the geometry; without mixing arguments they do nothing.
    """

    tl_align_parent = SwinForImageClassification
    tl_align_num_prefix_tokens = 0
    tl_align_pooling = "patch_mean"

    @property
    def tl_align_num_blocks(self) -> int:
        return sum(self.config.depths)

    def tl_align_install_hooks(self) -> None:
        super().tl_align_install_hooks()
        for module in self.modules():
            if isinstance(module, SwinLayer):
                module.register_forward_pre_hook(_swin_layer_pre_hook, with_kwargs=True)
            elif isinstance(module, SwinStage):
                module.register_forward_hook(_swin_stage_hook, with_kwargs=True)


ALIGNED_CLASSES: dict[type[PreTrainedModel], type[TLAlignMixin]] = {
    ViTForImageClassification: TLAlignViTForImageClassification,
    DeiTForImageClassification: TLAlignDeiTForImageClassification,
    DeiTForImageClassificationWithTeacher: TLAlignDeiTForImageClassificationWithTeacher,
    ViTMSNForImageClassification: TLAlignViTMSNForImageClassification,
    Dinov2ForImageClassification: TLAlignDinov2ForImageClassification,
    Dinov2WithRegistersForImageClassification: TLAlignDinov2WithRegistersForImageClassification,
    BeitForImageClassification: TLAlignBeitForImageClassification,
    IJepaForImageClassification: TLAlignIJepaForImageClassification,
    CLIPForImageClassification: TLAlignCLIPForImageClassification,
    MetaClip2ForImageClassification: TLAlignMetaClip2ForImageClassification,
    SiglipForImageClassification: TLAlignSiglipForImageClassification,
    SwinForImageClassification: TLAlignSwinForImageClassification,
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
            f"{supported}. TL-Align follows the labels through attention, so it needs pre-norm residual attention "
            "blocks that run through transformers' attention interface and a known read-out; convolutional and "
            "hybrid models and the families implemented otherwise (Swinv2, Hiera, PVT, MobileViT, ...) are not "
            "supported."
        )
    model.__class__ = aligned_class
    model.tl_align_route_attention()
    model.tl_align_install_hooks()
    return model
