"""Loading and checking image data sets for the example scripts: Hub data sets and local imagefolders, the
validation split carved from train, the checks that name the fix, and the label maps. The transforms that turn the
images into model inputs are in :mod:`.transforms`.

It follows transformers' `examples/pytorch/image-classification/run_image_classification.py` (data sets from the
Hub or local imagefolders, a validation split carved from train when there is none, label maps with string keys),
with these choices:

- The validation split carved from train is stratified by label (every class in both splits, in proportion) and
  fixed by the seed, so both example scripts split the same data the same way.
- Checks that name the fix: a wrong column (listing the columns present), a label column that is not a
  `ClassLabel`, an image column that is not an `Image`, label names that differ between splits, an empty split,
  image files that cannot be read (listed before training).
"""
from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping
from typing import Any

from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from datasets import Image as ImageFeature
from PIL import Image

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
