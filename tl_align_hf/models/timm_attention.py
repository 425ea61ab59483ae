"""How timm's attention modules feed a :class:`~tl_align_hf.aligner.TokenLabelAligner` (the timm family's half of
:mod:`tl_align_hf.attention`, which it reuses: :func:`~tl_align_hf.attention.attention_with_shares` runs every path).

timm's attention does not run through transformers' attention interface: each timm attention module prepares its
queries, keys and values its own way (RoPE on the non-prefix tokens, separate q/k/v biases, q/k norms, cosine
similarity, grouped keys, relative position biases) and then calls ``F.scaled_dot_product_attention``
(``fused_attn=True``) or computes an explicit softmax. Those two calls are the one place where every family is met:
an aligned attention module runs timm's own forward under :class:`_AttentionShares`, a ``TorchFunctionMode`` that
takes over the SDPA call (to run it on the aligner's path) and reads the explicit softmax's probabilities. Nothing of
timm's forward is copied, and without an aligner the module's forward is timm's, bit for bit.

The attention-pooling head (``global_pool='map'``) has no residual and is read out, not updated: a pre-hook turns the
token shares into the shares of its latent queries.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from timm.layers import AttentionPoolLatent, AttentionRope
from timm.models.beit import Attention as BeitAttention
from timm.models.eva import EvaAttention
from timm.models.swin_transformer import WindowAttention as SwinWindowAttention
from timm.models.swin_transformer_v2 import WindowAttention as SwinV2WindowAttention
from timm.models.vision_transformer import Attention
from timm.models.vision_transformer_relpos import RelPosAttention
from torch.overrides import TorchFunctionMode

from ..attention import (
    ALIGNER_ATTRIBUTE,
    additive_mask,
    attention_with_shares,
    dropout_free_probabilities,
    mean_attended_shares,
)


# -------------------------------------------------------------------------------------------------- attention
def _self_attention_mask(attn_mask: torch.Tensor | None, is_causal: bool, query: torch.Tensor) -> torch.Tensor | None:
    """The mask timm's attention applies: ``attn_mask`` (additive, or a boolean keep-mask), or a causal keep-mask."""
    if is_causal:
        num_tokens = query.shape[2]
        return torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=query.device).tril()
    return attn_mask


def _timm_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, *, fused, is_causal=False):
    """Attention as timm's modules compute it, in the calling convention of transformers' attention functions (so
    that :func:`~tl_align_hf.attention.attention_with_shares` can run it on every path).

    Args:
        query, key, value: `(B, H, N, D)`, as timm hands them to ``F.scaled_dot_product_attention``.
        attention_mask: additive or boolean, broadcastable to `(B, H, N, N)` (relative position bias, window masks).
        dropout: the attention dropout probability of this call (timm's ``attn_drop.p`` in training, else 0); the
            explicit softmax applies timm's own ``attn_drop`` module.
        scaling: the scale timm's call uses (``None`` there: ``1/sqrt(D)``).
        fused: SDPA, or the explicit softmax timm computes when ``fused_attn`` is off.
    Returns:
        `(B, N, H, D)` output and the `(B, H, N, N)` probabilities before dropout (``None`` when fused).
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if fused:
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling
        )
        return output.transpose(1, 2), None
    scores = (query * scaling) @ key.transpose(-2, -1)
    bias = additive_mask(_self_attention_mask(attention_mask, is_causal, query), scores.dtype)
    probabilities = (scores if bias is None else scores + bias).softmax(dim=-1)
    return (module.attn_drop(probabilities) @ value).transpose(1, 2), probabilities


def _scaled_dot_product_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The arguments of a ``F.scaled_dot_product_attention`` call, by name."""
    return dict(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


_SOFTMAX_FUNCTIONS = (F.softmax, torch.softmax, torch.Tensor.softmax)


class _AttentionShares(TorchFunctionMode):
    """Active while one timm attention module runs with an aligner; feeds the aligner from that module's attention.

    timm's attention modules prepare queries, keys and values their own way (RoPE on the non-prefix tokens, separate
    q/k/v biases, q/k norms, cosine similarity, grouped keys) and then either call ``F.scaled_dot_product_attention``
    (``fused_attn``) or compute an explicit softmax. Both calls are where this mode meets them, whatever came before:

    - the SDPA call runs on the aligner's path (:func:`~tl_align_hf.attention.attention_with_shares`: the value
      channel, the explicit probabilities beside it, or an explicit softmax whose probabilities are reused),
      with the call's own mask (relative position bias, window masks), dropout and scale;
    - the explicit softmax (timm's attention probabilities, before ``attn_drop``) is computed as timm computes it,
      and the block's update ``mean_h(P_h) @ s`` is taken from its output.

    Each module computes one attention per call (one SDPA call or one softmax); the aligner's closing count catches
    any other.
    """

    def __init__(self, module: torch.nn.Module, aligner):
        super().__init__()
        self.module, self.aligner = module, aligner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._fused_attention(**_scaled_dot_product_arguments(*args, **kwargs))
        output = func(*args, **kwargs)
        if func in _SOFTMAX_FUNCTIONS and not self.aligner.closed:
            self.aligner.update(mean_attended_shares(output.detach(), self.aligner.attention_shares()))
        return output

    def _fused_attention(self, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        """`(B, H, N, D)` attention output of timm's SDPA call, on the aligner's path."""
        if enable_gqa:  # timm expands grouped keys and values itself before the call
            key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        output, _ = attention_with_shares(
            self.aligner, self.module, query, key, value, _self_attention_mask(attn_mask, is_causal, query), dropout_p,
            query.shape[-1] ** -0.5 if scale is None else scale,
            base_function=functools.partial(_timm_attention, fused=True),
            eager_function=functools.partial(_timm_attention, fused=False),
            base_is_eager=False,
        )  # fmt: skip
        return output.transpose(1, 2)


class AlignedTimmAttention:
    """A timm attention module that, with an aligner put on it for an aligned forward pass, computes timm's own
    forward under :class:`_AttentionShares`; without one, timm's forward itself. Converted models get the subclass
    of each attention class (same module, same weights)."""

    def forward(self, *args, **kwargs):
        aligner = getattr(self, ALIGNER_ATTRIBUTE, None)
        if aligner is None:
            return super().forward(*args, **kwargs)
        with _AttentionShares(self, aligner):
            return super().forward(*args, **kwargs)


class _TLAlignTimmAttention(AlignedTimmAttention, Attention):
    """timm's ViT ``Attention`` (``vision_transformer.py``), aligned."""


class _TLAlignRelPosAttention(AlignedTimmAttention, RelPosAttention):
    """timm's ``RelPosAttention`` (relative-position ViTs, ``vit_relpos_*``: the bias as the SDPA mask), aligned."""


class _TLAlignEvaAttention(AlignedTimmAttention, EvaAttention):
    """timm's ``EvaAttention`` (EVA, EVA-02, DINOv3, timm's RoPE ViTs), aligned."""


class _TLAlignAttentionRope(AlignedTimmAttention, AttentionRope):
    """timm's ``AttentionRope`` (Perception Encoder, Naver's RoPE ViTs), aligned."""


class _TLAlignBeitAttention(AlignedTimmAttention, BeitAttention):
    """timm's BEiT ``Attention`` (relative position bias as the SDPA mask), aligned."""


class _TLAlignSwinWindowAttention(AlignedTimmAttention, SwinWindowAttention):
    """timm's Swin ``WindowAttention`` (relative position bias and shift mask as the SDPA mask), aligned."""


class _TLAlignSwinV2WindowAttention(AlignedTimmAttention, SwinV2WindowAttention):
    """timm's Swin V2 ``WindowAttention`` (cosine attention, explicit softmax only), aligned."""


ALIGNED_ATTENTION = {
    parent: aligned
    for aligned in (
        _TLAlignTimmAttention, _TLAlignRelPosAttention, _TLAlignEvaAttention, _TLAlignAttentionRope, _TLAlignBeitAttention,
        _TLAlignSwinWindowAttention, _TLAlignSwinV2WindowAttention,
    )  # fmt: skip
    for parent in aligned.__bases__[1:]
}


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


def attention_pool_pre_hook(attn_pool: AttentionPoolLatent, args: tuple) -> None:
    aligner = getattr(attn_pool, ALIGNER_ATTRIBUTE, None)
    if aligner is not None:
        aligner.merge_tokens(functools.partial(_latent_shares, attn_pool, args[0]))
