"""The mixer: one draw per batch, on a stacked batch on any device.

Methods: CutMix with a pixel box (https://arxiv.org/abs/1905.04899), CutMix with a box on the patch grid (the
default of Token-Label Alignment, https://arxiv.org/abs/2210.06455), Mixup (https://arxiv.org/abs/1710.09412),
TokenMix-style random tokens (https://arxiv.org/abs/2207.08409), and a cut-style method switched with Mixup as in
timm's `Mixup`, whose parameters (`prob`, `switch_prob`, `mode`, `cutmix_minmax`, `correct_lam`) these mirror.

The settings are a :class:`~tl_align_hf.settings.MixingSettings` (declared, checked and documented there; a
`TLAlignConfig` works as is), of which :class:`TLAlignMixer` takes its own copy. The mixer is applied to a stacked `(B, C, H, W)` batch, as timm's
`Mixup` is in its training loop; `TLAlignCollator` calls it on the host, and a custom loop can call it after the
transfer to a GPU. Its randomness is the `torch.Generator` passed in: the draws (a few numbers per batch) are made
on the CPU, so box coordinates are known without a device sync, and only the pixel work runs on the batch's device.
:func:`mixing_generator` derives such a generator from integers (seed, rank, epoch, step...), so that nothing about
the random stream has to be saved to resume a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers.utils import logging

from .contract import MIXING_KEYS  # noqa: F401 (re-exported: the keys the mixer adds)
from .mixing import (
    box_pixel_mask,
    box_token_weights,
    cutmix_bbox_and_lam,
    cyclic_pairing,
    flip_pairing,
    mix_images,
    mutual_pairing,
    pair_leaders,
    paste_box,
    random_token_mask,
    sample_lam,
    stack_images,
    token_grid_bbox,
    token_mask_to_pixels,
)
from .patch_sequences import PatchSequenceMixing
from .settings import MixingSettings

logger = logging.get_logger(__name__)

PAIRINGS = ("permutation", "flip")


def mixing_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by `(seed, *keys)`: the same integers give the same stream, any change another one.

    `keys` say which draw this is, e.g. `(rank, epoch, step)` in a training loop; they are mixed with NumPy's
    `SeedSequence`, so nearby keys give unrelated streams. This is how the draws of a batch become a pure function of
    where it is in training, with no random state to save, rewind or replay.
    """
    entropy = [int(seed), *(int(key) for key in keys)]
    if any(value < 0 for value in entropy):
        raise ValueError(f"`seed` and `keys` must be non-negative integers, got {entropy}.")
    return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1))


def _as_size(value: Any, name: str) -> tuple[int, int]:
    """An int or a pair of ints (as in transformers configs) as `(height, width)` of positive ints."""
    pair = (value, value) if isinstance(value, int | np.integer) else value
    if (
        not isinstance(pair, tuple | list)
        or len(pair) != 2
        or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v > 0 for v in pair)
    ):
        raise ValueError(f"`{name}` must be a positive int or a (height, width) pair of positive ints, got {value!r}.")
    return int(pair[0]), int(pair[1])


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a small host tensor to `device` without making the host wait for the device's queue."""
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class _Cut(NamedTuple):
    """Cut regions of n draws: pixel boxes (n, 4) or a token mask (n, N); own shares (n, N); mix_lam (n,)."""

    boxes: torch.Tensor | None
    token_mask: torch.Tensor | None
    token_weights: torch.Tensor
    mix_lam: torch.Tensor

    def select(self, index: torch.Tensor) -> _Cut:
        return _Cut(*(None if part is None else part[index] for part in self))


@dataclass
class TLAlignMixer(PatchSequenceMixing):
    """Mixes a stacked batch into the TL-Align batch contract; one call is one batch's draw.

    Example:

    ```python
    >>> import torch
    >>> from tl_align_hf import MixingSettings, TLAlignMixer, mixing_generator
    >>> mixer = TLAlignMixer(MixingSettings(mixing_method="cutmix"), patch_size=16)
    >>> pixel_values = torch.rand(8, 3, 224, 224)
    >>> batch = mixer(pixel_values, mixing_generator(0, 1))   # a new, mixed tensor: pixel_values are left alone
    >>> {key: tuple(value.shape) for key, value in batch.items()}
    {'pixel_values': (8, 3, 224, 224), 'mix_index': (8,), 'token_weights': (8, 196), 'mix_lam': (8,)}

    ```

    Args:
        settings: the :class:`MixingSettings` (a `TLAlignConfig` works as is).
        patch_size: the model's patch size, an int or `(height, width)`; images must be divisible by it.
        image_size: the expected image size, or `None` for any size divisible by `patch_size`.
        pairing: `"permutation"` (random partners: a random cycle in `batch`/`elem` mode, random pairs in `pair`
            mode, so no sample is its own partner and odd batches work) or `"flip"` (`i <-> B-1-i`, as timm and the
            official code; the middle sample of an odd batch stays unmixed).

    Calling it with `pixel_values` `(B, C, H, W)` (any float dtype, any device; or B `(C, H, W)` images, which are
    stacked and mixed in one pass, as the collator does) and a CPU `torch.Generator` returns:

    - `pixel_values`: the mixed batch, a new tensor (the input is not modified; each image is written once).
    - `mix_index`: `(B,)` int64, the partner `j` whose pixels fill the rest of sample `i` (`i` when unmixed).
    - `token_weights`: `(B, N)` float32 in [0, 1], the share of each patch's pixels from sample `i` itself,
      patch-grid row-major, `N = (H / patch_h) * (W / patch_w)`.
    - `mix_lam`: `(B,)` float32, the share of the whole image from sample `i` itself (`token_weights.mean(1)`,
      except for `"cutmix"` with `correct_lam=False`).

    All on the batch's device. A batch of one, `mix_prob` draws that fail and `mixing_method="none"` leave samples
    unmixed.
    """

    settings: MixingSettings = field(default_factory=MixingSettings)
    patch_size: int | tuple[int, int] = 16
    image_size: int | tuple[int, int] | None = None
    pairing: str = "permutation"

    def __post_init__(self) -> None:
        if not isinstance(self.settings, MixingSettings):
            raise TypeError(f"`settings` must be a MixingSettings (or TLAlignConfig), got {type(self.settings).__name__}.")
        self.settings = MixingSettings.from_config(self.settings)
        self.patch_size = _as_size(self.patch_size, "patch_size")
        if self.image_size is not None:
            self.image_size = _as_size(self.image_size, "image_size")
            self.check_image_size(self.image_size)
        if self.pairing not in PAIRINGS:
            raise ValueError(f"`pairing` must be one of {', '.join(PAIRINGS)}; got {self.pairing!r}.")

    @classmethod
    def from_model(cls, model_or_config: Any, settings: MixingSettings | None = None, **kwargs: Any) -> TLAlignMixer:
        """A mixer with `patch_size` and `image_size` read from a transformers model or config.

        kwargs: `image_size`, `patch_size` or `pairing` (overriding what is read; `image_size=None` accepts any
        size), or mixing settings fields when `settings` is not given (`mixing_method="cutmix"`, ...). Settings with
        `interpolate_pos_encoding=True` (a `TLAlignConfig`) accept any size, as the model then does.
        """
        config = getattr(model_or_config, "config", model_or_config)
        if getattr(config, "patch_size", None) is None and getattr(config, "vision_config", None) is not None:
            config = config.vision_config  # composite models (e.g. CLIP) keep the patch settings there
        # An aligned model says its token grid (timm models keep it in the timm model, not the config).
        patch_size = getattr(model_or_config, "tl_align_patch_size", getattr(config, "patch_size", None))
        image_size = getattr(model_or_config, "tl_align_image_size", getattr(config, "image_size", None))
        if getattr(settings, "interpolate_pos_encoding", False):
            image_size = None
        own = {name: kwargs.pop(name) for name in ("patch_size", "image_size", "pairing") if name in kwargs}
        patch_size = own.pop("patch_size", patch_size)
        if patch_size is None:
            raise ValueError(f"{type(config).__name__} has no patch_size; pass patch_size=... as well.")
        if settings is None:
            settings = MixingSettings(**kwargs)
        elif kwargs:
            raise TypeError(f"Pass mixing settings either as `settings` or as keywords, not both (got {sorted(kwargs)}).")
        return cls(settings, patch_size, own.pop("image_size", image_size), **own)

    def check_image_size(self, image_size: Sequence[int], name: str = "image_size") -> None:
        """Raise a ValueError unless `(height, width)` is a whole number of patches (and the expected size)."""
        height, width = image_size
        if height < self.patch_size[0] or width < self.patch_size[1]:
            raise ValueError(
                f"{name} {height}x{width} is smaller than one patch ({self.patch_size[0]}x{self.patch_size[1]}): "
                "resize the images to the model's image_size, or use a model with a smaller patch_size."
            )
        if height % self.patch_size[0] or width % self.patch_size[1]:
            raise ValueError(
                f"{name} {height}x{width} is not divisible by patch_size {self.patch_size[0]}x{self.patch_size[1]}; "
                "resize or crop the images to a multiple of the patch size."
            )
        if self.image_size is not None and tuple(image_size) != self.image_size:
            raise ValueError(
                f"pixel_values are {height}x{width} but image_size is {self.image_size[0]}x{self.image_size[1]}; "
                "resize the images to the model's image_size, or, to train at this size (e.g. a checkpoint fine-tuned "
                "at a higher resolution), set interpolate_pos_encoding=True in TLAlignConfig "
                "(--interpolate_pos_encoding), which the trainer passes to the model (a collator of your own: "
                "image_size=None)."
            )

    def num_tokens(self, image_size: Sequence[int]) -> int:
        """Patch tokens of an image of `(height, width)`."""
        return (image_size[0] // self.patch_size[0]) * (image_size[1] // self.patch_size[1])

    def __call__(self, pixel_values: torch.Tensor | Sequence[torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Mix `pixel_values` ((B, C, H, W), or B (C, H, W) tensors, which are stacked on the way) with the draws of
        `generator`; see the class docstring."""
        first = pixel_values[0] if isinstance(pixel_values, list | tuple) and pixel_values else None
        shape = (len(pixel_values), *first.shape) if first is not None else getattr(pixel_values, "shape", ())
        sample = first if first is not None else pixel_values
        if not isinstance(sample, torch.Tensor) or len(shape) != 4 or not sample.is_floating_point():
            described = f"{sample.dtype} tensor of shape {tuple(shape)}" if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise TypeError(f"`pixel_values` must be a float tensor of shape (B, C, H, W) (or B (C, H, W) tensors), got {described}.")
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError(
                "`generator` must be a CPU torch.Generator (the mixer draws a few numbers per batch on the host, so "
                "that box coordinates need no device sync), e.g. mixing_generator(seed, step)."
            )
        image_size = tuple(shape[-2:])
        self.check_image_size(image_size, "image size")
        batch_size = shape[0]
        if batch_size < 2 and self.settings.mixing_method != "none":
            logger.warning_once(
                "A batch of one image is returned unmixed: mixing needs at least two images (raise the batch size, "
                "or set dataloader_drop_last=True if only the last batch of an epoch is short)."
            )
        if self.settings.mixing_method == "none" or batch_size < 2:
            pixels, mix_index, token_weights, mix_lam = (stack_images(pixel_values), *self._unmixed(batch_size, image_size))
        elif self.settings.mix_mode == "batch":
            pixels, mix_index, token_weights, mix_lam = self._mix_batch(pixel_values, image_size, generator)
        else:
            pixels, mix_index, token_weights, mix_lam = self._mix_per_element(pixel_values, image_size, generator)
        return self._batch_contract(pixels, mix_index, token_weights, mix_lam)

    @staticmethod
    def _batch_contract(pixels, mix_index, token_weights, mix_lam) -> dict[str, torch.Tensor]:
        """The mixed `pixels` and the three contract tensors (host tensors), moved to the pixels' device."""
        device = pixels.device
        return {
            "pixel_values": pixels,
            "mix_index": _to_device(mix_index, device),
            "token_weights": _to_device(token_weights.float().contiguous(), device),
            "mix_lam": _to_device(mix_lam.float().contiguous(), device),
        }

    # ---- draws (CPU) ---------------------------------------------------------------------------------------------

    def _unmixed(self, batch_size: int, image_size: tuple[int, int]):
        return torch.arange(batch_size), torch.ones(batch_size, self.num_tokens(image_size)), torch.ones(batch_size)

    def _draw_use_cut(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Which draws use the cut-style method rather than Mixup: bool (count,)."""
        if self.settings.mixing_method == "mixup":
            return torch.zeros(count, dtype=torch.bool)
        if self.settings.switches_to_mixup:
            return torch.rand(count, generator=generator) < self.settings.switch_prob
        return torch.ones(count, dtype=torch.bool)

    def _draw_lam(self, use_cut: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Lambda of each draw from the Beta of its method (float64 (count,)); 1 where a box comes from minmax."""
        count = use_cut.numel()
        lam = torch.ones(count, dtype=torch.float64)
        if use_cut.any() and self.settings.cutmix_minmax is None:
            lam = torch.where(use_cut, sample_lam(self.settings.cutmix_alpha, count, generator), lam)
        if not use_cut.all():
            lam = torch.where(use_cut, lam, sample_lam(self.settings.mixup_alpha, count, generator))
        return lam

    def _draw_pairing(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        if self.pairing == "flip":
            return flip_pairing(batch_size)
        if self.settings.mix_mode == "pair":
            return mutual_pairing(batch_size, generator)
        return cyclic_pairing(batch_size, generator)

    def _draw_cut(self, lam: torch.Tensor, image_size: tuple[int, int], generator: torch.Generator) -> _Cut:
        """Cut regions of the configured cut-style method for each lambda in `lam` (n,)."""
        method, minmax = self.settings.mixing_method, self.settings.cutmix_minmax
        if method == "token_mix":
            token_mask, lam = random_token_mask(self.num_tokens(image_size), lam, generator)
            return _Cut(None, token_mask, (~token_mask).float(), lam.float())
        minmax = None if minmax is None else tuple(minmax)
        if method == "token_cutmix":
            boxes, lam = token_grid_bbox(image_size, self.patch_size, lam, generator, minmax)
        else:
            boxes, lam = cutmix_bbox_and_lam(image_size, lam, generator, minmax, self.settings.correct_lam)
        token_weights = box_token_weights(boxes, image_size, self.patch_size)
        exact = method == "token_cutmix" or self.settings.correct_lam or minmax is not None
        return _Cut(boxes, None, token_weights, token_weights.mean(1) if exact else lam.float())

    # ---- mixing (on the batch's device) --------------------------------------------------------------------------

    def _mix_batch(self, images, image_size: tuple[int, int], generator: torch.Generator):
        """`batch` mode: one draw for the whole batch. Returns the mixed (B, C, H, W) and the three contract tensors."""
        batch_size, num_tokens = len(images), self.num_tokens(image_size)
        if not torch.rand((), generator=generator) < self.settings.mix_prob:
            return (stack_images(images), *self._unmixed(batch_size, image_size))
        use_cut = self._draw_use_cut(1, generator)
        lam = self._draw_lam(use_cut, generator)
        mix_index = self._draw_pairing(batch_size, generator)
        if use_cut.item():
            cut = self._draw_cut(lam, image_size, generator)
            if cut.boxes is not None:
                pixels = paste_box(images, mix_index, cut.boxes[0].tolist())
            else:
                pixels = mix_images(images, mix_index, token_mask_to_pixels(cut.token_mask, image_size, self.patch_size)[0].float())
            token_weights, mix_lam = cut.token_weights.expand(batch_size, -1), cut.mix_lam.expand(batch_size)
        else:
            lam = lam.float()
            pixels = mix_images(images, mix_index, 1.0 - lam.item())
            token_weights, mix_lam = lam.expand(batch_size, num_tokens), lam.expand(batch_size)
        return (pixels, *self._finish(mix_index, token_weights, mix_lam, mix_index != torch.arange(batch_size)))

    def _mix_per_element(self, images, image_size: tuple[int, int], generator: torch.Generator):
        """`pair` / `elem` modes: one draw per sample (copied to both members of a pair in `pair` mode)."""
        batch_size = len(images)
        apply = torch.rand(batch_size, generator=generator) < self.settings.mix_prob
        use_cut = self._draw_use_cut(batch_size, generator)
        lam = self._draw_lam(use_cut, generator)
        mix_index = self._draw_pairing(batch_size, generator)
        cut = self._draw_cut(lam, image_size, generator) if use_cut.any() else None
        if self.settings.mix_mode == "pair":
            leaders = pair_leaders(mix_index)
            apply, use_cut, lam = apply[leaders], use_cut[leaders], lam[leaders]
            cut = None if cut is None else cut.select(leaders)
        mixed = apply & (mix_index != torch.arange(batch_size))
        lam = lam.float()
        if cut is None:
            pixels = mix_images(images, mix_index, torch.where(mixed, 1.0 - lam, 0.0))
            token_weights = lam[:, None].expand(batch_size, self.num_tokens(image_size))
            return (pixels, *self._finish(mix_index, token_weights, lam, mixed))
        if cut.boxes is not None:
            cut_pixels = box_pixel_mask(cut.boxes, image_size)
        else:
            cut_pixels = token_mask_to_pixels(cut.token_mask, image_size, self.patch_size)
        partner_share = cut_pixels.float()  # edited in place: one (B, H, W) map
        partner_share[~use_cut] = (1.0 - lam[~use_cut])[:, None, None]
        partner_share[~mixed] = 0.0
        pixels = mix_images(images, mix_index, partner_share)
        token_weights = torch.where(use_cut[:, None], cut.token_weights, lam[:, None])
        return (pixels, *self._finish(mix_index, token_weights, torch.where(use_cut, cut.mix_lam, lam), mixed))

    @staticmethod
    def _finish(mix_index, token_weights, mix_lam, mixed):
        """Samples not `mixed` (bool (B,)) keep their own index, `token_weights = 1` and `mix_lam = 1`."""
        positions = torch.arange(mix_index.numel())
        return (
            torch.where(mixed, mix_index, positions),
            torch.where(mixed[:, None], token_weights, 1.0),
            torch.where(mixed, mix_lam, 1.0),
        )
