"""Model EMA: an exponential moving average of the weights (Polyak averaging; timm's `ModelEmaV3`, DeiT's
`ModelEma`), which fine-tuning recipes (DeiT III, BEiT, DINOv2 linear and full fine-tuning) evaluate beside the
trained weights. `TLAlignTrainer` keeps one with `ema_decay`, updates it after every optimizer step, evaluates it
(`eval_ema_*`) and saves it as a model of its own in `<output_dir or checkpoint>/ema`.
"""

from __future__ import annotations

import contextlib

import torch


class ModelEma:
    """The moving average of `model`'s floating-point parameters and buffers, on their device and in their dtype.

    After each optimizer step, `update(model)` sets `ema = decay * ema + (1 - decay) * weight` for each parameter
    and floating-point buffer (other buffers are copied). `swapped_into(model)` puts the averages into the model
    for a `with` block (evaluation, saving) and the trained weights back afterwards, bit for bit.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> ema = ModelEma(model, decay=0.9)
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1.0)
        >>> ema.update(model)  # 0.9 * old + 0.1 * (old + 1) = old + 0.1
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.averages = [tensor.detach().clone() for tensor in self._tensors(model)]

    @staticmethod
    def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
        return [*model.parameters(), *model.buffers()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One EMA step from `model`'s current weights (no host sync)."""
        averaged, copied = [], []
        for average, tensor in zip(self.averages, self._tensors(model), strict=True):
            (averaged if average.is_floating_point() else copied).append((average, tensor.detach()))
        if averaged:
            torch._foreach_lerp_([pair[0] for pair in averaged], [pair[1] for pair in averaged], 1.0 - self.decay)
        for average, tensor in copied:
            average.copy_(tensor)

    @contextlib.contextmanager
    def swapped_into(self, model: torch.nn.Module):
        """Within the block, `model` holds the averages (and this object the trained weights)."""
        self._swap(model)
        try:
            yield model
        finally:
            self._swap(model)

    def _swap(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for average, tensor in zip(self.averages, self._tensors(model), strict=True):
                trained = tensor.detach().clone()
                tensor.copy_(average)
                average.copy_(trained)
