"""`TLAlignCollator`: stacks `datasets`-prepared examples and mixes them into the TL-Align batch contract.

Methods: CutMix with a pixel box (https://arxiv.org/abs/1905.04899), CutMix with a box on the patch grid (the
default of Token-Label Alignment, https://arxiv.org/abs/2210.06455), Mixup (https://arxiv.org/abs/1710.09412),
TokenMix-style random tokens (https://arxiv.org/abs/2207.08409), and a cut-style method switched with Mixup as in
timm's `Mixup`. The tensor work lives in `tl_align_hf.mixing`; this module draws the random numbers, checks the
input and assembles the batch.
"""

import math
import os
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import get_worker_info

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
    token_grid_bbox,
    token_mask_to_pixels,
)

METHODS = ("cutmix", "token_cutmix", "token_mix", "mixup", "none")
CUT_METHODS = ("cutmix", "token_cutmix", "token_mix")
MODES = ("batch", "pair", "elem")
PAIRINGS = ("permutation", "flip")
STATE_HISTORY = 16  # calls back that state_dict(num_calls=...) can rewind to (loaders fetch a batch or two ahead)


def _as_size(value: Any, name: str) -> tuple[int, int]:
    """An int or a pair of ints (as in transformers configs) as `(height, width)` of positive ints."""
    pair = (value, value) if isinstance(value, int | np.integer) else value
    if (
        not isinstance(pair, tuple | list)
        or len(pair) != 2
        or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v > 0 for v in pair)
    ):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair of positive ints, got {value!r}.")
    return int(pair[0]), int(pair[1])


def _check_number(value: Any, name: str, low: float, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high or math.isinf(value):
        bounds = f"in [{low}, {high}]" if high < math.inf else f">= {low} and finite"
        raise ValueError(f"{name} must be a number {bounds}, got {value!r}.")


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _as_label(value: Any, position: int) -> int:
    """An integer class id from an int, a NumPy integer or a one-element integer tensor/array."""
    if isinstance(value, torch.Tensor | np.ndarray) and math.prod(value.shape) == 1:
        is_integer = value.dtype.kind in "iu" if isinstance(value, np.ndarray) else _is_integer_dtype(value.dtype)
        value = value.item() if is_integer else value
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"labels must be integer class ids, but example {position} has label {value!r} ({type(value).__name__}). "
            "Map class names to ids (e.g. a `datasets.ClassLabel` or `model.config.label2id`) and pass each "
            "sample's own label: the collator does the mixing, so do not one-hot or mix labels beforehand."
        )
    return int(value)


class _Cut(NamedTuple):
    """Cut regions of n samples: pixel boxes (n, 4) or a token mask (n, N); own shares (n, N); mix_lam (n,)."""

    boxes: torch.Tensor | None
    token_mask: torch.Tensor | None
    token_weights: torch.Tensor
    mix_lam: torch.Tensor

    def select(self, index: torch.Tensor) -> "_Cut":
        return _Cut(*(None if part is None else part[index] for part in self))


@dataclass
class TLAlignCollator:
    """Data collator that stacks image examples and mixes them for Token-Label Alignment.

    Each example is a dict with `pixel_values` (a (C, H, W) float tensor or NumPy array) and `label` or `labels`
    (an integer class id); other keys are ignored. The batch holds:

    - `pixel_values`: (B, C, H, W) float, the mixed images.
    - `labels`: (B,) int64, each sample's own label (never mixed).
    - `mix_index`: (B,) int64, the partner `j` whose pixels fill the rest of sample `i` (`i` itself when unmixed).
    - `token_weights`: (B, N) float32 in [0, 1], the share of each patch's pixels from sample `i` itself, patch-grid
      row-major, `N = (H / patch_h) * (W / patch_w)`.
    - `mix_lam`: (B,) float32, the share of the whole image from sample `i` itself, `token_weights.mean(1)`.

    Example:

    ```python
    >>> import torch
    >>> from tl_align_hf import TLAlignCollator
    >>> collator = TLAlignCollator(method="cutmix", cutmix_alpha=1.0, patch_size=16, num_labels=10, seed=0)
    >>> examples = [{"pixel_values": torch.rand(3, 224, 224), "label": i % 10} for i in range(8)]
    >>> batch = collator(examples)
    >>> {key: tuple(value.shape) for key, value in batch.items()}
    {'pixel_values': (8, 3, 224, 224), 'labels': (8,), 'mix_index': (8,), 'token_weights': (8, 196), 'mix_lam': (8,)}
    >>> torch.allclose(batch["mix_lam"], batch["token_weights"].mean(1))
    True

    ```

    Use it as `Trainer(data_collator=collator)` (with `remove_unused_columns=False`, so `pixel_values` and `label`
    reach it), `DataLoader(collate_fn=collator)` or in an Accelerate loop. `TLAlignCollator.from_model(model)` reads
    `patch_size`, `image_size` and `num_labels` from the model's config.

    Args:
        method (`str`, defaults to `"token_cutmix"`):
            `"cutmix"` (pixel box; shares fractional at box edges), `"token_cutmix"` (box on the patch grid, the
            official TL-Align default), `"token_mix"` (random patches from the partner), `"mixup"` or `"none"`.
        mixup_alpha (`float`, defaults to `0.0`):
            Beta alpha of Mixup. Required > 0 for `method="mixup"`. With a cut-style method, `mixup_alpha > 0`
            switches between that method and Mixup as timm's `Mixup` does when both alphas are set.
        cutmix_alpha (`float`, defaults to `1.0`):
            Beta alpha of the cut-style methods (unused by `"mixup"`).
        cutmix_minmax (`tuple[float, float]`, *optional*):
            Box side range as a fraction of the image (or grid) side, for `"cutmix"` and `"token_cutmix"`; the box
            size then ignores `cutmix_alpha`, as in timm.
        prob (`float`, defaults to `1.0`):
            Probability of mixing a batch (`"batch"` mode) or a sample (`"pair"`, `"elem"`); unmixed samples keep
            their pixels, `token_weights = 1` and `mix_lam = 1`. `0` turns mixing off.
        switch_prob (`float`, defaults to `0.5`):
            Probability of the cut-style method rather than Mixup when both are enabled (timm's meaning).
        mode (`str`, defaults to `"batch"`):
            `"batch"`: one lambda and one box (or token subset) for the whole batch. `"pair"`: one per mutual pair
            `i <-> j`; with an odd batch the sample left over takes pixels one way from a random other sample.
            `"elem"`: one per sample.
        correct_lam (`bool`, defaults to `True`):
            As in timm: `mix_lam` of `"cutmix"` is the true share after clipping the box at the border. With
            `False` it is the drawn lambda, which then differs from `token_weights.mean(1)`. Lambda is always exact
            for `"token_cutmix"` (kept-token fraction), `"token_mix"` and `"mixup"`.
        pairing (`str`, defaults to `"permutation"`):
            `"permutation"`: random partners (a random cycle in `"batch"`/`"elem"`, random pairs in `"pair"`), so
            no sample is its own partner. `"flip"`: `i <-> B-1-i` as timm and the official code; the middle
            sample of an odd batch stays unmixed.
        patch_size (`int` or `tuple[int, int]`, defaults to `16`):
            The model's patch size; images must be divisible by it.
        image_size (`int` or `tuple[int, int]`, *optional*):
            Expected image size; `None` accepts any size divisible by `patch_size`.
        num_labels (`int`, *optional*):
            Number of classes; labels must be in `[0, num_labels)`.
        seed (`int`, *optional*):
            Seed of the collator's own generator; `None` takes `torch.initial_seed()` at the first batch, so
            `transformers.set_seed` / `torch.manual_seed` control it. The same seed gives the same batches.
        rank (`int`, *optional*):
            Process rank, mixed into the seed so ranks draw different streams; `None` reads `torch.distributed`
            (when initialised) or the `RANK` environment variable at the first batch.

    Randomness: the stream is derived from `(seed, rank)` and, inside a DataLoader worker, from the worker's seed
    (`get_worker_info().seed`), which differs per worker and per epoch and follows the DataLoader's generator, so
    workers never repeat each other or the previous epoch (a fixed `seed + worker_id` would replay the same mixing
    every epoch, as non-persistent workers restart from the same copy of the collator). `state_dict(num_calls=...)`
    and `load_state_dict()` save and restore the stream of the process that collates (the main process when
    `num_workers=0`), as JSON-serialisable data. `collate_unmixed(examples)` stacks without mixing for evaluation.
    """

    method: str = "token_cutmix"
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 1.0
    cutmix_minmax: tuple[float, float] | None = None
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = "batch"
    correct_lam: bool = True
    pairing: str = "permutation"
    patch_size: int | tuple[int, int] = 16
    image_size: int | tuple[int, int] | None = None
    num_labels: int | None = None
    seed: int | None = None
    rank: int | None = None
    _generator: torch.Generator | None = field(default=None, init=False, repr=False, compare=False)
    _stream_worker_seed: int | None = field(default=None, init=False, repr=False, compare=False)
    _num_calls: int = field(default=0, init=False, repr=False, compare=False)
    _history: deque = field(default_factory=lambda: deque(maxlen=STATE_HISTORY), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, value, choices in (("method", self.method, METHODS), ("mode", self.mode, MODES)):
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}.")
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing={self.pairing!r} is not supported; choose one of {PAIRINGS}.")
        _check_number(self.prob, "prob", 0.0, 1.0)
        _check_number(self.switch_prob, "switch_prob", 0.0, 1.0)
        _check_number(self.mixup_alpha, "mixup_alpha", 0.0)
        _check_number(self.cutmix_alpha, "cutmix_alpha", 0.0)
        self._check_method_settings()
        self.patch_size = _as_size(self.patch_size, "patch_size")
        if self.image_size is not None:
            self.image_size = _as_size(self.image_size, "image_size")
            self._check_divisible(self.image_size, "image_size")
        for name in ("num_labels", "seed", "rank"):
            value = getattr(self, name)
            low = 1 if name == "num_labels" else 0
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be None or an int >= {low}, got {value!r}.")

    def _check_method_settings(self) -> None:
        if self.cutmix_minmax is not None:
            minmax = self.cutmix_minmax
            if not isinstance(minmax, tuple | list) or len(minmax) != 2 or not 0 < minmax[0] < minmax[1] <= 1:
                raise ValueError(f"cutmix_minmax must be (min, max) with 0 < min < max <= 1, got {minmax!r}.")
            if self.method not in ("cutmix", "token_cutmix"):
                raise ValueError(
                    f"cutmix_minmax is used by method='cutmix' or 'token_cutmix' only, not {self.method!r}; "
                    "remove it or change the method."
                )
            self.cutmix_minmax = (float(minmax[0]), float(minmax[1]))
        if self.method in CUT_METHODS and self.cutmix_alpha <= 0 and self.cutmix_minmax is None:
            raise ValueError(
                f"method={self.method!r} needs cutmix_alpha > 0 (e.g. 1.0) or cutmix_minmax; "
                "for Mixup alone use method='mixup'."
            )
        if self.method == "mixup" and self.mixup_alpha <= 0:
            raise ValueError("method='mixup' needs mixup_alpha > 0 (e.g. 0.8).")

    def _check_divisible(self, size: tuple[int, int], name: str) -> None:
        if size[0] % self.patch_size[0] or size[1] % self.patch_size[1]:
            raise ValueError(
                f"{name} {size[0]}x{size[1]} is not divisible by patch_size {self.patch_size[0]}x{self.patch_size[1]}; "
                "resize or crop the images to a multiple of the patch size."
            )

    @classmethod
    def from_model(cls, model_or_config: Any, **kwargs: Any) -> "TLAlignCollator":
        """Build a collator with `patch_size`, `image_size` and `num_labels` read from a transformers model or config.

        `kwargs` are the other fields, and override the values read (e.g. `image_size=None` to accept any size,
        `num_labels=None` to skip the label range check).
        """
        config = getattr(model_or_config, "config", model_or_config)
        num_labels = getattr(config, "num_labels", None)
        if getattr(config, "patch_size", None) is None and getattr(config, "vision_config", None) is not None:
            config = config.vision_config  # composite models (e.g. CLIP) keep the patch settings there
        values = {
            "patch_size": getattr(config, "patch_size", None),
            "image_size": getattr(config, "image_size", None),
            "num_labels": num_labels,
            **kwargs,
        }
        if values["patch_size"] is None:
            raise ValueError(
                f"{type(config).__name__} has no patch_size; pass patch_size=... to TLAlignCollator.from_model."
            )
        return cls(**values)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate and mix `examples` (B dicts) into the batch described in the class docstring."""
        images, labels = self._collect(examples, labels_required=True)
        batch_size, image_size = len(images), tuple(images[0].shape[-2:])
        self._history.append((self._num_calls, self._stream().get_state()))
        self._num_calls += 1
        if self.method == "none" or batch_size < 2:
            pixels, mix_index, token_weights, mix_lam = self._unmixed(images, image_size)
        elif self.mode == "batch":
            pixels, mix_index, token_weights, mix_lam = self._mix_batch(images, image_size)
        else:
            pixels, mix_index, token_weights, mix_lam = self._mix_per_element(images, image_size)
        return {
            "pixel_values": pixels,
            "labels": labels,
            "mix_index": mix_index,
            "token_weights": token_weights,
            "mix_lam": mix_lam,
        }

    def collate_unmixed(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Stack `examples` without mixing, for evaluation and prediction; draws no random numbers.

        Returns `pixel_values` (B, C, H, W) and, when every example has a label, `labels` (B,) int64.
        """
        images, labels = self._collect(examples, labels_required=False)
        batch = {"pixel_values": torch.stack(images)}
        if labels is not None:
            batch["labels"] = labels
        return batch

    # ---- input -------------------------------------------------------------------------------------------------

    def _collect(self, examples: list[dict[str, Any]], labels_required: bool):
        """Images (B tensors (C, H, W)) and labels (B,) int64, or None if not required and some example has none."""
        if not isinstance(examples, list | tuple) or not examples:
            raise ValueError("TLAlignCollator needs a non-empty list of examples (dicts with pixel_values and label).")
        images = [self._image(example, position) for position, example in enumerate(examples)]
        self._check_sizes(images)
        labels = []
        for position, example in enumerate(examples):
            label_key = "labels" if "labels" in example else "label"
            if label_key not in example:
                if not labels_required:
                    return images, None
                raise ValueError(
                    f"example {position} has no 'label' or 'labels' key (keys present: {sorted(example)}); "
                    "keep the label column (Trainer: remove_unused_columns=False) or rename it to 'label'."
                )
            labels.append(_as_label(example[label_key], position))
        return images, self._check_labels(torch.tensor(labels, dtype=torch.long))

    def _image(self, example: dict[str, Any], position: int) -> torch.Tensor:
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
            described = (
                f"{image.dtype} tensor of shape {tuple(image.shape)}" if hasattr(image, "shape") else type(image)
            )
            raise TypeError(
                f"pixel_values of example {position} must be a float tensor or NumPy array of shape (C, H, W), got "
                f"{described}; return normalised float tensors from the transform (or set the dataset format to torch)."
            )
        return image

    def _check_sizes(self, images: list[torch.Tensor]) -> None:
        first = images[0].shape
        for position, image in enumerate(images):
            if image.shape != first:
                raise ValueError(
                    f"pixel_values of example {position} has shape {tuple(image.shape)} but example 0 has "
                    f"{tuple(first)}; all images in a batch must have the same size (resize or crop in the transform)."
                )
        size = (first[-2], first[-1])
        if self.image_size is not None and size != self.image_size:
            raise ValueError(
                f"pixel_values are {size[0]}x{size[1]} but image_size is {self.image_size[0]}x{self.image_size[1]}; "
                "resize the images to the model's image_size, or pass image_size=None to accept any size."
            )
        self._check_divisible(size, "image size")

    def _check_labels(self, labels: torch.Tensor) -> torch.Tensor:
        bad = labels < 0
        if self.num_labels is not None:
            bad |= labels >= self.num_labels
        if bad.any():
            allowed = "non-negative" if self.num_labels is None else f"[0, {self.num_labels})"
            raise ValueError(
                f"labels {labels[bad].tolist()} are outside {allowed}; check the label column and the model's "
                "num_labels / label2id (or pass num_labels=...)."
            )
        return labels

    # ---- random stream -----------------------------------------------------------------------------------------

    def _stream(self) -> torch.Generator:
        """The generator for this process; (re)derived on first use and in each new DataLoader worker."""
        worker = get_worker_info()
        worker_seed = None if worker is None else worker.seed
        if self._generator is None or worker_seed != self._stream_worker_seed:
            seed = torch.initial_seed() if self.seed is None else self.seed
            entropy = [seed, self._resolve_rank()] + ([] if worker_seed is None else [worker_seed])
            self._generator = torch.Generator()
            self._generator.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]))
            self._stream_worker_seed = worker_seed
        return self._generator

    def _resolve_rank(self) -> int:
        if self.rank is not None:
            return self.rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
        return int(os.environ.get("RANK", 0))

    def state_dict(self, num_calls: int | None = None) -> dict[str, Any]:
        """The state of this process's random stream, JSON-serialisable; `load_state_dict` continues from it.

        num_calls: the state after that many calls of this collator instead of now, one of the last
            `STATE_HISTORY` calls (a loader that fetches ahead has collated batches not yet trained on). In a process
            that has not collated (DataLoader workers do it), the current, unused state is returned.
        """
        state, calls = self._stream().get_state(), self._num_calls
        if num_calls is not None and num_calls != calls and calls > 0:
            recent = dict(self._history)
            if num_calls not in recent:
                raise ValueError(
                    f"num_calls={num_calls} is not among the last {STATE_HISTORY} calls of this collator "
                    f"(it has made {calls}); save the state within {STATE_HISTORY} batches of collating."
                )
            state, calls = recent[num_calls], num_calls
        return {"generator_state": state.tolist(), "num_calls": calls}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from `state_dict()` (also after a JSON round trip) into this process's stream."""
        self._stream().set_state(torch.tensor(state_dict["generator_state"], dtype=torch.uint8))
        self._num_calls = int(state_dict.get("num_calls", 0))
        self._history.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._generator is not None:
            state["_generator"] = self._generator.get_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator_state = state.pop("_generator")
        self.__dict__.update(state, _generator=None)
        if generator_state is not None:
            self._generator = torch.Generator()
            self._generator.set_state(generator_state)

    # ---- mixing ------------------------------------------------------------------------------------------------

    def _num_tokens(self, image_size: tuple[int, int]) -> int:
        return (image_size[0] // self.patch_size[0]) * (image_size[1] // self.patch_size[1])

    def _unmixed(self, images: list[torch.Tensor], image_size: tuple[int, int]):
        batch_size = len(images)
        ones = torch.ones(batch_size, self._num_tokens(image_size))
        return torch.stack(images), torch.arange(batch_size), ones, torch.ones(batch_size)

    def _draw_use_cut(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Which draws use the cut-style method rather than Mixup: bool (count,)."""
        if self.method == "mixup":
            return torch.zeros(count, dtype=torch.bool)
        if self.mixup_alpha > 0:
            return torch.rand(count, generator=generator) < self.switch_prob
        return torch.ones(count, dtype=torch.bool)

    def _draw_lam(self, use_cut: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Lambda of each draw from the Beta of its method (float64 (count,)); 1 where a box comes from minmax."""
        count = use_cut.numel()
        lam = torch.ones(count, dtype=torch.float64)
        if use_cut.any() and self.cutmix_minmax is None:
            lam = torch.where(use_cut, sample_lam(self.cutmix_alpha, count, generator), lam)
        if not use_cut.all():
            lam = torch.where(use_cut, lam, sample_lam(self.mixup_alpha, count, generator))
        return lam

    def _draw_pairing(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        if self.pairing == "flip":
            return flip_pairing(batch_size)
        if self.mode == "pair":
            return mutual_pairing(batch_size, generator)
        return cyclic_pairing(batch_size, generator)

    def _draw_cut(self, lam: torch.Tensor, image_size: tuple[int, int], generator: torch.Generator) -> _Cut:
        """Cut regions of the configured cut-style method for each lambda in `lam` (n,)."""
        if self.method == "token_mix":
            token_mask, lam = random_token_mask(self._num_tokens(image_size), lam, generator)
            return _Cut(None, token_mask, (~token_mask).float(), lam.float())
        if self.method == "token_cutmix":
            boxes, lam = token_grid_bbox(image_size, self.patch_size, lam, generator, self.cutmix_minmax)
        else:
            boxes, lam = cutmix_bbox_and_lam(image_size, lam, generator, self.cutmix_minmax, self.correct_lam)
        token_weights = box_token_weights(boxes, image_size, self.patch_size)
        exact = self.method == "token_cutmix" or self.correct_lam or self.cutmix_minmax is not None
        return _Cut(boxes, None, token_weights, token_weights.mean(1) if exact else lam.float())

    def _mix_batch(self, images: list[torch.Tensor], image_size: tuple[int, int]):
        """`batch` mode: one draw for the whole batch, pasted in place on the stacked images."""
        generator = self._stream()
        if not torch.rand((), generator=generator) < self.prob:
            return self._unmixed(images, image_size)
        batch_size, num_tokens = len(images), self._num_tokens(image_size)
        use_cut = self._draw_use_cut(1, generator)
        lam = self._draw_lam(use_cut, generator)
        mix_index = self._draw_pairing(batch_size, generator)
        if use_cut.item():
            cut = self._draw_cut(lam, image_size, generator)
            if cut.boxes is not None:
                pixels = paste_box(images, mix_index, cut.boxes[0])
            else:
                partner_share = token_mask_to_pixels(cut.token_mask, image_size, self.patch_size)[0].float()
                pixels = mix_images(images, mix_index, partner_share)
            token_weights, mix_lam = cut.token_weights.expand(batch_size, -1), cut.mix_lam.expand(batch_size)
        else:
            lam = lam.float()
            pixels = mix_images(images, mix_index, 1.0 - lam.item())
            token_weights, mix_lam = lam.expand(batch_size, num_tokens), lam.expand(batch_size)
        return self._finish(pixels, mix_index, token_weights, mix_lam, mix_index != torch.arange(batch_size))

    def _mix_per_element(self, images: list[torch.Tensor], image_size: tuple[int, int]):
        """`pair` / `elem` modes: one draw per sample (copied to both members of a pair in `pair` mode)."""
        generator = self._stream()
        batch_size = len(images)
        apply = torch.rand(batch_size, generator=generator) < self.prob
        use_cut = self._draw_use_cut(batch_size, generator)
        lam = self._draw_lam(use_cut, generator)
        mix_index = self._draw_pairing(batch_size, generator)
        cut = self._draw_cut(lam, image_size, generator) if use_cut.any() else None
        if self.mode == "pair":
            leaders = pair_leaders(mix_index)
            apply, use_cut, lam = apply[leaders], use_cut[leaders], lam[leaders]
            cut = None if cut is None else cut.select(leaders)
        mixed = apply & (mix_index != torch.arange(batch_size))
        lam = lam.float()
        if cut is None:
            pixels = mix_images(images, mix_index, torch.where(mixed, 1.0 - lam, 0.0))
            token_weights = lam[:, None].expand(batch_size, self._num_tokens(image_size))
            return self._finish(pixels, mix_index, token_weights, lam, mixed)
        if cut.boxes is not None:
            cut_pixels = box_pixel_mask(cut.boxes, image_size)
        else:
            cut_pixels = token_mask_to_pixels(cut.token_mask, image_size, self.patch_size)
        partner_share = cut_pixels.float()  # edited in place: one (B, H, W) buffer
        partner_share[~use_cut] = (1.0 - lam[~use_cut])[:, None, None]
        partner_share[~mixed] = 0.0
        pixels = mix_images(images, mix_index, partner_share)
        token_weights = torch.where(use_cut[:, None], cut.token_weights, lam[:, None])
        return self._finish(pixels, mix_index, token_weights, torch.where(use_cut, cut.mix_lam, lam), mixed)

    @staticmethod
    def _finish(pixels, mix_index, token_weights, mix_lam, mixed):
        """Samples not `mixed` (bool (B,)) keep their own index, `token_weights = 1` and `mix_lam = 1`."""
        positions = torch.arange(mix_index.numel())
        return (
            pixels,
            torch.where(mixed, mix_index, positions),
            torch.where(mixed[:, None], token_weights, 1.0).float().contiguous(),
            torch.where(mixed, mix_lam, 1.0).float().contiguous(),
        )
