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

from .mixer import MIXING_KEYS


def _check_dtypes_and_shapes(
    mix_index: torch.Tensor, token_weights: torch.Tensor, mix_lam: torch.Tensor, batch_size: int, num_patches: int
) -> None:
    for name, value in zip(MIXING_KEYS, (mix_index, token_weights, mix_lam)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}.")
    if mix_index.dtype.is_floating_point or mix_index.dtype == torch.bool or mix_index.is_complex():
        raise TypeError(f"`mix_index` must be an integer (long) tensor, got dtype {mix_index.dtype}.")
    for name, value in (("token_weights", token_weights), ("mix_lam", mix_lam)):
        if not torch.is_floating_point(value):
            raise TypeError(f"`{name}` must be a floating-point tensor with values in [0, 1], got dtype {value.dtype}.")
    if tuple(mix_index.shape) != (batch_size,):
        raise ValueError(f"`mix_index` must have shape ({batch_size},) (one partner per image), got {tuple(mix_index.shape)}.")
    if tuple(token_weights.shape) != (batch_size, num_patches):
        raise ValueError(
            f"`token_weights` must have shape (batch_size, num_patches) = ({batch_size}, {num_patches}) for these "
            f"images, got {tuple(token_weights.shape)}. Build it with the model's patch size and the image size "
            "actually fed to the model."
        )
    if tuple(mix_lam.shape) != (batch_size,):
        raise ValueError(f"`mix_lam` must have shape ({batch_size},) (one share per image), got {tuple(mix_lam.shape)}.")


def _check_values(mix_index: torch.Tensor, token_weights: torch.Tensor, mix_lam: torch.Tensor, batch_size: int):
    """Value ranges: a ValueError on the CPU (the data is on the host), an asynchronous device assert elsewhere.

    On an accelerator, or while `torch.compile` traces, reading a value back would stall the device's queue (and
    break the graph), so the check is queued with the computation (`torch._assert_async`) instead.
    """
    checks = (
        ("mix_index", mix_index, 0, batch_size - 1, "index into the batch"),
        ("token_weights", token_weights, 0, 1, "hold the share of each patch's pixels from the sample itself"),
        ("mix_lam", mix_lam, 0, 1, "hold the share of each image from the sample itself"),
    )
    on_host = mix_index.device.type == "cpu" and not torch.compiler.is_compiling()
    for name, values, low, high, meaning in checks:
        in_range = ((values >= low) & (values <= high)).all()
        message = f"`{name}` must {meaning}, i.e. hold values in [{low}, {high}]"
        if not on_host:
            torch._assert_async(in_range, message + " (TLAlignCollator produces valid values).")
        elif not bool(in_range):
            raise ValueError(
                f"{message}, got values in [{values.min().item():.4g}, {values.max().item():.4g}]. Pass the batch "
                "that TLAlignCollator produces."
            )


def validate_mixing_inputs(
    mix_index: torch.Tensor, token_weights: torch.Tensor, mix_lam: torch.Tensor, batch_size: int, num_patches: int
) -> None:
    """Raise a clear error when the batch-contract tensors do not fit the batch.

    Dtypes and shapes are checked on the host; value ranges never cost a device sync (see :func:`_check_values`).

    Args:
        mix_index: `(B,)` integer tensor, partner of each sample, values in `[0, B)`.
        token_weights: `(B, num_patches)` float tensor in [0, 1], row-major over the patch grid.
        mix_lam: `(B,)` float tensor in [0, 1].
        batch_size: `B`, the number of images in `pixel_values`.
        num_patches: patch tokens per image for the current image size.
    """
    _check_dtypes_and_shapes(mix_index, token_weights, mix_lam, batch_size, num_patches)
    if batch_size:
        _check_values(mix_index, token_weights, mix_lam, batch_size)


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
