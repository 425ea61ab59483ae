"""Swin and Swin V2: windowed attention with cyclic shifts, and patch merging between stages.

The shares follow the tokens: hooks on the Swin layers give the aligner each layer's window layout, and hooks on
the stages merge the shares as patch merging merges the tokens (:func:`merge_2x2_shares`, which timm's Swin models
reuse). Swin V2's attention (cosine similarity, continuous
position bias) runs outside transformers' attention interface: its modules become an aligned subclass.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.utils.hooks import RemovableHandle
from transformers import SwinForImageClassification, Swinv2ForImageClassification
from transformers.models.swin.modeling_swin import SwinLayer, SwinStage, window_partition, window_reverse
from transformers.models.swinv2.modeling_swinv2 import Swinv2Layer, Swinv2SelfAttention, Swinv2Stage
from transformers.models.vit.modeling_vit import eager_attention_forward

from ..aligner import TokenLabelAligner
from ..attention import ALIGNER_ATTRIBUTE
from .base import TLAlignMixin, attention_with_aligner


def _input_dimensions(args: tuple, kwargs: dict) -> tuple[int, int]:
    """The `(height, width)` token grid passed to a SwinLayer or SwinStage call."""
    return tuple(args[1]) if len(args) > 1 else tuple(kwargs["input_dimensions"])


def _cyclic_shift(layer: SwinLayer | Swinv2Layer, grid: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """The layer's cyclic shift of a `(B, H, W, C)` grid (``SwinLayer.cyclic_shift``; Swin V2 rolls inline)."""
    if layer.shift_size <= 0:
        return grid
    shift = layer.shift_size if reverse else -layer.shift_size
    return torch.roll(grid, shifts=(shift, shift), dims=(1, 2))


class _SwinWindows:
    """The token layout of one Swin (V1 or V2) layer's attention: the layer's own padding, its cyclic shift and the
    window partition.

    Padded positions (when the grid is not a whole number of windows) hold ``mix_lam``: like the CLS token, they
    carry no pixels of either image. The layer's window and shift sizes are read when the attention runs, after the
    layer has adapted them to its input (windows no larger than the grid, no shift then).
    """

    def __init__(self, layer: SwinLayer | Swinv2Layer, height: int, width: int, fill: torch.Tensor):
        self.layer, self.height, self.width = layer, height, width
        self.fill = fill[:, None, None, None]  # (B, 1, 1, 1)

    def to_attention(self, shares: torch.Tensor) -> torch.Tensor:
        """`(B, H*W)` -> `(B * num_windows, window_size**2)`."""
        grid = shares.view(-1, self.height, self.width, 1) - self.fill
        grid, _ = self.layer.maybe_pad(grid, self.height, self.width)
        self.padded_size = tuple(grid.shape[1:3])
        windows = window_partition(_cyclic_shift(self.layer, grid + self.fill), self.layer.window_size)
        return windows.reshape(windows.shape[0], -1)

    def from_attention(self, attended: torch.Tensor) -> torch.Tensor:
        """`(B * num_windows, window_size**2)` -> `(B, H*W)`."""
        window_size = self.layer.window_size
        windows = attended.view(-1, window_size, window_size, 1)
        grid = _cyclic_shift(self.layer, window_reverse(windows, window_size, *self.padded_size), reverse=True)
        return grid[:, : self.height, : self.width].reshape(grid.shape[0], -1)


def merge_2x2_shares(shares: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Swin's patch merging for shares: `(B, H*W)` -> `(B, ceil(H/2) * ceil(W/2))`, the mean of each 2x2 group.

    At an odd border Swin merges zero padding, which carries no content: the mean is over the real tokens.
    """
    grid = shares.view(-1, 1, height, width)
    padding = (0, width % 2, 0, height % 2)
    group_sums = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(grid, padding), 2, divisor_override=1)
    real_tokens = torch.nn.functional.pad(torch.ones_like(grid[:1]), padding)
    group_sizes = torch.nn.functional.avg_pool2d(real_tokens, 2, divisor_override=1)
    return (group_sums / group_sizes).flatten(1)


def _aligner_of_call(module: torch.nn.Module, kwargs: dict) -> TokenLabelAligner | None:
    """The aligner of this call: a keyword argument (Swin), or put on the module for the pass (Swin V2)."""
    return kwargs.get("token_label_aligner") or getattr(module, ALIGNER_ATTRIBUTE, None)


def _swin_layer_pre_hook(layer: SwinLayer | Swinv2Layer, args: tuple, kwargs: dict) -> None:
    aligner = _aligner_of_call(layer, kwargs)
    if aligner is not None and not aligner.closed:
        aligner.layout = _SwinWindows(layer, *_input_dimensions(args, kwargs), aligner.mix_lam)


def _swin_stage_hook(stage: SwinStage | Swinv2Stage, args: tuple, kwargs: dict, output) -> None:
    aligner = _aligner_of_call(stage, kwargs)
    if aligner is not None:
        aligner.layout = None
        if stage.downsample is not None:
            height, width = _input_dimensions(args, kwargs)
            aligner.merge_tokens(functools.partial(merge_2x2_shares, height=height, width=width))


class _SwinRouting:
    """What Swin V1 and V2 share: one update per block of every stage, and the hooks that give the aligner each
    layer's window layout and each stage's patch merging."""

    @property
    def tl_align_num_blocks(self) -> int:
        return sum(self.config.depths)

    def tl_align_install_hooks(self) -> list[RemovableHandle]:
        handles = super().tl_align_install_hooks()
        for module in self.modules():
            if isinstance(module, SwinLayer | Swinv2Layer):
                handles.append(module.register_forward_pre_hook(_swin_layer_pre_hook, with_kwargs=True))
            elif isinstance(module, SwinStage | Swinv2Stage):
                handles.append(module.register_forward_hook(_swin_stage_hook, with_kwargs=True))
        return handles


class TLAlignSwinForImageClassification(_SwinRouting, TLAlignMixin, SwinForImageClassification):
    """:class:`~transformers.SwinForImageClassification` with token-label alignment.

    The shares follow the tokens: each block's attention sees them padded, cyclically shifted and partitioned into
    windows exactly as the hidden states (the shift mask and relative position bias are part of the probabilities),
    and the update is mapped back to the token grid. Patch merging takes the mean of each 2x2 group of shares, and
    the aligned share is the mean of the final shares, as the classifier mean-pools the final tokens. ``token_weights``
    cover the first stage's token grid, which is the patch grid. Hooks on the Swin layers and stages tell the aligner
    the geometry; without mixing arguments they do nothing.
    """

    tl_align_parent = SwinForImageClassification
    tl_align_num_prefix_tokens = 0
    tl_align_pooling = "patch_mean"


# -------------------------------------------------------------------------------------------------------- Swin V2
class _TLAlignSwinv2SelfAttention(Swinv2SelfAttention):
    """Swin V2's window attention that also feeds the aligner put on it for an aligned forward pass; without one,
    the parent's forward. Converted models get this class in place of ``Swinv2SelfAttention`` (same weights).

    The ``eager`` and ``explicit`` paths run the parent's forward (see :func:`attention_with_aligner`). For the
    ``value_channel`` path, cosine attention is written as scaled dot-product attention with scaling 1 of the
    normalised queries times the clamped logit scale and the normalised keys, with the continuous position bias
    (``16 * sigmoid``) and the shift mask (which ``Swinv2SelfAttention`` adds twice) as its additive mask.
    """

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        aligner = getattr(self, ALIGNER_ATTRIBUTE, None)
        if aligner is None:
            return super().forward(hidden_states, attention_mask, output_attentions)
        context, weights = attention_with_aligner(
            self, aligner, functools.partial(super().forward, hidden_states, attention_mask),
            functools.partial(self._tl_align_attention_inputs, hidden_states, attention_mask), output_attentions,
            self.dropout.p if self.training else 0.0, 1.0, eager_attention_forward, True,
        )  # fmt: skip
        return (context, weights) if output_attentions else (context,)

    def _tl_align_attention_inputs(self, hidden_states, attention_mask):
        """Query, key, value `(B * windows, H, N, D)` and the `(B * windows, H, N, N)` additive mask."""
        batch_size, num_tokens, _ = hidden_states.shape  # (B * windows, window_size**2, C)
        heads = (batch_size, num_tokens, self.num_attention_heads, self.attention_head_size)
        query, key, value = (layer(hidden_states).view(heads).transpose(1, 2) for layer in (self.query, self.key, self.value))
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()  # (H, 1, 1)
        query = torch.nn.functional.normalize(query, dim=-1) * logit_scale
        key = torch.nn.functional.normalize(key, dim=-1)
        bias_table = self.continuous_position_bias_mlp(self.relative_coords_table).view(-1, self.num_attention_heads)
        bias = bias_table[self.relative_position_index.view(-1)].view(num_tokens, num_tokens, -1).permute(2, 0, 1)
        mask = 16 * torch.sigmoid(bias).unsqueeze(0)  # (1, H, N, N)
        if attention_mask is not None:  # (windows, N, N) shift mask, repeated over the images of the batch
            num_windows = attention_mask.shape[0]
            shift_mask = attention_mask[None, :, None]
            mask = (mask[None] + shift_mask + shift_mask).expand(batch_size // num_windows, -1, -1, -1, -1)
            mask = mask.reshape(batch_size, -1, num_tokens, num_tokens)
        return query, key, value, mask


class TLAlignSwinv2ForImageClassification(_SwinRouting, TLAlignMixin, Swinv2ForImageClassification):
    """:class:`~transformers.Swinv2ForImageClassification` with token-label alignment.

    The shares follow the tokens through the windows, shifts and patch merging exactly as for Swin (same hooks on
    the Swin V2 layers and stages). Swin V2's attention runs outside the attention interface (cosine similarity,
    clamped logit scale, continuous position bias); its modules become :class:`_TLAlignSwinv2SelfAttention`, which
    computes each window's ``mean_h(P_h) @ s`` from those probabilities, before attention dropout. The blocks are
    post-norm (``x + norm(attention(x))``): still one residual attention branch, so the rule is unchanged. The
    aligned share is the mean of the final shares, as the classifier mean-pools the final tokens.
    """

    tl_align_parent = Swinv2ForImageClassification
    tl_align_num_prefix_tokens = 0
    tl_align_pooling = "patch_mean"
    tl_align_attention_classes = {Swinv2SelfAttention: _TLAlignSwinv2SelfAttention}
    tl_align_aligner_holders = (Swinv2Layer, Swinv2Stage)


