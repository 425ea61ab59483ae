"""BEiT and Data2Vec-Vision: CLS token, relative position bias, mean pooling (or the CLS token).

BEiT's attention runs through transformers' attention interface; Data2Vec-Vision's eager and SDPA attention classes
run outside it, so its modules become aligned subclasses (same weights) that feed the aligner through
:func:`~tl_align_hf.models.base.attention_with_aligner`.
"""

from __future__ import annotations

import functools

from transformers import BeitForImageClassification, Data2VecVisionForImageClassification
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.data2vec.modeling_data2vec_vision import (
    Data2VecVisionSdpaSelfAttention,
    Data2VecVisionSelfAttention,
)
from transformers.models.vit.modeling_vit import eager_attention_forward

from ..attention import ALIGNER_ATTRIBUTE
from .base import TLAlignMixin, attention_with_aligner


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


# ------------------------------------------------------------------------------------------------ Data2Vec-Vision
_DATA2VEC_SDPA = functools.partial(sdpa_attention_forward, is_causal=False)


class _TLAlignData2VecVisionAttention:
    """Data2Vec-Vision's self-attention (eager or SDPA class) that also feeds the aligner put on it for an aligned
    forward pass; without one, the parent's forward. The relative position biases (the layer's own and the shared
    one) are the additive mask of :func:`~tl_align_hf.attention.attention_with_shares`, on every path."""

    def forward(self, hidden_states, output_attentions=False, relative_position_bias=None, interpolate_pos_encoding=False, resolution=None):
        aligner = getattr(self, ALIGNER_ATTRIBUTE, None)
        if aligner is None:
            return super().forward(hidden_states, output_attentions, relative_position_bias, interpolate_pos_encoding, resolution)
        fused = isinstance(self, Data2VecVisionSdpaSelfAttention)
        context, weights = attention_with_aligner(
            self, aligner,
            lambda attentions: super(_TLAlignData2VecVisionAttention, self).forward(
                hidden_states, attentions, relative_position_bias, interpolate_pos_encoding, resolution
            ),
            functools.partial(self._tl_align_attention_inputs, hidden_states, relative_position_bias, interpolate_pos_encoding, resolution),
            output_attentions, self.dropout.p if self.training else 0.0, self.attention_head_size**-0.5,
            _DATA2VEC_SDPA if fused else eager_attention_forward, not fused,
        )  # fmt: skip
        if fused:
            return context, None
        return (context, weights) if output_attentions else (context,)

    def _tl_align_attention_inputs(self, hidden_states, relative_position_bias, interpolate_pos_encoding, resolution):
        """Query, key, value `(B, H, N, D)` and the `(1, H, N, N)` relative position bias (or ``None``)."""
        heads = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        query, key, value = (layer(hidden_states).view(heads).transpose(1, 2) for layer in (self.query, self.key, self.value))
        bias = relative_position_bias
        if self.has_relative_position_bias:
            grid = (resolution[0] // self.config.patch_size, resolution[1] // self.config.patch_size)
            own_bias = self.relative_position_bias(grid, interpolate_pos_encoding, dim_size=hidden_states.shape[1])
            bias = own_bias if bias is None else own_bias + bias
        return query, key, value, bias


class _TLAlignData2VecVisionSelfAttention(_TLAlignData2VecVisionAttention, Data2VecVisionSelfAttention):
    pass


class _TLAlignData2VecVisionSdpaSelfAttention(_TLAlignData2VecVisionAttention, Data2VecVisionSdpaSelfAttention):
    pass


class TLAlignData2VecVisionForImageClassification(TLAlignMixin, Data2VecVisionForImageClassification):
    """:class:`~transformers.Data2VecVisionForImageClassification` with token-label alignment.

    The BEiT computation (CLS token, relative position bias, mean pooling) with Data2Vec-Vision's own eager and SDPA
    attention classes, which run outside the attention interface: they become aligned subclasses (same weights).
    The read-out follows ``config.use_mean_pooling`` as for BEiT: the mean patch share, or the CLS share.
    """

    tl_align_parent = Data2VecVisionForImageClassification
    tl_align_num_prefix_tokens = 1
    tl_align_attention_classes = {
        Data2VecVisionSelfAttention: _TLAlignData2VecVisionSelfAttention,
        Data2VecVisionSdpaSelfAttention: _TLAlignData2VecVisionSdpaSelfAttention,
    }

    @property
    def tl_align_pooling(self) -> str:
        return "patch_mean" if self.config.use_mean_pooling else "cls"


