"""Token-label alignment state: per-token label shares traced through attention.

TL-Align (Xiao et al., "Token-Label Alignment for Vision Transformers", ICCV 2023, arXiv 2210.06455) follows
each token's label through the attention maps of a vision transformer. Every token label is a convex combination
of the labels of a sample and its mixing partner, and the per-block update is linear, so one scalar per token, the
share ``s`` of the sample's own label, carries the whole label (see docs/algorithm.md). This module holds that state:

    s_0 = [mix_lam (for each prefix token: CLS, distillation, registers), token_weights (patch tokens)]
    s   <- (s + mean_h(P_h) @ s) / 2          once per transformer block
    aligned_lam = read-out of s after the last block (CLS share for CLS-pooled models)

How ``mean_h(P_h) @ s`` is computed from a block's attention is the job of :mod:`tl_align_hf.attention`. Models whose
attention sees the tokens re-arranged (Swin's shifted windows) give the aligner a :class:`TokenLayout` per block, so
that the shares follow the tokens; models that merge tokens (Swin's patch merging) call :meth:`merge_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch


class TokenLayout(Protocol):
    """How one block's attention sees the tokens, when not as the `(B, N)` sequence itself (Swin's windows)."""

    def to_attention(self, shares: torch.Tensor) -> torch.Tensor:
        """`(B, N)` shares -> `(B', N')` shares in the attention's batch and token order (padding filled in)."""

    def from_attention(self, attended: torch.Tensor) -> torch.Tensor:
        """`(B', N')` attended shares -> `(B, N)` in the model's token order (padding dropped)."""


class TokenLabelAligner:
    """Holds the `(B, N)` label shares of all tokens and applies the per-block TL-Align update.

    One aligner lives for one forward pass. The attention functions of :mod:`tl_align_hf.attention` receive it as the
    keyword argument ``token_label_aligner`` and call :meth:`update` once per block with ``mean_h(P_h) @ s``.
    After the forward pass the model calls :meth:`close`, so that forward passes recomputed later for gradient
    checkpointing leave the shares untouched.

    Args:
        token_weights: `(B, num_patches)` share of each patch's pixels that come from the sample itself.
        mix_lam: `(B,)` share of the whole image from the sample itself; start value of every prefix token.
        num_prefix_tokens: tokens in front of the patch tokens (1 for ViT's CLS, 2 for DeiT's CLS + distillation,
            1 + registers for DINOv2 with registers, 0 for models without a CLS token such as Swin).
        attention_path: how shares are computed from attention; see :func:`tl_align_hf.attention.choose_path`.
    """

    def __init__(
        self,
        token_weights: torch.Tensor,
        mix_lam: torch.Tensor,
        num_prefix_tokens: int,
        attention_path: str = "auto",
    ):
        prefix_shares = mix_lam.detach().float()[:, None].expand(-1, num_prefix_tokens)
        # (B, N) float32 shares, no gradient: the model may run in bf16/fp16, the shares never do.
        self.shares = torch.cat([prefix_shares, token_weights.detach().float()], dim=1)
        self.mix_lam = mix_lam.detach().float()
        self.attention_path = attention_path
        self.layout: TokenLayout | None = None
        self.num_updates = 0
        self.closed = False

    def attention_shares(self) -> torch.Tensor:
        """The current shares as the block's attention sees its tokens: `(B, N)`, or `(B', N')` under a layout."""
        return self.shares if self.layout is None else self.layout.to_attention(self.shares)

    def update(self, attended_shares: torch.Tensor) -> None:
        """Apply one block's update ``s <- (s + mean_h(P_h) @ s) / 2``.

        Args:
            attended_shares: the head-averaged attention applied to :meth:`attention_shares`, same shape.
        """
        if self.closed:  # a forward pass recomputed for gradient checkpointing: the update was already applied
            return
        attended_shares = attended_shares.detach().float()
        if self.layout is not None:
            attended_shares = self.layout.from_attention(attended_shares)
        self.shares = (self.shares + attended_shares) * 0.5
        self.num_updates += 1

    def merge_tokens(self, merge: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the `(B, N)` shares by `merge(shares)` `(B, N')` where the model merges tokens (Swin)."""
        if not self.closed:
            self.shares = merge(self.shares)

    def close(self, expected_updates: int) -> None:
        """End the forward pass; raise if the attention did not report exactly once per block."""
        self.closed = True
        if self.num_updates != expected_updates:
            raise RuntimeError(
                f"TL-Align expected {expected_updates} attention updates (one per block) but received "
                f"{self.num_updates}. Some attention module no longer sees the aligned routing (it was replaced, or "
                "its `config` attribute was reset): call `model.tl_align_route_attention()` (or `to_tl_align`) again."
            )
