"""The data pipeline shared by the example scripts: load, check, label maps, transforms, evaluation collate.

It follows transformers' `examples/pytorch/image-classification/run_image_classification.py` (data sets from
the Hub or local imagefolders, a validation split carved from train when there is none, label maps with string
keys, transforms attached with `dataset.with_transform`) so our scripts stay diffable against it, with three
differences:

- No torchvision. The transforms work on PIL images and return float tensors; the target size, resampling
  filter, mean and std are read from a transformers image processor (its PIL backend is used without
  torchvision).
- Train-time randomness is reproducible and independent of how the data are loaded: each example draws its
  crop and flip from its own `random.Random`, seeded by (`seed`, epoch, a digest of the example's pixels). The
  same seed gives the same augmented examples whatever `dataloader_num_workers`, the number of processes, the
  batch order, or a resume from a checkpoint (a sequential per-worker stream would drift on resume: accelerate
  fetches one batch ahead and `skip_first_batches` does not fetch the skipped ones). Training loops call
  `set_train_epoch(train_dataset, epoch)` at the start of every epoch so that each epoch gets fresh crops.
- Checks that name the fix: a wrong column (listing the columns present), a label column that is not a
  `ClassLabel`, an image column that is not an `Image`, label names that differ between splits, an empty split.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from datasets import Image as ImageFeature
from PIL import Image

logger = logging.getLogger(__name__)

# Fraction of the resized image kept by the eval centre crop (the usual ImageNet 224/256), when neither the
# caller nor the image processor (`crop_pct`) gives one.
DEFAULT_CROP_PCT = 0.875
# How many example digests a train transform remembers to notice that `set_train_epoch` is never called.
_REPEAT_CHECK_SIZE = 4096


# ---------------------------------------------------------------- loading


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | os.PathLike | None = None,
    validation_dir: str | os.PathLike | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    trust_remote_code: bool = False,
    train_val_split: float | None = 0.15,
    seed: int = 42,
    label_column_name: str = "label",
) -> DatasetDict:
    """Load a data set from the Hub (`dataset_name`) or local imagefolders as `DatasetDict(train, validation)`.

    Local folders use the `imagefolder` builder (`<dir>/<class name>/<image>`; labels become a `ClassLabel`
    whose names are the sorted folder names of all splits). When there is no "validation" split, a fraction
    `train_val_split` of train is split off, stratified by `label_column_name` when it is a `ClassLabel` with at
    least two examples per class, and fixed by `seed`. Other splits (e.g. "test") are dropped.
    """
    if dataset_name is not None:
        remote_code = {"trust_remote_code": True} if trust_remote_code else {}
        dataset = load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, token=token, **remote_code)
    elif train_dir is not None:
        data_files = {"train": os.path.join(train_dir, "**")}
        if validation_dir is not None:
            data_files["validation"] = os.path.join(validation_dir, "**")
        dataset = load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir)
    else:
        raise ValueError(
            "No data given: pass dataset_name (a Hub data set, --dataset_name) or train_dir (an imagefolder, "
            "--train_dir), optionally with validation_dir."
        )
    if "train" not in dataset:
        raise ValueError(f"The data set has no 'train' split (splits: {', '.join(dataset)}); pass train_dir.")
    if "validation" in dataset:
        return DatasetDict(train=dataset["train"], validation=dataset["validation"])
    return _split_train(dataset["train"], train_val_split, seed, label_column_name)


def _split_train(train: Dataset, train_val_split: float | None, seed: int, label_column_name: str) -> DatasetDict:
    """Split `train` into train and validation, stratified by label when possible."""
    if train_val_split is None or not 0.0 < train_val_split < 1.0:
        raise ValueError(
            f"The data set has no 'validation' split and train_val_split={train_val_split!r}; pass "
            "validation_dir (--validation_dir) or a train_val_split strictly between 0 and 1."
        )
    stratify = label_column_name if isinstance(train.features.get(label_column_name), ClassLabel) else None
    try:
        split = train.train_test_split(test_size=train_val_split, seed=seed, stratify_by_column=stratify)
    except ValueError as error:  # e.g. a class with a single example cannot be stratified
        logger.warning("Stratified train/validation split failed (%s); splitting at random.", error)
        split = train.train_test_split(test_size=train_val_split, seed=seed)
    return DatasetDict(train=split["train"], validation=split["test"])


# ---------------------------------------------------------------- checks and label maps


def check_columns(
    dataset: Dataset | DatasetDict, image_column_name: str = "image", label_column_name: str = "label"
) -> None:
    """Raise a ValueError that names the fix unless every split has an `Image` column, a `ClassLabel` column
    with the same label names in all splits, and at least one row."""
    splits = dataset.items() if isinstance(dataset, DatasetDict) else [("dataset", dataset)]
    label_names = {}
    for split_name, split in splits:
        _check_split(split_name, split, image_column_name, label_column_name)
        label_names[split_name] = split.features[label_column_name].names
    if len({tuple(names) for names in label_names.values()}) > 1:
        raise ValueError(
            f"The splits have different label names for {label_column_name!r}: {label_names}. Cast every split "
            f"to the same labels, e.g. dataset = dataset.cast_column({label_column_name!r}, ClassLabel(names=...))."
        )


def _check_split(split_name: str, split: Dataset, image_column_name: str, label_column_name: str) -> None:
    for column, option in ((image_column_name, "image_column_name"), (label_column_name, "label_column_name")):
        if column not in split.column_names:
            raise ValueError(
                f"{option}={column!r} not found in split {split_name!r}. Set {option} (--{option} in the "
                f"example scripts) to one of the columns present: {', '.join(split.column_names)}."
            )
    if not isinstance(split.features[image_column_name], ImageFeature):
        raise ValueError(
            f"Column {image_column_name!r} of split {split_name!r} is {split.features[image_column_name]!r}, not "
            f"an Image; decode it with dataset = dataset.cast_column({image_column_name!r}, datasets.Image())."
        )
    _class_label(split, label_column_name, split_name)
    if split.num_rows == 0:
        raise ValueError(
            f"Split {split_name!r} is empty (0 rows). Check that train_dir / validation_dir hold images in "
            "<class name>/ sub-folders, and that max_train_samples / max_eval_samples are not 0."
        )


def _class_label(split: Dataset, label_column_name: str, split_name: str = "train") -> ClassLabel:
    """The `ClassLabel` feature of the label column, or a ValueError that says how to make one."""
    feature = split.features.get(label_column_name)
    if isinstance(feature, ClassLabel):
        return feature
    raise ValueError(
        f"Label column {label_column_name!r} of split {split_name!r} is {feature!r}, not a ClassLabel, so there "
        "are no label names for the model config. Convert it before training: "
        f"dataset = dataset.class_encode_column({label_column_name!r}) (strings or ints; on a DatasetDict this "
        "encodes each split on its own), or for the same ids in every split "
        f"dataset = dataset.cast_column({label_column_name!r}, datasets.ClassLabel(names=[...]))."
    )


def label_maps(dataset: Dataset | DatasetDict, label_column_name: str = "label") -> tuple[dict, dict]:
    """(label2id, id2label) from the `ClassLabel` names, string ids as in the transformers example.

    For names ["cat", "dog"]: ({"cat": "0", "dog": "1"}, {"0": "cat", "1": "dog"}). A DatasetDict uses its
    "train" split (else its first).
    """
    if isinstance(dataset, DatasetDict):
        split_name = "train" if "train" in dataset else next(iter(dataset))
        split = dataset[split_name]
    else:
        split_name, split = "dataset", dataset
    names = _class_label(split, label_column_name, split_name).names
    label2id = {name: str(index) for index, name in enumerate(names)}
    id2label = {str(index): name for index, name in enumerate(names)}
    return label2id, id2label


# ---------------------------------------------------------------- image processor


def default_image_processor(image_size: int):
    """The image processor of the built-in default: a ViT processor, size (image_size, image_size), mean and
    std 0.5, bilinear resampling. Built locally, no Hub access; saves and reloads with `AutoImageProcessor`."""
    try:  # transformers >= 5 has a PIL backend class; it saves as "ViTImageProcessor" all the same
        from transformers import ViTImageProcessorPil as processor_class
    except ImportError:
        from transformers import ViTImageProcessor as processor_class
    return processor_class(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=Image.Resampling.BILINEAR,
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


def _size_field(size: Any, key: str) -> int | None:
    return size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)


def _processor_resample(image_processor) -> Image.Resampling:
    try:
        return Image.Resampling(int(image_processor.resample))
    except (AttributeError, TypeError, ValueError):
        return Image.Resampling.BILINEAR


def _processor_mean_std(image_processor) -> tuple[Sequence[float] | None, Sequence[float] | None]:
    if getattr(image_processor, "do_normalize", True) is False:
        return None, None
    return getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)


# ---------------------------------------------------------------- image helpers


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, P, RGBA, LA, CMYK, ...) -> RGB; transparency is composited onto white, as in
    `transformers.image_transforms.convert_to_rgb`."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_tensor(image: Image.Image, mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    """RGB image (W, H) -> float32 tensor (3, H, W): values / 255 in [0, 1], then (x - mean) / std."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    if mean is not None and std is not None:
        pixels = (pixels - mean) / std
    return pixels


def _as_channel_tensor(values: Sequence[float] | None) -> torch.Tensor | None:
    """[c0, c1, c2] -> float32 tensor (C, 1, 1) for broadcasting over (C, H, W); None stays None."""
    return None if values is None else torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1)


def _random_crop_box(
    rng: random.Random, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop with area fraction in `scale` and aspect w/h in `ratio`.

    The algorithm of torchvision's `RandomResizedCrop.get_params`: ten tries, then a centre crop of the whole
    image clamped to `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
            return left, top, left + crop_w, top + crop_h
    crop_w, crop_h = width, height
    if width / height < min(ratio):
        crop_h = round(width / min(ratio))
    elif width / height > max(ratio):
        crop_w = round(height * max(ratio))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def _resize_shortest_edge(image: Image.Image, shortest_edge: int, resample: Image.Resampling) -> Image.Image:
    """Resize keeping the aspect ratio so that min(width, height) == shortest_edge."""
    width, height = image.size
    factor = shortest_edge / min(width, height)
    new_size = (max(shortest_edge, round(width * factor)), max(shortest_edge, round(height * factor)))
    return image.resize(new_size, resample)


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """The central (height, width) region; the image must be at least that large."""
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _example_seed(seed: int, epoch: int, image: Image.Image) -> int:
    """A 64-bit seed from (seed, epoch, the image's size, mode and pixels): stable across processes."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{image.mode}:{image.size}:".encode(), digest_size=8)
    digest.update(image.tobytes())
    return int.from_bytes(digest.digest(), "little")


def _images(batch: Mapping[str, list], image_column_name: str) -> list[Image.Image]:
    images = batch[image_column_name]
    for image in images:
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"Column {image_column_name!r} holds {type(image).__name__}, not PIL images; decode it with "
                f"dataset = dataset.cast_column({image_column_name!r}, datasets.Image())."
            )
    return images


def _with_labels(batch: Mapping[str, list], label_column_name: str, pixel_values: list) -> dict[str, list]:
    output = {"pixel_values": pixel_values}
    if label_column_name in batch:
        output["label"] = [int(label) for label in batch[label_column_name]]
    return output


# ---------------------------------------------------------------- transforms


@dataclass
class TrainTransform:
    """Random resized crop, optional horizontal flip, to tensor, normalise; for `dataset.with_transform`.

    Maps a batch {image_column_name: [PIL images], label_column_name: [ints]} to
    {"pixel_values": [float32 tensors (3, height, width)], "label": [ints]}; images of any mode become RGB.
    Each example's crop and flip come from `random.Random(hash(seed, epoch, pixels))` (see the module
    docstring), so results do not depend on workers, ranks, batch order or resuming. Call `set_epoch` (or
    `set_train_epoch(dataset, epoch)`) at the start of each epoch.
    """

    image_column_name: str
    label_column_name: str
    size: tuple[int, int]
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    horizontal_flip: bool = True
    resample: Image.Resampling = Image.Resampling.BILINEAR
    seed: int = 0
    epoch: int = 0
    _epoch_was_set: bool = field(default=False, init=False, repr=False)
    _seen: set | None = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_range("scale", self.scale, upper=1.0)
        _check_range("ratio", self.ratio)
        self._mean, self._std = _as_channel_tensor(self.mean), _as_channel_tensor(self.std)

    def set_epoch(self, epoch: int) -> None:
        """Use `epoch` in the per-example seeds from now on (fresh crops and flips each epoch)."""
        self.epoch, self._epoch_was_set = int(epoch), True

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        pixel_values = [self.augment(image) for image in _images(batch, self.image_column_name)]
        return _with_labels(batch, self.label_column_name, pixel_values)

    def augment(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> float32 tensor (3, height, width), randomised by (seed, epoch, pixels)."""
        image = to_rgb(image)
        example_seed = _example_seed(self.seed, self.epoch, image)
        self._warn_on_repeat(example_seed)
        rng = random.Random(example_seed)
        box = _random_crop_box(rng, image.width, image.height, self.scale, self.ratio)
        height, width = self.size
        image = image.resize((width, height), self.resample, box=box)
        if self.horizontal_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(image, self._mean, self._std)

    def _warn_on_repeat(self, example_seed: int) -> None:
        """Warn once if an example comes back with the same seed while no epoch was ever set."""
        if self._epoch_was_set or self._seen is None:
            return
        if example_seed in self._seen:
            logger.warning(
                "An example was augmented twice with the same crop and flip: call "
                "set_train_epoch(train_dataset, epoch) at the start of every epoch, or every epoch repeats the "
                "augmentation of the first (this also shows when the data set holds duplicate images)."
            )
            self._seen = None  # warn once
        elif len(self._seen) < _REPEAT_CHECK_SIZE:
            self._seen.add(example_seed)


@dataclass
class EvalTransform:
    """Resize the shortest edge to floor(max(height, width) / crop_pct), centre crop to (height, width), to
    tensor, normalise. Deterministic.

    Maps a batch {image_column_name: [PIL images], label_column_name: [ints]} to
    {"pixel_values": [float32 tensors (3, height, width)], "label": [ints]}. crop_pct=1.0 resizes straight to
    the target size for square images (the original ViT evaluation).
    """

    image_column_name: str
    label_column_name: str
    size: tuple[int, int]
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    crop_pct: float = DEFAULT_CROP_PCT
    resample: Image.Resampling = Image.Resampling.BILINEAR

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}.")
        self._mean, self._std = _as_channel_tensor(self.mean), _as_channel_tensor(self.std)

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        pixel_values = [self.preprocess(image) for image in _images(batch, self.image_column_name)]
        return _with_labels(batch, self.label_column_name, pixel_values)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> float32 tensor (3, height, width)."""
        height, width = self.size
        image = _resize_shortest_edge(to_rgb(image), math.floor(max(height, width) / self.crop_pct), self.resample)
        return _to_tensor(_center_crop(image, height, width), self._mean, self._std)


def _check_range(name: str, bounds: tuple[float, float], upper: float = math.inf) -> None:
    low, high = bounds
    if not 0.0 < low <= high <= upper:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= {upper}, got {bounds!r}.")


def make_transforms(
    image_processor,
    image_column_name: str = "image",
    label_column_name: str = "label",
    horizontal_flip: bool = True,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    crop_pct: float | None = None,
    seed: int = 0,
) -> tuple[TrainTransform, EvalTransform]:
    """(train_transform, eval_transform) for `dataset.with_transform`, configured from `image_processor`.

    Target size: `processor_image_size(image_processor)`; resampling: the processor's `resample`; mean and std:
    the processor's `image_mean` / `image_std` (no normalisation when it has none or do_normalize=False).
    `horizontal_flip=False` for data whose mirror image is another class or no image at all (digits, text).
    `crop_pct` for evaluation: this argument, else the processor's `crop_pct`, else 0.875.
    """
    size = processor_image_size(image_processor)
    mean, std = _processor_mean_std(image_processor)
    resample = _processor_resample(image_processor)
    if crop_pct is None:
        crop_pct = getattr(image_processor, "crop_pct", None) or DEFAULT_CROP_PCT
    train = TrainTransform(
        image_column_name, label_column_name, size, mean, std, scale, ratio, horizontal_flip, resample, seed
    )
    evaluation = EvalTransform(image_column_name, label_column_name, size, mean, std, crop_pct, resample)
    return train, evaluation


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


# ---------------------------------------------------------------- collate


def eval_collate(examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack examples for unmixed evaluation: {"pixel_values": (B, 3, H, W) float, "labels": (B,) int64}.

    Each example has "pixel_values" (3, H, W) and "label" or "labels"; "labels" is left out when no example
    has one (prediction on unlabelled data).
    """
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
    labels = [example.get("labels", example.get("label")) for example in examples]
    if all(label is not None for label in labels):
        batch["labels"] = torch.tensor([int(label) for label in labels], dtype=torch.int64)
    return batch
