"""The value channel without copies: projections that produce query, key and value already widened.

The value channel (:mod:`tl_align_hf.attention`) runs the fused kernel on query, key and value of head dim
``D + extra`` (``extra`` channels per head: the share channels in the values, zeros elsewhere). Built from the
module's ``(B, H, N, D)`` tensors that costs a copy of query, key and value per block, of the output back, and of
their gradients in backward. Most attention modules of transformers are shaped like Llama's::

    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)      # same for key and value
    output, weights = attention_interface(self, query, key, value, mask, ...)
    output = self.o_proj(output.reshape(*input_shape, -1).contiguous())

For one aligned call on the value-channel path, such a module's ``head_dim`` reads ``D + extra`` and its query,
key and value projections compute with ``extra`` zero rows appended after each head's ``D`` rows (weight and
bias, built each call from the real parameters: a copy of a `(dim, dim)` weight, not of the `(B, N, dim)`
activations), so the view gives `(B, H, N, D + extra)` tensors directly; the attention function writes the share
channels into the value's extra channels and returns the wide `(B, N, H, D + extra)` output, whose reshape is free;
the output projection computes with ``extra`` zero columns after each head's ``D`` columns, so the extra channels
add nothing to the block's output. Zero rows and columns add exact zeros: the block's output and every gradient are
those of the copy-based value channel up to float summation order, and gradients reach the real parameters through
the small weight copies. No gradient flows into the extra channels (the output projection's columns there are
zero), so the write of the share channels is hidden from autograd.

Without an aligned call (no aligner, or another path: eager, explicit) nothing changes: the projections are the
parent's ``nn.Linear`` forward and ``head_dim`` is the module's own. Modules qualify when their four projections
are exactly ``torch.nn.Linear`` of matching shapes and they have an integer ``head_dim`` (ViT, DeiT, ViT-MSN,
DINOv2, I-JEPA, BEiT, CLIP, MetaCLIP 2, SigLIP, Swin); a projection replaced later (a peft ``lora.Linear``) turns
the widening off for that module at its next call, and the copy-based value channel runs instead.
:func:`restore_projections` puts a model back as it was.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
OUTPUT_PROJECTIONS = ("o_proj", "out_proj")  # the name differs between families (CLIP, SigLIP: out_proj)
WIDENED_ATTRIBUTE = "tl_align_widened"  # the attention module's WidenedLayout during an aligned call, else None
_HOOKS_ATTRIBUTE = "_tl_align_widening_hooks"


class WidenedLayout(NamedTuple):
    """The head layout of one widened call: ``head_dim`` real channels, then ``extra`` (the first
    ``num_share_channels`` of them carry the shares in the values, the rest are zeros)."""

    num_heads: int
    head_dim: int
    extra: int
    num_share_channels: int


class _WidenedRowsLinear(torch.nn.Linear):
    """A query / key / value projection: the parent's ``nn.Linear`` unless ``tl_align_layout`` is set, then
    `(..., in_features)` -> `(..., num_heads * (head_dim + extra))` with zero outputs in each head's extra channels."""

    tl_align_layout: WidenedLayout | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        layout = self.tl_align_layout
        if layout is None:
            return super().forward(input)
        num_heads, head_dim, extra, _ = layout
        weight = self.weight.reshape(num_heads, head_dim, -1)
        weight = torch.cat([weight, weight.new_zeros(num_heads, extra, weight.shape[-1])], dim=1).flatten(0, 1)
        bias = self.bias
        if bias is not None:
            bias = bias.reshape(num_heads, head_dim)
            bias = torch.cat([bias, bias.new_zeros(num_heads, extra)], dim=1).flatten()
        return F.linear(input, weight, bias)


class _WidenedColumnsLinear(torch.nn.Linear):
    """An output projection: the parent's ``nn.Linear`` unless ``tl_align_layout`` is set, then
    `(..., num_heads * (head_dim + extra))` -> `(..., out_features)`, each head's extra channels ignored."""

    tl_align_layout: WidenedLayout | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        layout = self.tl_align_layout
        if layout is None:
            return super().forward(input)
        num_heads, head_dim, extra, _ = layout
        weight = self.weight.reshape(-1, num_heads, head_dim)
        weight = torch.cat([weight, weight.new_zeros(weight.shape[0], num_heads, extra)], dim=2).flatten(1)
        return F.linear(input, weight, self.bias)


_WIDENED_CLASSES = (_WidenedRowsLinear, _WidenedColumnsLinear)


def _output_projection_name(module: torch.nn.Module) -> str | None:
    return next((name for name in OUTPUT_PROJECTIONS if hasattr(module, name)), None)


def qualifies(module: torch.nn.Module) -> bool:
    """Whether ``module`` has Llama-shaped projections that can be widened: ``q_proj``, ``k_proj``, ``v_proj`` of
    `(num_heads * head_dim, dim)` and ``o_proj`` / ``out_proj`` of `(dim_out, num_heads * head_dim)`, each exactly a
    ``torch.nn.Linear`` (or already widenable), and an integer ``head_dim``."""
    head_dim = getattr(module, "head_dim", None)
    output_name = _output_projection_name(module)
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0 or output_name is None:
        return False
    projections = [getattr(module, name, None) for name in (*INPUT_PROJECTIONS, output_name)]
    if not all(type(linear) in (torch.nn.Linear, *_WIDENED_CLASSES) for linear in projections):
        return False
    width = projections[0].out_features
    return (
        width % head_dim == 0
        and all(linear.out_features == width for linear in projections[:3])
        and projections[3].in_features == width
    )


def _widenable_now(module: torch.nn.Module) -> bool:
    """The module's projections are still the ones installed (peft or a user may have replaced them since)."""
    return all(type(getattr(module, name, None)) is _WidenedRowsLinear for name in INPUT_PROJECTIONS) and (
        type(getattr(module, _output_projection_name(module) or "", None)) is _WidenedColumnsLinear
    )


def widened_layout(module: torch.nn.Module) -> WidenedLayout | None:
    """The layout of the aligned call ``module`` is in, or ``None`` (the attention function's query, key and value
    then have the module's own head dim)."""
    return getattr(module, WIDENED_ATTRIBUTE, None)


def _set_layout(module: torch.nn.Module, layout: WidenedLayout | None) -> None:
    for name in (*INPUT_PROJECTIONS, _output_projection_name(module)):
        getattr(module, name).tl_align_layout = layout
    setattr(module, WIDENED_ATTRIBUTE, layout)


def _widen(layout_of_call: Callable, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    layout = layout_of_call(module, args, kwargs) if _widenable_now(module) else None
    if layout is not None:
        _set_layout(module, layout)
        module.head_dim = layout.head_dim + layout.extra


def _narrow(module: torch.nn.Module, args: tuple, kwargs: dict, output) -> None:
    layout = widened_layout(module)
    if layout is not None:
        module.head_dim = layout.head_dim
        _set_layout(module, None)


def install_widened_projections(
    module: torch.nn.Module, layout_of_call: Callable[[torch.nn.Module, tuple, dict], WidenedLayout | None]
) -> bool:
    """Make ``module``'s projections widenable (once); return whether it qualifies.

    Before each call of ``module``, ``layout_of_call(module, args, kwargs)`` says whether it runs widened and how;
    after the call (even one that raises) the module and its projections are the parent's again.
    """
    if getattr(module, _HOOKS_ATTRIBUTE, None) is not None:
        return True
    if not qualifies(module):
        return False
    for name in INPUT_PROJECTIONS:
        getattr(module, name).__class__ = _WidenedRowsLinear
    getattr(module, _output_projection_name(module)).__class__ = _WidenedColumnsLinear
    setattr(module, WIDENED_ATTRIBUTE, None)
    hooks = (
        module.register_forward_pre_hook(functools.partial(_widen, layout_of_call), with_kwargs=True),
        module.register_forward_hook(_narrow, with_kwargs=True, always_call=True),
    )
    setattr(module, _HOOKS_ATTRIBUTE, hooks)
    return True


def restore_projections(model: torch.nn.Module) -> int:
    """Undo :func:`install_widened_projections` on every module of ``model``: the hooks are removed and the
    projections are plain ``torch.nn.Linear`` again (same parameters); return how many modules were restored.
    The value channel then copies query, key and value (the fallback path)."""
    restored = 0
    for module in model.modules():
        hooks = getattr(module, _HOOKS_ATTRIBUTE, None)
        if hooks is None:
            continue
        for hook in hooks:
            hook.remove()
        for child in module.children():
            if type(child) in _WIDENED_CLASSES:
                child.__class__ = torch.nn.Linear
                child.__dict__.pop("tl_align_layout", None)
        delattr(module, _HOOKS_ATTRIBUTE)
        delattr(module, WIDENED_ATTRIBUTE)
        restored += 1
    return restored
