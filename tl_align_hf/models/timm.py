"""Token-label alignment for timm models wrapped by transformers' ``TimmWrapperForImageClassification``.

Supported timm classes (``SUPPORTED_TIMM_MODELS``): ``VisionTransformer`` and ``VisionTransformerDistilled`` (ViT,
DeiT, DeiT III, ViTs with registers, CLIP / SigLIP / DINOv2-style ViTs), ``Eva`` (EVA, EVA-02, DINOv3, timm's and
Naver's RoPE ViTs, Perception Encoder), ``Beit`` (BEiT, BEiT v2), ``SwinTransformer`` and ``SwinTransformerV2``.

The wrapper hands only the pixels to the timm model, and timm's attention does not run through transformers'
attention interface, so the aligner travels differently, through the same building blocks:

- converting a model gives each of its attention modules the aligned subclass of its class
  (:mod:`tl_align_hf.models.timm_attention`: same weights, same forward when no aligner is there) and hooks the
  attention-pooling head (``global_pool='map'``) and, in Swin models, the blocks and patch merging
  (:mod:`tl_align_hf.models.timm_swin`);
- for the aligned forward pass only, the model puts the aligner on those modules (``ALIGNER_ATTRIBUTE``, as
  :func:`~tl_align_hf.attention.pass_aligner_through` does for modules that drop their kwargs) and takes it off
  afterwards, so a forward pass without mixing arguments is timm's own, bit for bit;
- with an aligner, each attention computes timm's forward with the block's ``mean_h(P_h) @ s`` taken from its
  attention: for timm's SDPA (``fused_attn``) on the aligner's path (``value_channel``: the shares as an extra
  value channel of timm's SDPA call; ``explicit``: timm's SDPA unchanged, the dropout-free probabilities beside it;
  ``eager``: an explicit softmax whose probabilities are reused), and for timm's explicit softmax from its own
  probabilities (before ``attn_drop``), whatever the path.

Gradient checkpointing (``set_grad_checkpointing``) recomputes timm's blocks without the aligner, i.e. as plain
timm; the aligned forward then takes the ``explicit`` path, whose attention output is exactly timm's own, so that
the recomputation matches the forward pass and each update is applied once.

The prefix tokens (class, distillation, registers: ``num_prefix_tokens``) start at ``mix_lam``. The read-out mirrors
``forward_head``: ``'token'`` reads the class token's share, ``'avg'`` the mean share of the pooled tokens (the patch
tokens, all tokens with ``pool_include_prefix``, all tokens of Swin's last stage), and ``'map'`` the shares of the
pooling attention's latent queries, ``mean_h(P_h) @ s`` over the pooled tokens (that attention has no residual:
the latent holds no label of its own), then pooled as the head pools its latents. Distilled DeiTs read the class
token's share for both heads.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from timm.layers import AttentionPoolLatent, PatchEmbed
from timm.models.beit import Beit
from timm.models.beit import Block as BeitBlock
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva, EvaBlock, EvaBlockPostNorm
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from timm.models.vision_transformer_relpos import RelPosBlock, ResPostRelPosBlock, VisionTransformerRelPos
from torch.utils.hooks import RemovableHandle
from transformers import TimmWrapperForImageClassification

from ..attention import aligner_on_modules
from .base import TLAlignMixin, aligned_output_class
from .timm_attention import ALIGNED_ATTENTION, AlignedTimmAttention, attention_pool_pre_hook
from .timm_swin import SWIN_BLOCKS, SWIN_MERGING, install_swin_hooks, swin_blocks

SUPPORTED_TIMM_MODELS = (
    "timm's VisionTransformer (vit_*, deit_*, deit3_*, ViTs with registers, CLIP / SigLIP / DINOv2-style ViTs), "
    "VisionTransformerDistilled (deit_*_distilled_*), VisionTransformerRelPos (vit_relpos_*, vit_srelpos_*), Eva (eva_*, eva02_*, DINOv3 vit_*_dinov3, RoPE ViTs "
    "vit_*_rope_*, Perception Encoder vit_pe_core_*), Beit (beit_*, beitv2_*), SwinTransformer (swin_*) and "
    "SwinTransformerV2 (swinv2_*), with a linear PatchEmbed, no patch dropout, and global_pool 'token', 'avg' or "
    "'map' (Swin: 'avg')"
)
SUPPORTED_POOLS = "'token' (class token), 'avg' (mean of the tokens) or 'map' (attention pooling, pool_type 'token' or 'avg')"
# timm class -> the block classes it is built from (each block's ``attn`` must be one of ALIGNED_ATTENTION's classes)
_BLOCKS = {
    VisionTransformer: (Block, ResPostBlock),
    VisionTransformerDistilled: (Block, ResPostBlock),
    VisionTransformerRelPos: (RelPosBlock, ResPostRelPosBlock),
    Eva: (EvaBlock, EvaBlockPostNorm),
    Beit: (BeitBlock,),
    SwinTransformer: SWIN_BLOCKS[:1],
    SwinTransformerV2: SWIN_BLOCKS[1:],
}


# -------------------------------------------------------------------------------------------- what is supported
def _transformer_blocks(timm_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention blocks of a supported timm model, in order (one share update each)."""
    return swin_blocks(timm_model) if isinstance(timm_model, SwinTransformer | SwinTransformerV2) else list(timm_model.blocks)


# timm classes users reach for that TL-Align refuses: what mixes their tokens outside a softmax attention, and the
# nearest supported timm models
_REFUSED_CLASSES = {
    "Cait": "its talking-heads attention mixes the heads' probabilities after the softmax with learned weights (a "
    "row is then no distribution over tokens, so there is no share to follow); use deit3_* (layer scale, class token)",
    "Xcit": "its cross-covariance attention attends over channels, and its local patch interaction (depthwise "
    "convolutions) mixes neighbouring tokens outside attention; use vit_* or eva02_*",
    "SwinTransformerV2Cr": "this is the 'cr' re-implementation of Swin V2 with its own blocks, which TL-Align does not "
    "follow; use swinv2_* (SwinTransformerV2), same architecture",
    "Hiera": "it max-pools tokens between stages (a maximum, not a mean, of shares); use swin_* or swinv2_*",
    "MaxxVit": "its MBConv blocks mix neighbouring tokens by convolution outside attention; use swin_* or swinv2_*",
    "DaVit": "its channel-attention blocks attend over channels and its convolutional position encodings mix tokens; "
    "use swin_* or swinv2_*",
    "Twins": "its attention runs over a convolutionally sub-sampled sequence and its position encoding is a "
    "convolution; use swin_* or vit_*",
    "PyramidVisionTransformerV2": "its attention runs over a convolutionally reduced sequence and its MLP holds a "
    "depthwise convolution; use swin_* or vit_*",
}


def _unsupported_part(timm_model: torch.nn.Module) -> str | None:
    """Why the labels cannot be followed through ``timm_model``, or ``None`` when they can."""
    class_name = type(timm_model).__name__
    if class_name in _REFUSED_CLASSES:
        return f"{_REFUSED_CLASSES[class_name]} (timm class {class_name})"
    if type(timm_model) not in _BLOCKS:
        return (
            f"its timm class {class_name} mixes tokens in ways TL-Align does not follow (convolutions, pooling, or "
            "attention other than a softmax over tokens)"
        )
    if type(timm_model.patch_embed) is not PatchEmbed:
        return (
            f"its patch embedding {type(timm_model.patch_embed).__name__} is not a linear PatchEmbed (a convolutional "
            "stem mixes pixels across patches, so a token's share is not its patch's)"
        )
    blocks = _transformer_blocks(timm_model)
    others = sorted({type(block).__name__ for block in blocks if type(block) not in _BLOCKS[type(timm_model)]})
    if others:
        return f"its blocks ({', '.join(others)}) are not {type(timm_model).__name__}'s own (e.g. attention and MLP in parallel)"
    attentions = sorted({
        type(block.attn).__name__ for block in blocks
        if type(block.attn) not in ALIGNED_ATTENTION and not isinstance(block.attn, AlignedTimmAttention)
    })  # fmt: skip
    if attentions:
        return f"its attention ({', '.join(attentions)}) is not one of timm's attention classes TL-Align follows"
    if not isinstance(getattr(timm_model, "patch_drop", None), torch.nn.Identity | None):
        return "patch dropout drops tokens in training; build it with model_args={'patch_drop_rate': 0.0}"
    return None


def _pool_type(timm_model: torch.nn.Module) -> str:
    """``'token'`` or ``'avg'``: how ``forward_head`` pools the final tokens (with ``'map'``: the latent queries)."""
    attn_pool = getattr(timm_model, "attn_pool", None)
    if attn_pool is None:
        pool, described = timm_model.global_pool, repr(timm_model.global_pool)
    elif type(attn_pool) is AttentionPoolLatent:
        pool, described = attn_pool.pool, f"'map' with pool_type {attn_pool.pool!r}"
    else:
        pool, described = None, f"{timm_model.global_pool!r} ({type(attn_pool).__name__})"
    if pool not in ("token", "avg"):
        raise ValueError(
            f"TL-Align does not support timm's global_pool {described}: the aligned share mirrors the pooling, which "
            f"must be a mean of token shares ('' keeps one output per token; 'max' and 'avgmax' take a maximum). "
            f"Supported: global_pool {SUPPORTED_POOLS}. Build the model with e.g. model_args={{'global_pool': 'avg'}}."
        )
    return pool


def _check_supported(model: TimmWrapperForImageClassification) -> None:
    """Raise a ValueError naming the architecture and the supported ones unless TL-Align can align ``model``."""
    reason = _unsupported_part(model.timm_model)
    if reason is not None:
        raise ValueError(
            f"TL-Align does not support the timm model {model.config.architecture!r}: {reason}. Supported timm "
            f"models: {SUPPORTED_TIMM_MODELS}. Convolutional and hybrid models (ResNet, ConvNeXt, R50+ViT, ...) "
            "are not supported: for those, use a ViT, EVA-02, DINOv3, BEiT or Swin checkpoint."
        )
    _pool_type(model.timm_model)


# ------------------------------------------------------------------------------------------------------ model
@dataclasses.dataclass
class TLAlignTimmWrapperClassifierOutput(aligned_output_class(TimmWrapperForImageClassification)):
    """`ImageClassifierOutput` plus ``aligned_lam`` `(B,)`; in timm's distilled training (``logits`` is then the
    pair of the class and distillation heads' logits) also ``cls_logits`` and ``distillation_logits`` `(B, C)`,
    which :func:`~tl_align_hf.mixed_batch_loss` trains on the same target, as for DeiT with teacher."""

    cls_logits: torch.FloatTensor | None = None
    distillation_logits: torch.FloatTensor | None = None


# the modules that read the aligner during an aligned forward pass
_ALIGNER_CARRIERS = (AlignedTimmAttention, AttentionPoolLatent, *SWIN_BLOCKS, *SWIN_MERGING)


def _forward_with_aligner_on_modules(parent_forward, model, *, token_label_aligner, **arguments):
    """``parent_forward(model, **arguments)`` with the aligner on timm's attention and pooling modules for the call
    (timm's forward takes no aligner argument); the distilled heads are named in the output."""
    checkpointing = any(getattr(module, "grad_checkpointing", False) for module in model.timm_model.modules())
    if checkpointing and torch.is_grad_enabled():  # the blocks are recomputed as plain timm (module docstring)
        token_label_aligner.attention_path = "explicit"
    with aligner_on_modules([module for module in model.modules() if isinstance(module, _ALIGNER_CARRIERS)], token_label_aligner):
        outputs = parent_forward(model, **arguments)
    if isinstance(outputs.logits, tuple):  # VisionTransformerDistilled with distilled_training, in training
        outputs = {**outputs, "cls_logits": outputs.logits[0], "distillation_logits": outputs.logits[1]}
    return outputs


class TLAlignTimmWrapperForImageClassification(TLAlignMixin, TimmWrapperForImageClassification):
    """:class:`~transformers.TimmWrapperForImageClassification` of a timm transformer with token-label alignment.

    Supported: timm's ``VisionTransformer``, ``VisionTransformerDistilled``, ``Eva``, ``Beit``, ``SwinTransformer``
    and ``SwinTransformerV2`` (see ``SUPPORTED_TIMM_MODELS``); others raise a ValueError. The prefix tokens (class,
    distillation, registers; none in Swin) start at ``mix_lam``; the aligned
    share mirrors timm's ``global_pool`` (module docstring). The shares are computed by timm's own attention modules
    on the path ``tl_align_attention_path`` picks, for SDPA (``fused_attn=True``) and explicit attention alike.

    The patch grid (``tl_align_patch_size``, ``tl_align_image_size``, which :class:`~tl_align_hf.TLAlignCollator`
    reads) comes from the timm model's patch embedding; the config is left alone.
    """

    tl_align_parent = TimmWrapperForImageClassification

    @property
    def tl_align_num_prefix_tokens(self) -> int:
        return getattr(self.timm_model, "num_prefix_tokens", 0)

    @property
    def tl_align_num_blocks(self) -> int:
        return len(_transformer_blocks(self.timm_model))

    @property
    def tl_align_pooling(self) -> str:
        """``"cls"`` when the head reads one token's share (``'token'``), ``"patch_mean"`` when it averages."""
        return "cls" if _pool_type(self.timm_model) == "token" else "patch_mean"

    @classmethod
    def tl_align_check_supported(cls, model: TimmWrapperForImageClassification) -> None:
        _check_supported(model)

    @property
    def tl_align_patch_size(self) -> tuple[int, int]:
        return tuple(self.timm_model.patch_embed.patch_size)

    @property
    def tl_align_image_size(self) -> tuple[int, int] | None:
        """The image size the patch embedding insists on, `None` when it takes any size (dynamic sizes)."""
        patch_embed = self.timm_model.patch_embed
        fixed_size = patch_embed.img_size is not None and patch_embed.strict_img_size and not patch_embed.dynamic_img_pad
        return tuple(patch_embed.img_size) if fixed_size else None

    def tl_align_route_attention(self) -> None:
        """Check the timm model and give each block's attention module the aligned subclass of its class."""
        _check_supported(self)
        for block in _transformer_blocks(self.timm_model):
            block.attn.__class__ = ALIGNED_ATTENTION.get(type(block.attn), type(block.attn))

    def tl_align_unroute_attention(self) -> None:
        """Give each aligned attention module its timm class back."""
        timm_classes = {aligned: parent for parent, aligned in ALIGNED_ATTENTION.items()}
        for module in self.timm_model.modules():
            module.__class__ = timm_classes.get(type(module), type(module))
        super().tl_align_unroute_attention()

    def tl_align_install_hooks(self) -> list[RemovableHandle]:
        handles = super().tl_align_install_hooks()
        attn_pool = getattr(self.timm_model, "attn_pool", None)
        if isinstance(attn_pool, AttentionPoolLatent):
            handles.append(attn_pool.register_forward_pre_hook(attention_pool_pre_hook))
        return handles + install_swin_hooks(self.timm_model)

    def tl_align_readout(self, shares: torch.Tensor) -> torch.Tensor:
        """`(B, N)` final shares (`(B, L)` latent shares after a ``'map'`` pool) -> `(B,)`, pooled as timm pools."""
        timm_model = self.timm_model
        pooled = shares
        if getattr(timm_model, "attn_pool", None) is None and not getattr(timm_model, "pool_include_prefix", False):
            pooled = shares[:, self.tl_align_num_prefix_tokens :]
        return shares[:, 0] if _pool_type(timm_model) == "token" else pooled.mean(dim=1)

    def tl_align_forward(self, parent_forward, arguments, labels, mix_index, token_weights, mix_lam, target_smoothing):
        forward = functools.partial(_forward_with_aligner_on_modules, parent_forward)
        return super().tl_align_forward(forward, arguments, labels, mix_index, token_weights, mix_lam, target_smoothing)


TLAlignTimmWrapperForImageClassification.tl_align_output_class = TLAlignTimmWrapperClassifierOutput
