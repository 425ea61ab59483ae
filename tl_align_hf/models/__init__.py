"""The aligned models: :class:`TLAlignMixin` (:mod:`.base`), one module per family group (:mod:`.vit`, :mod:`.beit`,
:mod:`.swin`, and :mod:`.timm`, which needs timm and is imported only when used), and the family table with the two
conversions, :func:`to_tl_align` and :func:`from_tl_align` (:mod:`.registry`)."""

from .base import TLAlignMixin, as_parent_class
from .beit import TLAlignBeitForImageClassification, TLAlignData2VecVisionForImageClassification
from .registry import ALIGNED_CLASSES, UNSUPPORTED_FAMILIES, aligned_classes, from_tl_align, to_tl_align
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

__all__ = [
    "ALIGNED_CLASSES",
    "UNSUPPORTED_FAMILIES",
    "TLAlignBeitForImageClassification",
    "TLAlignCLIPForImageClassification",
    "TLAlignData2VecVisionForImageClassification",
    "TLAlignDeiTForImageClassification",
    "TLAlignDeiTForImageClassificationWithTeacher",
    "TLAlignDinov2ForImageClassification",
    "TLAlignDinov2WithRegistersForImageClassification",
    "TLAlignIJepaForImageClassification",
    "TLAlignMetaClip2ForImageClassification",
    "TLAlignMixin",
    "TLAlignSiglip2ForImageClassification",
    "TLAlignSiglipForImageClassification",
    "TLAlignSwinForImageClassification",
    "TLAlignSwinv2ForImageClassification",
    "TLAlignViTForImageClassification",
    "TLAlignViTMSNForImageClassification",
    "aligned_classes",
    "as_parent_class",
    "from_tl_align",
    "to_tl_align",
]
