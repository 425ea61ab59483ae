"""tl-align-hf: Token-Label Alignment (TL-Align, ICCV 2023) for Hugging Face vision transformers.

The public API: the aligned models (and `to_tl_align`, `from_tl_align`), the attention paths, the mixing settings, mixer and
collator, the loss, the trainer and its config, and the Hub helpers. The support code the examples need (data
loading and checks, the digits set, checkpoints, the model card, the metric, the recipe's optimizer/sampler/EMA) is
the `tl_align_hf.support` subpackage, whose `__all__` lists its documented helpers.
"""

import importlib.util

from ._version import __version__ as __version__
from .aligner import TokenLabelAligner
from .attention import ATTENTION_PATHS
from .collator import TLAlignCollator
from .config import TLAlignConfig
from .losses import alignment_metrics, mixed_batch_loss, mixed_soft_targets, mixing_loss, soft_target_cross_entropy
from .mixer import TLAlignMixer, mixing_generator
from .models import (
    TLAlignBeitForImageClassification,
    TLAlignCLIPForImageClassification,
    TLAlignData2VecVisionForImageClassification,
    TLAlignDeiTForImageClassification,
    TLAlignDeiTForImageClassificationWithTeacher,
    TLAlignDinov2ForImageClassification,
    TLAlignDinov2WithRegistersForImageClassification,
    TLAlignIJepaForImageClassification,
    TLAlignMetaClip2ForImageClassification,
    TLAlignMixin,
    TLAlignSiglip2ForImageClassification,
    TLAlignSiglipForImageClassification,
    TLAlignSwinForImageClassification,
    TLAlignSwinv2ForImageClassification,
    TLAlignViTForImageClassification,
    TLAlignViTMSNForImageClassification,
    from_tl_align,
    to_tl_align,
)
from .settings import MixingSettings
from .support.model_card import push_checkpoint_to_hub, tl_align_model_card
from .trainer import TLAlignTrainer

__all__ = [
    "ATTENTION_PATHS",
    "MixingSettings",
    "TLAlignBeitForImageClassification",
    "TLAlignCLIPForImageClassification",
    "TLAlignCollator",
    "TLAlignConfig",
    "TLAlignData2VecVisionForImageClassification",
    "TLAlignDeiTForImageClassification",
    "TLAlignDeiTForImageClassificationWithTeacher",
    "TLAlignDinov2ForImageClassification",
    "TLAlignDinov2WithRegistersForImageClassification",
    "TLAlignIJepaForImageClassification",
    "TLAlignMetaClip2ForImageClassification",
    "TLAlignMixer",
    "TLAlignMixin",
    "TLAlignSiglip2ForImageClassification",
    "TLAlignSiglipForImageClassification",
    "TLAlignSwinForImageClassification",
    "TLAlignSwinv2ForImageClassification",
    "TLAlignTrainer",
    "TLAlignViTForImageClassification",
    "TLAlignViTMSNForImageClassification",
    "TokenLabelAligner",
    "alignment_metrics",
    "from_tl_align",
    "mixed_batch_loss",
    "mixed_soft_targets",
    "mixing_generator",
    "mixing_loss",
    "push_checkpoint_to_hub",
    "soft_target_cross_entropy",
    "tl_align_model_card",
    "to_tl_align",
]

# The timm family imports timm (an optional extra): only when its class is asked for, never on `import tl_align_hf`.
if importlib.util.find_spec("timm") is not None:
    __all__ += ["TLAlignTimmWrapperForImageClassification"]


def __getattr__(name: str):
    if name == "TLAlignTimmWrapperForImageClassification":
        from .models.registry import timm_aligned_class

        return timm_aligned_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
