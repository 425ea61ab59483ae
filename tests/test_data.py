"""The example scripts' data pipeline: digits imagefolder, loading, checks, label maps, PIL modes, transforms."""

from __future__ import annotations

import collections
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image
from transformers import AutoImageProcessor, BitImageProcessor, DeiTImageProcessor, ViTImageProcessor

from tl_align_hf.support.data import check_columns, label_maps, load_image_dataset
from tl_align_hf.support.digits import MARKER_NAME, default_digits_dir, write_digits_imagefolder
from tl_align_hf.support.transforms import (
    default_image_processor,
    make_transforms,
    processor_image_size,
    set_train_epoch,
    to_rgb,
)

from .test_no_trainer import load_example

DIGITS_SIZE = 16  # smaller than the default 32 to keep the tests fast
NUM_DIGITS, NUM_TRAIN, NUM_VALIDATION = 1797, 1437, 360


def _png_files(root: Path, split: str) -> list[Path]:
    return sorted((root / split).glob("*/*.png"))


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    return write_digits_imagefolder(tmp_path_factory.mktemp("digits") / "digits", image_size=DIGITS_SIZE)


@pytest.fixture(scope="session")
def digits_dataset(digits_root, tmp_path_factory) -> DatasetDict:
    return load_image_dataset(
        train_dir=digits_root / "train",
        validation_dir=digits_root / "validation",
        cache_dir=str(tmp_path_factory.mktemp("hf_cache")),
    )


def _constant_image(mode: str, value, size=(20, 12)) -> Image.Image:
    return Image.new(mode, size, value)


# ---------------------------------------------------------------- digits folder


def test_digits_folder_has_every_image_with_stratified_classes(digits_root):
    train, validation = _png_files(digits_root, "train"), _png_files(digits_root, "validation")
    assert (len(train), len(validation)) == (NUM_TRAIN, NUM_VALIDATION)
    assert sorted(p.name for p in (digits_root / "train").iterdir()) == [str(d) for d in range(10)]
    per_class = {str(d): len(list((digits_root / "validation" / str(d)).glob("*.png"))) for d in range(10)}
    assert all(35 <= count <= 37 for count in per_class.values()), per_class  # ~20% of ~180 per class
    indices = [int(p.stem) for p in train + validation]
    assert sorted(indices) == list(range(NUM_DIGITS))  # disjoint and complete
    with Image.open(train[0]) as image:
        assert (image.mode, image.size) == ("L", (DIGITS_SIZE, DIGITS_SIZE))


def test_digits_folder_matches_source_labels(digits_root):
    from sklearn.datasets import load_digits

    target = load_digits().target
    for path in _png_files(digits_root, "validation")[:50]:
        assert int(path.parent.name) == target[int(path.stem)]


def test_digits_split_is_fixed_across_calls(digits_root, tmp_path):
    again = write_digits_imagefolder(tmp_path / "again", image_size=DIGITS_SIZE)
    names = [p.relative_to(digits_root) for p in _png_files(digits_root, "validation")]
    assert names == [p.relative_to(again) for p in _png_files(again, "validation")]
    first = names[0]
    assert (digits_root / first).read_bytes() == (again / first).read_bytes()


def test_digits_folder_is_written_once(digits_root):
    marker_mtime = (digits_root / MARKER_NAME).stat().st_mtime_ns
    assert write_digits_imagefolder(digits_root, image_size=DIGITS_SIZE) == digits_root
    assert (digits_root / MARKER_NAME).stat().st_mtime_ns == marker_mtime


def test_digits_folder_is_rewritten_when_parameters_change(tmp_path):
    root = write_digits_imagefolder(tmp_path / "digits", image_size=8, seed=0)
    before = _png_files(root, "validation")
    write_digits_imagefolder(root, image_size=8, seed=1)
    assert json.loads((root / MARKER_NAME).read_text())["seed"] == 1
    assert _png_files(root, "validation") != before
    assert len(_png_files(root, "validation")) == NUM_VALIDATION
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]  # no staging or old copies left


def test_digits_concurrent_writers_agree(tmp_path):
    root = tmp_path / "digits"
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: write_digits_imagefolder(root, image_size=8), range(3)))
    assert results == [root] * 3
    assert len(_png_files(root, "train")) == NUM_TRAIN
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]


def test_raises_error_when_digits_root_holds_other_files(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not written by write_digits_imagefolder"):
        write_digits_imagefolder(tmp_path, image_size=8)
    assert (tmp_path / "mine.txt").exists()


def test_raises_error_when_digits_parameters_are_invalid(tmp_path):
    with pytest.raises(ValueError, match="image_size must be"):
        write_digits_imagefolder(tmp_path / "d", image_size=4)
    with pytest.raises(ValueError, match="test_size must be"):
        write_digits_imagefolder(tmp_path / "d", test_size=1.0)


def test_default_digits_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TL_ALIGN_HF_CACHE", str(tmp_path))
    assert default_digits_dir(24) == tmp_path / "digits-24"
    monkeypatch.delenv("TL_ALIGN_HF_CACHE")
    assert default_digits_dir() == Path.home() / ".cache" / "tl_align_hf" / "digits-32"


# ---------------------------------------------------------------- loading, checks, label maps


def test_load_image_dataset_from_digits_folders(digits_dataset):
    assert set(digits_dataset) == {"train", "validation"}
    assert (digits_dataset["train"].num_rows, digits_dataset["validation"].num_rows) == (NUM_TRAIN, NUM_VALIDATION)
    label = digits_dataset["train"].features["label"]
    assert isinstance(label, ClassLabel) and label.names == [str(d) for d in range(10)]
    check_columns(digits_dataset, "image", "label")


def test_load_image_dataset_splits_off_stratified_validation(digits_root, tmp_path):
    kwargs = dict(train_dir=digits_root / "train", cache_dir=str(tmp_path), train_val_split=0.2, seed=3)
    dataset = load_image_dataset(**kwargs)
    assert (dataset["train"].num_rows, dataset["validation"].num_rows) == (1149, 288)
    counts = np.bincount(dataset["validation"]["label"], minlength=10)
    assert counts.min() >= 27 and counts.max() <= 30, counts  # stratified: ~20% of each class
    again = load_image_dataset(**kwargs)
    assert again["validation"]["label"] == dataset["validation"]["label"]


def _small_imagefolder(digits_root: Path, folder: Path, per_class: int) -> Path:
    """The first `per_class` training images of each digit, copied to `folder/<digit>/`."""
    for class_folder in sorted((digits_root / "train").iterdir()):
        (folder / class_folder.name).mkdir(parents=True)
        for image in sorted(class_folder.glob("*.png"))[:per_class]:
            shutil.copy(image, folder / class_folder.name / image.name)
    return folder


def test_both_examples_split_the_data_identically(digits_root, tiny_checkpoint, tmp_path, monkeypatch):
    """Given only a training folder, the Trainer example and the no-Trainer example carve the same stratified
    validation split from it (same seed, same train_val_split): the files each script's `main` attaches its training
    and evaluation transforms to, in order, are the same, and so are the label maps of the models they save."""
    train_dir = _small_imagefolder(digits_root, tmp_path / "train", per_class=12)
    attached = {}  # transform class name -> the files of the split it was attached to, in row order
    with_transform = Dataset.with_transform

    def recording_with_transform(self, transform, *args, **kwargs):
        values = self.with_format(None).cast_column("image", ImageFeature(decode=False))["image"]
        attached[type(transform).__name__] = [Path(value["path"]).relative_to(train_dir) for value in values]
        return with_transform(self, transform, *args, **kwargs)

    monkeypatch.setattr(Dataset, "with_transform", recording_with_transform)
    common = ["--model_name_or_path", str(tiny_checkpoint), "--train_dir", str(train_dir), "--seed", "3",
              "--train_val_split", "0.25", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32"]
    trainer_out, no_trainer_out = tmp_path / "trainer", tmp_path / "no_trainer"
    load_example("run_image_classification").main(
        common + ["--output_dir", str(trainer_out), "--do_train", "--do_eval", "--max_steps", "1",
                  "--save_strategy", "no", "--report_to", "none", "--use_cpu"]
    )  # fmt: skip
    trainer_split, attached = attached, {}
    load_example("run_image_classification_no_trainer").main(
        common + ["--output_dir", str(no_trainer_out), "--max_train_steps", "1", "--cpu"]
    )

    assert set(trainer_split) == set(attached) == {"TrainTransform", "EvalTransform"}
    assert trainer_split == attached
    train_files, validation_files = attached["TrainTransform"], attached["EvalTransform"]
    assert len(train_files) == 90 and not set(train_files) & set(validation_files)
    validation_per_class = collections.Counter(path.parent.name for path in validation_files)
    assert validation_per_class == {str(digit): 3 for digit in range(10)}  # stratified: a quarter of each class
    id2label = [json.loads((out / "config.json").read_text())["id2label"] for out in (trainer_out, no_trainer_out)]
    assert id2label[0] == id2label[1] == {str(digit): str(digit) for digit in range(10)}


def test_raises_error_when_no_data_given():
    with pytest.raises(ValueError, match="pass dataset_name .* or train_dir"):
        load_image_dataset()


def test_raises_error_when_no_validation_and_no_split(digits_root, tmp_path):
    with pytest.raises(ValueError, match="no 'validation' split .* pass validation_dir"):
        load_image_dataset(train_dir=digits_root / "train", cache_dir=str(tmp_path), train_val_split=0.0)


def _tiny_dataset(labels=("a", "b", "a"), label_feature=None) -> Dataset:
    images = [_constant_image("RGB", (i, i, i), (4, 4)) for i in range(len(labels))]
    features = Features({"img": ImageFeature(), "y": label_feature or ClassLabel(names=["a", "b"])})
    return Dataset.from_dict({"img": images, "y": list(labels)}, features=features)


@pytest.mark.parametrize(
    "image_column, label_column, match",
    [("image", "y", "image_column_name='image' not found .* columns present: img, y"),
     ("img", "label", "label_column_name='label' not found .* columns present: img, y")],
)  # fmt: skip
def test_raises_error_when_column_is_wrong(image_column, label_column, match):
    with pytest.raises(ValueError, match=match):
        check_columns(_tiny_dataset(), image_column, label_column)


def test_raises_error_when_label_is_not_class_label():
    dataset = _tiny_dataset(label_feature=Value("string"))
    with pytest.raises(ValueError, match=r"not a ClassLabel.*class_encode_column\('y'\).*cast_column"):
        check_columns(dataset, "img", "y")
    with pytest.raises(ValueError, match="not a ClassLabel"):
        label_maps(dataset, "y")
    check_columns(dataset.class_encode_column("y"), "img", "y")  # the fix the message names works


def test_raises_error_when_image_column_is_not_image():
    dataset = Dataset.from_dict(
        {"img": ["a.png"], "y": [0]}, features=Features({"img": Value("string"), "y": ClassLabel(names=["a"])})
    )
    with pytest.raises(ValueError, match=r"not an Image.*cast_column\('img', datasets.Image\(\)\)"):
        check_columns(dataset, "img", "y")


def test_raises_error_when_split_is_empty():
    dataset = DatasetDict(train=_tiny_dataset(), validation=_tiny_dataset().select([]))
    with pytest.raises(ValueError, match="Split 'validation' is empty"):
        check_columns(dataset, "img", "y")


def test_raises_error_when_splits_have_different_label_names():
    other = _tiny_dataset(labels=("b",)).cast_column("y", ClassLabel(names=["b", "a"]))
    with pytest.raises(ValueError, match="different label names"):
        check_columns(DatasetDict(train=_tiny_dataset(), validation=other), "img", "y")


def test_label_maps_have_string_ids(digits_dataset):
    label2id, id2label = label_maps(digits_dataset, "label")
    assert label2id["7"] == "7" and id2label["7"] == "7" and len(label2id) == 10
    assert label_maps(_tiny_dataset(), "y") == ({"a": "0", "b": "1"}, {"0": "a", "1": "b"})


# ---------------------------------------------------------------- image processor and transforms


def test_default_image_processor_saves_and_reloads(tmp_path):
    processor = default_image_processor(24)
    assert processor_image_size(processor) == (24, 24)
    processor.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert processor_image_size(reloaded) == (24, 24) and list(reloaded.image_mean) == [0.5] * 3


def test_processor_image_size_reads_shortest_edge_and_crop_size():
    processor = default_image_processor(24)
    processor.size = {"shortest_edge": 40}
    assert processor_image_size(processor) == (40, 40)
    processor.do_center_crop, processor.crop_size = True, {"height": 30, "width": 20}
    assert processor_image_size(processor) == (30, 20)
    processor.do_center_crop, processor.size = False, {"longest_edge": 40}
    with pytest.raises(ValueError, match="Cannot read a target size"):
        processor_image_size(processor)


@pytest.mark.parametrize("which", ["train", "eval"])
def test_transform_normalises_with_processor_mean_and_std(which):
    processor = default_image_processor(12)
    processor.image_mean, processor.image_std = [0.2, 0.4, 0.6], [0.5, 0.25, 0.1]
    transforms = dict(zip(("train", "eval"), make_transforms(processor, "img", "y")))
    value = (51, 102, 204)  # 0.2, 0.4, 0.8 after /255
    out = transforms[which]({"img": [_constant_image("RGB", value)], "y": [1]})
    assert set(out) == {"pixel_values", "label"} and out["label"] == [1]
    pixels = out["pixel_values"][0]
    assert pixels.shape == (3, 12, 12) and pixels.dtype == torch.float32
    expected = (torch.tensor([0.2, 0.4, 0.8]) - torch.tensor([0.2, 0.4, 0.6])) / torch.tensor([0.5, 0.25, 0.1])
    torch.testing.assert_close(pixels, expected.reshape(3, 1, 1).expand(3, 12, 12), atol=1e-5, rtol=0)


def _sixteen_bit_gradient(size=(20, 12)) -> Image.Image:
    """A 16-bit greyscale image (`I;16`) spanning 0..65535, as a 16-bit PNG decodes."""
    values = np.linspace(0, 65535, size[0] * size[1]).reshape(size[1], size[0]).astype(np.uint16)
    return Image.fromarray(values)


@pytest.mark.parametrize(
    "image, rgb",
    [(_constant_image("L", 128), (128, 128, 128)),
     (_constant_image("RGBA", (255, 0, 0, 0)), (255, 255, 255)),  # transparent -> white background
     (_constant_image("RGBA", (255, 0, 0, 255)), (255, 0, 0)),
     (_constant_image("P", 3), None),
     (_constant_image("LA", (10, 255)), (10, 10, 10)),
     (_constant_image("I;16", 32896), (128, 128, 128)),  # 16-bit: 32896 / 257 = 128, not clipped to 255
     (_constant_image("I", 40), (40, 40, 40)),  # 32-bit integer holding 8-bit values
     (_constant_image("F", 0.5), (128, 128, 128))],  # float in [0, 1]
)  # fmt: skip
def test_transforms_turn_any_mode_into_three_channels(image, rgb):
    assert to_rgb(image).mode == "RGB"
    if rgb is not None:
        assert to_rgb(image).getpixel((0, 0)) == rgb
    train, evaluation = make_transforms(default_image_processor(8), "img", "y")
    for transform in (train, evaluation):
        assert transform({"img": [image], "y": [0]})["pixel_values"][0].shape == (3, 8, 8)


def test_sixteen_bit_images_keep_their_range():
    """A full-range 16-bit gradient spans [-1, 1] after normalisation (PIL's own conversion saturates 97%% at +1)."""
    _, evaluation = make_transforms(default_image_processor(12), "img", "y")
    pixels = evaluation({"img": [_sixteen_bit_gradient()]})["pixel_values"][0]
    assert pixels.min() < -0.9 and pixels.max() > 0.9
    assert (pixels > 0.99).float().mean() < 0.1
    saturated = evaluation({"img": [_sixteen_bit_gradient().convert("RGB")]})["pixel_values"][0]
    assert (saturated > 0.99).float().mean() > 0.9  # what the conversion fixes


def _noise_images(count: int, size=(20, 14)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def _pixels(transform, images) -> torch.Tensor:
    return torch.stack(transform({"img": images, "y": [0] * len(images)})["pixel_values"])


def test_train_transform_is_reproducible_per_seed_and_epoch():
    images = _noise_images(6)
    processor = default_image_processor(10)
    first, _ = make_transforms(processor, "img", "y", seed=1)
    same, _ = make_transforms(processor, "img", "y", seed=1)
    other_seed, _ = make_transforms(processor, "img", "y", seed=2)
    reference = _pixels(first, images)
    assert torch.equal(reference, _pixels(same, images))
    assert not torch.equal(reference, _pixels(other_seed, images))
    # Independent of batch order, batch size and the global generator: what a resume or another worker count sees.
    torch.manual_seed(123)
    assert torch.equal(reference[[3, 1]], _pixels(same, [images[3], images[1]]))
    same.set_epoch(1)
    assert not torch.equal(reference, _pixels(same, images))  # a fresh crop every epoch


def test_train_transform_leaves_the_global_generator_alone():
    train, _ = make_transforms(default_image_processor(10), "img", "y")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _pixels(train, _noise_images(2))
    assert torch.equal(torch.rand(3), expected)


def test_train_transform_leaves_accelerator_generators_alone(monkeypatch):
    """The per-example seed goes to the CPU generator only: reseeding the CUDA generators per example would
    change (and, with fork_rng(devices=[]), not restore) the training's GPU random stream (dropout, drop path)."""

    def reseeds_a_device(seed):
        raise AssertionError(f"an accelerator generator was reseeded with {seed}")

    train, _ = make_transforms(default_image_processor(10), "img", "y")
    reference = _pixels(train, _noise_images(2))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeds_a_device)
    assert torch.equal(_pixels(train, _noise_images(2)), reference)


def test_set_train_epoch_reaches_the_attached_transform():
    dataset = _tiny_dataset()
    train, evaluation = make_transforms(default_image_processor(4), "img", "y")
    assert set_train_epoch(dataset.with_transform(evaluation), 1) is False
    assert set_train_epoch(dataset.with_transform(train), 3) is True and train.epoch == 3


def test_horizontal_flip_can_be_turned_off():
    image = Image.fromarray(np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1)))  # bright to the right
    train, _ = make_transforms(default_image_processor(16), "img", "y", horizontal_flip=False, scale=(1.0, 1.0))
    for epoch in range(8):
        train.set_epoch(epoch)
        row = train({"img": [image]})["pixel_values"][0][0, 0]
        assert row[-1] > row[0]


PROCESSORS = {  # the processors of ViT, DeiT (resize 256 + centre crop 224), Swin (ViT's) and DINOv2 (BiT's)
    "vit": lambda: ViTImageProcessor(size={"height": 24, "width": 24}),
    "deit": lambda: DeiTImageProcessor(size={"height": 28, "width": 28}, crop_size={"height": 24, "width": 24}),
    "swin": lambda: ViTImageProcessor(size={"height": 24, "width": 24}, resample=3),
    "dinov2": lambda: BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 24, "width": 24}),
}


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_eval_transform_equals_the_image_processor(name):
    processor = PROCESSORS[name]()
    _, evaluation = make_transforms(processor, "img", "y")
    for size in [(50, 41), (24, 24), (17, 33), (300, 200)]:
        images = _noise_images(2, size=size)
        expected = processor(images=images, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(_pixels(evaluation, images), expected, rtol=0, atol=1e-6)
    assert "label" not in evaluation({"img": images})


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_train_transform_is_sized_and_normalised_from_the_processor(name):
    processor = PROCESSORS[name]()
    train, _ = make_transforms(processor, "img", "y", scale=(1.0, 1.0))
    pixels = _pixels(train, _noise_images(2, size=(24, 24)))
    assert pixels.shape == (2, 3, *processor_image_size(processor)) and pixels.dtype == torch.float32
    mean, std = torch.tensor(processor.image_mean), torch.tensor(processor.image_std)
    low, high = (0 - mean) / std, (1 - mean) / std
    assert (pixels.amin((0, 2, 3)) >= low - 1e-5).all() and (pixels.amax((0, 2, 3)) <= high + 1e-5).all()


def test_raises_error_when_transform_arguments_are_invalid():
    processor = default_image_processor(8)
    with pytest.raises(ValueError, match="scale must be"):
        make_transforms(processor, scale=(0.5, 1.5))
    train, _ = make_transforms(processor, "img", "y")
    with pytest.raises(TypeError, match=r"not PIL images.*cast_column"):
        train({"img": [np.zeros((4, 4, 3))], "y": [0]})


def test_digits_pipeline_with_the_collator(digits_dataset):
    from tl_align_hf import TLAlignCollator

    train, evaluation = make_transforms(default_image_processor(12), horizontal_flip=False)
    collator = TLAlignCollator.from_model(types_namespace(patch_size=4, image_size=12, num_labels=10), seed=0)
    validation = digits_dataset["validation"].with_transform(evaluation)
    batch = collator.collate_unmixed([validation[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 12, 12) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == validation["label"][:4]
    assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    loader = torch.utils.data.DataLoader(digits_dataset["train"].with_transform(train), batch_size=8, collate_fn=collator)
    assert next(iter(loader))["token_weights"].shape == (8, 9)


def types_namespace(**values):
    import types

    return types.SimpleNamespace(**values)
