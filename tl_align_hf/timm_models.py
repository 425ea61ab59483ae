"""Token-label alignment for timm ViTs wrapped by transformers' ``TimmWrapperForImageClassification``.

timm's attention does not run through transformers' attention interface: each ``timm.layers.Attention`` computes
``F.scaled_dot_product_attention`` (``fused_attn=True``) or an explicit softmax itself, and the wrapper hands only
the pixels to the timm model. So the aligner travels differently, through the same building blocks:

- converting a model gives each of its ``Attention`` modules the subclass :class:`_TLAlignTimmAttention` (same
  weights, same forward when no aligner is there) and hooks the attention-pooling head (``global_pool='map'``);
- for the aligned forward pass only, the model puts the aligner on those modules (``ALIGNER_ATTRIBUTE``, as
  :func:`~tl_align_hf.attention.pass_aligner_through` does for modules that drop their kwargs) and takes it off
  afterwards, so a forward pass without mixing arguments is timm's own, bit for bit;
- with an aligner, the attention computes timm's q, k and v and the block's ``mean_h(P_h) @ s`` on the aligner's
  path (``eager``: the probabilities of timm's explicit softmax; ``value_channel``: the shares as an extra value
  channel of timm's SDPA call; ``explicit``: timm's attention unchanged, the dropout-free probabilities beside it).

Gradient checkpointing (``set_grad_checkpointing``) recomputes timm's blocks without the aligner, i.e. as plain
timm; the aligned forward then takes the ``explicit`` path, whose attention output is exactly timm's own, so that
the recomputation matches the forward pass and each update is applied once.

The prefix tokens (class, distillation, registers: ``num_prefix_tokens``) start at ``mix_lam``. The read-out mirrors
``forward_head``: ``'token'`` reads the class token's share, ``'avg'`` the mean share of the pooled tokens (the patch
tokens, or all tokens with ``pool_include_prefix``), and ``'map'`` the shares of the pooling attention's latent
queries, ``mean_h(P_h) @ s`` over the pooled tokens (that attention has no residual: the latent holds no label of
its own), then pooled as the head pools its latents. Distilled DeiTs read the class token's share for both heads.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from timm.layers import AttentionPoolLatent, PatchEmbed
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Attention, Block, ResPostBlock, VisionTransformer
from transformers import TimmWrapperForImageClassification

from .attention import (
    ALIGNER_ATTRIBUTE,
    additive_mask,
    attention_with_shares,
    dropout_free_probabilities,
    mean_attended_shares,
)
from .modeling import TLAlignMixin, _aligned_output_class

SUPPORTED_TIMM_MODELS = (
    "timm's VisionTransformer (vit_*, deit_*, deit3_*, ViTs with registers, CLIP / SigLIP / DINOv2-style ViTs) and "
    "VisionTransformerDistilled (deit_*_distilled_*), built from Block or ResPostBlock blocks with timm's standard "
    "Attention, a linear PatchEmbed, no patch dropout, and global_pool 'token', 'avg' or 'map'"
)
SUPPORTED_POOLS = "'token' (class token), 'avg' (mean of the tokens) or 'map' (attention pooling, pool_type 'token' or 'avg')"


# -------------------------------------------------------------------------------------------------- attention
def _self_attention_mask(attn_mask: torch.Tensor | None, is_causal: bool, query: torch.Tensor) -> torch.Tensor | None:
    """The mask timm's attention applies: ``attn_mask`` (additive, or a boolean keep-mask), or a causal keep-mask."""
    if is_causal:
        num_tokens = query.shape[2]
        return torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=query.device).tril()
    return attn_mask


def _timm_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, *, fused, is_causal=False):
    """Attention as ``timm.layers.Attention.forward`` computes it, in the calling convention of transformers'
    attention functions (so that :func:`~tl_align_hf.attention.attention_with_shares` can run it on every path).

    Args:
        query, key, value: `(B, H, N, D)`, after timm's q/k norm.
        dropout: the attention dropout probability of this call (timm's ``attn_drop.p`` in training, else 0); the
            explicit softmax applies timm's own ``attn_drop`` module.
        scaling: ``None`` for timm's ``1/sqrt(D)``; given only for the zero-padded heads of the value channel.
        fused: SDPA (timm's ``fused_attn``) or the explicit softmax.
    Returns:
        `(B, N, H, D)` output and the `(B, H, N, N)` probabilities before dropout (``None`` when fused).
    """
    if fused:
        scale = {} if scaling is None else {"scale": scaling}
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, **scale
        )
        return output.transpose(1, 2), None
    scores = (query * (module.scale if scaling is None else scaling)) @ key.transpose(-2, -1)
    bias = additive_mask(_self_attention_mask(attention_mask, is_causal, query), scores.dtype)
    probabilities = (scores if bias is None else scores + bias).softmax(dim=-1)
    return (module.attn_drop(probabilities) @ value).transpose(1, 2), probabilities


def _attention_with_shares(module, query, key, value, attn_mask, is_causal, aligner) -> torch.Tensor:
    """The `(B, N, H, D)` attention output on the aligner's path, after applying this block's share update."""
    mask = _self_attention_mask(attn_mask, is_causal, query)
    output, _ = attention_with_shares(
        aligner, module, query, key, value, mask, module.attn_drop.p if module.training else 0.0, module.scale,
        base_function=functools.partial(_timm_attention, fused=module.fused_attn),
        eager_function=functools.partial(_timm_attention, fused=False),
        base_is_eager=not module.fused_attn,
    )  # fmt: skip
    return output


class _TLAlignTimmAttention(Attention):
    """timm's ``Attention`` that also feeds the aligner put on it for an aligned forward pass; without one, timm's
    forward itself. Converted models get this class in place of ``Attention`` (same module, same weights)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        aligner = getattr(self, ALIGNER_ATTRIBUTE, None)
        if aligner is None:
            return super().forward(x, *args, **kwargs)
        return self._aligned_forward(x, aligner, *args, **kwargs)

    def _aligned_forward(self, x, aligner, attn_mask=None, is_causal=False) -> torch.Tensor:
        """timm's ``Attention.forward`` on `(B, N, C)` tokens, with the attention call replaced."""
        batch_size, num_tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(batch_size, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        query, key = self.q_norm(query), self.k_norm(key)
        x = _attention_with_shares(self, query, key, value, attn_mask, is_causal, aligner)
        x = self.norm(x.reshape(batch_size, num_tokens, self.num_heads * self.head_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


# ----------------------------------------------------------------------------------------- attention pooling
def _latent_pool_probabilities(attn_pool: AttentionPoolLatent, tokens: torch.Tensor) -> torch.Tensor:
    """`(B, H, L, N)` float32 probabilities of the pool's L latent queries over its `(B, N, C)` input tokens."""
    with torch.no_grad():
        batch_size, num_tokens, _ = tokens.shape
        if attn_pool.pos_embed is not None:
            tokens = tokens + attn_pool.pos_embed.unsqueeze(0).to(tokens.dtype)
        heads = (attn_pool.num_heads, attn_pool.head_dim)
        query = attn_pool.q(attn_pool.latent.expand(batch_size, -1, -1))
        query = query.reshape(batch_size, attn_pool.latent_len, *heads).transpose(1, 2)
        key = attn_pool.kv(tokens).reshape(batch_size, num_tokens, 2, *heads)[:, :, 0].transpose(1, 2)
        query, key = attn_pool.q_norm(query), attn_pool.k_norm(key)
        return dropout_free_probabilities(query, key, None, attn_pool.scale)


def _latent_shares(attn_pool: AttentionPoolLatent, tokens: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """`(B, N)` token shares -> `(B, L)` shares of the latent queries, ``mean_h(P_h) @ s`` over the pooled tokens.

    The pooled tokens are the last ``tokens.shape[1]`` ones: the patch tokens, or all with ``pool_include_prefix``.
    """
    pooled_shares = shares[:, shares.shape[1] - tokens.shape[1] :]
    return mean_attended_shares(_latent_pool_probabilities(attn_pool, tokens), pooled_shares)


def _attention_pool_pre_hook(attn_pool: AttentionPoolLatent, args: tuple) -> None:
    aligner = getattr(attn_pool, ALIGNER_ATTRIBUTE, None)
    if aligner is not None:
        aligner.merge_tokens(functools.partial(_latent_shares, attn_pool, args[0]))


# -------------------------------------------------------------------------------------------- what is supported
def _unsupported_part(timm_model: torch.nn.Module) -> str | None:
    """Why the labels cannot be followed through ``timm_model``, or ``None`` when they can."""
    if type(timm_model) not in (VisionTransformer, VisionTransformerDistilled):
        return f"its timm class {type(timm_model).__name__} is not a ViT built on timm's standard attention blocks"
    if type(timm_model.patch_embed) is not PatchEmbed:
        return (
            f"its patch embedding {type(timm_model.patch_embed).__name__} is not a linear PatchEmbed (a convolutional "
            "stem mixes pixels across patches, so a token's share is not its patch's)"
        )
    blocks = sorted({type(block).__name__ for block in timm_model.blocks if type(block) not in (Block, ResPostBlock)})
    if blocks:
        return f"its blocks ({', '.join(blocks)}) are not Block or ResPostBlock (e.g. attention and MLP in parallel)"
    attentions = sorted({type(block.attn).__name__ for block in timm_model.blocks if not isinstance(block.attn, Attention)})
    if attentions:
        return f"its attention ({', '.join(attentions)}) is not timm's standard Attention"
    if not isinstance(timm_model.patch_drop, torch.nn.Identity):
        return "patch dropout drops tokens in training; build it with model_args={'patch_drop_rate': 0.0}"
    return None


def _pool_type(timm_model: VisionTransformer) -> str:
    """``'token'`` or ``'avg'``: how ``forward_head`` pools the final tokens (with ``'map'``: the latent queries)."""
    attn_pool = timm_model.attn_pool
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
            f"models: {SUPPORTED_TIMM_MODELS}. Models with their own attention (EVA, BEiT, Swin, CaiT, XCiT, ...) "
            "and convolutional or hybrid models (ResNet, ConvNeXt, R50+ViT, ...) are not supported."
        )
    _pool_type(model.timm_model)


# ------------------------------------------------------------------------------------------------------ model
@dataclasses.dataclass
class TLAlignTimmWrapperClassifierOutput(_aligned_output_class(TimmWrapperForImageClassification)):
    """`ImageClassifierOutput` plus ``aligned_lam`` `(B,)`; in timm's distilled training (``logits`` is then the
    pair of the class and distillation heads' logits) also ``cls_logits`` and ``distillation_logits`` `(B, C)`,
    which :func:`~tl_align_hf.mixed_batch_loss` trains on the same target, as for DeiT with teacher."""

    cls_logits: torch.FloatTensor | None = None
    distillation_logits: torch.FloatTensor | None = None


def _forward_with_aligner_on_modules(parent_forward, model, *, token_label_aligner, **arguments):
    """``parent_forward(model, **arguments)`` with the aligner on timm's attention and pooling modules for the call
    (timm's forward takes no aligner argument); the distilled heads are named in the output."""
    if model.timm_model.grad_checkpointing and torch.is_grad_enabled():
        token_label_aligner.attention_path = "explicit"  # the blocks are recomputed as plain timm (module docstring)
    modules = [module for module in model.modules() if isinstance(module, _TLAlignTimmAttention | AttentionPoolLatent)]
    for module in modules:
        setattr(module, ALIGNER_ATTRIBUTE, token_label_aligner)
    try:
        outputs = parent_forward(model, **arguments)
    finally:
        for module in modules:
            setattr(module, ALIGNER_ATTRIBUTE, None)
    if isinstance(outputs.logits, tuple):  # VisionTransformerDistilled with distilled_training, in training
        outputs = {**outputs, "cls_logits": outputs.logits[0], "distillation_logits": outputs.logits[1]}
    return outputs


class TLAlignTimmWrapperForImageClassification(TLAlignMixin, TimmWrapperForImageClassification):
    """:class:`~transformers.TimmWrapperForImageClassification` of a timm ViT with token-label alignment.

    Supported: timm's ``VisionTransformer`` and ``VisionTransformerDistilled`` (see ``SUPPORTED_TIMM_MODELS``);
    others raise a ValueError. The prefix tokens (class, distillation, registers) start at ``mix_lam``; the aligned
    share mirrors timm's ``global_pool`` (module docstring). The shares are computed by timm's own attention modules
    on the path ``tl_align_attention_path`` picks, for SDPA (``fused_attn=True``) and explicit attention alike.

    The patch grid (``tl_align_patch_size``, ``tl_align_image_size``, which :class:`~tl_align_hf.TLAlignCollator`
    reads) comes from the timm model's patch embedding; the config is left alone.
    """

    tl_align_parent = TimmWrapperForImageClassification

    @property
    def tl_align_num_prefix_tokens(self) -> int:
        return self.timm_model.num_prefix_tokens

    @property
    def tl_align_num_blocks(self) -> int:
        return len(self.timm_model.blocks)

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
        """Check the timm model and give its attention modules the aligned subclass."""
        _check_supported(self)
        for block in self.timm_model.blocks:
            block.attn.__class__ = _TLAlignTimmAttention

    def tl_align_install_hooks(self) -> None:
        super().tl_align_install_hooks()
        if isinstance(self.timm_model.attn_pool, AttentionPoolLatent):
            self.timm_model.attn_pool.register_forward_pre_hook(_attention_pool_pre_hook)

    def tl_align_readout(self, shares: torch.Tensor) -> torch.Tensor:
        """`(B, N)` final shares (`(B, L)` latent shares after a ``'map'`` pool) -> `(B,)`, pooled as timm pools."""
        timm_model = self.timm_model
        pooled = shares
        if timm_model.attn_pool is None and not getattr(timm_model, "pool_include_prefix", False):
            pooled = shares[:, timm_model.num_prefix_tokens :]
        return shares[:, 0] if _pool_type(timm_model) == "token" else pooled.mean(dim=1)

    def tl_align_forward(self, parent_forward, arguments, labels, mix_index, token_weights, mix_lam, target_smoothing):
        forward = functools.partial(_forward_with_aligner_on_modules, parent_forward)
        return super().tl_align_forward(forward, arguments, labels, mix_index, token_weights, mix_lam, target_smoothing)


TLAlignTimmWrapperForImageClassification.tl_align_output_class = TLAlignTimmWrapperClassifierOutput
