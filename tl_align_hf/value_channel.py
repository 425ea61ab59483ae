"""The value channel: the shares ride through the fused attention kernel as extra value channels.

For a block on the ``value_channel`` path (:mod:`tl_align_hf.attention`), the kernel runs on query, key and value of
head dim ``D + extra``: the centred shares in the first one or two extra value channels (:func:`num_share_channels`),
zeros everywhere else, so the output's extra channels hold ``P_h @ s`` and no ``N x N`` matrix is formed. ``extra``
is 1 or 2 on the CPU, up to a multiple of 8 on accelerators (:func:`value_channel_width`). Two ways to get there:

- **widened projections** (no copies). Most attention modules of transformers are shaped like Llama's::

      hidden_shape = (*input_shape, -1, self.head_dim)
      query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)      # same for key and value
      output, weights = attention_interface(self, query, key, value, mask, ...)
      output = self.o_proj(output.reshape(*input_shape, -1).contiguous())

  For one aligned call on the value-channel path (:func:`install_widened_projections`; the attention module decides
  in a forward pre-hook), such a module's ``head_dim`` reads ``D + extra`` and its query, key and value projections
  compute with ``extra`` zero rows after each head's ``D`` rows (weight and bias built per call from the real
  parameters: a copy of a `(dim, dim)` weight, not of the `(B, N, dim)` activations), so the view gives
  `(B, H, N, D + extra)` directly; the share channels are written into the value's extra channels; the wide
  `(B, N, H, D + extra)` output reshapes for free, and the output projection computes with zero columns there, so the
  extra channels add exact zeros to the block's output. The output and every gradient are those of the copy-based
  way up to float summation order; gradients reach the real parameters through the small weight copies, and none
  flows into the extra channels (the output projection's columns there are zero), so the write of the shares is
  hidden from autograd. Outside such a call (no aligner, or the eager / explicit path) the projections run the
  parent's ``nn.Linear`` forward and ``head_dim`` is the module's own. Modules qualify (:func:`qualifies`) when their
  four projections are exactly ``torch.nn.Linear`` of matching shapes and ``head_dim`` is an integer (ViT, DeiT,
  ViT-MSN, DINOv2, I-JEPA, BEiT, CLIP, MetaCLIP 2, SigLIP, Swin); a projection replaced later (a peft
  ``lora.Linear``) turns the widening off for that module at its next call. :func:`restore_projections` undoes it.
- **copies** (the fallback: other modules, Data2Vec-Vision, timm, peft-wrapped projections, restored models):
  :func:`value_channel_attention` widens the module's `(B, H, N, D)` query, key and value by concatenation and
  splits the output, which costs a copy of each per block, and of their gradients in backward.
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


# Head dims the fused kernels accept: a multiple of 8 on accelerators (flash / memory-efficient kernels); any on the
# CPU, whose flash kernel tiles the head dim itself, so the value channel adds one channel there instead of eight.
_CHANNEL_MULTIPLE = {"cpu": 1}
_ACCELERATOR_CHANNEL_MULTIPLE = 8


class WidenedLayout(NamedTuple):
    """The head layout of one widened call: ``head_dim`` real channels, then ``extra`` (the first
    ``num_share_channels`` of them carry the shares in the values, the rest are zeros)."""

    num_heads: int
    head_dim: int
    extra: int
    num_share_channels: int


def num_share_channels(dtype: torch.dtype) -> int:
    """How many value channels carry the shares through a kernel of ``dtype`` (:func:`_share_channels`)."""
    return 1 if dtype in (torch.float32, torch.float64) else 2


def value_channel_width(head_dim: int, num_share_channels: int, device_type: str) -> int:
    """The head dim of query, key and value on the value-channel path: ``head_dim + num_share_channels``, rounded up
    to the channel multiple the device's fused kernels accept."""
    multiple = _CHANNEL_MULTIPLE.get(device_type, _ACCELERATOR_CHANNEL_MULTIPLE)
    return -(-(head_dim + num_share_channels) // multiple) * multiple


def _share_channels(shares: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`(B, N)` float32 shares as the value channels that carry them through a kernel of `dtype`: `(B, N, K)`.

    In float32, one channel (the shares). In bf16 / fp16, two: ``hi = shares`` rounded to `dtype` and the rest
    ``lo = shares - hi``, also in `dtype`, so that the kernel sees the shares to about twice `dtype`'s precision
    (bf16 alone keeps 8 bits: a share of 0.3 would become 0.30078); their outputs are summed in float32.
    """
    shares = shares.detach().float()
    if num_share_channels(dtype) == 1:
        return shares.to(dtype)[..., None]
    high = shares.to(dtype)
    return torch.stack([high, (shares - high.float()).to(dtype)], dim=-1)


def _widened(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """`tensor` with zero channels appended up to `width` (a copy; the input itself when it has that width)."""
    missing = width - tensor.shape[-1]
    return tensor if missing == 0 else torch.cat([tensor, tensor.new_zeros(*tensor.shape[:-1], missing)], dim=-1)


def _attended_from_channels(share_output: torch.Tensor) -> torch.Tensor:
    """`(B, N, H, K)` outputs of the share channels -> `(B, N)` attended shares: summed in float32 (the high and low
    parts), averaged over heads, the centring undone."""
    return share_output.detach().float().sum(dim=-1).mean(dim=-1) + 0.5


def _value_channel_in_widened_projections(
    base_function: Callable, module, query, key, value, attention_mask, shares, layout: WidenedLayout, **call
):
    """The value channel on query, key and value that the module's projections widened already (`(B, H, N, W)`,
    zeros in each head's extra channels): the share channels are written into the value's, and the output keeps
    its width `(B, N, H, W)` for the widened output projection. Returns output, weights and `(B, N)` attended shares.
    """
    channels = _share_channels(shares - 0.5, value.dtype)  # (B, N, K), centred as in value_channel_attention
    num_channels = channels.shape[-1]
    expected = (layout.num_heads, layout.head_dim + layout.extra)
    if (value.shape[1], value.shape[-1]) != expected or num_channels > layout.extra:
        # a module whose forward splits the heads by something else than its `head_dim`, or an unforeseen dtype
        raise RuntimeError(
            f"{type(module).__name__}'s widened projections should give {expected[0]} heads of {expected[1]} channels "
            f"with room for {num_channels} share channel(s), but its attention received values of shape "
            f"{tuple(value.shape)} ({value.dtype}). Call `tl_align_hf.value_channel.restore_projections(model)` to "
            "use the copy-based value channel for this model."
        )
    # Not seen by autograd: no gradient reaches the extra channels (the output projection's columns there are zero).
    value.detach()[..., layout.head_dim : layout.head_dim + num_channels].copy_(channels[:, None])
    output, weights = base_function(module, query, key, value, attention_mask, **call)
    attended = _attended_from_channels(output[..., layout.head_dim : layout.head_dim + num_channels])
    return output, weights, attended


def value_channel_attention(base_function: Callable, module, query, key, value, attention_mask, shares, *, dropout, scaling, **kwargs):
    """Run the backend once on values widened by share channels; return output, weights and `(B, N)` attended shares.

    Where the module's projections produced query, key and value widened already (an aligned call of a module with
    :func:`install_widened_projections`), nothing is copied; otherwise (the fallback) they are widened here by copies.
    """
    layout = widened_layout(module)
    if layout is not None:
        call = dict(dropout=dropout, scaling=scaling, **kwargs)
        return _value_channel_in_widened_projections(
            base_function, module, query, key, value, attention_mask, shares, layout, **call
        )
    batch_size, num_heads, num_tokens, head_dim = value.shape
    # Centred at 1/2: attention rows sum to 1, so P @ (s - 1/2) + 1/2 = P @ s, and values within [-1/2, 1/2] halve
    # the rounding of the kernel's (bf16 / fp16) output channel.
    channels = _share_channels(shares - 0.5, value.dtype)  # (B, N, K)
    num_channels = channels.shape[-1]
    padded_dim = value_channel_width(head_dim, num_channels, value.device.type)
    share_values = channels[:, None].expand(batch_size, num_heads, num_tokens, num_channels)
    # Zero channels on query and key leave QK^T unchanged and keep all three head dims equal (the kernels need it).
    # `cat` with a small zero block, not `pad`: padding fills the whole widened tensor before copying into it.
    value = _widened(torch.cat([value, share_values], dim=-1), padded_dim)
    query, key = _widened(query, padded_dim), _widened(key, padded_dim)
    output, weights = base_function(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    # output is (B, N, H, padded_dim). `split`, not slicing: the gradient of a slice is a zero-filled tensor of the
    # whole width, that of a split only the (zero) gradient of the share channels next to the output's own.
    output, share_output, _ = output.split([head_dim, num_channels, padded_dim - head_dim - num_channels], dim=-1)
    return output, weights, _attended_from_channels(share_output)


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
    projections are plain ``torch.nn.Linear`` again (same parameters), also where peft has wrapped them since (its
    ``base_layer``); return how many attention modules were restored. The value channel then copies query, key and
    value (the fallback path)."""
    restored = 0
    for module in model.modules():
        if type(module) in _WIDENED_CLASSES:
            module.__class__ = torch.nn.Linear
            module.__dict__.pop("tl_align_layout", None)
        hooks = module.__dict__.pop(_HOOKS_ATTRIBUTE, None)
        if hooks is not None:
            for hook in hooks:
                hook.remove()
            module.__dict__.pop(WIDENED_ATTRIBUTE, None)
            restored += 1
    return restored
