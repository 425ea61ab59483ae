#!/usr/bin/env python
"""Fine-tune a vision transformer for image classification with data mixing and Token-Label Alignment.

Shaped like transformers' examples/pytorch/image-classification/run_image_classification.py, with `Trainer`
replaced by `TLAlignTrainer` and `TrainingArguments` by `TLAlignConfig` (which adds the mixing settings).

    # Built-in default: a small ViT trained from scratch on scikit-learn's bundled digits, about two minutes on CPU.
    python examples/run_image_classification.py

    # Any Hub ViT / DeiT on any image-classification dataset.
    python examples/run_image_classification.py --model_name_or_path google/vit-base-patch16-224-in21k \
        --dataset_name beans --output_dir outputs/vit-beans --do_train --do_eval --mixing_method cutmix

    # A config file (.json or .yaml); flags given after it override its values.
    python examples/run_image_classification.py --config examples/configs/digits.json --num_train_epochs 5

    # The paper's ImageNet training of DeiT-Small with TL-Align (docs/recipes.md), on 8 GPUs.
    accelerate launch --multi_gpu --num_processes 8 examples/run_image_classification.py \
        --config examples/recipes/deit_small_tl_align.yaml --train_dir imagenet/train --validation_dir imagenet/val
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
import yaml
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    BitImageProcessor,
    HfArgumentParser,
    TimmWrapperConfig,
    ViTConfig,
)
from transformers.image_utils import PILImageResampling
from transformers.trainer_utils import get_last_checkpoint

from tl_align_hf import TLAlignConfig, TLAlignTrainer, to_tl_align
from tl_align_hf.support import (
    AUGMENTATIONS,
    DEIT_RECIPE,
    default_digits_dir,
    default_image_processor,
    deit_augmentation,
    label_maps,
    load_image_dataset,
    make_transforms,
    prepare_image_dataset,
    processor_resolution_differs,
    set_drop_path_rate,
    write_digits_imagefolder,
)

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "digits.json"
# The built-in model: a small ViT for 32 px images, 8 x 8 patches of 4 px.
BUILTIN_VIT = dict(
    image_size=32,
    patch_size=4,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=128,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


@dataclass
class DataTrainingArguments:
    """Arguments pertaining to what data we are going to input our model for training and eval."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Name of a dataset from the Hub (could be your own, possibly private)."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The configuration name of the dataset to use (via the datasets library)."}
    )
    train_dir: str | None = field(default=None, metadata={"help": "A folder containing the training data."})
    validation_dir: str | None = field(default=None, metadata={"help": "A folder containing the validation data."})
    train_val_split: float | None = field(
        default=0.15, metadata={"help": "Percent to split off of train for validation, when there is no validation split."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "For debugging or quicker training, truncate the number of training examples."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "For debugging or quicker training, truncate the number of evaluation examples."}
    )
    image_column_name: str = field(default="image", metadata={"help": "The dataset column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "The dataset column holding the labels."})
    use_digits: bool = field(
        default=False,
        metadata={"help": "Train on scikit-learn's bundled digits (written once to a local image folder)."},
    )
    horizontal_flip: bool = field(default=True, metadata={"help": "Random horizontal flips in training."})
    crop_scale_min: float = field(
        default=0.08, metadata={"help": "Smallest area fraction kept by the random resized crop in training."}
    )
    augmentation: str = field(
        default="default",
        metadata={
            "help": "Training augmentation: default (torchvision crop and flip sized from the image processor) or "
            "deit (the DeiT recipe: timm's RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, bicubic; also "
            "sets its mixing defaults: mixup_alpha 0.8, cutmix_alpha 1.0, switch_prob 0.5, label_smoothing 0.1).",
            "choices": list(AUGMENTATIONS),
        },
    )
    verify_images: bool = field(
        default=False,
        metadata={"help": "Read every training image once before training and list those that cannot be read "
                  "(the validation images are always checked)."},
    )

    def __post_init__(self):
        sources = [self.dataset_name is not None, self.train_dir is not None or self.validation_dir is not None, self.use_digits]
        if sum(sources) != 1:
            raise ValueError(
                "Give exactly one data source: --dataset_name, --train_dir/--validation_dir, or --use_digits "
                "(running the script with no arguments uses the built-in digits default)."
            )


@dataclass
class ModelArguments:
    """Arguments pertaining to which model/config/image processor we are going to fine-tune from."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Path or Hub id of a pretrained ViT/DeiT; None trains the built-in small ViT from scratch."},
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Pretrained config name or path, if not the same as model_name_or_path."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to store the pretrained models downloaded from the Hub."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "The specific model version to use (a branch name, tag name or commit id)."}
    )
    image_processor_name: str | None = field(default=None, metadata={"help": "Name or path of the image processor."})
    token: str | None = field(
        default=None, metadata={"help": "The token for remote files (default: the one from `hf auth login`)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Whether to allow custom models defined on the Hub in their own modeling files."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Will enable to load a pretrained model whose head dimensions are different."},
    )
    image_size: int = field(default=32, metadata={"help": "Image size of the built-in ViT (model_name_or_path=None)."})
    timm_model: str | None = field(
        default=None,
        metadata={"help": "A timm architecture to train from scratch through TimmWrapperForImageClassification (e.g. "
                  "deit_small_patch16_224); built locally, no Hub access. Instead of model_name_or_path."},
    )
    timm_model_args: dict | str | None = field(
        default=None,
        metadata={"help": "JSON of further timm.create_model arguments for --timm_model (e.g. '{\"img_size\": 32}')."},
    )
    crop_pct: float | None = field(
        default=None,
        metadata={"help": "Evaluation of --timm_model: resize the shorter side to input size / crop_pct, then centre "
                  "crop (DeiT: 0.875, 256 -> 224); None: the timm model's own."},
    )
    drop_path_rate: float | None = field(
        default=None,
        metadata={"help": "Stochastic depth of the last block (timm models, BEiT, DINOv2, Swin, ...; DeiT: 0.1); "
                  "None keeps the model's own. transformers' ViT and DeiT have none."},
    )

    def __post_init__(self):
        if self.timm_model is not None and self.model_name_or_path is not None:
            raise ValueError("Give either --timm_model (a timm architecture from scratch) or --model_name_or_path.")
        if (self.timm_model_args is not None or self.crop_pct is not None) and self.timm_model is None:
            raise ValueError("--timm_model_args and --crop_pct are settings of --timm_model; give --timm_model too.")
        if isinstance(self.timm_model_args, str):
            self.timm_model_args = json.loads(self.timm_model_args)


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataTrainingArguments, TLAlignConfig))


def read_config_file(path: str | os.PathLike) -> dict:
    """Settings from a .json or .yaml file."""
    text = Path(path).read_text()
    values = yaml.safe_load(text) if str(path).endswith((".yaml", ".yml")) else json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a mapping of argument names to values.")
    return values


def parse_args(argv: list[str] | None = None):
    """(model_args, data_args, training_args); no arguments at all runs the built-in digits default.

    `--config FILE` (.json or .yaml) sets defaults that the other flags override.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["--config", str(DEFAULT_CONFIG)]
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):  # transformers' single-file form
        argv = ["--config", argv[0]]
    parser = make_parser()
    if launched_without_accelerator():
        parser.set_defaults(use_cpu=True, dataloader_pin_memory=False)
    if "--config" in argv:
        position = argv.index("--config")
        if position + 1 >= len(argv):
            raise ValueError("--config needs a file path.")
        config_values = read_config_file(argv[position + 1])
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(config_values) - known)
        if unknown:
            raise ValueError(f"Unknown settings in {argv[position + 1]}: {unknown}.")
        parser.set_defaults(**config_values)
        argv = argv[:position] + argv[position + 2 :]
    if "deit" in argv and argv[argv.index("deit") - 1] == "--augmentation":
        parser.set_defaults(**DEIT_RECIPE)  # the recipe's mixing settings, unless flags say otherwise
    return parser.parse_args_into_dataclasses(args=argv)


def launched_without_accelerator() -> bool:
    """Under torchrun / accelerate launch on a machine without GPUs (then `use_cpu` must default to True).

    Without `use_cpu`, transformers would set up every process as a separate single-process run there.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def setup_logging(training_args: TLAlignConfig) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def last_checkpoint_of(training_args: TLAlignConfig) -> str | None:
    """The newest checkpoint in output_dir, to resume from when training is started again."""
    if not (os.path.isdir(training_args.output_dir) and training_args.do_train):
        return None
    checkpoint = get_last_checkpoint(training_args.output_dir)
    if checkpoint is not None and training_args.resume_from_checkpoint is None:
        logger.warning(
            f"Checkpoint detected, resuming training at {checkpoint}. To train from scratch, change --output_dir "
            "(or remove its checkpoint-* folders)."
        )
    return checkpoint


def load_data(data_args: DataTrainingArguments, model_args: ModelArguments, training_args: TLAlignConfig):
    if data_args.use_digits:
        root = write_digits_imagefolder(default_digits_dir(model_args.image_size), image_size=model_args.image_size)
        data_args.train_dir, data_args.validation_dir = str(root / "train"), str(root / "validation")
    dataset = load_image_dataset(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_dir=data_args.train_dir,
        validation_dir=data_args.validation_dir,
        cache_dir=model_args.cache_dir,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
        train_val_split=data_args.train_val_split,
        seed=training_args.seed,
        label_column_name=data_args.label_column_name,
    )
    verify = ["validation"] if training_args.do_eval else []  # a bad validation image would stop after training
    if data_args.verify_images and training_args.do_train:
        verify.append("train")
    return prepare_image_dataset(dataset, data_args.image_column_name, data_args.label_column_name, verify)


def timm_image_processor(timm_model, crop_pct: float | None = None) -> BitImageProcessor:
    """timm's evaluation transform of `timm_model` as an image processor: resize the shorter side to
    input / crop_pct (DeiT: 224 / 0.875 = 256), centre crop to the input size, normalise with its mean and std.
    `crop_pct` None takes the timm model's own (its pretrained config's)."""
    from timm.data import resolve_model_data_config

    data_config = resolve_model_data_config(timm_model)
    data_config["crop_pct"] = crop_pct or data_config["crop_pct"]
    height, width = timm_model.patch_embed.img_size if hasattr(timm_model, "patch_embed") else data_config["input_size"][1:]
    resample = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}
    return BitImageProcessor(
        size={"shortest_edge": int(height / data_config["crop_pct"])},
        resample=resample.get(data_config["interpolation"], PILImageResampling.BICUBIC),
        crop_size={"height": height, "width": width},
        image_mean=list(data_config["mean"]),
        image_std=list(data_config["std"]),
    )


def load_model_and_processor(model_args: ModelArguments, label2id: dict, id2label: dict):
    """A pretrained model (converted with `to_tl_align`), a timm architecture from scratch, or the built-in small
    ViT, and its image processor; `drop_path_rate` is set on the config before the model is built."""
    if model_args.timm_model is not None:
        config = TimmWrapperConfig(
            architecture=model_args.timm_model, model_args=model_args.timm_model_args, label2id=label2id, id2label=id2label
        )
        if model_args.drop_path_rate is not None:
            set_drop_path_rate(config, model_args.drop_path_rate)
        model = AutoModelForImageClassification.from_config(config)
        return to_tl_align(model), timm_image_processor(model.timm_model, model_args.crop_pct)
    if model_args.model_name_or_path is None:
        config = ViTConfig(**{**BUILTIN_VIT, "image_size": model_args.image_size}, label2id=label2id, id2label=id2label)
        if model_args.drop_path_rate is not None:
            set_drop_path_rate(config, model_args.drop_path_rate)
        model = AutoModelForImageClassification.from_config(config)
        return to_tl_align(model), default_image_processor(model_args.image_size)
    hub_kwargs = dict(
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path,
        num_labels=len(label2id),
        label2id=label2id,
        id2label=id2label,
        finetuning_task="image-classification",
        **hub_kwargs,
    )
    if model_args.drop_path_rate is not None:
        set_drop_path_rate(config, model_args.drop_path_rate)
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **hub_kwargs,
    )
    image_processor = AutoImageProcessor.from_pretrained(
        model_args.image_processor_name or model_args.model_name_or_path, **hub_kwargs
    )
    return to_tl_align(model), image_processor


def select_split(dataset, name: str, max_samples: int | None, seed: int):
    if name not in dataset:
        raise ValueError(f"--do_{'train' if name == 'train' else 'eval'} requires a {name} split.")
    if max_samples is not None and max_samples < 1:
        option = "max_train_samples" if name == "train" else "max_eval_samples"
        raise ValueError(f"--{option} must be at least 1 (got {max_samples}); leave it out to use the whole split.")
    split = dataset[name]
    if max_samples is not None:
        split = split.shuffle(seed=seed).select(range(min(max_samples, len(split))))
    return split


def main(argv: list[str] | None = None) -> dict:
    """Run training and evaluation; return the final metrics (train and eval)."""
    model_args, data_args, training_args = parse_args(argv)
    setup_logging(training_args)
    logger.warning(
        f"Process rank: {training_args.process_index}, device: {training_args.device}, n_gpu: {training_args.n_gpu}, "
        f"distributed training: {training_args.parallel_mode.value == 'distributed'}"
    )
    logger.info(f"Training/evaluation parameters {training_args}")
    last_checkpoint = last_checkpoint_of(training_args)
    transformers.set_seed(training_args.seed)

    # Dataset, label maps, model and image processor.
    dataset = load_data(data_args, model_args, training_args)
    label2id, id2label = label_maps(dataset, data_args.label_column_name)
    model, image_processor = load_model_and_processor(model_args, label2id, id2label)
    if not training_args.interpolate_pos_encoding and processor_resolution_differs(model, image_processor):
        training_args.interpolate_pos_encoding = True  # e.g. a 224 checkpoint with a 384 image processor
        logger.info("The image processor's size differs from the model's image_size: interpolate_pos_encoding=True.")

    # Transforms, applied on the fly with `with_transform`.
    train_transform, eval_transform = make_transforms(
        image_processor,
        data_args.image_column_name,
        data_args.label_column_name,
        horizontal_flip=data_args.horizontal_flip,
        scale=(data_args.crop_scale_min, 1.0),
        seed=training_args.seed,
        augmentation=deit_augmentation(image_processor) if data_args.augmentation == "deit" else None,
    )
    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_split = select_split(dataset, "train", data_args.max_train_samples, training_args.seed)
        train_dataset = train_split.with_transform(train_transform)
    if training_args.do_eval:
        eval_split = select_split(dataset, "validation", data_args.max_eval_samples, training_args.seed)
        eval_dataset = eval_split.with_transform(eval_transform)

    trainer = TLAlignTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=image_processor,
    )

    # Training.
    metrics = {}
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        metrics.update(train_result.metrics)

    # Evaluation.
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
        if trainer.is_world_process_zero():
            print(
                f"\nEval accuracy: {eval_metrics['eval_accuracy']:.4f} (top-5 {eval_metrics['eval_top5_accuracy']:.4f}) "
                f"on {len(eval_dataset)} validation images, {len(label2id)} classes."
            )

    # Model card, and push to the Hub when asked.
    card_kwargs = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "image-classification",
        "dataset": data_args.dataset_name or ("scikit-learn digits" if data_args.use_digits else None),
        "tags": ["image-classification", "vision"],
    }
    if training_args.push_to_hub:
        trainer.push_to_hub(**card_kwargs)
    elif trainer.is_world_process_zero():
        trainer.create_model_card(**card_kwargs)
    return metrics


if __name__ == "__main__":
    main()
