"""Soft targets and the soft-target cross-entropy of mixed batches (ALGORITHM.md, "Read-out and loss")."""

from __future__ import annotations

import torch


def mixed_soft_targets(
    labels: torch.Tensor,
    mix_index: torch.Tensor,
    own_share: torch.Tensor,
    num_classes: int,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Targets ``own_share[i] * y~_{labels[i]} + (1 - own_share[i]) * y~_{labels[mix_index[i]]}``.

    ``y~ = (1 - label_smoothing) * onehot + label_smoothing / num_classes`` is smoothed before mixing.

    Args:
        labels: `(B,)` integer class of each sample.
        mix_index: `(B,)` partner of each sample.
        own_share: `(B,)` in [0, 1]: ``aligned_lam`` for TL-Align, the area ``mix_lam`` for plain mixing.
    Returns:
        `(B, num_classes)` float32 targets; each row sums to 1.
    """
    smoothed = torch.nn.functional.one_hot(labels, num_classes).float() * (1.0 - label_smoothing)
    smoothed = smoothed + label_smoothing / num_classes
    own_share = own_share.detach().float()[:, None]
    return own_share * smoothed + (1.0 - own_share) * smoothed[mix_index]


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``-(targets * log_softmax(logits)).sum(-1)``, averaged (``"mean"``) or summed (``"sum"``) over the batch."""
    per_sample = -(targets * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    raise ValueError(f"`reduction` must be 'mean' or 'sum', got {reduction!r}.")


def mixing_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mix_index: torch.Tensor,
    own_share: torch.Tensor,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Soft-target cross-entropy of `(B, C)` ``logits`` against :func:`mixed_soft_targets`."""
    targets = mixed_soft_targets(labels, mix_index, own_share, logits.shape[-1], label_smoothing)
    return soft_target_cross_entropy(logits, targets, reduction)
