#!/usr/bin/env python
# tl-align-hf test asset, not shipped: a stand-in for transformers'
# examples/pytorch/image-classification/run_image_classification.py (see README.md here for the upstream revision).
# The lines the README's diff touches, and the line around each, are upstream's exactly: the import blocks, the
# accuracy metric and its function, the `Trainer(...)` call. The rest does what upstream's does, shorter: one
# `main()` reading `sys.argv`, upstream's logging setup (`--log_level`, default info on the main process),
# `check_min_version`, an imagefolder from `--train_dir`/`--validation_dir`, torchvision transforms applied with
# `set_transform`, train, evaluate, save the metrics and the model card.
# ruff: noqa: I001 (upstream's import blocks, as upstream sorts them: the diff's context)

import logging
import os
import sys
from dataclasses import dataclass, field

import evaluate
import numpy as np
import torch
from datasets import load_dataset
from torchvision.transforms import (
    CenterCrop,
    Compose,
    Lambda,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToTensor,
)

import transformers
from transformers import (
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    TimmWrapperImageProcessor,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.utils import check_min_version
from transformers.utils.versions import require_version

logger = logging.getLogger(__name__)

check_min_version("4.57.0.dev0")  # the requirement of upstream's main at the recorded revision

require_version("datasets>=2.14.0", "To fix: pip install -r examples/pytorch/image-classification/requirements.txt")

MODEL_TYPES = tuple(config.model_type for config in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING)


@dataclass
class DataTrainingArguments:
    train_dir: str | None = field(default=None, metadata={"help": "A folder containing the training data."})
    validation_dir: str | None = field(default=None, metadata={"help": "A folder containing the validation data."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation examples."})
    image_column_name: str = field(default="image", metadata={"help": "The name of the image column."})
    label_column_name: str = field(default="label", metadata={"help": "The name of the label column."})


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Path to pretrained model or model identifier."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store the pretrained models."})
    model_revision: str = field(default="main", metadata={"help": "The specific model version to use."})
    token: str | None = field(default=None, metadata={"help": "The token for remote files."})
    ignore_mismatched_sizes: bool = field(default=False, metadata={"help": "Load a head of another size."})


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    # Upstream's logging setup: records of other loggers reach the root's stdout handler; transformers' have theirs.
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    set_seed(training_args.seed)

    data_files = {"train": os.path.join(data_args.train_dir, "**")}
    if data_args.validation_dir is not None:
        data_files["validation"] = os.path.join(data_args.validation_dir, "**")
    dataset = load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)

    def collate_fn(examples):
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        labels = torch.tensor([example[data_args.label_column_name] for example in examples])
        return {"pixel_values": pixel_values, "labels": labels}

    labels = dataset["train"].features[data_args.label_column_name].names
    label2id, id2label = {}, {}
    for i, label in enumerate(labels):
        label2id[label] = str(i)
        id2label[str(i)] = label

    # Load the accuracy metric from the datasets package
    metric = evaluate.load("accuracy", cache_dir=model_args.cache_dir)

    # Define our compute_metrics function. It takes an `EvalPrediction` object (a namedtuple with a
    # predictions and label_ids field) and has to return a dictionary string to float.
    def compute_metrics(p):
        """Computes accuracy on a batch of predictions"""
        return metric.compute(predictions=np.argmax(p.predictions, axis=1), references=p.label_ids)

    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(labels),
        label2id=label2id,
        id2label=id2label,
        finetuning_task="image-classification",
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
    )
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )
    image_processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)

    if isinstance(image_processor, TimmWrapperImageProcessor):
        _train_transforms, _val_transforms = image_processor.train_transforms, image_processor.val_transforms
    else:
        if "shortest_edge" in image_processor.size:
            size = image_processor.size["shortest_edge"]
        else:
            size = (image_processor.size["height"], image_processor.size["width"])
        if hasattr(image_processor, "image_mean") and hasattr(image_processor, "image_std"):
            normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
        else:
            normalize = Lambda(lambda x: x)
        _train_transforms = Compose([RandomResizedCrop(size), RandomHorizontalFlip(), ToTensor(), normalize])
        _val_transforms = Compose([Resize(size), CenterCrop(size), ToTensor(), normalize])

    def transforms_of(transform):
        def apply(example_batch):
            images = example_batch[data_args.image_column_name]
            example_batch["pixel_values"] = [transform(image.convert("RGB")) for image in images]
            return example_batch

        return apply

    for split, transform, max_samples, wanted in (
        ("train", _train_transforms, data_args.max_train_samples, training_args.do_train),
        ("validation", _val_transforms, data_args.max_eval_samples, training_args.do_eval),
    ):
        if wanted:
            if max_samples is not None:
                dataset[split] = dataset[split].shuffle(seed=training_args.seed).select(range(max_samples))
            dataset[split].set_transform(transforms_of(transform))

    # Initialize our trainer
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"] if training_args.do_train else None,
        eval_dataset=dataset["validation"] if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=collate_fn,
    )

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    kwargs = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "image-classification",
        "tags": ["image-classification", "vision"],
    }
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)


if __name__ == "__main__":
    main()
