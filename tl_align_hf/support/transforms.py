"""The image side of the example scripts: the training augmentation sized from the image processor, evaluation
through the image processor itself, PIL modes, and training at the processor's image size
(`interpolate_pos_encoding`).

Transforms are attached with `dataset.with_transform`, as in transformers' image-classification example, with these
choices:

- Training augmentation is torchvision's `transforms.v2` (random resized crop, optional flip, to float, normalise),
  sized, resampled and normalised from the checkpoint's image processor. Each example's draws come from the global
  torch generator seeded by (`seed`, epoch, a digest of the example's pixels), inside `torch.random.fork_rng`, so the
  same seed gives the same crops whatever `dataloader_num_workers`, the number of processes, the batch order, or a
  resume from a checkpoint. Training loops call `set_train_epoch(train_dataset, epoch)` at the start of each epoch.
- Evaluation is the image processor's own `processor(images=..., return_tensors="pt")`: the accuracy reported is
  measured on exactly the inputs the published checkpoint gets at inference.
- Images of every PIL mode become 8-bit RGB correctly (16-bit and float greyscale are scaled, not clipped).
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import inspect
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from PIL import Image
from torchvision.transforms import v2
from transformers import ViTImageProcessor
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import PILImageResampling, pil_torch_interpolation_mapping

from .data import decode_image

# ---------------------------------------------------------------- image processor


def default_image_processor(image_size: int) -> ViTImageProcessor:
    """The image processor of the built-in default: a ViT processor, size (image_size, image_size), mean and
    std 0.5, bilinear resampling. Built locally, no Hub access; saves and reloads with `AutoImageProcessor`."""
    return ViTImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BILINEAR,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def processor_image_size(image_processor) -> tuple[int, int]:
    """(height, width) of the model input: the processor's `crop_size` when it centre-crops, else its `size`.

    `size` may be a dict / `SizeDict` with height and width or with shortest_edge (a square of that side), or
    an int.
    """
    size = image_processor.size
    if getattr(image_processor, "do_center_crop", False) and getattr(image_processor, "crop_size", None):
        size = image_processor.crop_size
    if isinstance(size, int):
        return size, size
    height, width, shortest_edge = (_size_field(size, key) for key in ("height", "width", "shortest_edge"))
    if height and width:
        return int(height), int(width)
    if shortest_edge:
        return int(shortest_edge), int(shortest_edge)
    raise ValueError(
        f"Cannot read a target size from image processor size {size!r}: expected height and width, or "
        "shortest_edge. Pass an image processor with e.g. size={'height': 224, 'width': 224}."
    )


def processor_resolution_differs(model, image_processor) -> bool:
    """Whether `image_processor` gives images of another size than the one the model is built for (a 224 checkpoint
    fine-tuned at 384): `False` for models that take any size (DINOv2, timm ViTs with `dynamic_img_size`)."""
    model_size = getattr(model, "tl_align_image_size", None)
    if model_size is None:
        return False
    model_size = (model_size, model_size) if isinstance(model_size, int) else tuple(model_size)
    return processor_image_size(image_processor) != model_size


def interpolation_kwargs(model, interpolate_pos_encoding: bool) -> dict[str, bool]:
    """What `interpolate_pos_encoding=True` adds to every forward call: `{"interpolate_pos_encoding": True}` where the
    forward takes it (in its own signature, or through its `**kwargs` to a vision tower that takes it: CLIP,
    MetaCLIP 2), nothing for models that take any image size (DINOv2, timm ViTs with `dynamic_img_size`), and a
    ValueError for the others."""
    if not interpolate_pos_encoding:
        return {}
    parent = getattr(model, "tl_align_parent", type(model))
    forwards = (parent.forward, getattr(getattr(model, "vision_model", None), "forward", None))
    if any(forward is not None and "interpolate_pos_encoding" in inspect.signature(forward).parameters for forward in forwards):
        return {"interpolate_pos_encoding": True}
    image_size = getattr(model, "tl_align_image_size", None)
    if image_size is None:
        return {}
    raise ValueError(
        f"interpolate_pos_encoding=True (--interpolate_pos_encoding), but {type(model).__name__} does not take it and "
        f"only takes images of its image_size {image_size}. For a timm ViT, build the model with "
        "model_args={'dynamic_img_size': True} (it then takes any size that is a whole number of patches); "
        "otherwise resize the images to the model's image_size and leave interpolate_pos_encoding off."
    )


def _size_field(size: Any, key: str) -> int | None:
    return size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)


# ---------------------------------------------------------------- images


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit and 32-bit integer greyscale (`I;16`, `I`) are scaled from their range to
    0..255 and float greyscale (`F`) from [0, 1] (PIL's own `convert` clips them); transparency is composited onto
    white, by transformers' `convert_to_rgb`."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            high = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        else:
            high = 255.0 if values.max(initial=0) <= 255 else 65535.0
        image = Image.fromarray(np.clip(np.rint(values * (255.0 / high)), 0, 255).astype(np.uint8), mode="L")
    return convert_to_rgb(image)


def _images(batch: Mapping[str, list], image_column_name: str) -> list[Image.Image]:
    """The batch's images as RGB: decoded `datasets.Image` values, or undecoded ones (`Image(decode=False)`, whose
    read errors then name the file)."""
    images = batch[image_column_name]
    for image in images:
        if not isinstance(image, Image.Image | Mapping):
            raise TypeError(
                f"Column {image_column_name!r} holds {type(image).__name__}, not PIL images; decode it with "
                f"dataset = dataset.cast_column({image_column_name!r}, datasets.Image())."
            )
    return [to_rgb(decode_image(image)) for image in images]


def _with_labels(batch: Mapping[str, list], label_column_name: str, pixel_values: list) -> dict[str, list]:
    output = {"pixel_values": pixel_values}
    if label_column_name in batch:
        output["label"] = [int(label) for label in batch[label_column_name]]
    return output


def _image_digest(seed: int, epoch: int, image: Image.Image):
    """The blake2b state of (seed, epoch, the image's size and pixels): the same in every process and worker."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{image.size}:".encode(), digest_size=8)
    digest.update(image.tobytes())
    return digest


def _example_seed(image_digest, copy: int = 0) -> int:
    """A 63-bit seed from an image's digest (:func:`_image_digest`); `copy` > 0 numbers the further copies of an
    image in one batch (repeated augmentation), each drawn anew."""
    if copy:
        image_digest = image_digest.copy()
        image_digest.update(f":copy {copy}".encode())
    return int.from_bytes(image_digest.digest(), "little") >> 1


# ---------------------------------------------------------------- transforms


@dataclass
class TrainTransform:
    """torchvision's random resized crop, optional horizontal flip, to float and normalise, for `with_transform`.

    Maps a batch {image_column_name: [PIL images], label_column_name: [ints]} to
    {"pixel_values": [float32 tensors (3, height, width)], "label": [ints]}. `augmentation` is the torchvision
    transform applied to each RGB image; `make_transforms` builds it from the image processor. Each example's random
    draws are seeded by (seed, epoch, the example's pixels), see the module docstring; call `set_epoch` (or
    `set_train_epoch(dataset, epoch)`) at the start of each epoch.
    """

    image_column_name: str
    label_column_name: str
    augmentation: Any
    seed: int = 0
    epoch: int = field(default=0)

    def set_epoch(self, epoch: int) -> None:
        """Use `epoch` in the per-example seeds from now on (fresh crops and flips each epoch)."""
        self.epoch = int(epoch)

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        images = _images(batch, self.image_column_name)
        copies = collections.Counter()  # equal images of the batch (repeated augmentation) get different draws
        pixel_values = []
        for image in images:  # each image's pixels are hashed once
            image_digest = _image_digest(self.seed, self.epoch, image)
            key = image_digest.digest()
            pixel_values.append(self._augment_with_seed(image, _example_seed(image_digest, copies[key])))
            copies[key] += 1
        return _with_labels(batch, self.label_column_name, pixel_values)

    def augment(self, image: Image.Image, copy: int = 0) -> torch.Tensor:
        """One RGB image -> float32 tensor (3, height, width), randomised by (seed, epoch, pixels, copy number)."""
        return self._augment_with_seed(image, _example_seed(_image_digest(self.seed, self.epoch, image), copy))

    def _augment_with_seed(self, image: Image.Image, example_seed: int) -> torch.Tensor:
        with _seeded_global_generators(example_seed):
            return self.augmentation(image)


@contextlib.contextmanager
def _seeded_global_generators(seed: int):
    """Seed torch's, Python's and NumPy's global generators (torchvision draws from the first, timm's RandAugment
    and random erasing from the other two), and restore their states afterwards. Only torch's CPU generator: the
    transforms draw on the CPU, and `torch.manual_seed` would also reseed every accelerator's generator (which
    `fork_rng(devices=[])` does not restore) and, on a CUDA build without a GPU, queue a lazy call with a
    formatted stack trace per example."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@dataclass
class EvalTransform:
    """The image processor itself: `image_processor(images=..., return_tensors="pt")`, for `with_transform`.

    Maps a batch {image_column_name: [PIL images], label_column_name: [ints]} to
    {"pixel_values": [float32 tensors (3, height, width)], "label": [ints]}; images of any mode become RGB first.
    """

    image_column_name: str
    label_column_name: str
    image_processor: Any

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        images = _images(batch, self.image_column_name)
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return _with_labels(batch, self.label_column_name, list(pixel_values))


def train_augmentation(
    image_processor,
    horizontal_flip: bool = True,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> v2.Compose:
    """torchvision v2 training augmentation sized, resampled and normalised from `image_processor`.

    `RandomResizedCrop(processor_image_size(...), scale, ratio)` with the processor's resampling filter, an optional
    `RandomHorizontalFlip` (`horizontal_flip=False` for data whose mirror image is another class, e.g. digits),
    `ToImage`, `ToDtype(float32, scale=do_rescale)` and `Normalize(image_mean, image_std)` when `do_normalize`.
    """
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"scale must be (low, high) with 0 < low <= high <= 1, got {scale!r}.")
    resample = getattr(image_processor, "resample", None)
    interpolation = pil_torch_interpolation_mapping.get(resample, v2.InterpolationMode.BILINEAR)
    steps = [v2.RandomResizedCrop(processor_image_size(image_processor), scale, ratio, interpolation, antialias=True)]
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=getattr(image_processor, "do_rescale", True))]
    if getattr(image_processor, "do_normalize", False):
        steps.append(v2.Normalize(image_processor.image_mean, image_processor.image_std))
    return v2.Compose(steps)


# The DeiT recipe (Touvron et al., 2021; the official TL-Align code trains with it): its training augmentation,
# built by `deit_augmentation`, and its mixing settings and label smoothing, which the example scripts' option
# `--augmentation deit` sets as defaults (flags given with it still win). The cut-style method is TL-Align's own
# default, the box on the patch grid.
DEIT_RECIPE = dict(mixing_method="token_cutmix", cutmix_alpha=1.0, mixup_alpha=0.8, switch_prob=0.5, mix_prob=1.0,
                   label_smoothing=0.1)  # fmt: skip
AUGMENTATIONS = ("default", "deit")


def deit_augmentation(image_processor) -> Any:
    """The DeiT recipe's training augmentation, by timm's `create_transform`: random resized crop (bicubic),
    horizontal flip, RandAugment `rand-m9-mstd0.5-inc1`, normalisation with the processor's mean and std, then
    random erasing (probability 0.25, per-pixel noise). Needs `pip install tl-align-hf[timm]`."""
    try:
        from timm.data import create_transform
    except ImportError as error:
        raise ImportError("--augmentation deit builds timm's RandAugment: pip install 'tl-align-hf[timm]'.") from error
    return create_transform(
        input_size=processor_image_size(image_processor),
        is_training=True,
        auto_augment="rand-m9-mstd0.5-inc1",
        interpolation="bicubic",
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
        mean=tuple(image_processor.image_mean),
        std=tuple(image_processor.image_std),
    )


def make_transforms(
    image_processor,
    image_column_name: str = "image",
    label_column_name: str = "label",
    horizontal_flip: bool = True,
    scale: tuple[float, float] = (0.08, 1.0),
    seed: int = 0,
    augmentation: Any = None,
) -> tuple[TrainTransform, EvalTransform]:
    """(train_transform, eval_transform) for `dataset.with_transform`, configured from `image_processor`.

    Training: `augmentation` (default: :func:`train_augmentation` of the processor, `horizontal_flip` and `scale`)
    seeded per example; evaluation: the processor itself.
    """
    if augmentation is None:
        augmentation = train_augmentation(image_processor, horizontal_flip, scale)
    train = TrainTransform(image_column_name, label_column_name, augmentation, seed)
    return train, EvalTransform(image_column_name, label_column_name, image_processor)


def set_train_epoch(dataset: Dataset, epoch: int) -> bool:
    """Tell the `TrainTransform` attached with `dataset.with_transform` the current epoch; False if none is.

    Call before the epoch's data loader iterator is created (e.g. in `TrainerCallback.on_epoch_begin`):
    worker processes copy the transform when they start, so `persistent_workers=True` keeps epoch 0's value.
    """
    transform = (getattr(dataset, "format", None) or {}).get("format_kwargs", {}).get("transform")
    if not isinstance(transform, TrainTransform):
        return False
    transform.set_epoch(epoch)
    return True
