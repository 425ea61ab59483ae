"""tl-align-hf: Token-Label Alignment (TL-Align, ICCV 2023) for Hugging Face vision transformers."""

from .aligner import TokenLabelAligner
from .collator import TLAlignCollator
from .config import TLAlignConfig
from .data import (
    check_columns,
    default_image_processor,
    eval_collate,
    label_maps,
    load_image_dataset,
    make_transforms,
    set_train_epoch,
)
from .digits import default_digits_dir, write_digits_imagefolder
from .losses import mixed_soft_targets, mixing_loss, soft_target_cross_entropy
from .model_card import model_card_text, push_checkpoint_to_hub, write_model_card
from .modeling import (
    TLAlignBeitForImageClassification,
    TLAlignCLIPForImageClassification,
    TLAlignDeiTForImageClassification,
    TLAlignDeiTForImageClassificationWithTeacher,
    TLAlignDinov2ForImageClassification,
    TLAlignDinov2WithRegistersForImageClassification,
    TLAlignIJepaForImageClassification,
    TLAlignMetaClip2ForImageClassification,
    TLAlignMixin,
    TLAlignSiglipForImageClassification,
    TLAlignSwinForImageClassification,
    TLAlignViTForImageClassification,
    TLAlignViTMSNForImageClassification,
    to_tl_align,
)
from .trainer import TLAlignTrainer

__version__ = "0.1.0"

__all__ = [
    "TLAlignBeitForImageClassification",
    "TLAlignCLIPForImageClassification",
    "TLAlignCollator",
    "TLAlignConfig",
    "TLAlignDeiTForImageClassification",
    "TLAlignDeiTForImageClassificationWithTeacher",
    "TLAlignDinov2ForImageClassification",
    "TLAlignDinov2WithRegistersForImageClassification",
    "TLAlignIJepaForImageClassification",
    "TLAlignMetaClip2ForImageClassification",
    "TLAlignMixin",
    "TLAlignSiglipForImageClassification",
    "TLAlignSwinForImageClassification",
    "TLAlignTrainer",
    "TLAlignViTForImageClassification",
    "TLAlignViTMSNForImageClassification",
    "TokenLabelAligner",
    "check_columns",
    "default_digits_dir",
    "default_image_processor",
    "eval_collate",
    "label_maps",
    "load_image_dataset",
    "make_transforms",
    "mixed_soft_targets",
    "mixing_loss",
    "set_train_epoch",
    "model_card_text",
    "push_checkpoint_to_hub",
    "soft_target_cross_entropy",
    "to_tl_align",
    "write_digits_imagefolder",
    "write_model_card",
]
