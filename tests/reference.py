"""Independent reference for TL-Align: the official formulation with full label vectors.

Runs a *vanilla* transformers model with eager attention and ``output_attentions=True`` and propagates
`(B, N, C)` label-smoothed one-hot vectors with ``L <- (L + mean_h(A_h) @ L) / 2`` per block, in float64.
Swin (V1 and V2), whose attention runs per window and whose ``output_attentions`` keeps one block per stage, is
followed with hooks that record every block's attention and geometry. Shares nothing with ``tl_align_hf`` but the batch it is given.
"""

from __future__ import annotations

import torch


def _start_labels(batch: dict, num_classes: int, num_prefix_tokens: int, label_smoothing: float):
    """`(B, N, C)` token labels before the first block, and `(B, C)` the area-mixed label (of CLS-like tokens)."""
    smoothed = torch.full((len(batch["labels"]), num_classes), label_smoothing / num_classes, dtype=torch.float64)
    smoothed[torch.arange(len(batch["labels"])), batch["labels"]] += 1.0 - label_smoothing
    own, partner = smoothed, smoothed[batch["mix_index"]]
    prefix = batch["mix_lam"].double()[:, None].expand(-1, num_prefix_tokens)
    start_share = torch.cat([prefix, batch["token_weights"].double()], dim=1)[..., None]  # (B, N, 1)
    area_share = batch["mix_lam"].double()[:, None]
    return start_share * own[:, None, :] + (1 - start_share) * partner[:, None, :], area_share * own + (1 - area_share) * partner


def reference_token_labels(vanilla_model, batch: dict, num_prefix_tokens: int, label_smoothing: float = 0.1, **forward_kwargs):
    """`(B, N, C)` float64 labels of all tokens after the last block."""
    with torch.no_grad():
        outputs = vanilla_model(batch["pixel_values"], output_attentions=True, **forward_kwargs)
    config = getattr(vanilla_model.config, "vision_config", None) or vanilla_model.config
    token_labels, _ = _start_labels(batch, vanilla_model.config.num_labels, num_prefix_tokens, label_smoothing)
    assert len(outputs.attentions) == config.num_hidden_layers
    for attention in outputs.attentions:
        token_labels = (token_labels + attention.double().mean(dim=1) @ token_labels) / 2
    return token_labels


def reference_cls_labels(vanilla_model, batch: dict, num_prefix_tokens: int, label_smoothing: float = 0.1, **forward_kwargs):
    """`(B, C)` float64 label of the class token after the last block."""
    return reference_token_labels(vanilla_model, batch, num_prefix_tokens, label_smoothing, **forward_kwargs)[:, 0]


def _swin_module_classes(vanilla_model) -> tuple[type, type, type]:
    """The (attention, layer, stage) classes of a Swin V1 or V2 model."""
    if vanilla_model.config.model_type == "swinv2":
        from transformers.models.swinv2.modeling_swinv2 import Swinv2Attention, Swinv2Layer, Swinv2Stage

        return Swinv2Attention, Swinv2Layer, Swinv2Stage
    from transformers.models.swin.modeling_swin import SwinAttention, SwinLayer, SwinStage

    return SwinAttention, SwinLayer, SwinStage


def _record_swin_blocks(vanilla_model, pixel_values: torch.Tensor) -> list[dict]:
    """Per block, in order: its token grid, window and shift sizes (as used) and `(B * windows, H, w*w, w*w)` attention."""
    SwinAttention, SwinLayer, SwinStage = _swin_module_classes(vanilla_model)
    blocks, handles = [], []

    def record_attention(module, args, output):
        blocks.append({"attention": output[1].double()})

    def record_layer(layer, args, output):  # runs after its attention: the sizes are those the layer used
        blocks[-1].update(grid=tuple(args[1]), window=int(layer.window_size), shift=int(layer.shift_size))

    def record_stage(stage, args, output):
        blocks[-1]["merge_after"] = stage.downsample is not None

    for module in vanilla_model.modules():
        hook = {SwinAttention: record_attention, SwinLayer: record_layer, SwinStage: record_stage}.get(type(module))
        if hook is not None:
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            vanilla_model(pixel_values, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    return blocks


def reference_swin_labels(vanilla_model, batch: dict, label_smoothing: float = 0.1):
    """`(B, C)` float64 label of Swin's (V1 or V2) mean-pooled output, the labels following the tokens.

    Per block: the grid is padded to whole windows with the area-mixed label (padding holds no pixels of either
    image, like a CLS token), rolled by the shift, cut into windows, mixed by that window's head-averaged attention,
    and put back. Patch merging averages each 2x2 group of real tokens. The output label is the mean over tokens.
    """
    blocks = _record_swin_blocks(vanilla_model, batch["pixel_values"])
    labels, area_label = _start_labels(batch, vanilla_model.config.num_labels, 0, label_smoothing)
    batch_size, num_classes = area_label.shape
    for block in blocks:
        (height, width), window, shift = block["grid"], block["window"], block["shift"]
        padded_h, padded_w = -(-height // window) * window, -(-width // window) * window
        grid = area_label[:, None, None, :].repeat(1, padded_h, padded_w, 1)
        grid[:, :height, :width] = labels.view(batch_size, height, width, num_classes)
        grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))
        rows, cols = padded_h // window, padded_w // window
        windows = grid.view(batch_size, rows, window, cols, window, num_classes).permute(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(batch_size * rows * cols, window * window, num_classes)
        mixed = block["attention"].mean(dim=1) @ windows
        mixed = mixed.view(batch_size, rows, cols, window, window, num_classes).permute(0, 1, 3, 2, 4, 5)
        mixed = torch.roll(mixed.reshape(batch_size, padded_h, padded_w, num_classes), shifts=(shift, shift), dims=(1, 2))
        labels = (labels + mixed[:, :height, :width].reshape(batch_size, height * width, num_classes)) / 2
        if block.get("merge_after"):
            even = torch.full((batch_size, height + height % 2, width + width % 2, num_classes), float("nan"), dtype=torch.float64)
            even[:, :height, :width] = labels.view(batch_size, height, width, num_classes)
            groups = torch.stack([even[:, row::2, col::2] for row in (0, 1) for col in (0, 1)])
            labels = groups.nanmean(dim=0).reshape(batch_size, -1, num_classes)
    return labels.mean(dim=1)
