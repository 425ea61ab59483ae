"""tl-align-hf: Token-Label Alignment (TL-Align, ICCV 2023) for Hugging Face vision transformers."""

from .aligner import TokenLabelAligner
from .losses import mixed_soft_targets, mixing_loss, soft_target_cross_entropy
from .modeling import (
    TLAlignDeiTForImageClassification,
    TLAlignDeiTForImageClassificationWithTeacher,
    TLAlignMixin,
    TLAlignViTForImageClassification,
    to_tl_align,
)

__version__ = "0.1.0"

__all__ = [
    "TLAlignDeiTForImageClassification",
    "TLAlignDeiTForImageClassificationWithTeacher",
    "TLAlignMixin",
    "TLAlignViTForImageClassification",
    "TokenLabelAligner",
    "mixed_soft_targets",
    "mixing_loss",
    "soft_target_cross_entropy",
    "to_tl_align",
]
