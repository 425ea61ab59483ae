"""Independent reference for TL-Align: the official formulation with full label vectors.

Runs a *vanilla* transformers model with eager attention and ``output_attentions=True`` and propagates
`(B, N, C)` label-smoothed one-hot vectors with ``L <- (L + mean_h(A_h) @ L) / 2`` per block, in float64.
Shares nothing with ``tl_align_hf`` but the batch it is given.
"""

from __future__ import annotations

import torch


def reference_cls_labels(vanilla_model, batch: dict, num_prefix_tokens: int, label_smoothing: float = 0.1, **forward_kwargs):
    """`(B, C)` float64 label of the class token after the last block."""
    num_classes = vanilla_model.config.num_labels
    with torch.no_grad():
        outputs = vanilla_model(batch["pixel_values"], output_attentions=True, **forward_kwargs)
    smoothed = torch.full((len(batch["labels"]), num_classes), label_smoothing / num_classes, dtype=torch.float64)
    smoothed[torch.arange(len(batch["labels"])), batch["labels"]] += 1.0 - label_smoothing
    own, partner = smoothed, smoothed[batch["mix_index"]]
    prefix = batch["mix_lam"].double()[:, None].expand(-1, num_prefix_tokens)
    start_share = torch.cat([prefix, batch["token_weights"].double()], dim=1)[..., None]  # (B, N, 1)
    token_labels = start_share * own[:, None, :] + (1 - start_share) * partner[:, None, :]  # (B, N, C)
    assert len(outputs.attentions) == vanilla_model.config.num_hidden_layers
    for attention in outputs.attentions:
        token_labels = (token_labels + attention.double().mean(dim=1) @ token_labels) / 2
    return token_labels[:, 0]
