"""The ViT-like families: one token sequence through every block, read out from the CLS token or a mean of tokens.

ViT, DeiT (with and without teacher), ViT-MSN, DINOv2 (with and without registers), I-JEPA, CLIP, MetaCLIP 2,
SigLIP and SigLIP 2 (NaFlex). Their attention runs through transformers' attention interface, so each family is
data on :class:`~tl_align_hf.models.base.TLAlignMixin`: the prefix tokens and the read-out.
"""

from __future__ import annotations

import functools

import torch
from transformers import (
    CLIPForImageClassification,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    Dinov2ForImageClassification,
    Dinov2WithRegistersForImageClassification,
    IJepaForImageClassification,
    MetaClip2ForImageClassification,
    Siglip2ForImageClassification,
    SiglipForImageClassification,
    ViTForImageClassification,
    ViTMSNForImageClassification,
)
from transformers.models.siglip.modeling_siglip import SiglipAttention
from transformers.models.siglip2.modeling_siglip2 import Siglip2Attention

from .base import TLAlignMixin


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

    Both heads are trained against the same aligned target, read from the CLS token, as the official code does:
    :func:`~tl_align_hf.mixed_batch_loss` averages the two heads' soft-target cross-entropies. Like the parent, the
    forward takes no ``labels`` (so it returns no loss); distillation from a teacher is separate.
    """

    tl_align_parent = DeiTForImageClassificationWithTeacher
    tl_align_num_prefix_tokens = 2


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
    tl_align_image_size = None  # any size: the embeddings always interpolate (Hub configs say 518, processors crop 224)


class TLAlignDinov2WithRegistersForImageClassification(TLAlignMixin, Dinov2WithRegistersForImageClassification):
    """:class:`~transformers.Dinov2WithRegistersForImageClassification` with token-label alignment.

    The register tokens start at ``mix_lam`` like CLS. The classifier reads ``[CLS, mean of the patch tokens]``
    (registers excluded), so the aligned share is the mean of the CLS share and the mean patch share.
    """

    tl_align_parent = Dinov2WithRegistersForImageClassification
    tl_align_pooling = "cls_and_patch_mean"
    tl_align_image_size = None  # any size: the embeddings always interpolate

    @property
    def tl_align_num_prefix_tokens(self) -> int:
        return 1 + self.config.num_register_tokens


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


# -------------------------------------------------------------------------------------------- SigLIP 2 (NaFlex)
def _masked_mean_shares(shares: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """`(B, N)` shares, `(B, N)` mask of the real patches -> `(B, 1)` mean share of the real patches."""
    weights = pool_mask.to(shares.dtype)
    return ((shares * weights).sum(dim=1) / weights.sum(dim=1))[:, None]


def _forward_then_pool_shares(parent_forward, model, *, token_label_aligner, **arguments):
    """The parent's forward, then the shares pooled as the classifier pools the tokens: the mean over the real
    patches of ``pixel_attention_mask`` (all tokens without one)."""
    outputs = parent_forward(model, token_label_aligner=token_label_aligner, **arguments)
    pool_mask = arguments.get("pixel_attention_mask")
    if pool_mask is not None:
        token_label_aligner.merge_tokens(functools.partial(_masked_mean_shares, pool_mask=pool_mask))
    return outputs


class TLAlignSiglip2ForImageClassification(TLAlignMixin, Siglip2ForImageClassification):
    """:class:`~transformers.Siglip2ForImageClassification` (NaFlex) with token-label alignment.

    SigLIP 2 takes each image as a padded sequence of patches: ``pixel_values`` `(B, N, C * P * P)`, with
    ``pixel_attention_mask`` `(B, N)` (1 for the image's patches, 0 for padding) and ``spatial_shapes`` `(B, 2)`
    (each image's own patch grid, row-major at the start of its sequence). ``token_weights`` `(B, N)` cover the same
    padded sequence. Padded patches are masked out of the attention as keys, so they never reach a real token, and
    out of the read-out: the aligned share is the mean share of each image's real patches, as the classifier averages
    them (no CLS token). Whatever ``token_weights`` hold at padded positions has no effect.
    """

    tl_align_parent = Siglip2ForImageClassification
    tl_align_num_prefix_tokens = 0
    tl_align_pooling = "patch_mean"
    tl_align_kwargs_dropped_by = (Siglip2Attention,)

    @property
    def tl_align_image_size(self) -> None:
        return None  # NaFlex: each image keeps its own size

    def tl_align_num_patches(self, pixel_values: torch.Tensor) -> int:
        if pixel_values.dim() != 3:
            raise ValueError(
                "Siglip2ForImageClassification takes `pixel_values` as patch sequences (batch_size, num_patches, "
                f"channels * patch_size**2) with `pixel_attention_mask` and `spatial_shapes`, got shape "
                f"{tuple(pixel_values.shape)}. Prepare the images with Siglip2ImageProcessor."
            )
        return pixel_values.shape[1]

    def tl_align_forward(self, parent_forward, arguments, labels, mix_index, token_weights, mix_lam, target_smoothing):
        forward = functools.partial(_forward_then_pool_shares, parent_forward)
        return super().tl_align_forward(forward, arguments, labels, mix_index, token_weights, mix_lam, target_smoothing)


