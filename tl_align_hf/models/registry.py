"""The family table, the one place that knows which transformers class becomes which aligned class, and the two
conversions: :func:`to_tl_align` (a loaded model -> its aligned subclass) and :func:`from_tl_align` (the way back).

``ALIGNED_CLASSES`` maps each supported transformers class to its aligned subclass; the timm family (which needs
timm, an optional extra) is imported only when a ``TimmWrapperForImageClassification`` is converted or asked for
(:func:`aligned_classes`). ``UNSUPPORTED_FAMILIES`` names, per ``model_type`` that TL-Align refuses, what keeps it
from following the labels and the nearest supported alternative.
"""

from __future__ import annotations

import importlib.util
import sys

import torch
from transformers import PreTrainedModel
from transformers.trainer_utils import unwrap_peft_model

from .base import TLAlignMixin
from .beit import TLAlignBeitForImageClassification, TLAlignData2VecVisionForImageClassification
from .swin import TLAlignSwinForImageClassification, TLAlignSwinv2ForImageClassification
from .vit import (
    TLAlignCLIPForImageClassification,
    TLAlignDeiTForImageClassification,
    TLAlignDeiTForImageClassificationWithTeacher,
    TLAlignDinov2ForImageClassification,
    TLAlignDinov2WithRegistersForImageClassification,
    TLAlignIJepaForImageClassification,
    TLAlignMetaClip2ForImageClassification,
    TLAlignSiglip2ForImageClassification,
    TLAlignSiglipForImageClassification,
    TLAlignViTForImageClassification,
    TLAlignViTMSNForImageClassification,
)

_TIMM_WRAPPER_MODULE = "transformers.models.timm_wrapper.modeling_timm_wrapper"

# The transformers families. The timm family is looked up only when asked for (`aligned_classes`, `to_tl_align` of
# a TimmWrapperForImageClassification), so that importing tl_align_hf does not import timm.
ALIGNED_CLASSES: dict[type[PreTrainedModel], type[TLAlignMixin]] = {
    aligned.tl_align_parent: aligned
    for aligned in (
        TLAlignViTForImageClassification,
        TLAlignDeiTForImageClassification,
        TLAlignDeiTForImageClassificationWithTeacher,
        TLAlignViTMSNForImageClassification,
        TLAlignDinov2ForImageClassification,
        TLAlignDinov2WithRegistersForImageClassification,
        TLAlignBeitForImageClassification,
        TLAlignIJepaForImageClassification,
        TLAlignCLIPForImageClassification,
        TLAlignMetaClip2ForImageClassification,
        TLAlignSiglipForImageClassification,
        TLAlignSwinForImageClassification,
        TLAlignSwinv2ForImageClassification,
        TLAlignData2VecVisionForImageClassification,
        TLAlignSiglip2ForImageClassification,
    )
}


_CONVOLUTIONAL = "a convolutional network: it has no attention to follow the labels through"
_TRY_VIT = "Nearest supported: a ViT of similar size (ViT, DeiT, BEiT, DINOv2) or Swin / Swin V2"
_TRY_SWIN = "Nearest supported: Swin or Swin V2 (hierarchical, windowed attention only)"
_TIMM_DINOV3 = (
    "Fine-tune DINOv3 with TL-Align through timm: TimmWrapperForImageClassification of `vit_small_patch16_dinov3` "
    "or `vit_base_patch16_dinov3` (the `timm/vit_small_patch16_dinov3.lvd1689m`, `timm/vit_base_patch16_dinov3."
    "lvd1689m` checkpoints: AutoModelForImageClassification.from_pretrained('timm/vit_base_patch16_dinov3.lvd1689m'))"
)
# model_type -> (what keeps TL-Align from following the labels, the nearest supported alternative)
UNSUPPORTED_FAMILIES: dict[str, tuple[str, str]] = {
    **{
        model_type: (_CONVOLUTIONAL, _TRY_VIT)
        for model_type in (
            "bit", "convnext", "convnextv2", "dinov3_convnext", "efficientnet", "hgnet_v2", "mobilenet_v1",
            "mobilenet_v2", "pp_lcnet", "regnet", "resnet", "textnet",
        )
    },
    "poolformer": ("its token mixer is average pooling, not attention", _TRY_VIT),
    "focalnet": ("focal modulation (depth-wise convolutions and gating) mixes the tokens instead of attention", _TRY_SWIN),
    "cvt": (
        "convolutional token embeddings and convolutional query/key/value projections mix neighbouring tokens "
        "outside the attention probabilities",
        _TRY_VIT,
    ),
    "pvt": (
        "spatial-reduction attention: keys and values come from a strided convolution over the token grid, so the "
        "attention does not run between the tokens themselves",
        _TRY_SWIN,
    ),
    "pvt_v2": (
        "spatial-reduction attention (keys and values from a strided convolution or pooling), overlapping "
        "convolutional patch embeddings and a depth-wise convolution in every MLP mix tokens outside attention",
        _TRY_SWIN,
    ),
    "segformer": (
        "its attention uses the attention interface, but keys and values come from a strided convolution (spatial "
        "reduction), the patch embeddings overlap and the Mix-FFN has a depth-wise convolution: tokens mix outside "
        "attention",
        _TRY_SWIN,
    ),
    "mobilevit": (
        "MobileNetV2 convolution blocks, and unfold/fold around the transformer, mix pixels outside attention",
        "Nearest supported: a small ViT such as DeiT-Tiny",
    ),
    "mobilevitv2": (
        "separable linear attention (one context score per token, no token-to-token probabilities) between "
        "convolution blocks",
        "Nearest supported: a small ViT such as DeiT-Tiny",
    ),
    "swiftformer": (
        "efficient additive attention (no token-to-token probabilities) between convolutional encoders",
        "Nearest supported: a small ViT such as DeiT-Tiny",
    ),
    "levit": (
        "a convolutional stem, and attention blocks that subsample the queries (tokens merge inside attention, with "
        "no residual)",
        "Nearest supported: DeiT (LeViT's distilled training is DeiT's), with or without teacher",
    ),
    "hiera": (
        "mask-unit attention with query pooling (tokens merge inside attention) in its own attention module, outside "
        "transformers' attention interface",
        _TRY_SWIN,
    ),
    "dinat": ("neighbourhood attention from the natten kernels, with convolutional downsampling between stages", _TRY_SWIN),
    "donut-swin": (
        "Donut's encoder copies Swin V1 into its own classes, with attention outside transformers' attention "
        "interface",
        "Nearest supported: SwinForImageClassification",
    ),
    "perceiver": (
        "cross-attention from a learned latent array: the classifier reads latents that are not image tokens",
        _TRY_VIT,
    ),
    "imagegpt": (
        "it reads colour-cluster ids of single pixels (`input_ids`), not patches of `pixel_values`",
        _TRY_VIT,
    ),
    "shieldgemma2": (
        "a vision-language safety classifier: its scores are Gemma 3's generated yes/no answers, not a read-out of "
        "image tokens",
        "Nearest supported: SigLIP 2 (Siglip2ForImageClassification), the family of Gemma 3's vision tower",
    ),
    "dinov3_vit": (
        "transformers has no DINOv3 image-classification class (AutoModelForImageClassification does not map "
        "dinov3_vit; DINOv3ViTModel has no head)",
        _TIMM_DINOV3,
    ),
}


def timm_aligned_class() -> type[TLAlignMixin]:
    """``TLAlignTimmWrapperForImageClassification`` (imports timm: ModuleNotFoundError where it is not installed)."""
    from .timm import TLAlignTimmWrapperForImageClassification

    return TLAlignTimmWrapperForImageClassification


def aligned_classes() -> dict[type[PreTrainedModel], type[TLAlignMixin]]:
    """Every supported class -> its aligned subclass: :data:`ALIGNED_CLASSES`, and, where timm is installed,
    ``TimmWrapperForImageClassification`` (which imports timm)."""
    if importlib.util.find_spec("timm") is None:
        return dict(ALIGNED_CLASSES)
    timm_class = timm_aligned_class()
    return {**ALIGNED_CLASSES, timm_class.tl_align_parent: timm_class}


def _aligned_class_of(model_class: type) -> type[TLAlignMixin] | None:
    """The aligned subclass of exactly ``model_class``, or ``None``."""
    timm_wrapper = sys.modules.get(_TIMM_WRAPPER_MODULE)  # imported (with timm) once a timm model exists
    if timm_wrapper is not None and model_class is timm_wrapper.TimmWrapperForImageClassification:
        return timm_aligned_class()
    return ALIGNED_CLASSES.get(model_class)


def _refusal(model: torch.nn.Module) -> str:
    """Why ``model`` is not supported and what to use instead: the family's own obstacle, or, for a supported family
    loaded without its image-classification head, the class to load."""
    every_family = aligned_classes()
    supported = ", ".join(cls.__name__ for cls in every_family)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    head = f"TL-Align does not support {type(model).__name__} (model_type={model_type!r})"
    if model_type in UNSUPPORTED_FAMILIES:
        obstacle, alternative = UNSUPPORTED_FAMILIES[model_type]
        return f"{head}: {obstacle}. {alternative}. Supported classes: {supported}."
    same_family = [cls.__name__ for cls in every_family if getattr(cls, "config_class", None) is type(model.config)]
    if same_family:
        return (
            f"{head}: TL-Align trains image classifiers. Load the checkpoint with AutoModelForImageClassification "
            f"({' or '.join(same_family)}). Supported classes: {supported}."
        )
    return (
        f"{head}: its family has not been checked. TL-Align follows the labels through attention, so it needs "
        "blocks whose tokens mix only through attention (one residual attention branch per block) and a classifier "
        f"that reads a mean of the final tokens or a class token. Supported classes: {supported}."
    )


def to_tl_align(model: PreTrainedModel) -> PreTrainedModel:
    """Turn a loaded model of a supported class into its aligned subclass, in place; return it.

    Works on models from ``AutoModelForImageClassification.from_pretrained(...)``, and on peft models of them
    (``get_peft_model(model, LoraConfig(...))``): the base model inside is converted, adapters and all, and the
    ``PeftModel`` is returned; its forward hands the mixing arguments on to the base model. No weights change.

    Raises:
        ValueError: the model's class is not supported (nothing is changed).
    """
    peft_base = unwrap_peft_model(model)  # the transformers model inside a PeftModel (as peft finds it), else model
    if peft_base is not model:
        to_tl_align(peft_base)
        return model
    if isinstance(model, TLAlignMixin):
        return model
    aligned_class = _aligned_class_of(type(model))
    if aligned_class is None:
        raise ValueError(_refusal(model))
    aligned_class.tl_align_check_supported(model)
    model.__class__ = aligned_class
    model.tl_align_convert()
    return model


def from_tl_align(model: PreTrainedModel) -> PreTrainedModel:
    """The way back from :func:`to_tl_align`: turn an aligned model into its parent class, in place; return it.

    The model is then what its parent class builds, with the same weights: the hooks TL-Align registered are
    removed, every attention module has its own class and config back, and no ``tl_align_*`` attribute is left.
    Works on peft models as :func:`to_tl_align` does (the base model inside is converted back and the ``PeftModel``
    returned). A model that is not aligned is returned as it is.
    """
    peft_base = unwrap_peft_model(model)
    if peft_base is not model:
        from_tl_align(peft_base)
        return model
    if isinstance(model, TLAlignMixin):
        model.tl_align_restore()
    return model
