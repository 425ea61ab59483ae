"""Token geometry of timm's Swin Transformers (``SwinTransformer``, ``SwinTransformerV2``) for the aligner.

As for transformers' Swin (:class:`~tl_align_hf.models.swin.TLAlignSwinForImageClassification`), the shares follow the
tokens: each block's attention sees them exactly as timm's ``_attn`` arranges the hidden states (cyclic shift first,
then padding to whole windows, then the window partition; the shift mask and the relative position bias are part of
the probabilities), and the update is mapped back to the token grid; patch merging, which timm runs at the start of
a stage, takes the mean of each 2x2 group of real tokens (:func:`~tl_align_hf.models.swin.merge_2x2_shares`). Padded
positions hold ``mix_lam``: zero tokens carry no pixels of either image, like a class token.

Hooks on the blocks and merging layers read the aligner that the model puts on them for an aligned forward pass
(``ALIGNER_ATTRIBUTE``); without one they do nothing.
"""

from __future__ import annotations

import functools

import torch
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, window_partition, window_reverse
from timm.models.swin_transformer_v2 import PatchMerging as PatchMergingV2
from timm.models.swin_transformer_v2 import SwinTransformerV2Block
from torch.utils.hooks import RemovableHandle

from ..attention import ALIGNER_ATTRIBUTE
from .swin import merge_2x2_shares

SWIN_BLOCKS = (SwinTransformerBlock, SwinTransformerV2Block)
SWIN_MERGING = (PatchMerging, PatchMergingV2)


class _TimmSwinWindows:
    """The token layout of one timm Swin block's attention: its cyclic shift, padding and window partition."""

    def __init__(self, block: torch.nn.Module, height: int, width: int, fill: torch.Tensor):
        self.block, self.height, self.width = block, height, width
        self.fill = fill[:, None, None, None]  # (B, 1, 1, 1)

    def to_attention(self, shares: torch.Tensor) -> torch.Tensor:
        """`(B, H*W)` -> `(B * num_windows, window_h * window_w)`."""
        (window_h, window_w), (shift_h, shift_w) = self.block.window_size, self.block.shift_size
        grid = torch.roll(shares.view(-1, self.height, self.width, 1), shifts=(-shift_h, -shift_w), dims=(1, 2))
        padding = (0, 0, 0, -self.width % window_w, 0, -self.height % window_h)
        grid = torch.nn.functional.pad(grid - self.fill, padding) + self.fill
        self.padded_size = tuple(grid.shape[1:3])
        windows = window_partition(grid, (window_h, window_w))
        return windows.reshape(windows.shape[0], -1)

    def from_attention(self, attended: torch.Tensor) -> torch.Tensor:
        """`(B * num_windows, window_h * window_w)` -> `(B, H*W)`."""
        window_size, shift_size = self.block.window_size, self.block.shift_size
        windows = attended.view(-1, *window_size, 1)
        grid = window_reverse(windows, window_size, *self.padded_size)[:, : self.height, : self.width]
        return torch.roll(grid, shifts=tuple(shift_size), dims=(1, 2)).reshape(grid.shape[0], -1)


def _block_pre_hook(block: torch.nn.Module, args: tuple) -> None:
    aligner = getattr(block, ALIGNER_ATTRIBUTE, None)
    if aligner is not None and not aligner.closed:
        _, height, width, _ = args[0].shape  # (B, H, W, C)
        aligner.layout = _TimmSwinWindows(block, height, width, aligner.mix_lam)


def _block_hook(block: torch.nn.Module, args: tuple, output) -> None:
    aligner = getattr(block, ALIGNER_ATTRIBUTE, None)
    if aligner is not None:
        aligner.layout = None


def _merging_pre_hook(merging: torch.nn.Module, args: tuple) -> None:
    aligner = getattr(merging, ALIGNER_ATTRIBUTE, None)
    if aligner is not None:
        _, height, width, _ = args[0].shape  # (B, H, W, C)
        aligner.merge_tokens(functools.partial(merge_2x2_shares, height=height, width=width))


def install_swin_hooks(timm_model: torch.nn.Module) -> list[RemovableHandle]:
    """Register the geometry hooks on a timm Swin model's blocks and patch-merging layers; return their handles."""
    handles = []
    for module in timm_model.modules():
        if isinstance(module, SWIN_BLOCKS):
            handles.append(module.register_forward_pre_hook(_block_pre_hook))
            handles.append(module.register_forward_hook(_block_hook, always_call=True))
        elif isinstance(module, SWIN_MERGING):
            handles.append(module.register_forward_pre_hook(_merging_pre_hook))
    return handles


def swin_blocks(timm_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a timm Swin model, stage by stage."""
    return [block for stage in timm_model.layers for block in stage.blocks]
