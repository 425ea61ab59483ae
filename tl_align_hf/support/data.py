"""The data side of the example scripts: load and check image data sets, label maps, PIL modes, the training
augmentation sized from the image processor, evaluation through the image processor itself, and training at the
processor's image size (`interpolate_pos_encoding`).

It follows transformers' `examples/pytorch/image-classification/run_image_classification.py` (data sets from the
Hub or local imagefolders, a validation split carved from train when there is none, label maps with string keys,
transforms attached with `dataset.with_transform`), with these choices:

- Training augmentation is torchvision's `transforms.v2` (random resized crop, optional flip, to float, normalise),
  sized, resampled and normalised from the checkpoint's image processor. Each example's draws come from the global
  torch generator seeded by (`seed`, epoch, a digest of the example's pixels), inside `torch.random.fork_rng`, so the
  same seed gives the same crops whatever `dataloader_num_workers`, the number of processes, the batch order, or a
  resume from a checkpoint. Training loops call `set_train_epoch(train_dataset, epoch)` at the start of each epoch.
- Evaluation is the image processor's own `processor(images=..., return_tensors="pt")`: the accuracy reported is
  measured on exactly the inputs the published checkpoint gets at inference.
- Images of every PIL mode become 8-bit RGB correctly (16-bit and float greyscale are scaled, not clipped).
- Checks that name the fix: a wrong column (listing the columns present), a label column that is not a
  `ClassLabel`, an image column that is not an `Image`, label names that differ between splits, an empty split.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import inspect
import io
import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from datasets import Image as ImageFeature
from PIL import Image
from torchvision.transforms import v2
from transformers import ViTImageProcessor
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import PILImageResampling, pil_torch_interpolation_mapping

logger = logging.getLogger(__name__)


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


IMAGEFOLDER_LAYOUT = (
    "An image folder must be laid out as <split folder>/<class name>/<image> (e.g. train/cat/1.png, train/dog/2.png, "
    "validation/cat/3.png), with every image at that same depth in train_dir and validation_dir and at least two "
    "class folders: datasets' imagefolder infers the labels from the class folder names only then."
)


def check_columns(
    dataset: Dataset | DatasetDict, image_column_name: str = "image", label_column_name: str = "label"
) -> None:
    """Raise a ValueError that names the fix unless every split has an `Image` column, a `ClassLabel` column with
    the same label names (at least two) in all splits, and at least one row; warn about validation classes that
    the training split lacks."""
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
    names = next(iter(label_names.values()))
    if len(names) < 2:
        raise ValueError(
            f"The data has {len(names)} class ({names}): TL-Align trains on mixes of two labels and needs at least two "
            f"classes (with one, the loss is 0 and the accuracy 1). {IMAGEFOLDER_LAYOUT}"
        )
    if isinstance(dataset, DatasetDict) and {"train", "validation"} <= set(dataset):
        _warn_about_classes_without_training_images(dataset, label_column_name, names)


def _warn_about_classes_without_training_images(dataset: DatasetDict, label_column_name: str, names: list) -> None:
    present = {split: set(dataset[split].with_format(None)[label_column_name]) for split in ("train", "validation")}
    unseen = sorted(present["validation"] - present["train"])
    if unseen:
        logger.warning(
            "The validation split has classes that the training split has no images of: %s. The model cannot learn "
            "them, and their validation images count as errors; check train_dir (or the split).",
            ", ".join(str(names[index]) for index in unseen),
        )


def _check_split(split_name: str, split: Dataset, image_column_name: str, label_column_name: str) -> None:
    if label_column_name not in split.column_names and split.column_names == [image_column_name]:
        raise ValueError(
            f"Split {split_name!r} has images but no labels (columns: {split.column_names}). {IMAGEFOLDER_LAYOUT}"
        )
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


def prepare_image_dataset(
    dataset: DatasetDict, image_column_name: str = "image", label_column_name: str = "label", verify_splits=()
) -> DatasetDict:
    """`check_columns`, then the images of `verify_splits` read once (a ValueError lists the unreadable files),
    then the image column left undecoded (`Image(decode=False)`): the transforms decode it, and a file that cannot
    be read later stops the run with its name instead of deep inside `datasets`."""
    check_columns(dataset, image_column_name, label_column_name)
    for split_name in verify_splits:
        unreadable = find_unreadable_images(dataset[split_name], image_column_name) if split_name in dataset else []
        if unreadable:
            listed = "\n".join(f"  {path}: {error}" for _, path, error in unreadable[:20])
            more = f"\n  ... and {len(unreadable) - 20} more" if len(unreadable) > 20 else ""
            raise ValueError(
                f"{len(unreadable)} image(s) of split {split_name!r} cannot be read:\n{listed}{more}\nRemove or "
                "replace them (or drop their rows with dataset.filter) and run again."
            )
    return dataset.cast_column(image_column_name, ImageFeature(decode=False))


def find_unreadable_images(split: Dataset, image_column_name: str = "image") -> list[tuple[int, str, str]]:
    """`(row, file, error)` of every image in `split` that PIL cannot open and decode, without the split's transform.

    Reads each file once (about a millisecond for a small PNG); use it before training, when a bad file would
    otherwise stop the run at its batch (or, in the validation split, after training).
    """
    raw = split.with_format(None).cast_column(image_column_name, ImageFeature(decode=False))
    unreadable = []
    for row, value in enumerate(raw[image_column_name]):
        try:
            decode_image(value)
        except ValueError as error:
            unreadable.append((row, value.get("path") or f"row {row}", str(error.__cause__ or error)))
    return unreadable


def decode_image(value: Any) -> Image.Image:
    """A PIL image from a decoded image or an undecoded `datasets.Image` value ({"bytes", "path"}), fully read.

    Raises a ValueError that names the file and how to drop it when it cannot be read.
    """
    if isinstance(value, Image.Image):
        return value
    path = value.get("path") if isinstance(value, Mapping) else None
    try:
        source = io.BytesIO(value["bytes"]) if isinstance(value, Mapping) and value.get("bytes") else path
        image = Image.open(source)
        image.load()
        return image
    except (OSError, SyntaxError, ValueError, TypeError) as error:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(
            f"Cannot read the image {path or value!r}: {error}. Remove or replace the file (or drop its row, e.g. "
            "dataset = dataset.filter(...)); run with --verify_images to list every unreadable image before "
            "training."
        ) from error


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
