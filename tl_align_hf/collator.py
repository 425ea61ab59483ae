"""`TLAlignCollator`: checks and stacks `datasets`-prepared examples, then mixes them with a `TLAlignMixer`.

The draws of a batch are a pure function of `(seed, rank, epoch, the batch itself)`: the collator seeds the mixer's
generator with a digest of the batch's labels and pixels, so the same batch in the same epoch is mixed the same way
whichever process or DataLoader worker collates it, however far ahead a loader prefetches, and after a resume from
a checkpoint, with no random state to save, rewind or replay. Training loops call `set_epoch(epoch)` so that each
epoch draws anew even when a batch comes back unchanged.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import TrainingArguments

from .config import as_tl_align_config
from .mixer import TLAlignMixer, mixing_generator
from .settings import MixingSettings

_DIGEST_SAMPLES_PER_SIDE = 16  # pixels per image side that enter the batch digest (about 16 x 16 x C per image)


def batch_digest(
    pixel_values: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor, check_finite: bool = False
) -> int:
    """A 63-bit digest of a batch: its labels and a strided sample of its pixels (`(B, C, H, W)` or B `(C, H, W)`,
    and `(B,)`).

    Any change of a label, of the order of the samples or of the sampled pixels gives another digest; hashing a
    `16 x 16` grid per image instead of every pixel keeps it well under a millisecond for 128 images of 224 px.
    With `check_finite`, a NaN or infinite value among the sampled pixels raises a ValueError naming the images.
    """
    height, width = pixel_values[0].shape[-2:]
    rows, cols = max(1, height // _DIGEST_SAMPLES_PER_SIDE), max(1, width // _DIGEST_SAMPLES_PER_SIDE)
    sample = torch.stack([image[:, ::rows, ::cols] for image in pixel_values]).detach().float().cpu()
    if check_finite and not bool(torch.isfinite(sample).all()):
        bad = (~torch.isfinite(sample)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(
            f"pixel_values of examples {bad} hold NaN or infinite values: training on them makes the model NaN. "
            "Check the transform (e.g. an image_std of 0) and the image files."
        )
    digest = hashlib.blake2b(sample.numpy().tobytes(), digest_size=8)
    digest.update(labels.cpu().numpy().astype(np.int64).tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


def _as_label(value: Any, position: int) -> int:
    """An integer class id from an int, a NumPy integer or a one-element integer tensor/array."""
    if isinstance(value, torch.Tensor | np.ndarray) and math.prod(value.shape) == 1:
        is_integer = value.dtype.kind in "iu" if isinstance(value, np.ndarray) else not (
            value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool
        )
        value = value.item() if is_integer else value
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"labels must be integer class ids, but example {position} has label {value!r} ({type(value).__name__}). "
            "Map class names to ids (e.g. a `datasets.ClassLabel` or `model.config.label2id`) and pass each "
            "sample's own label: the collator does the mixing, so do not one-hot or mix labels beforehand."
        )
    return int(value)


def _image(example: Any, position: int) -> torch.Tensor:
    """The `(C, H, W)` float `pixel_values` of an example (a tensor or a NumPy array)."""
    if not isinstance(example, Mapping) or "pixel_values" not in example:
        keys = sorted(example) if isinstance(example, Mapping) else type(example).__name__
        raise ValueError(
            f"example {position} has no 'pixel_values' key (keys present: {keys}); prepare the dataset so each "
            "example has pixel_values of shape (C, H, W), e.g. with dataset.with_transform(image_processor ...)."
        )
    image = example["pixel_values"]
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    if not isinstance(image, torch.Tensor) or not image.is_floating_point() or image.ndim != 3:
        described = f"{image.dtype} tensor of shape {tuple(image.shape)}" if hasattr(image, "shape") else type(image)
        raise TypeError(
            f"pixel_values of example {position} must be a float tensor or NumPy array of shape (C, H, W), got "
            f"{described}; return normalised float tensors from the transform (or set the dataset format to torch)."
        )
    if image.shape[0] > 4 and image.shape[-1] <= 4:
        raise ValueError(
            f"pixel_values of example {position} has shape {tuple(image.shape)}, which looks channels-last "
            "(H, W, C); return channels-first (C, H, W) images, e.g. image.permute(2, 0, 1)."
        )
    return image


PATCH_SEQUENCE_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")  # SigLIP 2 NaFlex inputs


def _holds_patch_sequences(examples: Any) -> bool:
    """Whether the examples are SigLIP 2 NaFlex patch sequences (they carry `spatial_shapes`)."""
    return isinstance(examples, list | tuple) and bool(examples) and isinstance(examples[0], Mapping) and "spatial_shapes" in examples[0]


def _stacked_field(examples: Sequence[Mapping[str, Any]], key: str) -> torch.Tensor:
    """The `key` field of every example, stacked; a ValueError naming the example that lacks it or does not fit."""
    values = []
    for position, example in enumerate(examples):
        if key not in example:
            raise ValueError(
                f"example {position} has no {key!r} key (keys present: {sorted(example)}); SigLIP 2 patch-sequence "
                f"examples need all of {PATCH_SEQUENCE_KEYS}, as Siglip2ImageProcessor returns them."
            )
        values.append(torch.as_tensor(example[key]))
        if values[-1].shape != values[0].shape:
            raise ValueError(
                f"{key} of example {position} has shape {tuple(values[-1].shape)} but example 0 has "
                f"{tuple(values[0].shape)}; pad every image to the same max_num_patches (Siglip2ImageProcessor does)."
            )
    return torch.stack(values)


@dataclass
class TLAlignCollator:
    """Data collator that stacks image examples and mixes them for Token-Label Alignment.

    Each example is a dict with `pixel_values` (a (C, H, W) float tensor or NumPy array) and its integer class id
    under `label_column_name` (default: `labels` or `label`); other keys are ignored. The batch holds `pixel_values`
    (B, C, H, W), `labels` (B,) int64 (each sample's own label, never mixed) and what the mixer adds: `mix_index`
    (B,) int64, `token_weights` (B, N) float32 and `mix_lam` (B,) float32 (see :class:`TLAlignMixer`).

    Example:

    ```python
    >>> import torch
    >>> from tl_align_hf import MixingSettings, TLAlignCollator, TLAlignMixer
    >>> mixer = TLAlignMixer(MixingSettings(mixing_method="cutmix"), patch_size=16)
    >>> collator = TLAlignCollator(mixer, num_labels=10, seed=0)
    >>> examples = [{"pixel_values": torch.rand(3, 224, 224), "label": i % 10} for i in range(8)]
    >>> batch = collator(examples)
    >>> {key: tuple(value.shape) for key, value in batch.items()}
    {'pixel_values': (8, 3, 224, 224), 'labels': (8,), 'mix_index': (8,), 'token_weights': (8, 196), 'mix_lam': (8,)}
    >>> torch.allclose(batch["mix_lam"], batch["token_weights"].mean(1))
    True

    ```

    SigLIP 2 (NaFlex) examples, which hold patch sequences (`pixel_values` (N, C * P * P), `pixel_attention_mask`
    (N,) and `spatial_shapes` (2,), as `Siglip2ImageProcessor` returns them), are stacked as such and mixed per patch
    on each image's own grid (`TLAlignMixer.mix_patch_sequences`); the batch then also holds `pixel_attention_mask`
    and `spatial_shapes`, and `token_weights` cover the padded sequence (B, N).

    `TLAlignCollator.from_model(model, mixing_method="cutmix", seed=0)` reads the patch size, image size and number
    of labels from a model's config. Use it as `Trainer(data_collator=collator)` (keep the `pixel_values` and label
    columns: `remove_unused_columns=False`), `DataLoader(collate_fn=collator)` or in an Accelerate loop.

    Args:
        mixer: the :class:`TLAlignMixer` that mixes each stacked batch.
        num_labels: number of classes; labels must be in `[0, num_labels)`.
        num_channels: channels the model expects (`config.num_channels`); images must have them.
        seed: seed of the draws; `None` takes `torch.initial_seed()` when the collator is built (so
            `transformers.set_seed` / `torch.manual_seed` before building it control it).
        rank: process rank, mixed into the draws so that processes differ even on equal batches; `None` reads
            `torch.distributed` (when initialised) or the `RANK` environment variable when collating.
        label_column_name: the example key holding the label; `None` looks for `labels`, then `label`.
        epoch: mixed into the draws; set it with `set_epoch` at the start of every epoch.
    """

    mixer: TLAlignMixer = field(default_factory=TLAlignMixer)
    num_labels: int | None = None
    num_channels: int | None = None
    seed: int | None = None
    rank: int | None = None
    label_column_name: str | None = None
    epoch: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.mixer, TLAlignMixer):
            raise TypeError(f"`mixer` must be a TLAlignMixer, got {type(self.mixer).__name__}.")
        for name in ("num_labels", "num_channels", "seed", "rank", "epoch"):
            value, low = getattr(self, name), 1 if name in ("num_labels", "num_channels") else 0
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"`{name}` must be None or an int >= {low}, got {value!r}.")
        if self.seed is None:
            self.seed = torch.initial_seed()

    @classmethod
    def from_model(
        cls,
        model_or_config: Any,
        settings: MixingSettings | TrainingArguments | None = None,
        *,
        seed: int | None = None,
        rank: int | None = None,
        label_column_name: str | None = None,
        **kwargs: Any,
    ) -> TLAlignCollator:
        """A collator for a transformers model or config: patch size, image size and `num_labels` read from it.

        settings: the mixing settings: a [`MixingSettings`], a `TLAlignConfig`, or a plain `TrainingArguments`
        (then TLAlignConfig's default mixing, as `TLAlignTrainer` converts it: see `as_tl_align_config`).
        kwargs: mixing settings fields when `settings` is not given (`mixing_method="cutmix"`, ...), the mixer's
        `patch_size`, `image_size` (`None` accepts any size) or `pairing`, and `num_labels` (`None` skips the label
        range check), each overriding what is read from the config.
        """
        if isinstance(settings, TrainingArguments):
            settings = as_tl_align_config(settings)
        config = getattr(model_or_config, "config", model_or_config)
        num_labels = kwargs.pop("num_labels", getattr(config, "num_labels", None))
        vision_config = getattr(config, "vision_config", None) or config
        num_channels = kwargs.pop("num_channels", getattr(vision_config, "num_channels", None))
        mixer = TLAlignMixer.from_model(model_or_config, settings, **kwargs)
        return cls(mixer, num_labels, num_channels, seed=seed, rank=rank, label_column_name=label_column_name)

    def set_epoch(self, epoch: int) -> None:
        """Use `epoch` in the draws from now on (DataLoader workers started afterwards take it over)."""
        self.epoch = int(epoch)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate and mix `examples` (B dicts) into the batch described in the class docstring."""
        if _holds_patch_sequences(examples):
            return self._collate_patch_sequences(examples, mix=True)
        images, labels = self._checked(examples, labels_required=True)
        generator = mixing_generator(self.seed, self._rank(), self.epoch, batch_digest(images, labels, check_finite=True))
        mixed = self.mixer(images, generator)  # stacks and mixes in one pass
        return {"pixel_values": mixed.pop("pixel_values"), "labels": labels, **mixed}

    def collate_unmixed(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Stack `examples` without mixing, for evaluation and prediction.

        Returns `pixel_values` (B, C, H, W) and, when every example has a label, `labels` (B,) int64.
        """
        if _holds_patch_sequences(examples):
            return self._collate_patch_sequences(examples, mix=False)
        images, labels = self._checked(examples, labels_required=False)
        self.mixer.check_image_size(images[0].shape[-2:], "image size")  # the mixer checks it in `__call__`
        pixel_values = torch.stack(images)
        return {"pixel_values": pixel_values} if labels is None else {"pixel_values": pixel_values, "labels": labels}

    def _collate_patch_sequences(self, examples: Sequence[Mapping[str, Any]], mix: bool) -> dict[str, torch.Tensor]:
        """Stack (and, with `mix`, mix) SigLIP 2 NaFlex examples: `pixel_values` (N, C * P * P),
        `pixel_attention_mask` (N,) and `spatial_shapes` (2,) each, as `Siglip2ImageProcessor` makes them.

        Returns those three stacked, `(B, N, C * P * P)`, `(B, N)` and `(B, 2)`, `labels` (B,) and, with `mix`, the
        mixer's `mix_index`, `token_weights` (B, N) and `mix_lam` (see `TLAlignMixer.mix_patch_sequences`).
        """
        batch = {key: _stacked_field(examples, key) for key in PATCH_SEQUENCE_KEYS}
        pixel_values = batch["pixel_values"]
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values of patch sequences must be float, got {pixel_values.dtype}.")
        patch_values = self.num_channels * self.mixer.patch_size[0] * self.mixer.patch_size[1] if self.num_channels else None
        if patch_values is not None and pixel_values.shape[-1] != patch_values:
            raise ValueError(
                f"Each patch holds {pixel_values.shape[-1]} values but the model's patches hold {patch_values} "
                f"(num_channels {self.num_channels} x patch_size {self.mixer.patch_size}); prepare the images with "
                "the model's own Siglip2ImageProcessor."
            )
        labels = self._labels(examples, labels_required=mix)
        if labels is not None:
            batch["labels"] = labels
        if not mix:
            return batch
        digest = batch_digest(pixel_values[:, None], labels, check_finite=True)  # each sequence as a 1-channel image
        generator = mixing_generator(self.seed, self._rank(), self.epoch, digest)
        mixed = self.mixer.mix_patch_sequences(pixel_values, batch["pixel_attention_mask"], batch["spatial_shapes"], generator)
        return {**batch, **mixed}

    def _rank(self) -> int:
        if self.rank is not None:
            return self.rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
        return int(os.environ.get("RANK", 0))

    def _checked(self, examples: Sequence[Mapping[str, Any]], labels_required: bool):
        """B checked `(C, H, W)` images and `(B,)` int64 labels (None if not required and some example has none).

        The host side of the batch contract (`tl_align_hf.contract`): keys, image shapes, channels and labels; the
        image size is the mixer's check (`TLAlignMixer.check_image_size`).
        """
        if not isinstance(examples, list | tuple) or not examples:
            raise ValueError("TLAlignCollator needs a non-empty list of examples (dicts with pixel_values and label).")
        images = [_image(example, position) for position, example in enumerate(examples)]
        for position, image in enumerate(images):
            if image.shape != images[0].shape:
                raise ValueError(
                    f"pixel_values of example {position} has shape {tuple(image.shape)} but example 0 has "
                    f"{tuple(images[0].shape)}; all images in a batch must have the same size (resize or crop in "
                    "the transform)."
                )
        if self.num_channels is not None and images[0].shape[0] != self.num_channels:
            raise ValueError(
                f"pixel_values have {images[0].shape[0]} channels but the model expects {self.num_channels} "
                f"(config.num_channels): convert the images in the transform (e.g. to {'grayscale' if self.num_channels == 1 else 'RGB'}), "
                "or build the model with a matching num_channels."
            )
        return images, self._labels(examples, labels_required)

    def _labels(self, examples: Sequence[Mapping[str, Any]], labels_required: bool) -> torch.Tensor | None:
        """`(B,)` int64 labels of `examples`, each checked against `num_labels` here on the host, where the data is
        (the one place labels are range-checked before the device; any dataset, streaming ones included)."""
        keys = (self.label_column_name,) if self.label_column_name else ("labels", "label")
        values, key = [], None
        for position, example in enumerate(examples):
            key = next((key for key in keys if key in example), None)
            if key is None:
                if not labels_required:
                    return None
                raise ValueError(
                    f"example {position} has no {' or '.join(map(repr, keys))} key (keys present: {sorted(example)}); "
                    "keep the label column (Trainer: remove_unused_columns=False), or name it with "
                    "label_column_name=..."
                )
            values.append(_as_label(example[key], position))
        labels = torch.tensor(values, dtype=torch.long)
        bad = (labels < 0) | (labels >= self.num_labels) if self.num_labels is not None else labels < 0
        if bad.any():
            allowed = "non-negative class ids" if self.num_labels is None else f"the model's classes [0, {self.num_labels})"
            raise ValueError(
                f"labels {sorted(set(labels[bad].tolist()))[:10]} are outside {allowed} (in {key!r}); check the label "
                "column and the model's num_labels / label2id (or pass num_labels=...)."
            )
        return labels
